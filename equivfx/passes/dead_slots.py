"""``eliminate-dead-slots``: compute one slot per coset of the elements that act trivially.

Slot g holds the network applied to g^-1 . v, where v is the value the lift reads. If a normal
subgroup K of G acts as the identity on v (the kernel of the action on v's shape: all of G once
``defer-lift`` has moved the lift past a global pool or a symmetric reduction over every acted
axis), then slot gk = slot g for every k in K. Only one slot per coset gK is consumed; the others
are copies, so they are not computed:

Before (D4, the lift deferred past ``AdaptiveAvgPool2d(1)``: D4 fixes a 1x1 grid)::

    x -> conv -> pool -> equivfx_lift -> fc -> equivfx_readout      (fc runs on 8 B rows)

After::

    x -> conv -> pool -> equivfx_lift -> fc -> equivfx_readout      (lift keeps slot e: B rows)

The lift computes the chosen slots (identity first), inputs repeated per slot are repeated once
per computed slot, and the readouts pool the computed slots (every coset has |K| elements, so the
mean, max and logsumexp - log|G| are unchanged) or copy them back into |G| slots (``slots``,
``pose``, ``equivariant``). Layer-wise models are left alone: their mixing layers read every slot.
A kernel found on the example's shape (not a trivial action) is checked at run time: a lifted
value of another shape raises :class:`~equivfx.errors.InputShapeError`.

Nothing is eliminated where an op computed from the lifted value draws random numbers (dropout)
or uses batch statistics (BatchNorm): in training mode its slots are not copies of one another.
(``defer-lift`` does move BatchNorm before a non-trivial lift, where the rotated copies it would
have seen have the same statistics; only the running variance's Bessel correction then counts
B H W instead of |G| B H W samples, a relative difference below 1 / (B H W).)
"""

from __future__ import annotations

import torch.fx as fx

from equivfx.groups.actions import TrivialAction
from equivfx.meta import REP
from equivfx.passes.infra import Pass, PassResult
from equivfx.passes.lift import LIFT_NAME, find_lift
from equivfx.passes.modules import Broadcast, Lift, Readout, slot_positions
from equivfx.passes.rules import training_sensitive

__all__ = ["EliminateDeadSlots", "coset_representatives"]


class EliminateDeadSlots(Pass):
    name = "eliminate-dead-slots"
    requires = frozenset({REP})
    provides = frozenset({REP})

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        lift = find_lift(gm)
        if lift is None or any(n.meta.get("equivfx.mixing") for n in gm.graph.nodes):
            return PassResult(gm, False)
        modules = dict(gm.named_modules())
        for n in _after(lift):  # in training, slots past these are not copies of one another
            if training_sensitive(n, modules.get(n.target) if n.op == "call_module" else None):
                return PassResult(gm, False)
        module: Lift = gm.get_submodule(LIFT_NAME)
        G = module.group
        shape = None
        if isinstance(module.action, TrivialAction):
            kernel = tuple(range(G.order))
        else:
            tm = lift.args[0].meta.get("tensor_meta") if lift.args else None
            if tm is None or not hasattr(tm, "shape"):
                return PassResult(gm, False)
            shape = tuple(tm.shape[1:])
            kernel = module.action.kernel((1, *shape))
        if len(kernel) == 1:
            return PassResult(gm, False)
        slots = coset_representatives(G, kernel)
        module.slots, module.kernel, module.kernel_shape = slots, kernel, shape
        slot_map = slot_positions(G, slots, kernel)
        for _, m in gm.named_modules():
            if isinstance(m, Broadcast):
                m.order = len(slots)
            elif isinstance(m, Readout):
                m.slot_map = slot_map
        return PassResult(gm, True)


def _after(node: fx.Node) -> list[fx.Node]:
    """Every node computed from ``node``."""
    seen, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    seen.discard(node)
    return list(seen)


def coset_representatives(G, kernel) -> tuple[int, ...]:
    """The first element (in slot order) of each coset gK, in slot order; the identity first."""
    table, seen, reps = G.table, set(), []
    for g in range(G.order):
        if g in seen:
            continue
        reps.append(g)
        seen.update(table[g][k] for k in kernel)
    return tuple(reps)
