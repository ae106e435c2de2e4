"""``to-map``: make folding the slots into the batch legal, node by node.

After ``insert-lift`` every batch-carrying node computes on |G| B samples, which is the slot-wise
application of each op (the lift of F o p). What breaks that is a literal batch size baked into the
model. ``annotate-reps`` found each such literal (with example inputs); this pass rewrites it in
terms
of the folded tensor's own size.

Before (example batch 2)::

    flat = x.view(2, -1)

After::

    size = x.size(0); flat = x.view(size, -1)
"""

from __future__ import annotations

import operator

import torch.fx as fx

from equivfx.meta import REP, BatchSize, Folded, InputRep, set_rep
from equivfx.passes.annotate import BATCH_LITERAL
from equivfx.passes.infra import Pass, PassResult, new_node_origin

__all__ = ["ToMap"]


class ToMap(Pass):
    name = "to-map"
    requires = frozenset({REP})
    provides = frozenset({REP})

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            lit = node.meta.get(BATCH_LITERAL)
            if lit is None:
                continue
            pos, multiple = lit
            src = node.args[0]
            src_rep = src.meta.get(REP)
            axis = src_rep.batch_axis if isinstance(src_rep, Folded) else 0
            if isinstance(src_rep, InputRep):
                axis = 0
            with gm.graph.inserting_before(node):
                size = gm.graph.call_method("size", (src, axis))
                new_node_origin(size, self.name)
                set_rep(size, BatchSize((0,)), "size")
                value = size
                if multiple != 1:
                    value = gm.graph.call_function(operator.mul, (size, multiple))
                    new_node_origin(value, self.name)
                    set_rep(value, BatchSize((0,)), "mul")
            self._replace_entry(node, pos, value)
            del node.meta[BATCH_LITERAL]
            modified = True
        return PassResult(gm, modified)

    @staticmethod
    def _replace_entry(node: fx.Node, pos: int, value: fx.Node) -> None:
        args = list(node.args)
        if len(args) == 2 and isinstance(args[1], (list, tuple)):
            shape = list(args[1])
            shape[pos] = value
            args[1] = type(args[1])(shape)
        elif len(args) > 1:
            args[1 + pos] = value
        else:
            kw = dict(node.kwargs)
            key = "size" if "size" in kw else "shape"
            shape = list(kw[key])
            shape[pos] = value
            kw[key] = tuple(shape)
            node.kwargs = kw
            return
        node.args = tuple(args)
