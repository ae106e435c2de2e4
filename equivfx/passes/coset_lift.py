"""``defer-lift-to-cosets``: ops that commute with a subgroup's action run once per coset.

``defer-lift`` moves an op before the lift when it commutes with the action of all of G. Where it
commutes only with a subgroup K's action (circular convolutions under the shifts of ShiftRev, not
its reversal), slot g of its output still follows from another: for g = r k with k in K,

    F(g^-1 . x) = F(k^-1 r^-1 . x) = k^-1 . F(r^-1 . x),

so the ops run on one slot per left coset gK (the representatives r, identity first), and a
:class:`CosetLift` after them makes every slot by acting with K on its coset's block::

    x -> equivfx_lift (8 slots) -> conv -> relu -> conv -> flatten -> fc -> equivfx_readout

    x -> equivfx_lift_cosets (2 slots: e, v) -> conv -> relu -> conv
      -> equivfx_lift (8 slots, each a roll of its coset's block) -> flatten -> fc -> readout

K may be G itself (one coset): ``defer-lift`` moves chains of ops commuting with G's action before
the lift, and a residual block of them runs once here.

Where the ops reach an op invariant under K, ``eliminate-dead-slots`` (which runs first) has
already computed one slot per coset for the whole network; this pass is for networks whose later
ops can tell the slots apart (a flatten before a linear layer, an output that keeps the sequence).
The ops that move form a region after the lift (see :func:`_commuting_region`): each reads the
lift or ops of the region only; one reading one of them commutes by the rule table, like
``defer-lift``'s moves, one reading several is a residual sum or a concatenation along an axis the
action leaves alone; and one value leaves the region, its last op's. Ops that draw random numbers
or use batch statistics do not move (in training they would see |G/K| B samples instead of |G| B),
nor ops whose claim holds on the example's shapes only (a pool tiling the example's grid; an
operand from another model input). Reading sizes of axes other than the batch axis (``h.shape[-1]``,
``h.size(1)``, ``h.dim()``) does not end the region: between the two lifts only the folded batch
axis differs, and an elementwise op with such a number commutes as with a constant; reading the
batch size does. The values between
the two lifts are :class:`~equivfx.meta.CosetFolded`: ``verify``'s localisation does not read them.
Outputs are unchanged up to float rounding.
"""

from __future__ import annotations

import torch.fx as fx

from equivfx.groups.actions import Restriction, TrivialAction
from equivfx.meta import REP, CosetFolded, Folded, set_rep, slot_major
from equivfx.passes.dead_slots import EQUIVARIANT, coset_representatives, equivariant_status
from equivfx.passes.defer import moves_past, reads_inputs
from equivfx.passes.infra import Pass, PassResult, new_node_origin, nodes_after
from equivfx.passes.lift import LIFT_NAME, find_global_lift
from equivfx.passes.modules import CosetLift, Lift
from equivfx.passes.rules import (
    draws_random,
    node_module,
    number_off_shapes,
    shape_value,
    tiling_window,
    training_sensitive,
)

__all__ = ["DeferLiftToCosets", "COSETS_NAME"]

COSETS_NAME = "equivfx_lift_cosets"


class DeferLiftToCosets(Pass):
    name = "defer-lift-to-cosets"
    requires = frozenset({REP})
    provides = frozenset({REP})

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        lift = find_global_lift(gm)
        if lift is None:
            return PassResult(gm, False)
        module = gm.get_submodule(LIFT_NAME)
        G = module.group
        if (
            type(module) is not Lift
            or len(module.slots) < G.order  # eliminate-dead-slots chose the slots
            or isinstance(module.action, TrivialAction)
        ):
            return PassResult(gm, False)
        modules = dict(gm.named_modules())
        best = None
        # the whole group too: defer-lift moves chains only, a residual block of ops commuting
        # with all of G (1x1 convolutions under D4) runs once here, before a "coset lift" of G
        whole = Restriction(tuple(range(G.order)), module.action)
        for sub in (whole, *module.action.restrictions()):
            chain = _commuting_region(lift, sub.action, modules)
            # the most work saved: ops in the region times the share of slots not computed
            # (1 - 1/|K|; a short block commuting with G must not beat a long region commuting
            # with a subgroup), then the larger subgroup
            saved = (len(chain) * (1 - 1 / len(sub.elements)), len(sub.elements))
            if chain and (best is None or saved > best[0]):
                best = (saved, sub, chain)
        if best is None:
            return PassResult(gm, False)
        _, sub, chain = best
        reps = coset_representatives(G, sub.elements)
        # the lift computes one slot per coset; the chain runs on those ...
        module.slots = reps
        gm.add_submodule(COSETS_NAME, module)
        lift.target = COSETS_NAME
        rep = CosetFolded(reps)
        set_rep(lift, rep, lift.meta.get("equivfx.rule"))
        for node in chain:
            set_rep(node, rep, node.meta.get("equivfx.rule"))
        # ... and the lift after them makes every slot from its coset's block
        last = chain[-1]
        gm.add_submodule(LIFT_NAME, CosetLift(G, sub.action, sub.elements, reps))
        with gm.graph.inserting_after(last):
            new = gm.graph.call_module(LIFT_NAME, (last,))
        last.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        new_node_origin(new, self.name)
        set_rep(new, Folded(0), "coset-lift")
        if "tensor_meta" in last.meta:
            new.meta["tensor_meta"] = last.meta["tensor_meta"]
        return PassResult(gm, True)


