"""``eliminate-dead-slots``: compute one slot per coset of the elements whose slots are copies.

Slot g holds the network applied to g^-1 . v, where v is the value the lift reads. Slot gk = slot g
for every k in a subgroup K of G where

- K acts as the identity on v (the kernel of the action on v's shape: all of G once
  ``defer-lift`` has moved the lift past a global pool or a symmetric reduction over every acted
  axis), or
- the ops after the lift are invariant under K's action: a chain that commutes with it up to an
  op invariant under it (for K = the shifts of ShiftRev, circular convolutions and pointwise ops
  up to a mean over the sequence). Then F(k^-1 g^-1 . v) = F(g^-1 . v). ``defer-lift`` cannot
  move these ops before the lift (they do not commute with the reversal), but only one slot per
  shift coset is needed: under ShiftRev4, 2 of 8. K is found per subgroup the action names
  (:meth:`~equivfx.groups.actions.Action.restrictions`), by the rule table, on the example's
  shapes, like ``defer-lift``'s moves.

Only one slot per coset gK is consumed; the others are copies, so they are not computed:

Before (D4, the lift deferred past ``AdaptiveAvgPool2d(1)``: D4 fixes a 1x1 grid)::

    x -> conv -> pool -> equivfx_lift -> fc -> equivfx_readout      (fc runs on 8 B rows)

After::

    x -> conv -> pool -> equivfx_lift -> fc -> equivfx_readout      (lift keeps slot e: B rows)

The lift computes the chosen slots (identity first), inputs repeated per slot are repeated once
per computed slot, and the readouts pool the computed slots (every coset has |K| elements, so the
mean, max and logsumexp - log|G| are unchanged) or copy them back into |G| slots (``slots``,
``pose``, ``equivariant``). Layer-wise models are left alone: their mixing layers read every slot.
A kernel of the action found on the example's shape (not a trivial action) is checked at run
time: a lifted value of another shape on which other elements act trivially raises
:class:`~equivfx.errors.InputShapeError`.

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
from equivfx.passes.defer import acts_trivially, moves_past
from equivfx.passes.infra import Pass, PassResult
from equivfx.passes.lift import LIFT_NAME, find_lift
from equivfx.passes.modules import Broadcast, Lift, Readout, slot_positions
from equivfx.passes.rules import training_sensitive

__all__ = [
    "EliminateDeadSlots",
    "coset_representatives",
    "generated_subgroup",
    "invariant_subgroup",
]


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
        shape_kernel = kernel
        kernel = generated_subgroup(G, (*kernel, *invariant_subgroup(lift, module.action, modules)))
        if len(kernel) == 1:
            return PassResult(gm, False)
        slots = coset_representatives(G, kernel)
        module.slots, module.kernel, module.kernel_shape = slots, kernel, shape
        module.shape_kernel = shape_kernel
        slot_map = slot_positions(G, slots, kernel)
        for _, m in gm.named_modules():
            if isinstance(m, Broadcast):
                m.order = len(slots)
            elif isinstance(m, Readout):
                m.slot_map = slot_map
        return PassResult(gm, True)


def invariant_subgroup(lift: fx.Node, action, modules) -> tuple[int, ...]:
    """Elements k of the group whose slots the ops after the lift cannot tell apart: the chain of
    single-user ops from the lift on commutes with k's action until an op is invariant under it
    (a symmetric reduction over the acted axes, a pool to 1x1). Then, for the value v the lift
    reads, F(k^-1 g^-1 . v) = F(g^-1 . v) for the chain F, so slot gk = slot g.

    Checked per subgroup the action names (:meth:`~equivfx.groups.actions.Action.restrictions`:
    the shifts of ShiftRev, one factor of a product, ...) with the rule table, as ``defer-lift``
    checks the whole group; the result is the subgroup those found generate (invariance under
    k1 and k2 is invariance under k1 k2). Empty where none is found."""
    found: list[int] = []
    for sub in action.restrictions():
        prev = lift
        while len(prev.users) == 1:
            node = next(iter(prev.users))
            how = moves_past(node, prev, sub.action, modules)
            if how is None:
                break
            if how == "invariant" or acts_trivially(sub.action, node, modules):
                found += sub.elements
                break
            prev = node
    return tuple(found)


def generated_subgroup(G, elements) -> tuple[int, ...]:
    """The subgroup of ``G`` generated by ``elements`` (slot indices), sorted; the identity
    alone for none."""
    table, sub = G.table, {0}
    frontier = [0]
    gens = set(elements) - {0}
    while frontier:
        a = frontier.pop()
        for b in gens:
            ab = table[a][b]
            if ab not in sub:
                sub.add(ab)
                frontier.append(ab)
    return tuple(sorted(sub))


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
