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

import torch
import torch.fx as fx

from equivfx.meta import REP, RULE, BatchSize, Folded, InputRep, Trivial, set_rep
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
    "per_slot_difference",
]

log = logging.getLogger(__name__)

BATCH_LITERAL = "equivfx.batch_literal"
"""``node.meta[BATCH_LITERAL] = (position, multiple)``: a literal batch size ``to-map`` rewrites."""


class OpaqueLeafWarning(UserWarning):
    """A leaf module with no rule is assumed to treat batch samples independently."""


class BatchMixingWarning(UserWarning):
    """An opaque leaf treats the samples of a batch together: the compiled model runs one slot
    per pass instead of folding the slots into the batch."""


MIXING_SCALE = 100.0
"""A leaf mixes samples where folded and per-slot outputs differ by more than this many times the
dtype's verify tolerance: batch-size-dependent kernels round differently, a leaf that reads
``len(x)`` or sums over the batch differs by far more."""


def opaque_leaves(gm: fx.GraphModule) -> tuple[str, ...]:
    """The targets of the leaf module calls annotated without an op rule."""
    return tuple(
        dict.fromkeys(
            n.target
            for n in gm.graph.nodes
            if n.op == "call_module" and n.meta.get(RULE) == OPAQUE_LEAF
        )
    )


def per_slot_difference(module, node: fx.Node, args, kwargs, out, slots: int) -> float | None:
    """Whether the leaf ``module`` (called by ``node`` on ``args``, giving ``out``) computes on
    the folded batch what it computes on each slot's part alone: None where it does (or where
    its inputs or output cannot be cut into ``slots`` parts), else the largest difference.

    Folded inputs (``node.args`` annotated :class:`Folded`) are cut slot-major along their batch
    axis; other inputs are passed whole, as the folded call gets them. The per-slot calls get
    copies (a leaf may write its input) and the module's buffers are restored after them."""
    from equivfx.verify.tolerance import abs_error, tolerance, within

    out_rep = node.meta.get(REP)
    if not isinstance(out_rep, Folded) or out_rep.container or not isinstance(out, torch.Tensor):
        return None
    cuts = {}
    for key, arg in [*enumerate(node.args), *node.kwargs.items()]:
        rep = arg.meta.get(REP) if isinstance(arg, fx.Node) else None
        if not isinstance(rep, Folded):
            continue
        value = args[key] if isinstance(key, int) else kwargs[key]
        axis = rep.batch_axis
        if rep.container or not isinstance(value, torch.Tensor) or value.shape[axis] % slots:
            return None
        cuts[key] = value.chunk(slots, axis)
    if not cuts or out.shape[out_rep.batch_axis] % slots:
        return None

    def copy(v):
        return v.clone() if isinstance(v, torch.Tensor) else v

    buffers = {name: b.clone() for name, b in module.named_buffers()}
    parts = []
    try:
        for s in range(slots):
            args_s = [copy(cuts[i][s] if i in cuts else a) for i, a in enumerate(args)]
            kwargs_s = {k: copy(cuts[k][s] if k in cuts else v) for k, v in kwargs.items()}
            part = module(*args_s, **kwargs_s)
            if not isinstance(part, torch.Tensor):
                return None
            parts.append(part)
    except Exception as err:  # noqa: BLE001 - the folded call ran; this one cannot tell
        log.info("equivfx: leaf %s fails on one slot's part: %s", node.target, err)
        return None
    finally:
        for name, b in module.named_buffers():
            if name in buffers and b.shape == buffers[name].shape:
                b.copy_(buffers[name])
    per_slot = torch.cat(parts, out_rep.batch_axis)
    rtol, atol = tolerance(out.dtype)
    if within(out, per_slot, MIXING_SCALE * rtol, MIXING_SCALE * atol):
        return None
    return abs_error(out, per_slot)


def _carries(rep) -> bool:
    return isinstance(rep, (Folded, InputRep)) or (isinstance(rep, BatchSize))


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
                rep = self._opaque_leaf(node, module, ctx)
                set_rep(node, rep, OPAQUE_LEAF)
            else:
                rep = rule.batch(ctx)
                set_rep(node, rep, rule.name)
            reps[node] = rep
        for node, lit in literals.items():
            node.meta[BATCH_LITERAL] = lit
        return PassResult(gm, False)

    def _placeholder_rep(self, node: fx.Node):
        if node.target == self.options.acted_input:
            return InputRep(self.options.input_action)
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            b = self.options.example_batch
            if len(tm.shape) >= 1 and b is not None and tm.shape[0] == b:
                return Folded(0)
            return Trivial()
        return Folded(0)  # assumed batched; the lift repeats it once per slot

    def _opaque_leaf(self, node: fx.Node, module, ctx: BatchCtx):
        a = node.args[0] if node.args else None
        ax = ctx.axis(a) if isinstance(a, fx.Node) else None
        if ax is None:
            ax = 0
        warnings.warn(
            f"equivfx: leaf module {node.target!r} ({type(module).__name__}) has no op rule; it is "
            "assumed to treat batch samples independently. compile checks this on example_inputs "
            "(and chunk='auto' at the first call) and runs one slot per pass where it does not "
            "hold; register a rule with equivfx.passes.rules.register to make it explicit.",
            OpaqueLeafWarning,
            stacklevel=4,
        )
        log.info("equivfx: opaque leaf %s\n%s", node.target, describe_node(node))
        out = node.meta.get("tensor_meta")
        container = out is not None and not hasattr(out, "shape")
        if out is None:
            container = False
        return Folded(ax, container=container)
