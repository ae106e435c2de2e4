"""The runtime modules the global passes insert: the lift at the input and the readout at the
output.

They hold no parameters and no persistent buffers, so a compiled model's ``state_dict()`` keeps
exactly
the original keys.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import nn

from equivfx.errors import InputShapeError, ReadoutError, explain
from equivfx.groups.actions import Action

__all__ = [
    "CheckInput",
    "Lift",
    "Broadcast",
    "Readout",
    "READOUTS",
    "POOLS",
    "PoseAction",
    "pose_action",
]

READOUTS = ("slots", "pose", "invariant", "equivariant")
POOLS = ("mean", "max", "logsumexp")


MEASURING = threading.RLock()
"""Held while a compiled model times its alternatives at a first call (``chunk="auto"``, the
mixing layers' memory format): one measurement at a time in the process, so threads do not time
each other's work, and a thread that waited finds the decision made. Reentrant: a measured layer
may run another that measures."""


def eager_tensor(x) -> bool:
    """``x`` is a plain tensor in an eager call: not traced, compiled, exported or vmapped, so a
    cached index or a reused buffer may stand in for the ops a tracer would have to record."""
    return (
        not is_tracing()  # first: torch.compile cannot trace the functorch query below
        and type(x) is torch.Tensor
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


def is_tracing() -> bool:
    """torch.compile, torch.export or torch.jit.trace is recording this call."""
    if torch.jit.is_tracing():
        return True
    compiler = getattr(torch, "compiler", None)
    if compiler is None:
        return False
    exporting = getattr(compiler, "is_exporting", lambda: False)
    return bool(compiler.is_compiling() or exporting())


class Lift(nn.Module):
    """The group-axis lift F^(x)(g) = F(g^-1 . x), folded slot-major into the batch axis.

    ``forward(x)`` checks ``x`` against the action (a non-square image under C4 raises
    :class:`~equivfx.errors.InputShapeError`) and returns ``cat([g_0^-1 . x, ..., g_{n-1}^-1 . x],
    0)`` of shape ``(|G| * B, ...)``: block i holds slot g_i. Under actions that only move
    entries, small inputs are lifted by one gather with a cached index (bitwise the same).
    """

    def __init__(self, group, action):
        super().__init__()
        self.group = group
        self.action = action
        self.inverses = tuple(group.inverse_table)
        # which slots are computed (eliminate-dead-slots keeps one per coset of the kernel of the
        # action) and the per-sample shape that kernel was found on (None: any shape)
        self.slots: tuple[int, ...] = tuple(range(group.order))
        self.kernel: tuple[int, ...] = (0,)
        self.kernel_shape: tuple[int, ...] | None = None
        self._kernels: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._indices: dict[tuple, torch.Tensor] = {}  # see _gather_index
        self._indices_for = None  # the (action, inverses) the cached indices were built for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lift_slots(x, self.slots)

    def lift_slots(self, x: torch.Tensor, slots) -> torch.Tensor:
        """Slots ``slots`` only, folded in their order: (len(slots) B, ...)."""
        self.action.check(x)
        shape = tuple(x.shape[1:])
        if self.kernel_shape is not None and shape != self.kernel_shape:
            if shape not in self._kernels:  # the same kernel on this shape is fine too
                self._kernels[shape] = self.action.kernel((1, *shape))
            if self._kernels[shape] != self.kernel:
                raise InputShapeError(
                    explain(
                        "this model computes one slot per coset of the elements that act "
                        "trivially on the lifted value's shape, found at compile time; on a "
                        "value of this shape other elements act trivially (per-sample shape)",
                        shape,
                        f"{self.kernel_shape}, or a shape with the same kernel",
                        "compile with example inputs of the shape you run, or optimize=False",
                    )
                )
        index = self._gather_index(x, slots)
        if index is not None:  # one gather instead of one op per slot, then a cat
            return x.reshape(-1).index_select(0, index).view(len(slots) * x.shape[0], *shape)
        return self._each_slot(x, slots)

    def _each_slot(self, x: torch.Tensor, slots) -> torch.Tensor:
        """The lift op by op: g^-1 . x for each slot g, folded. Always a new tensor (cat copies
        even one block): ops after the lift may work in place."""
        return torch.cat([self.action._apply(self.inverses[i], x) for i in slots], 0)

    INDEX_LIMIT = 1 << 15
    """Largest lifted tensor (elements) whose gather index is cached (int32: 128 KiB), and 4x
    that in all: the gather pays where per-slot ops cost more than the data they move."""

    def _gather_index(self, x: torch.Tensor, slots) -> torch.Tensor | None:
        """For actions that only move entries, the lift of ``x`` is one gather of its entries:
        the index is the lift of a tensor of entry numbers (exact: the same copies in the same
        places). Built once per shape, device and slots, for small inputs in eager calls, where
        the per-slot ops cost more than the data they move (|G| = 120 on a set of 5: 715 us ->
        17 us, ``benchmarks/diagnose_overhead.py``). None: lift op by op."""
        if not eager_tensor(x) or not self.action.is_permutation:
            return None
        # eligibility by the whole lift's size: chunks of one lift then share its budget, and
        # per-chunk indices cannot crowd each other out of the cache call after call
        if x.numel() * max(len(slots), len(self.slots)) > self.INDEX_LIMIT:
            return None
        size = x.numel() * len(slots)
        key = (tuple(x.shape), x.device, tuple(slots))
        built_for = self.__dict__.get("_indices_for")  # absent in older pickles
        if (
            built_for is None
            or built_for[0] is not self.action
            or built_for[1] is not self.inverses
        ):
            self._indices, self._indices_for = {}, (self.action, self.inverses)
        indices = self._indices
        index = indices.get(key)
        if index is None:
            # on the CPU: float64 (exact entry numbers) is not available on every device
            probe = torch.arange(x.numel(), dtype=torch.float64).view(x.shape)
            index = self._each_slot(probe, slots).reshape(-1).to(x.device, torch.int32)
            if size + sum(i.numel() for i in indices.values()) > 4 * self.INDEX_LIMIT:
                indices.clear()
            indices[key] = index
        return index

    def __getstate__(self):
        state = super().__getstate__()
        state["_indices"], state["_indices_for"] = {}, None  # a cache: not pickled
        return state

    def slot_permutation(self, h: int) -> list[int]:
        """The regular action of ``h`` on the computed slots: position j of ``h.s`` holds position
        ``perm[j]`` of ``s``."""
        where = slot_positions(self.group, self.slots, self.kernel)
        regular = self.group.regular_permutation(h)
        return [where[regular[i]] for i in self.slots]

    def extra_repr(self) -> str:
        computed = ""
        if len(self.slots) < self.group.order:
            computed = f", slots={list(self.slots)} (one per coset of the kernel)"
        return f"group={self.group!r}, action={self.action.describe()}{computed}"


def slot_positions(group, slots, kernel) -> tuple[int, ...]:
    """For each element g, the position in ``slots`` of the computed slot equal to slot g.

    ``slots`` holds one element per coset of ``kernel``, a normal subgroup acting trivially where
    the lift sits: slot g = slot r for the r in ``slots`` with r^-1 g in ``kernel``."""
    table, inv, kernel = group.table, group.inverse_table, set(kernel)
    return tuple(
        next(j for j, r in enumerate(slots) if table[inv[r]][g] in kernel)
        for g in range(group.order)
    )


class CheckInput(nn.Module):
    """Checks the model's input against the action (kept at the input when the lift moves later)."""

    def __init__(self, action):
        super().__init__()
        self.action = action

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.action.check(x)
        return x


class Broadcast(nn.Module):
    """An input G acts on trivially, repeated once per slot so it lines up with the folded batch."""

    def __init__(self, order: int):
        super().__init__()
        self.order = order

    def forward(self, x):
        return repeat_per_slot(x, self.order)

    def extra_repr(self) -> str:
        return f"order={self.order}"


def repeat_per_slot(x, slots: int):
    """``x`` repeated ``slots`` times along the batch axis (non-tensors and scalars unchanged)."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    return x.repeat((slots,) + (1,) * (x.dim() - 1))


class Readout(nn.Module):
    """Unfold the slots from the batch axis and read the result out.

    Readouts (for a folded value y whose slot i is F(g_i^-1 . x)):

    - ``slots``: shape ``(B, |G|, ...)`` (batch axis, then the slot axis);
    - ``pose``: ``(B, |G| * K)``, flattened slot-major (index i*K + k), the paper's R^(|G| K);
    - ``invariant``: pooled over slots: ``mean``, ``max`` or ``logsumexp`` (minus log|G|, so a
    constant
      slot value comes out unchanged);
    - ``equivariant``: (1/|G|) sum_i rho_out(g_i) y_i, for outputs with their own action rho_out.
    """

    def __init__(self, group, readout: str, pool: str = "mean", output_action=None):
        super().__init__()
        if readout not in READOUTS:
            raise ReadoutError(explain("unknown readout", readout, f"one of {READOUTS}"))
        if pool not in POOLS:
            raise ReadoutError(explain("unknown pool", pool, f"one of {POOLS}"))
        self.group = group
        self.readout = readout
        self.pool = pool
        self.output_action = output_action
        self.order = group.order
        # eliminate-dead-slots: for each element, the position of the computed slot equal to it
        self.slot_map: tuple[int, ...] | None = None

    def forward(self, y, batch_axis: int = 0):
        if isinstance(y, (tuple, list)):
            return type(y)(self.forward(t, batch_axis) for t in y)
        if not isinstance(y, torch.Tensor):
            return y
        if batch_axis != 0:
            y = y.movedim(batch_axis, 0)
        computed = self.order if self.slot_map is None else max(self.slot_map) + 1
        s = y.unflatten(0, (computed, -1))  # (slots computed, B, ...)
        if self.readout == "invariant":  # every coset has |K| elements: pool the computed slots
            if self.pool == "mean":
                out = s.mean(0)
            elif self.pool == "max":
                out = s.amax(0)
            else:
                out = torch.logsumexp(s, 0) - math.log(computed)
            return out.movedim(0, batch_axis) if batch_axis else out
        if self.slot_map is not None:  # (|G|, B, ...): slot g is a copy of its coset's slot
            s = s.index_select(0, torch.tensor(self.slot_map, device=s.device))
        if self.readout == "slots":
            out = s.transpose(0, 1)
            return out.movedim((0, 1), (batch_axis, batch_axis + 1)) if batch_axis else out
        if self.readout == "pose":
            return s.transpose(0, 1).flatten(1)
        act = self.output_action
        out = torch.stack([act.apply(i, s[i]) for i in range(self.order)], 0).mean(0)
        return out.movedim(0, batch_axis) if batch_axis else out

    def extra_repr(self) -> str:
        extra = f", pool={self.pool}" if self.readout == "invariant" else ""
        if self.readout == "equivariant":
            extra = f", output_action={self.output_action.describe()}"
        return f"group={self.group!r}, readout={self.readout}{extra}"


def pose_action(group) -> Action:
    """The regular action on the pose readout (B, |G| K): blocks of K entries permuted as slots."""
    return PoseAction().bind(group)


@dataclass(frozen=True)
class PoseAction(Action):
    """(h.y)[:, j*K + k] = y[:, perm[j]*K + k] with perm = G.regular_permutation(h)."""

    @property
    def is_permutation(self) -> bool:
        return True

    @property
    def axes(self) -> tuple[int, ...]:
        return (1,)

    def describe(self) -> str:
        return f"{self._label()} permutes the |G| blocks of the pose axis (regular action)"

    def _apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        G = self._need_group()
        perm = torch.tensor(G.regular_permutation(index), device=x.device)
        return x.unflatten(1, (G.order, -1)).index_select(1, perm).flatten(1)
