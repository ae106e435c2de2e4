"""``annotate-reps``: decide how G acts on every node's value (the policy; it changes no node).

Before::

    x -> conv -> relu -> output

After (``node.meta["equivfx.rep"]``)::

    x: input(C4)  conv: map(G) folded in axis 0  relu: map(G) folded in axis 0  output: trivial

The acted input carries the input action. Every node computed from it will, once the lift is
inserted,
hold a Map(G, .) value folded into its batch axis; the per-op rule table says where that axis goes
and
refuses ops that mix samples of the batch. Nodes that do not depend on the inputs are trivial.
Python
ints read off shapes are :class:`~equivfx.meta.BatchSize` values, so ``x.view(x.size(0), -1)`` keeps
the batch where it belongs.
"""

from __future__ import annotations

import logging
import warnings

import torch.fx as fx

from equivfx.errors import user_stacklevel
from equivfx.meta import FIXED, REP, RULE, BatchSize, Folded, InputRep, Trivial, set_rep
from equivfx.passes.infra import Pass, PassResult
from equivfx.passes.options import LiftOptions
from equivfx.passes.rules import (
    OPAQUE_LEAF,
    BatchCtx,
    describe_node,
    lookup,
    missing_rule,
    node_module,
    rule_key,
)

__all__ = [
    "AnnotateReps",
    "BATCH_LITERAL",
    "BatchMixingWarning",
    "OpaqueLeafWarning",
    "opaque_leaves",
]

log = logging.getLogger(__name__)

BATCH_LITERAL = "equivfx.batch_literal"
"""``node.meta[BATCH_LITERAL] = (position, multiple)``: a literal batch size ``to-map`` rewrites."""


class OpaqueLeafWarning(UserWarning):
    """A leaf module with no rule is assumed to treat batch samples independently."""


class BatchMixingWarning(UserWarning):
    """An opaque leaf treats the samples of a batch together: the compiled model runs one slot
    per pass instead of folding the slots into the batch."""


def opaque_leaves(gm: fx.GraphModule) -> tuple[str, ...]:
    """The targets of the leaf module calls annotated without an op rule."""
    return tuple(
        dict.fromkeys(
            n.target
            for n in gm.graph.nodes
            if n.op == "call_module" and n.meta.get(RULE) == OPAQUE_LEAF
        )
    )


def _carries(rep) -> bool:
    return isinstance(rep, (Folded, InputRep)) or (isinstance(rep, BatchSize))


def _warn_opaque(leaves: list[str]) -> None:
    """One warning for every leaf module without an op rule (a model with a stochastic-depth
    leaf per block warned once per block)."""
    one = len(leaves) == 1
    warnings.warn(
        f"equivfx: leaf module{'' if one else 's'} {', '.join(leaves)} "
        f"{'has' if one else 'have'} no op rule; {'it is' if one else 'they are'} assumed to "
        "treat batch samples independently. In global mode compile checks this on "
        "example_inputs (without them, chunk='auto' checks the whole model at its first "
        "call) and runs one slot per pass where it does not hold; layer-wise mode checks it "
        "on example_inputs only. Register a rule with equivfx.passes.rules.register to make "
        "it explicit.",
        OpaqueLeafWarning,
        stacklevel=user_stacklevel(),
    )


class AnnotateReps(Pass):
    """Annotate every node with its representation under the global construction."""

    name = "annotate-reps"
    provides = frozenset({REP})

    def __init__(self, options: LiftOptions):
        self.options = options

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        reps: dict[fx.Node, object] = {}
        modules = dict(gm.named_modules())
        literals: dict[fx.Node, tuple[int, int]] = {}
        opaque: list[str] = []
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                rep = self._placeholder_rep(node)
                set_rep(node, rep)
                reps[node] = rep
                continue
            if node.op == "get_attr":
                set_rep(node, Trivial())
                reps[node] = Trivial()
                continue
            if node.op == "output":
                set_rep(node, Trivial())
                continue
            inputs = node.all_input_nodes
            if not any(_carries(reps.get(a)) for a in inputs):
                set_rep(node, Trivial())
                reps[node] = Trivial()
                continue
            module = node_module(node, modules)
            key = rule_key(node, module)
            rule = lookup(key)
            ctx = BatchCtx(
                node=node,
                reps=reps,
                module=module,
                example_batch=self.options.example_batch,
                literal_batch=literals,
            )
            if rule is None:
                if node.op != "call_module":
                    raise missing_rule(node, key)
                rep = self._opaque_leaf(node, ctx)
                set_rep(node, rep, OPAQUE_LEAF)
                if node.target not in self.options.checked_leaves:
                    opaque.append(f"{node.target!r} ({type(module).__name__})")
            else:
                rep = rule.batch(ctx)
                set_rep(node, rep, rule.name)
            reps[node] = rep
        for node, lit in literals.items():
            node.meta[BATCH_LITERAL] = lit
        if opaque:
            _warn_opaque(opaque)
        return PassResult(gm, False)

    def _placeholder_rep(self, node: fx.Node):
        if node.target == self.options.acted_input:
            return InputRep(self.options.input_action)
        if FIXED in node.meta:  # traced with a fixed non-tensor value (equivfx.trace.trace)
            return Trivial()
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            b = self.options.example_batch
            if len(tm.shape) >= 1 and b is not None and tm.shape[0] == b:
                return Folded(0)
            return Trivial()
        return Folded(0)  # assumed batched; the lift repeats it once per slot

    def _opaque_leaf(self, node: fx.Node, ctx: BatchCtx):
        a = node.args[0] if node.args else None
        ax = ctx.axis(a) if isinstance(a, fx.Node) else None
        if ax is None:
            ax = 0
        log.info("equivfx: opaque leaf %s\n%s", node.target, describe_node(node))
        out = node.meta.get("tensor_meta")
        container = out is not None and not hasattr(out, "shape")
        if out is None:
            container = False
        return Folded(ax, container=container)
