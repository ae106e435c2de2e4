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

Where the ops reach an op invariant under K, ``eliminate-dead-slots`` (which runs first) has
already computed one slot per coset for the whole network; this pass is for networks whose later
ops can tell the slots apart (a flatten before a linear layer, an output that keeps the sequence).
Only a chain of single-user ops right after the lift moves, checked by the rule table like
``defer-lift``'s moves; ops that draw random numbers or use batch statistics do not (in training
they would see |G/K| B samples instead of |G| B), nor ops whose claim holds on the example's shapes
only (a pool tiling the example's grid; an operand from another model input). The values between
the two lifts are :class:`~equivfx.meta.CosetFolded`: ``verify``'s localisation does not read them.
Outputs are unchanged up to float rounding.
"""

from __future__ import annotations

import torch.fx as fx

from equivfx.groups.actions import TrivialAction
from equivfx.meta import REP, CosetFolded, Folded, set_rep
from equivfx.passes.dead_slots import coset_representatives
from equivfx.passes.defer import moves_past
from equivfx.passes.infra import Pass, PassResult, new_node_origin
from equivfx.passes.lift import LIFT_NAME, find_global_lift
from equivfx.passes.modules import CosetLift, Lift
from equivfx.passes.rules import node_module, tiling_window, training_sensitive

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
        for sub in module.action.restrictions():
            chain = _commuting_chain(lift, sub.action, modules)
            # the most work saved: the largest subgroup, then the longest chain
            if chain and (best is None or (len(sub.elements), len(chain)) > best[0]):
                best = ((len(sub.elements), len(chain)), sub, chain)
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


def _commuting_chain(lift: fx.Node, action, modules) -> list[fx.Node]:
    """The single-user ops right after the lift that commute with ``action`` (a subgroup's):
    they may run on one slot per coset."""
    chain: list[fx.Node] = []
    prev = lift
    while len(prev.users) == 1:
        node = next(iter(prev.users))
        module = node_module(node, modules)
        if training_sensitive(node, module) or tiling_window(node, module) is not None:
            break  # batch statistics would see fewer rows; a pool's claim holds on tiled grids only
        if moves_past(node, prev, action, modules) != "commutes":
            break
        chain.append(node)
        prev = node
    return chain
