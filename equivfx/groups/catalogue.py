"""The group catalogue: factories, user groups, and the spec parser :func:`group`.

Spec strings (``repr(G)`` of every group parses back to an equal group)::

    C1 C2 C4 D1 D2 D4           exact rotations / flips of the last two axes
    Cn Dn (any n >= 1)          C3, C8, D8 ...: interpolated where not a multiple of 90 degrees
    Shift{n}[@axis]             cyclic shifts of a sequence axis (default -1), generator "s"
    Rev[@axis]                  reversal of a sequence axis (default -1), generator "v"
    ShiftRev{n}[@axis]          shifts and reversal (dihedral), generators "s", "v"
    Perm{n}[@axis]              symmetric group on a set axis (default -2), generators "t", "c"
    AxB[xC...]                  direct products, e.g. D4xShift8@-3
    <name>                      a user group registered by from_generators / from_table
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from itertools import product as _cartesian

import torch

from equivfx.errors import GroupLawError, GroupSpecError, explain
from equivfx.groups.actions import (
    PermuteAction,
    ProductAction,
    ReverseAction,
    RollAction,
    RotFlipAction,
    ShiftReverseAction,
    WordAction,
    check_action_law,
)
from equivfx.groups.finite import MAX_ORDER, FiniteGroup, check_group_laws, closure

__all__ = [
    "VALID_SPECS",
    "cyclic",
    "dihedral",
    "from_generators",
    "from_table",
    "group",
    "permutation",
    "product",
    "reversal",
    "shift",
    "shift_reversal",
]

VALID_SPECS = (
    "C1 C2 C4 D1 D2 D4 (exact), Cn/Dn for any n >= 1 (e.g. C8, D8: interpolated), "
    "Shift{n}[@axis], Rev[@axis], ShiftRev{n}[@axis], Perm{n}[@axis], "
    "products AxB (e.g. D4xShift8@-3), or a registered user group's name"
)

_REGISTRY: dict[str, FiniteGroup] = {}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_n(n: object, what: str, spec_hint: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GroupSpecError(
            explain(f"{what} needs a positive integer order", n, "n >= 1", f"e.g. {spec_hint}")
        )
    if n > MAX_ORDER:
        raise GroupSpecError(
            explain(f"{what} order too large", n, f"at most {MAX_ORDER}", "use a smaller n")
        )
    return n


def _check_axis(axis: object) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise GroupSpecError(explain("axis must be an int", axis, "e.g. -1 or 2"))
    return axis


def _axis_suffix(axis: int, default: int) -> str:
    return "" if axis == default else f"@{axis}"


def _power(letter: str, k: int) -> str:
    return "" if k == 0 else letter if k == 1 else f"{letter}{k}"


def _cyclic_group(spec: str, n: int, letter: str, action: object) -> FiniteGroup:
    return FiniteGroup.from_permutations(
        spec,
        {letter: tuple((k + 1) % n for k in range(n))},
        action=action,
        slot_words=[(letter,) * k for k in range(n)],
        names=["e"] + [_power(letter, k) for k in range(1, n)],
    )


def _dihedral_group(spec: str, n: int, rot: str, flip: str, action: object) -> FiniteGroup:
    # Left-regular permutations on slots k + n*m (element rot^k flip^m):
    # rot * rot^k flip^m = rot^(k+1) flip^m;  flip * rot^k flip^m = rot^(-k) flip^(m+1).
    idx = [(k, m) for m in range(2) for k in range(n)]
    r = tuple((k + 1) % n + n * m for k, m in idx)
    f = tuple((-k) % n + n * (1 - m) for k, m in idx)
    names = [(_power(rot, k) + (flip if m else "")) or "e" for k, m in idx]
    return FiniteGroup.from_permutations(
        spec,
        {rot: r, flip: f},
        action=action,
        slot_words=[(rot,) * k + (flip,) * m for k, m in idx],
        names=names,
    )


@functools.cache
def cyclic(n: int) -> FiniteGroup:
    """The rotation group Cn of the last two axes, generator ``r`` (360/n degrees, anticlockwise).

    Slot order ``[e, r, r2, ...]``. Exact for n in (1, 2, 4) (``torch.rot90``), otherwise rotations
    that are not multiples of 90 degrees are bilinear interpolations.

    Example:
        >>> cyclic(4).elements
        (e, r, r2, r3)
    """
    n = _check_n(n, "cyclic group", "cyclic(4)")
    return _cyclic_group(f"C{n}", n, "r", RotFlipAction(n, dihedral=False))


@functools.cache
def dihedral(n: int) -> FiniteGroup:
    """The dihedral group Dn of the last two axes: rotations ``r`` and the left-right flip ``f``.

    Slot index ``k + n*m`` is ``r^k f^m``, acting as ``rot_k(flip_m(x))``.

    Example:
        >>> dihedral(4).elements
        (e, r, r2, r3, f, rf, r2f, r3f)
    """
    n = _check_n(n, "dihedral group", "dihedral(4)")
    return _dihedral_group(f"D{n}", n, "r", "f", RotFlipAction(n, dihedral=True))


@functools.cache
def shift(n: int, axis: int = -1) -> FiniteGroup:
    """Cyclic shifts of a sequence axis by multiples of 1/n of its length, generator ``s``.

    Example:
        >>> shift(8, axis=-3)
        Shift8@-3
    """
    n = _check_n(n, "Shift", "shift(8)")
    axis = _check_axis(axis)
    return _cyclic_group(f"Shift{n}{_axis_suffix(axis, -1)}", n, "s", RollAction(n, axis))


@functools.cache
def reversal(axis: int = -1) -> FiniteGroup:
    """The reversal of a sequence axis (order 2), generator ``v``.

    Example:
        >>> reversal().elements
        (e, v)
    """
    axis = _check_axis(axis)
    return FiniteGroup.from_permutations(
        f"Rev{_axis_suffix(axis, -1)}",
        {"v": (1, 0)},
        action=ReverseAction(axis),
        names=["e", "v"],
    )


@functools.cache
def shift_reversal(n: int, axis: int = -1) -> FiniteGroup:
    """Shifts and reversal of a sequence axis (dihedral): ``s^k v^m`` at slot ``k + n*m``.

    Example:
        >>> shift_reversal(3).elements
        (e, s, s2, v, sv, s2v)
    """
    n = _check_n(n, "ShiftRev", "shift_reversal(8)")
    axis = _check_axis(axis)
    spec = f"ShiftRev{n}{_axis_suffix(axis, -1)}"
    return _dihedral_group(spec, n, "s", "v", ShiftReverseAction(n, axis))


def _cycle_name(_: int, perm: tuple[int, ...]) -> str:
    seen: set[int] = set()
    cycles = []
    for start in range(len(perm)):
        if start in seen or perm[start] == start:
            continue
        cyc, i = [], start
        while i not in seen:
            seen.add(i)
            cyc.append(str(i))
            i = perm[i]
        cycles.append("(" + " ".join(cyc) + ")")
    return "".join(cycles) or "e"


@functools.cache
def permutation(n: int, axis: int = -2) -> FiniteGroup:
    """The symmetric group S_n permuting the n entries of a set axis (default -2).

    Generators ``t`` = the transposition (0 1) and ``c`` = the n-cycle (0 1 ... n-1); element names
    in cycle notation; slot order BFS (shortlex). ``(sigma.x)[i] = x[sigma^-1(i)]``.

    Raises:
        GroupSpecError: n! > 10000 (the lift would cost n! passes); the fix suggests ``Shift{n}``.

    Example:
        >>> G = permutation(3)
        >>> G.order, G.generators
        (6, ((0 1), (0 1 2)))
    """
    n = _check_n(n, "Perm", "permutation(4)")
    axis = _check_axis(axis)
    if math.factorial(min(n, 20)) > MAX_ORDER:
        raise GroupSpecError(
            explain(
                f"Perm{n} has {n}! elements, too many to lift (one pass per element)",
                f"Perm{n}",
                f"n! <= {MAX_ORDER} (n <= 7)",
                f"use its cyclic subgroup 'Shift{n}@{axis}' (shifts of the set axis)",
            )
        )
    gens: dict[str, tuple[int, ...]] = {}
    if n >= 2:
        gens["t"] = (1, 0, *range(2, n))
    gens["c"] = tuple((i + 1) % n for i in range(n))
    spec = f"Perm{n}{_axis_suffix(axis, -2)}"
    return FiniteGroup.from_permutations(
        spec, gens, action=PermuteAction(n, axis), names=_cycle_name
    )


def product(*groups: FiniteGroup | str) -> FiniteGroup:
    """The direct product of groups acting on disjoint axes; element ``(a, b)`` acts as ``a.(b.x)``.

    Slot index of ``(g_i, h_j)`` is ``i * |H| + j`` (mixed radix, first factor most significant).
    Element names look like ``"(r, s3)"``; the generators are those of each factor, e.g.
    ``"(r, e)"``. Nested products are flattened.

    Raises:
        GroupSpecError: no factors, or the product is too large.
        ActionLawError: two factors act on the same axis.

    Example:
        >>> product("D4", "Shift8@-3")
        D4xShift8@-3
    """
    flat: list[FiniteGroup] = []
    for g in groups:
        g = group(g)
        flat.extend(g.factors or (g,))
    if not flat:
        raise GroupSpecError(explain("product of no groups", (), "at least one factor"))
    if len(flat) == 1:
        return flat[0]
    return _product(tuple(flat))


@functools.cache
def _product(factors: tuple[FiniteGroup, ...]) -> FiniteGroup:
    order = math.prod(f.order for f in factors)
    if order > MAX_ORDER:
        raise GroupSpecError(
            explain(
                "product too large",
                "x".join(f.spec for f in factors),
                f"at most {MAX_ORDER} elements (got {order})",
                "use smaller factors",
            )
        )
    action = ProductAction(tuple(f.action for f in factors))
    sizes = [len(f.permutations[0]) for f in factors]
    offsets = [sum(sizes[:i]) for i in range(len(factors))]

    def combine(parts: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(off + v for off, p in zip(offsets, parts, strict=True) for v in p)

    idents = [f.permutations[0] for f in factors]
    gens: dict[str, tuple[int, ...]] = {}
    for i, f in enumerate(factors):
        for g in f.generators:
            parts = list(idents)
            parts[i] = f.permutations[g.index]
            label = "(" + ", ".join(g.name if j == i else "e" for j in range(len(factors))) + ")"
            gens.setdefault(label, combine(parts))
    combos = list(_cartesian(*(f.elements for f in factors)))
    slot_perms = [
        combine([f.permutations[e.index] for f, e in zip(factors, c, strict=True)]) for c in combos
    ]
    names = ["e"] + ["(" + ", ".join(e.name for e in c) + ")" for c in combos[1:]]
    cl = closure(gens, slot_perms=slot_perms)
    return FiniteGroup("x".join(f.spec for f in factors), cl, names, action, factors)


# ================================================================================== user groups
def _check_user_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise GroupSpecError(
            explain(
                "invalid user group name",
                name,
                "an identifier (letters, digits, underscore)",
                "e.g. 'Hex6' or 'my_group'",
            )
        )
    try:
        taken = _parse_catalogue(name)
    except Exception:  # a malformed catalogue-like name (e.g. 'Perm9') is still a catalogue name
        taken = True
    if taken is not None or name == "e":
        raise GroupSpecError(
            explain(
                "user group name collides with a catalogue spec",
                name,
                "a name that the catalogue does not parse (" + VALID_SPECS + ")",
                f"rename it, e.g. 'My{name}'",
            )
        )
    return name


def _register(name: str, g: FiniteGroup) -> FiniteGroup:
    _REGISTRY[name] = g
    return g


def _default_probe() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand((3, 5, 5), generator=gen, dtype=torch.float64)


def _check_action_keys(gen_names: Sequence[str], actions: Mapping[str, Callable]) -> None:
    for a in gen_names:
        if not isinstance(a, str) or not _NAME.match(a) or a == "e":
            raise GroupSpecError(
                explain(
                    "invalid generator name",
                    a,
                    "an identifier other than 'e' (which names the identity)",
                    "rename the generator, e.g. 'a' or 'rot'",
                )
            )
    if set(actions) != set(gen_names):
        raise GroupSpecError(
            explain(
                "actions must be given for exactly the generators",
                sorted(actions),
                f"{sorted(gen_names)}",
                "give one callable x -> x' per generator name",
            )
        )
    for a, fn in actions.items():
        if not callable(fn):
            raise GroupSpecError(explain(f"action of generator {a!r} is not callable", fn))


def from_generators(
    name: str,
    generators: Mapping[str, Sequence[int]],
    actions: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    probe: torch.Tensor | None = None,
    *,
    exact: bool = True,
    atol: float | None = None,
) -> FiniteGroup:
    """Build, validate and register a user group from permutation generators and their actions.

    The group is closed by BFS (slot order shortlex, identity first); an element acts through a
    shortest word, generators applied right to left. The action law is checked on ``probe``.

    Args:
        name: the group's spec; afterwards ``group(name)`` returns it. Must not be a catalogue spec.
        generators: generator name -> permutation of ``range(m)`` giving the abstract group.
        actions: generator name -> ``fn(x) -> x'`` on tensors.
        probe: a tensor to check the law on (default: random float64 of shape (3, 5, 5)).
        exact: whether the actions are exact (any mismatch is an error) or approximate.
        atol: for approximate actions, the largest error tolerated (default: not checked).

    Raises:
        GroupSpecError: bad name, generators or missing actions.
        ActionLawError: the actions break the law; the message names the generator and the size of
            the mismatch.

    Example:
        >>> G = from_generators("Flip2", {"a": (1, 0)}, {"a": lambda x: x.flip(-1)})
        >>> group("Flip2") is G, G.elements
        (True, (e, a))
    """
    name = _check_user_name(name)
    _check_action_keys(list(generators), actions)
    g = FiniteGroup.from_permutations(
        name, generators, action=WordAction(tuple(actions.items()), exact=exact)
    )
    check_action_law(g, None, _default_probe() if probe is None else probe, atol=atol)
    return _register(name, g)


def from_table(
    name: str,
    table: Sequence[Sequence[int]],
    generators: Mapping[str, int],
    actions: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    probe: torch.Tensor | None = None,
    *,
    exact: bool = True,
    atol: float | None = None,
) -> FiniteGroup:
    """Build, validate and register a user group from its multiplication table.

    Slot order is the table's (index 0 must be the identity); elements are named by shortest words.

    Args:
        name: the group's spec (see :func:`from_generators`).
        table: ``table[i][j]`` = index of ``g_i * g_j``.
        generators: generator name -> element index.
        actions: generator name -> ``fn(x) -> x'``.
        probe, exact, atol: as in :func:`from_generators`.

    Raises:
        GroupLawError: the table is not a group, or its identity is not at index 0.
        GroupSpecError: bad name, generators that do not generate the whole group, missing actions.
        ActionLawError: the actions break the law.

    Example:
        >>> G = from_table("Z2t", [[0, 1], [1, 0]], {"a": 1}, {"a": lambda x: -x})
        >>> G.order
        2
    """
    name = _check_user_name(name)
    check_group_laws(table)
    n = len(table)
    if list(table[0]) != list(range(n)):
        raise GroupLawError(
            explain(
                "the identity must be element 0",
                list(table[0]),
                f"table[0] == {list(range(n))}",
                "reorder the elements so that the identity comes first",
            )
        )
    _check_action_keys(list(generators), actions)
    gens: dict[str, tuple[int, ...]] = {}
    for a, i in generators.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise GroupSpecError(
                explain(f"generator {a!r} is not an element index", i, f"an int in range({n})")
            )
        gens[a] = tuple(int(v) for v in table[i])  # left multiplication by g_i
    sub = closure(gens)
    if len(sub.perms) != n:
        raise GroupSpecError(
            explain(
                "the generators do not generate the whole table",
                f"a subgroup of order {len(sub.perms)}",
                f"order {n}",
                "add generators",
            )
        )
    cl = closure(gens, slot_perms=[tuple(int(v) for v in row) for row in table])
    g = FiniteGroup(name, cl, action=WordAction(tuple(actions.items()), exact=exact))
    check_action_law(g, None, _default_probe() if probe is None else probe, atol=atol)
    return _register(name, g)


# ======================================================================================== parsing
_ROT = re.compile(r"^([CD])(\d+)$")
_SEQ = re.compile(r"^(ShiftRev|Shift|Perm)(\d+)(?:@([+-]?\d+))?$")
_REV = re.compile(r"^Rev(?:@([+-]?\d+))?$")
_ROT_AXIS = re.compile(r"^([CD])(\d+)@")


def _parse_catalogue(s: str) -> FiniteGroup | None:
    """Parse one catalogue atom; ``None`` if ``s`` is not of a catalogue form."""
    m = _ROT.match(s)
    if m:
        n = int(m.group(2))
        if n < 1:
            raise GroupSpecError(
                explain(
                    "rotation order must be >= 1", s, "C1, C4, D8 ...", "use C1 for no rotation"
                )
            )
        return cyclic(n) if m.group(1) == "C" else dihedral(n)
    m = _SEQ.match(s)
    if m:
        kind, n = m.group(1), int(m.group(2))
        if n < 1:
            raise GroupSpecError(
                explain(f"{kind} order must be >= 1", s, f"e.g. {kind}8", f"use {kind}1 or more")
            )
        if kind == "Perm":
            axis = -2 if m.group(3) is None else int(m.group(3))
            return permutation(n, axis)
        axis = -1 if m.group(3) is None else int(m.group(3))
        return shift(n, axis) if kind == "Shift" else shift_reversal(n, axis)
    m = _REV.match(s)
    if m:
        return reversal(-1 if m.group(1) is None else int(m.group(1)))
    if _ROT_AXIS.match(s):
        raise GroupSpecError(
            explain(
                "rotation groups take no axis suffix",
                s,
                "Cn/Dn acting on the last two axes",
                "move the image axes last (x.movedim), or bind "
                "RotFlipAction(n, dihedral, axes=...) to the group",
            )
        )
    return None


def _parse_atom(s: str) -> FiniteGroup | None:
    if s in _REGISTRY:
        return _REGISTRY[s]
    return _parse_catalogue(s)


def _unknown(spec: object, piece: str | None = None) -> GroupSpecError:
    known = ["C4", "D4", "C8", "Shift8", "Rev", "ShiftRev8", "Perm4", *sorted(_REGISTRY)]
    by_upper = {k.upper(): k for k in known}
    close = difflib.get_close_matches(str(piece or spec).upper(), list(by_upper), n=1, cutoff=0.5)
    fix = f"did you mean {by_upper[close[0]]!r}?" if close else "use one of the forms listed"
    what = "unknown group spec" if piece is None else f"unknown group {piece!r} in spec"
    return GroupSpecError(explain(what, spec, VALID_SPECS, fix))


def group(spec: str | FiniteGroup) -> FiniteGroup:
    """Return the group named by ``spec`` (a :class:`FiniteGroup` is returned unchanged).

    Whitespace is ignored; ``group(repr(G)) == G`` for every catalogue, product and user group.

    Raises:
        GroupSpecError: an unknown or malformed spec; the message lists the valid forms.
        ActionLawError: a product whose factors act on the same axis.

    Example:
        >>> group("D4 x Shift8@-3").order
        64
    """
    if isinstance(spec, FiniteGroup):
        return spec
    if not isinstance(spec, str):
        raise GroupSpecError(
            explain(
                "a group spec must be a string or a FiniteGroup",
                type(spec).__name__,
                VALID_SPECS,
                "e.g. equivfx.groups.group('C4')",
            )
        )
    s = "".join(spec.split())
    if not s:
        raise _unknown(spec)
    atom = _parse_atom(s)
    if atom is not None:
        return atom
    pieces = s.split("x")

    @functools.cache
    def split(start: int) -> tuple[FiniteGroup, ...] | None:
        # Segment pieces[start:] into atoms (user names may themselves contain 'x').
        if start == len(pieces):
            return ()
        for stop in range(len(pieces), start, -1):
            g = _parse_atom("x".join(pieces[start:stop]))
            if g is not None:
                rest = split(stop)
                if rest is not None:
                    return (g, *rest)
        return None

    factors = split(0)
    if factors is None or len(factors) < 2:
        bad = next((p for p in pieces if _parse_atom(p) is None), None)
        raise _unknown(spec, bad if len(pieces) > 1 else None)
    return product(*factors)
