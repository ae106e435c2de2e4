"""The runtime modules the global passes insert: the lift at the input and the readout at the
output.

They hold no parameters and no persistent buffers, so a compiled model's ``state_dict()`` keeps
exactly
the original keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from equivfx.errors import ReadoutError, explain
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


class Lift(nn.Module):
    """The group-axis lift F^(x)(g) = F(g^-1 . x), folded slot-major into the batch axis.

    ``forward(x)`` checks ``x`` against the action (a non-square image under C4 raises
    :class:`~equivfx.errors.InputShapeError`) and returns ``cat([g_0^-1 . x, ..., g_{n-1}^-1 . x],
    0)``
    of shape ``(|G| * B, ...)``: block i holds slot g_i.
    """

    def __init__(self, group, action):
        super().__init__()
        self.group = group
        self.action = action
        self.inverses = tuple(group.inverse_table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lift_slots(x, range(len(self.inverses)))

    def lift_slots(self, x: torch.Tensor, slots) -> torch.Tensor:
        """Slots ``slots`` only, folded in their order: (len(slots) B, ...)."""
        self.action.check(x)
        return torch.cat([self.action._apply(self.inverses[i], x) for i in slots], 0)

    def extra_repr(self) -> str:
        return f"group={self.group!r}, action={self.action.describe()}"


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
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        return x.repeat((self.order,) + (1,) * (x.dim() - 1))

    def extra_repr(self) -> str:
        return f"order={self.order}"


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

    def forward(self, y, batch_axis: int = 0):
        if isinstance(y, (tuple, list)):
            return type(y)(self.forward(t, batch_axis) for t in y)
        if not isinstance(y, torch.Tensor):
            return y
        if batch_axis != 0:
            y = y.movedim(batch_axis, 0)
        s = y.unflatten(0, (self.order, -1))  # (|G|, B, ...)
        if self.readout == "slots":
            out = s.transpose(0, 1)
            return out.movedim((0, 1), (batch_axis, batch_axis + 1)) if batch_axis else out
        if self.readout == "pose":
            return s.transpose(0, 1).flatten(1)
        if self.readout == "invariant":
            if self.pool == "mean":
                out = s.mean(0)
            elif self.pool == "max":
                out = s.amax(0)
            else:
                out = torch.logsumexp(s, 0) - math.log(self.order)
        else:
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
