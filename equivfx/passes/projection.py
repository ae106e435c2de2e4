"""``fuse-projection``: unfold the slots at the output and apply the readout.

The projection p (evaluation at the identity) and the readout are fused into one module per output.

Before::

    x -> equivfx_lift -> conv -> output(conv)

After::

    x -> equivfx_lift -> conv -> equivfx_readout -> output(equivfx_readout)

Outputs that carry no batch (constants) pass through unchanged.
"""

from __future__ import annotations

import torch.fx as fx

from equivfx.meta import REP, Folded, OutputRep, Trivial, set_rep
from equivfx.passes.infra import Pass, PassResult, new_node_origin
from equivfx.passes.modules import Readout, pose_action
from equivfx.passes.options import LiftOptions

__all__ = ["FuseProjection", "READOUT_NAME"]

READOUT_NAME = "equivfx_readout"


class FuseProjection(Pass):
    name = "fuse-projection"
    requires = frozenset({REP})
    provides = frozenset({REP})

    def __init__(self, options: LiftOptions):
        self.options = options

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        opts = self.options
        readout = Readout(opts.group, opts.readout, opts.pool, opts.output_action)
        gm.add_submodule(READOUT_NAME, readout)
        out_node = next(n for n in gm.graph.nodes if n.op == "output")

        def wrap(n: fx.Node) -> fx.Node:
            r = n.meta.get(REP)
            if not isinstance(r, Folded):
                return n
            with gm.graph.inserting_before(out_node):
                kwargs = {"batch_axis": r.batch_axis} if r.batch_axis else {}
                new = gm.graph.call_module(READOUT_NAME, (n,), kwargs)
            new_node_origin(new, self.name)
            action = readout_action(opts.group, opts.readout, opts.output_action, r.batch_axis)
            set_rep(new, OutputRep(opts.readout, action), "readout")
            return new

        out_node.args = fx.node.map_arg(out_node.args, wrap)
        set_rep(out_node, Trivial())
        return PassResult(gm, True)


def readout_action(group, readout: str, output_action=None, batch_axis: int = 0):
    """How G acts on a readout's value: trivially (invariant), the user's output action
    (equivariant), blocks of the pose axis, or the regular action on the slot axis (slots)."""
    from equivfx.groups.actions import RegularAction, TrivialAction

    if readout == "invariant":
        return TrivialAction().bind(group)
    if readout == "equivariant":
        return output_action
    if readout == "pose":
        return pose_action(group)
    return RegularAction(axis=batch_axis + 1).bind(group)
