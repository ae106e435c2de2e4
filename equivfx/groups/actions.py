"""Actions of finite groups on tensors.

An :class:`Action` is a frozen dataclass describing *how* group elements move a tensor. It is bound
to its group (``action.bind(G)``; a group's own ``G.action`` comes bound) because it needs the group
to turn a slot index into a canonical form (``r^k f^m``, a permutation, a word). All actions are
left actions: ``e.x = x`` and ``(gh).x = g.(h.x)``; :func:`check_action_law` measures both.

Exact actions only move entries (rot90, flips, rolls, set permutations, slot permutations) and
satisfy the law bitwise; interpolated rotations (C8, C16, ...) are approximate and their error is
measured.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

from equivfx.errors import ActionLawError, InputShapeError, explain

if TYPE_CHECKING:
    from equivfx.groups.finite import Element, FiniteGroup

__all__ = [
    "Action",
    "CallableAction",
    "PermuteAction",
    "ProductAction",
    "RegularAction",
    "Restriction",
    "ReverseAction",
    "RollAction",
    "RotFlipAction",
    "ShiftReverseAction",
    "TrivialAction",
    "WordAction",
    "check_action_law",
]


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _norm_axis(axis: int, ndim: int) -> int:
    return axis if axis < 0 else axis - ndim


@dataclass(frozen=True)
class Action:
    """Base class: a left action of a finite group on tensors.

    Subclasses implement ``_apply(index, x)`` (and usually ``check``). Properties describe the
    action to the compiler: ``exact`` (the law holds bitwise), ``axes`` (negative indices of the
    axes it touches, ``()`` for trivial), ``is_permutation`` (it only moves entries), ``linear``
    (linear in ``x``).

    Attributes:
        group: the group this action is bound to (``None`` until :meth:`bind`).
    """

    group: FiniteGroup | None = field(default=None, kw_only=True, repr=False)

    # ---------------------------------------------------------------------------- description
    @property
    def exact(self) -> bool:
        """Whether the action law holds bitwise (no interpolation)."""
        return True

    @property
    def axes(self) -> tuple[int, ...]:
        """The axes the action touches (negative indices where possible); ``()`` if none."""
        return ()

    @property
    def is_permutation(self) -> bool:
        """Whether each element only moves entries of the tensor."""
        return False

    @property
    def linear(self) -> bool:
        """Whether each element acts linearly on the tensor."""
        return True

    def describe(self) -> str:
        """A one-line human description, e.g. ``"C4 rotates axes (-2, -1) by 90 degrees"``."""
        return f"{self._label()} acts by {type(self).__name__}"

    def _label(self) -> str:
        return self.group.spec if self.group is not None else type(self).__name__

    # ---------------------------------------------------------------------------- binding
    def bind(self, group: FiniteGroup) -> Action:
        """Return a copy of this action bound to ``group``.

        Raises:
            ActionLawError: the action cannot be an action of this group (wrong order ...).
        """
        self._validate(group)
        return replace(self, group=group)

    def _validate(self, group: FiniteGroup) -> None:
        """Hook: raise ActionLawError if this action does not fit ``group``."""

    def _need_group(self) -> FiniteGroup:
        if self.group is None:
            raise ActionLawError(
                explain(
                    f"{type(self).__name__} is not bound to a group",
                    self,
                    "an action bound with action.bind(G)",
                    "use G.action or action.bind(G)",
                )
            )
        return self.group

    def _index(self, g: Element | int | str) -> int:
        if self.group is not None:
            return self.group.element(g).index
        return operator.index(g)

    def restrictions(self) -> tuple[Restriction, ...]:
        """Proper subgroups of the bound group, each with this action restricted to it and
        written as an action the rule table reasons about (a :class:`RollAction` for the shifts
        of a :class:`ShiftReverseAction`, one factor of a :class:`ProductAction`, ...).

        A cost pass that finds ops commuting with, or invariant under, a subgroup's action saves
        work for that subgroup even where the whole group's action has no such op
        (``eliminate-dead-slots``). Only subgroups whose restricted action is one of the rule
        table's kinds are listed, not every subgroup. Empty by default (and for Cn, Shiftn,
        Permn: no listed subgroup).

        Example:
            >>> from equivfx.groups import group
            >>> for r in group("ShiftRev4").action.restrictions():
            ...     print(r.elements, r.action.describe())
            (0, 1, 2, 3) Shift4 rolls axis -1 by multiples of 1/4 of its length
            (0, 4) Rev reverses axis -1
        """
        return ()

    # ---------------------------------------------------------------------------- applying
    def check(self, x: torch.Tensor) -> None:
        """Raise InputShapeError if ``x`` does not fit this action."""
        if not isinstance(x, torch.Tensor):
            raise InputShapeError(
                explain(
                    f"{self._label()} acts on tensors",
                    type(x).__name__,
                    "a torch.Tensor",
                    "convert the input with torch.as_tensor",
                )
            )
        axes = self.axes
        if axes:
            need = max(-a if a < 0 else a + 1 for a in axes)  # dimensions the axes need
            if x.ndim < need:
                raise InputShapeError(
                    explain(
                        f"{self._label()} acts on axes {axes}, which the input lacks (input shape)",
                        _shape(x),
                        f"at least {need} dimensions",
                        "add the missing axes (e.g. x.unsqueeze(0))",
                    )
                )

    def kernel(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Slot indices of the elements that act as the identity on every tensor of ``shape``.

        Exact for actions that only move entries: each element is applied to a tensor of distinct
        entries. Other actions report the identity alone. The kernel is a normal subgroup.

        Example:
            >>> from equivfx.groups import group
            >>> G = group("D4")
            >>> G.action.kernel((1, 3, 1, 1)) == tuple(range(8)), G.action.kernel((1, 3, 2, 2))
            (True, (0,))
        """
        G = self._need_group()
        if not self.is_permutation:
            return (0,)
        probe = torch.arange(math.prod(shape), dtype=torch.float64).reshape(tuple(shape))
        try:
            self.check(probe)
        except InputShapeError:
            return (0,)
        return tuple(i for i in range(G.order) if torch.equal(self._apply(i, probe), probe))

    def apply(self, g: Element | int | str, x: torch.Tensor) -> torch.Tensor:
        """Return ``g . x``.

        Args:
            g: an element of the bound group (Element, slot index or name).
            x: the input tensor.

        Raises:
            InputShapeError: ``x`` does not fit the action (see :meth:`check`).
        """
        i = self._index(g)
        self.check(x)
        return self._apply(i, x)

    def _apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_all(
        self, x: torch.Tensor, elements: Iterable[Element | int] | None = None
    ) -> torch.Tensor:
        """Stack ``g . x`` for each element on a new leading axis (default: all, in slot order)."""
        if elements is None:
            elements = range(self._need_group().order)
        self.check(x)
        return torch.stack([self._apply(self._index(g), x) for g in elements])


