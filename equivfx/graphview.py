"""A compiled graph as rows: each node with its representation, slot axis, rule and parameters.

Used by ``equivfx inspect``.
"""

from __future__ import annotations

import torch.fx as fx

from equivfx.meta import (
    ORIGIN,
    REP,
    RULE,
    ChannelFolded,
    CosetFolded,
    Folded,
    InputRep,
    OutputRep,
)

__all__ = ["describe_graph"]


def describe_graph(gm: fx.GraphModule) -> list[dict]:
    """One dict per node: node, op, target, rep, slot_axis, rule, origin, params, source."""
    gm = getattr(gm, "equivfx_flat", gm)  # a chunked model: its flat graph
    modules = dict(gm.named_modules())
    rows = []
    for node in gm.graph.nodes:
        rep = node.meta.get(REP)
        slot_axis = None
        if isinstance(rep, Folded):
            slot_axis = rep.batch_axis  # the slots are folded, slot-major, into this axis
        elif isinstance(rep, CosetFolded):
            slot_axis = 0  # one slot per coset, folded slot-major
        elif isinstance(rep, ChannelFolded):
            slot_axis = rep.axis  # the channel blocks (keep-channel-layout)
        elif isinstance(rep, OutputRep) and rep.readout in ("slots", "pose"):
            slot_axis = 1
        params = None
        if node.op == "call_module" and node.target in modules:
            params = sum(p.numel() for p in modules[node.target].parameters())
        called = [  # a module a function calls (keep-channel-layout's channel_call, mixer_call)
            a.target
            for a in node.args
            if isinstance(a, fx.Node) and a.op == "get_attr" and a.target in modules
        ]
        if node.op == "call_function" and called:
            params = sum(p.numel() for p in modules[called[0]].parameters())
        target = (
            node.target
            if isinstance(node.target, str)
            else getattr(node.target, "__name__", str(node.target))
        )
        rule = node.meta.get(RULE)
        if node.meta.get("equivfx.mixing"):
            rule = "mixing layer"
        elif isinstance(rep, InputRep):
            rule = "input"
        trace = (node.stack_trace or "").strip().splitlines()
        rows.append(
            {
                "node": node.name,
                "op": node.op,
                "target": str(target),
                "rep": rep.describe() if rep is not None else "-",
                "slot_axis": slot_axis,
                "rule": rule,
                "origin": node.meta.get(ORIGIN),
                "params": params,
                "source": trace[-1].strip() if trace else None,
            }
        )
    return rows