def _commuting_region(lift: fx.Node, action, modules) -> list[fx.Node]:
    """The ops after the lift that commute with ``action`` (a subgroup's) and may run on one slot
    per coset, in graph order: each reads the lift or such ops and nothing else computed from the
    lift; one op reading one of them must commute by its rule (as a ``defer-lift`` move), one
    reading several must be elementwise on aligned values (a residual sum) or a concatenation
    along an axis the action leaves alone. Of those, the longest prefix out of which one value
    leaves: every op but the last (and the lift) has all its users in it, so one coset lift
    after the last makes every slot. A chain of single-user ops is the simplest such region."""
    region = {lift}
    derived = {lift}
    outside = {lift: len(lift.users)}  # users not (yet) in the region
    open_ = 1 if lift.users else 0  # region values with users outside it
    taken: list[fx.Node] = []
    end = 0  # the region is taken[:end]
    for node in nodes_after(lift):
        read = [a for a in node.all_input_nodes if a in derived]
        if not read:
            continue
        if _shape_read(node):  # the same value on fewer slots: not an outside reader
            for a in read:
                if a in region:
                    outside[a] -= 1
                    open_ -= outside[a] == 0
            if open_ == 1 and taken and outside[taken[-1]]:  # the last op's value alone leaves
                end = len(taken)
            continue
        derived.add(node)
        if not _commutes(node, read, region, action, modules):
            continue
        region.add(node)
        taken.append(node)
        for a in read:  # all_input_nodes and a.users count node once
            outside[a] -= 1
            if outside[a] == 0:
                open_ -= 1
        outside[node] = len(node.users)
        if outside[node]:
            open_ += 1
            if open_ == 1:  # only this op's value leaves the region
                end = len(taken)
    return taken[:end]


def _shape_read(node: fx.Node) -> bool:
    """``node`` reads a shape and holds the same on one slot per coset as on every slot: a
    number or tuple read off shapes without the batch size (``rules.shape_value``), or a shape
    holding it whose readers all take other positions or are never read (``B, C, L = h.shape``
    with B unused). Between the two lifts only the folded batch axis differs."""
    value = shape_value(node)
    if value is None:
        return False
    if not value.batch:
        return True
    return (
        value.length is not None
        and bool(node.users)
        and all(
            ((v := shape_value(u)) is not None and not v.batch) or _unread(u) for u in node.users
        )
    )


def _unread(node: fx.Node) -> bool:
    """``node`` is an item of a shape that nothing reads (an unpacked name left unused)."""
    return not node.users and node.op == "call_function" and shape_value(node) is not None


def _commutes(node: fx.Node, read, region, action, modules) -> bool:
    """``node``, which reads the lift-derived values ``read``, commutes with ``action`` given
    that those values do (they are all in ``region``)."""
    if any(a not in region for a in read):
        return False
    module = node_module(node, modules)
    if training_sensitive(node, module) or tiling_window(node, module) is not None:
        return False  # batch statistics would see fewer rows; a pool's claim holds on tiled grids
    if len(read) == 1:
        numbers = frozenset(a for a in node.all_input_nodes if number_off_shapes(a))
        return moves_past(node, read[0], action, modules, numbers) == "commutes"
    if not slot_major(node.meta.get(REP)):
        return False
    if draws_random(node, module) or any(
        reads_inputs(a) for a in node.all_input_nodes if a not in region
    ):
        return False
    return equivariant_status(node, read, action, modules) == EQUIVARIANT
