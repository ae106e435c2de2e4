"""``insert-lift``: the group-axis lift at the acted input, slot i = g_i^-1 . x, folded into the
batch.

Before::

    x -> conv -> output

After::

    x -> equivfx_lift -> conv -> output        (equivfx_lift: (B, ...) -> (|G| B, ...))

Other batched inputs, which G acts on trivially, are repeated once per slot
(``equivfx_repeat_<name>``).
"""

from __future__ import annotations

import torch.fx as fx

from equivfx.meta import REP, Folded, set_rep
from equivfx.passes.infra import Pass, PassResult, new_node_origin
from equivfx.passes.modules import Broadcast, Lift
from equivfx.passes.options import LiftOptions

__all__ = ["InsertLift", "LIFT_NAME", "find_global_lift", "find_lift"]

LIFT_NAME = "equivfx_lift"


class InsertLift(Pass):
    name = "insert-lift"
    requires = frozenset({REP})
    provides = frozenset({REP})

    def __init__(self, options: LiftOptions):
        self.options = options

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        opts = self.options
        graph = gm.graph
        gm.add_submodule(LIFT_NAME, Lift(opts.group, opts.input_action))
        modified = False
        for node in list(graph.nodes):
            if node.op != "placeholder":
                continue
            if node.target == opts.acted_input:
                target = LIFT_NAME
            elif isinstance(node.meta.get(REP), Folded):
                target = f"equivfx_repeat_{node.name}"
                gm.add_submodule(target, Broadcast(opts.group.order))
            else:
                continue
            users = list(node.users)
            with graph.inserting_after(node):
                new = graph.call_module(target, (node,))
            new_node_origin(new, self.name)
            set_rep(new, Folded(0), "lift" if target == LIFT_NAME else "repeat")
            if "tensor_meta" in node.meta:  # same per-sample shape; the batch is |G| times larger
                new.meta["tensor_meta"] = node.meta["tensor_meta"]
            for u in users:
                u.replace_input_with(node, new)
            modified = True
        return PassResult(gm, modified)


def find_lift(gm: fx.GraphModule) -> fx.Node | None:
    """The node that calls the lift, or None (no acted input was lifted)."""
    return next(
        (n for n in gm.graph.nodes if n.op == "call_module" and n.target == LIFT_NAME), None
    )


def find_global_lift(gm: fx.GraphModule) -> fx.Node | None:
    """The node that calls the lift in a global-mode graph; None without one, and for layer-wise
    graphs, whose mixing layers read every slot (the passes that choose slots leave them alone)."""
    if any(n.meta.get("equivfx.mixing") for n in gm.graph.nodes):
        return None
    return find_lift(gm)