class Restriction(NamedTuple):
    """A subgroup of an action's group and the action restricted to it (see
    :meth:`Action.restrictions`).

    Attributes:
        elements: the subgroup's elements as slot indices of the whole group, in the slot order
            of the restricted action's own group (``elements[i]`` is its slot i; the identity
            first).
        action: the restriction, bound to a group isomorphic to the subgroup.
    """

    elements: tuple[int, ...]
    action: Action


# ==================================================================================== geometric
@dataclass(frozen=True)
class RotFlipAction(Action):
    """Rotations (and flips) of the last two axes: ``r^k f^m`` acts as ``rot_k(flip_m(x))``.

    ``f`` flips the last axis (left-right); ``r`` rotates by 360/n degrees counter-clockwise in the
    sense of ``torch.rot90(x, 1, (-2, -1))``. Multiples of 90 degrees use ``torch.rot90`` (exact);
    other angles use bilinear interpolation about the centre with zero padding (approximate). Slot
    index of ``r^k f^m`` is ``k + n*m``.

    Attributes:
        n: rotation order.
        dihedral: whether the flip ``f`` is included (Dn) or not (Cn).
        axes: the (row, column) axes, default ``(-2, -1)``.

    Example:
        >>> from equivfx.groups import group
        >>> group("D4").act("rf", torch.tensor([[1, 2], [3, 4]])).tolist()
        [[1, 3], [2, 4]]
    """

    n: int = 4
    dihedral: bool = False
    axes: tuple[int, int] = (-2, -1)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ActionLawError(explain("rotation order must be a positive int", self.n))
        if len(tuple(self.axes)) != 2:
            raise ActionLawError(explain("RotFlipAction needs two axes", self.axes, "(row, col)"))
        object.__setattr__(self, "axes", tuple(int(a) for a in self.axes))

    @property
    def exact(self) -> bool:
        return self.n in (1, 2, 4)

    @property
    def is_permutation(self) -> bool:
        return self.exact

    def _label(self) -> str:
        if self.group is not None:
            return self.group.spec
        return f"{'D' if self.dihedral else 'C'}{self.n}"

    def describe(self) -> str:
        flip = " and flips the last axis" if self.dihedral else ""
        how = "exactly" if self.exact else "by bilinear interpolation"
        return f"{self._label()} rotates axes {self.axes} by {360 / self.n:g} degrees{flip} ({how})"

    def _validate(self, group: FiniteGroup) -> None:
        want = self.n * (2 if self.dihedral else 1)
        if group.order != want:
            raise ActionLawError(
                explain(f"{self._label()} action bound to a group of another order", group, want)
            )

    @property
    def _needs_square(self) -> bool:
        return self.n not in (1, 2)

    def check(self, x: torch.Tensor) -> None:
        super().check(x)
        if self._needs_square and x.shape[self.axes[0]] != x.shape[self.axes[1]]:
            where = "the last two axes" if self.axes == (-2, -1) else f"axes {self.axes}"
            raise InputShapeError(
                explain(
                    f"{self._label()} rotates {where}, which must be square (input shape)",
                    _shape(x),
                    f"shape[{self.axes[0]}] == shape[{self.axes[1]}]",
                    "pad or crop to a square, or use D1/D2 (flips), which accept rectangles",
                )
            )

    def _apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        k, m = index % self.n, index // self.n
        if m:
            x = torch.flip(x, (self.axes[1],))
        return self._rotate(x, k)

    def restrictions(self) -> tuple[Restriction, ...]:
        """Dn: its rotations (Cn, slots 0..n-1) and the flip ``f`` (slot n, a reversal of the
        last axis). Cn: none."""
        if not self.dihedral:
            return ()
        from equivfx.groups.catalogue import cyclic, reversal

        n, col = self._need_group().order // 2, self.axes[1]
        rotations = replace(self, dihedral=False, group=None).bind(cyclic(n))
        return (
            Restriction(tuple(range(n)), rotations),
            Restriction((0, n), ReverseAction(col).bind(reversal(col))),
        )

    def _rotate(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if k == 0:
            return x
        if (4 * k) % self.n == 0:
            return torch.rot90(x, 4 * k // self.n, self.axes)
        return _rotate_bilinear(x, 2 * math.pi * k / self.n, self.axes)


def _rotate_bilinear(x: torch.Tensor, angle: float, axes: tuple[int, int]) -> torch.Tensor:
    """Rotate counter-clockwise (as ``torch.rot90``) by ``angle`` radians about the centre."""
    y = x.movedim(axes, (-2, -1))
    lead, (h, w) = y.shape[:-2], y.shape[-2:]
    dtype = y.dtype if y.dtype in (torch.float32, torch.float64) else torch.float32
    y4 = y.reshape(1, -1, h, w).to(dtype)
    c, s = math.cos(angle), math.sin(angle)
    # Output pixel (x_out, y_out) (x = column, y = row, normalised) samples the input at
    # (c*x - s*y, s*x + c*y): at 90 degrees, out[i, j] = in[j, W-1-i], which is torch.rot90.
    theta = torch.tensor([[[c, -s, 0.0], [s, c, 0.0]]], dtype=dtype, device=y.device)
    grid = F.affine_grid(theta, [1, y4.shape[1], h, w], align_corners=False)
    out = F.grid_sample(y4, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.reshape(*lead, h, w).to(x.dtype)
    return out.movedim((-2, -1), axes)


# ==================================================================================== sequences
def _divisor_hint(length: int, n: int) -> str:
    divisors = [d for d in range(2, length + 1) if length % d == 0 and d <= max(n, 2) * 2]
    mult = ((length + n - 1) // n) * n
    hint = f"pad or crop the axis to a multiple of {n} (e.g. {mult})"
    if divisors:
        hint += f", or use a shift order dividing {length} (e.g. Shift{divisors[-1]})"
    return hint


def _check_axis(label: str, x: torch.Tensor, axis: int) -> None:
    if not -x.ndim <= axis < x.ndim:
        raise InputShapeError(
            explain(
                f"{label} acts on axis {axis}, which the input lacks (input shape)",
                _shape(x),
                f"at least {axis + 1 if axis >= 0 else -axis} dimensions",
                "add the axis or choose another one with '@axis'",
            )
        )


@dataclass(frozen=True)
class RollAction(Action):
    """Cyclic shifts Z_n of one axis: element k rolls by ``k * L / n`` (L = length of the axis).

    Example:
        >>> from equivfx.groups import group
        >>> group("Shift4").act(1, torch.arange(4)).tolist()
        [3, 0, 1, 2]
    """

    n: int = 2
    axis: int = -1

    @property
    def axes(self) -> tuple[int, ...]:
        return (self.axis,)

    @property
    def is_permutation(self) -> bool:
        return True

    def describe(self) -> str:
        return f"{self._label()} rolls axis {self.axis} by multiples of 1/{self.n} of its length"

    def _validate(self, group: FiniteGroup) -> None:
        if group.order != self.n:
            raise ActionLawError(explain("RollAction bound to a group of another order", group))

    def check(self, x: torch.Tensor) -> None:
        Action.check(self, x)
        _check_axis(self._label(), x, self.axis)
        length = x.shape[self.axis]
        if length % self.n:
            raise InputShapeError(
                explain(
                    f"{self._label()} shifts axis {self.axis} by 1/{self.n} of its length, which "
                    f"must be divisible by {self.n} (input shape)",
                    _shape(x),
                    f"shape[{self.axis}] % {self.n} == 0",
                    _divisor_hint(length, self.n),
                )
            )

    def _apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return x
        return torch.roll(x, index * (x.shape[self.axis] // self.n), self.axis)


@dataclass(frozen=True)
class ReverseAction(Action):
    """The reversal of one axis (order 2): element 1 is ``torch.flip(x, (axis,))``."""

    axis: int = -1

    @property
    def axes(self) -> tuple[int, ...]:
        return (self.axis,)

    @property
    def is_permutation(self) -> bool:
        return True

    def describe(self) -> str:
        return f"{self._label()} reverses axis {self.axis}"

    def check(self, x: torch.Tensor) -> None:
        Action.check(self, x)
        _check_axis(self._label(), x, self.axis)

    def _apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, (self.axis,)) if index else x


@dataclass(frozen=True)
class ShiftReverseAction(RollAction):
    """Shifts and the reversal of one axis (dihedral): ``s^k v^m`` acts as ``roll_k(flip_m(x))``.

    The slot index of ``s^k v^m`` is ``k + n*m``.
    """

    def describe(self) -> str:
        return (
            f"{self._label()} rolls axis {self.axis} by multiples of 1/{self.n} of its length "
            "and reverses it"
        )

    def _validate(self, group: FiniteGroup) -> None:
        if group.order != 2 * self.n:
            raise ActionLawError(
                explain("ShiftReverseAction bound to a group of another order", group)
            )

    def _apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        k, m = index % self.n, index // self.n
        if m:
            x = torch.flip(x, (self.axis,))
        return RollAction._apply(self, k, x)

    def restrictions(self) -> tuple[Restriction, ...]:
        """The shifts (slots 0..n-1, a :class:`RollAction`) and the reversal ``v`` (slot n)."""
        from equivfx.groups.catalogue import reversal, shift

        self._need_group()
        n, axis = self.n, self.axis
        return (
            Restriction(tuple(range(n)), RollAction(n, axis).bind(shift(n, axis))),
            Restriction((0, n), ReverseAction(axis).bind(reversal(axis))),
        )


# ==================================================================================== sets, slots
@dataclass(frozen=True)
class PermuteAction(Action):
    """Permutations of a set axis of length n: ``(sigma.x)[i] = x[sigma^-1(i)]`` (a left action).

    The bound group's elements must be permutations of ``range(n)`` (``G.permutations``), as for
    Perm{n}.

    Example:
        >>> from equivfx.groups import group
        >>> G = group("Perm3@-1")
        >>> G.act("(0 1 2)", torch.tensor([10, 11, 12])).tolist()
        [12, 10, 11]
    """

    n: int = 2
    axis: int = -2

    @property
    def axes(self) -> tuple[int, ...]:
        return (self.axis,)

    @property
    def is_permutation(self) -> bool:
        return True

    def describe(self) -> str:
        return f"{self._label()} permutes the {self.n} entries of axis {self.axis}"

    def _validate(self, group: FiniteGroup) -> None:
        if len(group.permutations[0]) != self.n:
            raise ActionLawError(
                explain(
                    "PermuteAction bound to a group of permutations of another set",
                    len(group.permutations[0]),
                    f"permutations of range({self.n})",
                )
            )

    def check(self, x: torch.Tensor) -> None:
        Action.check(self, x)
        _check_axis(self._label(), x, self.axis)
        if x.shape[self.axis] != self.n:
            raise InputShapeError(
                explain(
                    f"{self._label()} permutes {self.n} entries along axis {self.axis} "
                    "(input shape)",
                    _shape(x),
                    f"shape[{self.axis}] == {self.n}",
                    "move the set axis there, or choose its axis with '@axis' in the spec",
                )
            )

    def _apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return x
        sigma = self._need_group().permutations[index]
        inv = [0] * self.n
        for i, s in enumerate(sigma):
            inv[s] = i
        return torch.index_select(x, self.axis, torch.tensor(inv, device=x.device))


@dataclass(frozen=True)
class TrivialAction(Action):
    """Every element acts as the identity."""

    @property
    def is_permutation(self) -> bool:
        return True

    def describe(self) -> str:
        return f"{self._label()} acts trivially"

    def _apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class RegularAction(Action):
    """The regular action on a slot axis of length |G|: ``(h.s)[..., j] = s[..., perm[j]]``.

    Here ``perm = G.regular_permutation(h)``, i.e. ``(h.s)(g) = s(h^-1 g)``.

    Example:
        >>> from equivfx.groups import group
        >>> G = group("C4")
        >>> RegularAction(axis=-1).bind(G).apply("r", torch.tensor([10, 11, 12, 13])).tolist()
        [13, 10, 11, 12]
    """

    axis: int = 1

    @property
    def axes(self) -> tuple[int, ...]:
        return (self.axis,)

    @property
    def is_permutation(self) -> bool:
        return True

    def describe(self) -> str:
        return f"{self._label()} permutes the slots of axis {self.axis} (regular action)"

    def check(self, x: torch.Tensor) -> None:
        Action.check(self, x)
        _check_axis(self._label(), x, self.axis)
        order = self._need_group().order
        if x.shape[self.axis] != order:
            raise InputShapeError(
                explain(
                    f"the regular action of {self._label()} needs a slot axis {self.axis} of "
                    f"length {order} (input shape)",
                    _shape(x),
                    f"shape[{self.axis}] == {order}",
                    "pass the slot axis with RegularAction(axis=...)",
                )
            )

    def _apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return x
        perm = self._need_group().regular_permutation(index)
        return torch.index_select(x, self.axis, torch.tensor(perm, device=x.device))


# ==================================================================================== products
@dataclass(frozen=True)
class ProductAction(Action):
    """The action of a direct product: ``(a, b)`` acts as ``act_A(a, act_B(b, x))``.

    Factors must touch disjoint axes so that their actions commute.

    Attributes:
        factors: one action per factor group, in order.

    Raises:
        ActionLawError: two factors touch the same axis.
    """

    factors: tuple[Action, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "factors", tuple(self.factors))
        for i, a in enumerate(self.factors):
            for b in self.factors[i + 1 :]:
                self._disjoint(a, b, set(a.axes) & set(b.axes))

    @staticmethod
    def _disjoint(a: Action, b: Action, common: set[int]) -> None:
        if common:
            raise ActionLawError(
                explain(
                    f"product factors {a._label()} and {b._label()} both act on axes "
                    f"{sorted(common)}",
                    (a.describe(), b.describe()),
                    "factors acting on disjoint axes",
                    "move one factor to another axis with '@axis' (e.g. 'D4xShift8@-3')",
                )
            )

    @property
    def exact(self) -> bool:
        return all(a.exact for a in self.factors)

    @property
    def axes(self) -> tuple[int, ...]:
        return tuple(sorted({ax for a in self.factors for ax in a.axes}))

    @property
    def is_permutation(self) -> bool:
        return all(a.is_permutation for a in self.factors)

    @property
    def linear(self) -> bool:
        return all(a.linear for a in self.factors)

    def describe(self) -> str:
        return "; ".join(a.describe() for a in self.factors)

    def bind(self, group: FiniteGroup) -> Action:
        if len(group.factors) != len(self.factors):
            raise ActionLawError(
                explain(
                    "ProductAction bound to a group with another number of factors",
                    group,
                    f"a product of {len(self.factors)} groups",
                )
            )
        bound = tuple(a.bind(f) for a, f in zip(self.factors, group.factors, strict=True))
        return replace(self, group=group, factors=bound)

    def _digits(self, index: int) -> list[int]:
        digits = []
        for f in reversed(self._need_group().factors):
            index, d = divmod(index, f.order)
            digits.append(d)
        return digits[::-1]

    def check(self, x: torch.Tensor) -> None:
        Action.check(self, x)
        normalised = [{_norm_axis(ax, x.ndim) for ax in a.axes} for a in self.factors]
        for i, a in enumerate(self.factors):
            for j in range(i + 1, len(self.factors)):
                self._disjoint(a, self.factors[j], normalised[i] & normalised[j])
        for a in self.factors:
            a.check(x)

    def _apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        for a, d in zip(reversed(self.factors), reversed(self._digits(index)), strict=True):
            x = a._apply(d, x)
        return x

    def restrictions(self) -> tuple[Restriction, ...]:
        """Each factor (the elements whose other factors are the identity) and, within it, the
        factor's own restrictions."""
        factors = self._need_group().factors
        out = []
        for i, a in enumerate(self.factors):
            stride = math.prod(f.order for f in factors[i + 1 :])
            out.append(Restriction(tuple(d * stride for d in range(factors[i].order)), a))
            out += [
                Restriction(tuple(d * stride for d in r.elements), r.action)
                for r in a.restrictions()
            ]
        return tuple(out)


# ==================================================================================== user actions
@dataclass(frozen=True)
class CallableAction(Action):
    """A user action: ``fn(g, x)`` with ``g`` an :class:`Element` of the bound group.

    Attributes:
        fn: the callable.
        exact: whether the user vouches that the law holds bitwise.
        axes: the axes it touches (for the product disjointness check), default ``()``.
        linear: whether it is linear in ``x``.
    """

    fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    exact: bool = True
    axes: tuple[int, ...] = ()
    linear: bool = False

    def describe(self) -> str:
        return f"{self._label()} acts by {getattr(self.fn, '__name__', repr(self.fn))}"

    def _apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self._need_group().elements[index], x)


@dataclass(frozen=True)
class WordAction(Action):
    """A user action given on generators: an element acts through its word, right to left.

    For ``g = a1 * a2 * ... * ak`` (``G.word(g)``), ``g.x = a1(a2(...ak(x)))``.

    Attributes:
        generator_fns: ``(name, fn)`` pairs (a dict is accepted and converted), ``fn(x) -> x'``.
        exact: whether the user vouches that the law holds bitwise.
        axes: the axes it touches, default ``()``.
        linear: whether it is linear in ``x``.
    """

    generator_fns: tuple[tuple[str, Callable[[torch.Tensor], torch.Tensor]], ...] = ()
    exact: bool = True
    axes: tuple[int, ...] = ()
    linear: bool = False

    def __post_init__(self) -> None:
        fns = self.generator_fns
        items = tuple(fns.items()) if isinstance(fns, Mapping) else tuple(tuple(p) for p in fns)
        object.__setattr__(self, "generator_fns", items)

    def describe(self) -> str:
        names = ", ".join(n for n, _ in self.generator_fns)
        return f"{self._label()} acts through words in its generators ({names})"

    def _validate(self, group: FiniteGroup) -> None:
        names = {n for n, _ in self.generator_fns}
        if names != set(group.generator_names):
            raise ActionLawError(
                explain(
                    "actions must be given for exactly the generators",
                    sorted(names),
                    f"{sorted(group.generator_names)}",
                    "give one callable per generator name",
                )
            )

    def _apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        fns = dict(self.generator_fns)
        for a in reversed(self._need_group().word(index)):
            x = fns[a](x)
        return x


# ==================================================================================== the law
def _mismatch(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        raise ActionLawError(
            explain(
                f"action law broken: {what} returns tensors of different shapes",
                (tuple(getattr(a, "shape", ())), tuple(getattr(b, "shape", ()))),
                "actions that keep the shape of the input",
            )
        )
    if a.numel() == 0:
        return 0.0
    if a.is_complex() or b.is_complex():
        return float((a.to(torch.complex128) - b.to(torch.complex128)).abs().max())
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max())


def check_action_law(
    group: FiniteGroup,
    action: Action | None,
    x: torch.Tensor,
    atol: float | None = None,
) -> dict[str, float]:
    """Measure the action law on ``x``: ``a.(b.x) == (a*b).x`` for each generator a, element b.

    Also measures ``e.x == x`` (reported under the key ``"e"``, which no generator may be named)
    and, for products, that generators of different factors commute in their action (folded into
    both generators' errors). Errors are max |difference| computed in float64.

    Args:
        group: the group.
        action: the action (bound to ``group`` here if needed); ``None`` for ``group.action``.
        x: a probe tensor that fits the action.
        atol: for inexact actions, raise if an error exceeds it (default: only measure).

    Returns:
        ``{generator name: max error}`` plus ``{"e": identity error}``.

    Raises:
        ActionLawError: an exact action with any nonzero mismatch, or an error above ``atol``;
            the message names the generator, the element and the size of the mismatch.

    Example:
        >>> from equivfx.groups import group
        >>> check_action_law(group("D4"), None, torch.rand(2, 5, 5))
        {'e': 0.0, 'r': 0.0, 'f': 0.0}
    """
    act = group.action if action is None else action
    if act.group is None or act.group is not group:
        act = act.bind(group)
    act.check(x)
    limit = 0.0 if act.exact else atol
    kind = "exact action" if act.exact else f"atol={atol}"

    def fail(where: str, err: float) -> None:
        if limit is not None and err > limit:
            raise ActionLawError(
                explain(
                    f"{group.spec} action law broken {where} (max |difference|)",
                    err,
                    f"{limit} ({kind}; {act.describe()})",
                    "make each generator's action agree with the group's multiplication "
                    "(a generator of order k must act with order k)",
                )
            )

    xs = [act._apply(i, x) for i in range(group.order)]
    errors: dict[str, float] = {}
    err_e = _mismatch(xs[0], x, "e.x vs x")
    fail("at the identity: e.x != x", err_e)
    errors["e"] = err_e
    for gname, a in zip(group.generator_names, group.generators, strict=True):
        worst = 0.0
        for b in group.elements:
            ab = group.compose(a, b)
            err = _mismatch(act._apply(a.index, xs[b.index]), xs[ab.index], f"{a}.({b}.x)")
            fail(f"for generator {gname!r} at element {b.name!r}: {a}.({b}.x) != ({ab}).x", err)
            worst = max(worst, err)
        errors[gname] = max(worst, errors.get(gname, 0.0))
    if group.factors:
        gens = list(zip(group.generator_names, group.generators, strict=True))
        for i, (an, a) in enumerate(gens):
            for bn, b in gens[i + 1 :]:
                if group.compose(a, b) != group.compose(b, a):
                    continue
                ab = act._apply(a.index, act._apply(b.index, x))
                ba = act._apply(b.index, act._apply(a.index, x))
                err = _mismatch(ab, ba, f"{a} and {b}")
                fail(f"generators {an!r} and {bn!r} do not commute in their action", err)
                errors[an] = max(errors[an], err)
                errors[bn] = max(errors[bn], err)
    return errors
