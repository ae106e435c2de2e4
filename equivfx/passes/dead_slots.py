"""``eliminate-dead-slots``: compute one slot per coset of the elements whose slots are copies.

Slot g holds the network applied to g^-1 . v, where v is the value the lift reads. Slot gk = slot g
for every k in a subgroup K of G where

- K acts as the identity on v (the kernel of the action on v's shape: all of G once
  ``defer-lift`` has moved the lift past a global pool or a symmetric reduction over every acted
  axis), or
- the network after the lift is invariant under K's action: every value computed from the
  lifted one commutes with it until an op is invariant under it (for K = the shifts of ShiftRev:
  circular convolutions, pointwise ops, residual sums, channel concatenations and gates, up to a
  mean over the sequence; :func:`blind_to`). Then F(k^-1 g^-1 . v) = F(g^-1 . v).
  ``defer-lift`` cannot move these ops before the lift (they do not commute with the reversal),
  but one slot per shift coset is enough: under ShiftRev4, 2 of 8. K is found per subgroup the
  action names (:meth:`~equivfx.groups.actions.Action.restrictions`), by the rule table, on the
  example's shapes, like ``defer-lift``'s moves.

Only one slot per coset gK is consumed; the others are copies, so they are not computed:

Before (D4, the lift deferred past ``AdaptiveAvgPool2d(1)``: D4 fixes a 1x1 grid)::

    x -> conv -> pool -> equivfx_lift -> fc -> equivfx_readout      (fc runs on 8 B rows)

After::

    x -> conv -> pool -> equivfx_lift -> fc -> equivfx_readout      (lift keeps slot e: B rows)

and under ShiftRev4, with circular convolutions (they commute with shifts, not with the reversal)::

    x -> equivfx_lift -> conv -> relu -> conv -> mean(-1) -> fc -> equivfx_readout
         (before: slots e, s, s2, s3, v, sv, s2v, s3v: 8 B rows; after: e and v: 2 B rows)

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

import torch
import torch.fx as fx

from equivfx.groups.actions import TrivialAction
from equivfx.meta import REP
from equivfx.passes.defer import acts_trivially, moves_past, reads_inputs
from equivfx.passes.infra import Pass, PassResult, nodes_after
from equivfx.passes.lift import LIFT_NAME, find_global_lift
from equivfx.passes.modules import Broadcast, Lift, Readout, slot_positions
from equivfx.passes.rules import (
    draws_random,
    lookup,
    node_module,
    rule_key,
    tiling_window,
    training_sensitive,
)

__all__ = [
    "EliminateDeadSlots",
    "coset_representatives",
    "blind_to",
    "generated_subgroup",
    "invariant_subgroup",
]


class EliminateDeadSlots(Pass):
    name = "eliminate-dead-slots"
    requires = frozenset({REP})
    provides = frozenset({REP})

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        lift = find_global_lift(gm)
        if lift is None:
            return PassResult(gm, False)
        modules = dict(gm.named_modules())
        for n in _after(lift):  # in training, slots past these are not copies of one another
            if training_sensitive(n, node_module(n, modules)):
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
        blind = invariant_subgroup(lift, module.action, modules) if shape is not None else ()
        kernel = generated_subgroup(G, (*kernel, *blind))
        if len(kernel) == 1:
            return PassResult(gm, False)
        slots = coset_representatives(G, kernel)
        module.slots, module.kernel, module.shape_kernel = slots, kernel, shape_kernel
        # only the elements found acting trivially on the example's shape need that shape: on
        # others, the run-time check sees whether they still do (the invariant part does not
        # depend on the shape: it relies on no claim that does, see blind_to)
        module.kernel_shape = shape if len(shape_kernel) > 1 else None
        slot_map = slot_positions(G, slots, kernel)
        for _, m in gm.named_modules():
            if isinstance(m, Broadcast):
                m.order = len(slots)
            elif isinstance(m, Readout):
                m.slot_map = slot_map
        return PassResult(gm, True)


def invariant_subgroup(lift: fx.Node, action, modules) -> tuple[int, ...]:
    """Elements k of the group whose slots the ops after the lift cannot tell apart: every value
    computed from the lifted one commutes with k's action until an op is invariant under it (a
    symmetric reduction over the acted axes, a pool to 1x1), and only invariant values reach the
    output. Then, for the value v the lift reads, F(k^-1 g^-1 . v) = F(g^-1 . v) for the network
    F after the lift, so slot gk = slot g.

    Checked per subgroup the action names (:meth:`~equivfx.groups.actions.Action.restrictions`:
    the shifts of ShiftRev, one factor of a product, ...) with the rule table, as ``defer-lift``
    checks the whole group (:func:`blind_to`); the result is the subgroup those found generate
    (invariance under k1 and k2 is invariance under k1 k2). Empty where none is found."""
    found: list[int] = []
    for sub in action.restrictions():
        if blind_to(lift, sub.action, modules):
            found += sub.elements
    return tuple(found)


EQUIVARIANT, INVARIANT = "equivariant", "invariant"
_SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"})


def blind_to(lift: fx.Node, action, modules) -> bool:
    """Whether the graph's output is invariant under ``action`` applied to the lifted value.

    Every node computed from the lift gets a status, in graph order: *equivariant* (op(k.x) =
    k.op(x)) or *invariant* (op(k.x) = op(x)). A node whose lift-derived inputs are all
    invariant is invariant (each slot's ops see the same values). A node with one equivariant
    input (and no other lift-derived or per-slot input) takes its rule's answer, as a move in
    ``defer-lift`` does; shapes, dtypes and sizes read off it are invariant. A node reading
    several equivariant values is equivariant if it is an elementwise op on values of one shape
    (a residual sum) or a concatenation along an axis the action leaves alone. Anything else
    reading an equivariant value, or an equivariant value reaching the output, fails; so does
    any op drawing random numbers from a lift-derived value (``torch.randn(mu.shape)``: one draw
    per slot, not copies).

    Claims that hold on the example's shapes only are not relied on (the found subgroup must hold
    on every input the model accepts): an operand computed from another model input (its shape
    may differ at run time), a pool whose windows tile the example's grid."""
    status = {lift: EQUIVARIANT}
    for node in nodes_after(lift):
        read = [a for a in node.all_input_nodes if a in status]
        if not read:
            continue
        module = node_module(node, modules)
        if draws_random(node, module):
            return False
        equivariant = [a for a in read if status[a] == EQUIVARIANT]
        if not equivariant:
            status[node] = INVARIANT
            continue
        if any(a not in status and reads_inputs(a) for a in node.all_input_nodes):
            return False  # an operand from another input: its shape was seen on the example only
        if tiling_window(node, module) is not None:
            return False  # its claim holds on tiled grids only: no new errors on other shapes
        how = equivariant_status(node, equivariant, action, modules)
        if how is None:
            return False
        status[node] = how
    return True


def equivariant_status(node: fx.Node, equivariant, action, modules) -> str | None:
    """The status of ``node``, which reads the equivariant values ``equivariant`` (and perhaps
    invariant ones), or None where no rule says."""
    if node.op == "output" or not getattr(action, "is_permutation", False):
        return None
    if _reads_metadata(node):
        return INVARIANT  # permutations keep shapes
    if len(equivariant) == 1:  # moves_past refuses other per-slot (folded) inputs
        how = moves_past(node, equivariant[0], action, modules)
        if how == "commutes":
            return INVARIANT if acts_trivially(action, node, modules) else EQUIVARIANT
        if how == "invariant":
            return INVARIANT
    out = _shape(node)
    if out is None or any(a % len(out) == 0 for a in action.axes):
        return None
    acted = {a % len(out) for a in action.axes}
    module = node_module(node, modules)
    rule = lookup(rule_key(node, module))
    if rule is not None and rule.kind == "pointwise" and not draws_random(node, module):
        # elementwise: k moves every equivariant operand alike and fixes the others, which must
        # be constant along the acted axes (an invariant gate, a per-channel bias ...)
        axes = sorted(acted)
        for a in node.all_input_nodes:
            shape = _shape(a)
            if shape is None:
                return None
            offset = len(out) - len(shape)  # broadcasting aligns shapes on the right
            along = [shape[ax - offset] if ax >= offset else 1 for ax in axes]
            if a in equivariant:
                if along != [out[ax] for ax in axes]:  # broadcast along an acted axis
                    return None
            elif any(n != 1 for n in along):
                return None
        return EQUIVARIANT
    if node.op == "call_function" and node.target is torch.cat:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        if (
            isinstance(dim, int)
            and dim % len(out) not in acted | {0}
            and isinstance(tensors, (list, tuple))
            and all(t in equivariant for t in tensors)  # k must move every block alike
        ):
            return EQUIVARIANT
    return None


def _reads_metadata(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("size", "dim")
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _SHAPE_ATTRS
    return node.op == "call_function" and node.target is len


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


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
