"""The per-op rule table: what equivfx knows about each op, in one place (like JAX's per-primitive
rules).

A rule answers three questions about one op:

- **batch**: given where the batch axis sits in the op's inputs, where is it in the output? This is
what
  makes folding the |G| slots into the batch axis legal. A rule raises :class:`BatchMixingError`
  when the op mixes samples (a reduction over the batch axis, a concatenation along it, a sample
  index ...).
- **commutes**: does ``op(g . x) == g . op(x)`` hold for a given input action (pointwise ops under
  any permutation of entries, 1x1 convolutions under spatial actions, circular convolutions under
  cyclic shifts, ...)? Used by cost passes.
- **invariant**: does ``op(g . x) == op(x)`` hold (symmetric reductions over every acted axis,
  adaptive pools to size 1 along every acted axis)?
  Used by cost passes: past such an op every slot holds the same value.
- **linear**: is the op linear in its tensor inputs?

Rules are keyed by the op: the function object for ``call_function`` nodes, ``"Tensor.<name>"`` for
``call_method`` nodes and the module class for ``call_module`` nodes. Each rule carries an
:class:`Example` so the test suite checks every claim numerically, parametrised over this registry.
A node whose op has no rule, where the pass needs one, is an error naming the op
(:class:`MissingRuleError`); :func:`register` adds rules for user ops.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from equivfx.errors import BatchMixingError, MissingRuleError, ModelTypeError, explain
from equivfx.groups.actions import ProductAction, RollAction
from equivfx.meta import REP, BatchSize, CosetFolded, Folded, InputRep, Rep, Trivial
from equivfx.trace import META_ATTRIBUTES, expect_given, in_place_op, stop_gradient

__all__ = [
    "OpRule",
    "Example",
    "BatchCtx",
    "RULES",
    "RANDOM_MODULES",
    "RANDOM_FUNCTIONS",
    "BATCH_STAT_MODULES",
    "draws_random",
    "training_sensitive",
    "register",
    "node_module",
    "rule_key",
    "lookup",
    "describe_node",
]


# ----------------------------------------------------------------------------------------------
# Context handed to a rule
# ----------------------------------------------------------------------------------------------


def describe_node(node: fx.Node, neighbours: int = 2) -> str:
    """A node for an error message: its ``format_node()``, the user's source line, nodes around
    it."""
    lines = [f"  node: {node.format_node()}"]
    trace = (node.stack_trace or "").strip().splitlines()
    if trace:
        src = [ln.strip() for ln in trace if ln.strip()]
        lines.append(f"  source: {' | '.join(src[-2:])}")
    around = []
    cur = node
    for _ in range(neighbours):
        cur = cur.prev
        if cur.op == "root":
            break
        around.insert(0, cur)
    cur = node
    for _ in range(neighbours):
        cur = cur.next
        if cur.op == "root":
            break
        around.append(cur)
    if around:
        lines.append("  around it:")
        for n in around:
            mark = "->" if n is node else "  "
            lines.append(f"   {mark} {n.format_node()}")
    return "\n".join(lines)


@dataclass
class BatchCtx:
    """What a rule's batch function sees of one node.

    Attributes:
        node: the node.
        reps: representation of every earlier node (node -> Rep).
        module: the called module for ``call_module`` nodes, else None.
        example_batch: the example inputs' batch size, when the compiler was given example inputs.
    """

    node: fx.Node
    reps: dict
    module: nn.Module | None = None
    example_batch: int | None = None
    literal_batch: dict = field(default_factory=dict)

    # -- reading the node ---------------------------------------------------------------------
    def arg(self, pos: int, name: str, default=None):
        """Argument ``pos`` (or keyword ``name``) of the node (positions count the tensor for
        methods)."""
        if len(self.node.args) > pos:
            return self.node.args[pos]
        return self.node.kwargs.get(name, default)

    def rep(self, a) -> Rep:
        if isinstance(a, fx.Node):
            return self.reps.get(a, Trivial())
        return Trivial()

    def axis(self, a) -> int | None:
        """The batch axis of argument ``a`` (a node), or None when it carries no batch."""
        r = self.rep(a)
        if isinstance(r, Folded):
            return r.batch_axis
        if isinstance(r, InputRep):
            return 0
        return None

    def rank(self, a) -> int | None:
        """Rank of argument ``a`` when shapes are known (example inputs given), else None."""
        if isinstance(a, fx.Node):
            tm = a.meta.get("tensor_meta")
            if tm is not None and hasattr(tm, "shape"):
                return len(tm.shape)
        return None

    def shape(self, a) -> tuple[int, ...] | None:
        if isinstance(a, fx.Node):
            tm = a.meta.get("tensor_meta")
            if tm is not None and hasattr(tm, "shape"):
                return tuple(tm.shape)
        return None

    def is_batch_int(self, a) -> bool:
        r = self.rep(a)
        return isinstance(r, BatchSize) and bool(r.batch_dims)

    def folded_inputs(self) -> list[tuple[fx.Node, int]]:
        out = []
        for a in self.node.all_input_nodes:
            ax = self.axis(a)
            if ax is not None:
                out.append((a, ax))
        return out

    def mixing(self, what: str, fix: str) -> BatchMixingError:
        return BatchMixingError(
            f"{what}: equivfx folds the |G| slots into the batch axis, so an op must treat batch "
            f"samples independently. Fix: {fix}.\n{describe_node(self.node)}"
        )

    def norm_dim(self, d: int, a) -> int | None:
        """Normalise a possibly negative dim of argument ``a``; None when unknown (no rank)."""
        if isinstance(d, fx.Node):  # computed in the model (x.dim() - 2): not known here
            raise self.mixing(
                f"the dim {d.name} is computed in the model, so equivfx cannot tell whether it "
                "is the batch axis",
                "pass the dim as a literal int",
            )
        if d >= 0:
            return d
        r = self.rank(a)
        return None if r is None else d + r


@dataclass(frozen=True)
class ShapeValue:
    """A Python number (``length`` None) or tuple of numbers read off the shapes of tensors in
    the graph, and where it holds the folded batch size (``batch``: the tuple's positions that
    hold it; for a number, {0} where it depends on it)."""

    length: int | None
    batch: frozenset[int]


_NUMBER_OPS = frozenset(
    {
        operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
        operator.mod, operator.pow, operator.neg, operator.pos,
    }
)  # fmt: skip


def shape_value(node) -> ShapeValue | None:
    """What ``node`` holds, if it is a number or shape tuple read off tensors (with the example
    inputs' shapes, which give ranks): ``t.shape`` and ``t.size()``; ``t.size(d)`` and ``t.dim()``
    for literal d; items and slices of such tuples at literal positions; arithmetic on such
    numbers and literals. None for anything else (tensors included). Positions are computed
    here from the ranks, not taken from the annotated reps."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    args, target = node.args, node.target
    if (target is getattr and len(args) == 2 and args[1] == "shape") or (
        target == "size" and len(args) == 1 and not node.kwargs
    ):
        return _shape_of(args[0])
    if target == "size" and (len(args) == 2 or "dim" in node.kwargs):
        whole = _shape_of(args[0])
        d = args[1] if len(args) == 2 else node.kwargs["dim"]
        if whole is None or type(d) is not int or not -whole.length <= d < whole.length:
            return None
        return ShapeValue(None, frozenset({0}) if d % whole.length in whole.batch else frozenset())
    if target in ("dim", "ndimension") and len(args) == 1 and isinstance(args[0], fx.Node):
        return ShapeValue(None, frozenset()) if _shape_of(args[0]) is not None else None
    if target is operator.getitem and len(args) == 2:
        src = shape_value(args[0])
        if src is None or src.length is None or not _literal_index(args[1]):
            return None
        return _index_shape(src.length, src.batch, args[1])
    if target in _NUMBER_OPS and not node.kwargs:
        carries = False
        for a in args:
            if isinstance(a, fx.Node):
                v = shape_value(a)
                if v is None or v.length is not None:
                    return None
                carries = carries or bool(v.batch)
            elif type(a) not in (int, float):
                return None
        return ShapeValue(None, frozenset({0}) if carries else frozenset())
    return None


def _literal_index(idx) -> bool:
    """``idx`` is an int, or a slice of ints and Nones (not values computed in the model)."""
    return type(idx) is int or (
        isinstance(idx, slice)
        and all(v is None or type(v) is int for v in (idx.start, idx.stop, idx.step))
    )


def _index_shape(length: int, batch: frozenset[int], idx) -> ShapeValue | None:
    """``shape[idx]`` (a literal index) of a shape of ``length`` entries holding the batch size at
    ``batch``: the number at idx, or the tuple the slice keeps, with where the batch size lies
    in it. None for an int out of range."""
    if type(idx) is int:
        if not -length <= idx < length:
            return None
        return ShapeValue(None, frozenset({0}) if idx % length in batch else frozenset())
    kept = range(length)[idx]
    return ShapeValue(len(kept), frozenset(j for j, p in enumerate(kept) if p in batch))


def _shape_of(tensor) -> ShapeValue | None:
    """The shape of a tensor node with a known rank: where its folded batch axis is."""
    shape = (
        getattr(tensor.meta.get("tensor_meta"), "shape", None)
        if isinstance(tensor, fx.Node)
        else None
    )
    if shape is None:
        return None
    rep = tensor.meta.get(REP)
    batch = getattr(rep, "batch_axis", 0) if isinstance(rep, (Folded, CosetFolded)) else None
    if isinstance(rep, Folded) and rep.container:
        return None
    return ShapeValue(len(shape), frozenset() if batch is None else frozenset({batch}))


def number_off_shapes(node) -> bool:
    """``node`` is a number read off shapes that does not depend on the folded batch size
    (:func:`shape_value`): a size of another axis, a rank, arithmetic on such."""
    value = shape_value(node)
    return value is not None and value.length is None and not value.batch


BatchFn = Callable[[BatchCtx], Rep]
CommuteFn = Callable[[BatchCtx, object], bool]


@dataclass(frozen=True)
class Example:
    """A small instance of an op, for the registry's own tests.

    Attributes:
        build: returns an ``nn.Module`` whose forward applies the op once (for module rules, the
            module itself).
        shapes: input shapes, batch first.
        group: a group spec whose default action the commutation claim is checked against.
        kind: ``"float"`` inputs, or ``"index"`` for integer inputs (embeddings).
    """

    build: Callable[[], nn.Module]
    shapes: tuple[tuple[int, ...], ...]
    group: str = "C4"
    kind: str = "float"


@dataclass(frozen=True)
class OpRule:
    """Per-op knowledge. See the module docstring."""

    name: str
    kind: str
    batch: BatchFn
    linear: bool = False
    commutes: CommuteFn = lambda ctx, action: False
    example: Example | None = None
    note: str = ""
    invariant: CommuteFn = lambda ctx, action: False


RULES: dict[object, OpRule] = {}

RANDOM_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.RReLU,
)
"""Modules that draw random masks in training: cost passes never move them across the lift or the
pool, where a mask would be shared between slots (or drawn once for all of them)."""

DROPOUT_FUNCTIONS = {
    F.dropout: "training", F.dropout1d: "training", F.dropout2d: "training",
    F.dropout3d: "training", F.alpha_dropout: "training", F.feature_alpha_dropout: "training",
    torch.dropout: "train", torch.alpha_dropout: "train", torch.feature_dropout: "train",
    torch.feature_alpha_dropout: "train",
}  # fmt: skip
"""Dropout functions and the name of their training flag (their third argument): in eval mode
(the flag False) they return their input."""

RANDOM_FUNCTIONS = (
    *DROPOUT_FUNCTIONS,
    F.rrelu,
    torch.bernoulli,
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.normal,
    torch.poisson,
    torch.multinomial,
)
"""Functions that draw random numbers (see RANDOM_MODULES): per sample, or a tensor whose shape
is read off a folded value (``torch.randn(mu.shape)``), one draw per slot."""

RANDOM_METHODS = frozenset(
    {"bernoulli", "bernoulli_", "uniform_", "normal_", "exponential_", "random_", "geometric_",
     "log_normal_", "cauchy_", "multinomial"}
)  # fmt: skip
"""Tensor methods that draw random numbers."""

BATCH_STAT_MODULES = (nn.modules.batchnorm._BatchNorm,)
"""Modules that normalise with statistics over the batch in training (BatchNorm, SyncBatchNorm)."""


def draws_random(node: fx.Node, module: nn.Module | None = None) -> bool:
    """Whether ``node`` draws random numbers per sample (dropout in training, ``bernoulli`` ...):
    moved across the lift or the pool, one draw would serve every slot."""
    if node.op == "call_module":
        return isinstance(module, RANDOM_MODULES)
    if node.op == "call_function":
        return node.target in RANDOM_FUNCTIONS
    return node.op == "call_method" and node.target in RANDOM_METHODS


def training_sensitive(node: fx.Node, module: nn.Module | None = None) -> bool:
    """Whether ``node`` draws random numbers or uses batch statistics in training mode: its result
    then depends on which (and how many) samples share its batch, so passes that change the number
    of slots a batch holds must leave it alone."""
    if draws_random(node, module):
        return True
    if node.op == "call_module":
        return isinstance(module, BATCH_STAT_MODULES)
    return node.op == "call_function" and node.target is F.batch_norm


OPAQUE_LEAF = "opaque-leaf"
"""``node.meta["equivfx.rule"]`` of a leaf module call with no op rule (``annotate-reps``)."""


def mutates(node: fx.Node, modules) -> bool:
    """The node may write into one of its inputs: an in-place method or function (``add_``,
    ``torch.relu_``, ``x[i] = v``, ``+=``), ``inplace=True``, or an ``out=`` argument."""
    if node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    if node.op in ("call_method", "call_function"):
        return in_place_op(node)
    if node.meta.get("equivfx.rule") == OPAQUE_LEAF:  # untraced: anything may happen inside
        return True
    if node.op == "call_module":
        return getattr(modules.get(node.target), "inplace", False) is True
    return False


def node_module(node: fx.Node, modules: dict) -> nn.Module | None:
    """The module ``node`` calls (from ``dict(gm.named_modules())``), None for other nodes."""
    return modules.get(node.target) if node.op == "call_module" else None


def rule_key(node: fx.Node, module: nn.Module | None = None):
    """The registry key of a node's op."""
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return type(module)
    return node.op


def lookup(key) -> OpRule | None:
    """The rule for ``key``; module classes fall back to their torch.nn base classes."""
    if key in RULES:
        return RULES[key]
    if isinstance(key, type) and issubclass(key, nn.Module):
        for base in key.__mro__[1:]:
            if (
                base in RULES
                and base.__module__.startswith("torch.nn")
                and (key.forward is base.forward)
            ):
                return RULES[base]
    return None


def register(keys, rule: OpRule) -> OpRule:
    """Register ``rule`` for one key or several (functions, ``"Tensor.name"``, module classes).

    Example:
        >>> r = register("Tensor.my_op", OpRule("my_op", "pointwise", batch=same_axis))
        >>> lookup("Tensor.my_op").name
        'my_op'
    """
    if not isinstance(keys, (list, tuple)):
        keys = [keys]
    for k in keys:
        RULES[k] = rule
    return rule


def missing_rule(node: fx.Node, key) -> MissingRuleError:
    name = getattr(key, "__qualname__", None) or getattr(key, "__name__", None) or str(key)
    return MissingRuleError(
        explain(
            f"equivfx has no rule for op {name!r}, which consumes a batch-carrying tensor",
            node.name,
            "an op in equivfx.passes.rules.RULES",
            "register one with equivfx.passes.rules.register(op, OpRule(...)) stating where the "
            "batch "
            "axis goes, or wrap the code in a submodule registered with "
            "equivfx.trace.register_leaf",
        )
        + "\n"
        + describe_node(node)
    )


# ----------------------------------------------------------------------------------------------
# Batch functions
# ----------------------------------------------------------------------------------------------


def trivial_only(ctx: BatchCtx) -> Rep:
    """Ops that never see a batch (creation of constants, metadata)."""
    return Trivial()


def same_axis(ctx: BatchCtx) -> Rep:
    """Pointwise / broadcasting ops: the batch axis lines up across inputs, counted from the end."""
    folded = ctx.folded_inputs()
    if not folded:
        return Trivial()
    out_rank = ctx.rank(ctx.node)
    from_end = set()
    from_front = set()
    for a, ax in folded:
        r = ctx.rank(a)
        if r is not None and out_rank is not None:
            from_end.add(ax - r)
        else:
            from_front.add(ax)
    if from_end and out_rank is not None:
        axes = {out_rank + e for e in from_end} | from_front
    else:
        axes = from_front | ({out_rank + e for e in from_end} if out_rank else set())
    if len(axes) != 1:
        raise ctx.mixing(
            f"inputs of {ctx.node.target} carry the batch on different axes {sorted(axes)}",
            "move the batch axis of the inputs to the same position before combining them",
        )
    return Folded(axes.pop())


def first_axis(required: int | None = 0, not_last: bool = False) -> BatchFn:
    """Ops that follow their first tensor argument's batch axis (modules, functional layers)."""

    def fn(ctx: BatchCtx) -> Rep:
        a = ctx.node.args[0] if ctx.node.args else next(iter(ctx.node.kwargs.values()), None)
        ax = ctx.axis(a)
        if ax is None:
            # a batch may still enter through another argument (e.g. a weight computed from x)
            if ctx.folded_inputs():
                raise ctx.mixing(
                    f"{_op_name(ctx)} takes a batch-carrying tensor as a weight or parameter",
                    "compute weights from parameters only, or register a rule for this use",
                )
            return Trivial()
        if required is not None and ax != required:
            raise ctx.mixing(
                f"{_op_name(ctx)} expects the batch on axis {required}, got axis {ax}",
                f"move the batch to axis {required} before this op",
            )
        if not_last:
            r = ctx.rank(a)
            if r is not None and ax == r - 1:
                raise ctx.mixing(
                    f"{_op_name(ctx)} contracts the last axis, which holds the batch",
                    "transpose so the batch is not the last axis",
                )
        others = [b for b, _ in ctx.folded_inputs() if b is not a]
        if others:
            raise ctx.mixing(
                f"{_op_name(ctx)} takes a batch-carrying tensor as a weight or parameter",
                "compute weights from parameters only",
            )
        return Folded(ax)

    return fn


def _op_name(ctx: BatchCtx) -> str:
    if ctx.module is not None:
        return type(ctx.module).__name__
    t = ctx.node.target
    return getattr(t, "__name__", str(t))


def _dims(d) -> list[int] | None:
    if d is None:
        return None
    if isinstance(d, (list, tuple)):
        return list(d)
    return [d]


def reduction(
    dim_pos: int = 1, dim_name: str = "dim", keepdim_pos: int = 2, full_ok=False
) -> BatchFn:
    """Reductions (sum, mean, amax ...): refused over the batch axis or over everything."""

    def fn(ctx: BatchCtx) -> Rep:
        x = ctx.node.args[0]
        ax = ctx.axis(x)
        if ax is None:
            if ctx.folded_inputs():
                return same_axis(ctx)
            return Trivial()
        dims = _dims(ctx.arg(dim_pos, dim_name))
        if dims is None or dims == []:
            raise ctx.mixing(
                f"{_op_name(ctx)} reduces over every axis, the batch axis included",
                f"reduce over the sample axes only, e.g. {_op_name(ctx)}(dim=tuple(range(1, "
                "x.dim())))",
            )
        keepdim = bool(ctx.arg(keepdim_pos, "keepdim", False))
        norm = [ctx.norm_dim(d, x) for d in dims]
        if ax in norm:
            raise ctx.mixing(
                f"{_op_name(ctx)} reduces over dim {dims}, which is the batch axis {ax}",
                "reduce over the sample axes only",
            )
        if keepdim:
            return Folded(ax)
        return Folded(ax - sum(1 for d in norm if d is not None and d < ax))

    return fn


def along_dim(
    dim_pos: int = 1, dim_name: str = "dim", default: int | None = None, drops_dim: bool = False
) -> BatchFn:
    """Ops that act along one dim (softmax, cumsum, flip ...): refused along the batch axis."""

    def fn(ctx: BatchCtx) -> Rep:
        x = ctx.node.args[0]
        ax = ctx.axis(x)
        if ax is None:
            return same_axis(ctx) if ctx.folded_inputs() else Trivial()
        dims = _dims(ctx.arg(dim_pos, dim_name, default))
        if dims is None:
            raise ctx.mixing(
                f"{_op_name(ctx)} without a dim may act along the batch axis",
                "pass dim= explicitly",
            )
        norm = [ctx.norm_dim(d, x) for d in dims]
        if ax in norm:
            raise ctx.mixing(
                f"{_op_name(ctx)} acts along the batch axis {ax}", "apply it along a sample axis"
            )
        if drops_dim:
            return Folded(ax - sum(1 for d in norm if d is not None and d < ax))
        return Folded(ax)

    return fn


def cat_like(stack: bool = False) -> BatchFn:
    """torch.cat / torch.stack: refused along the batch axis or with tensors that carry no batch."""

    def fn(ctx: BatchCtx) -> Rep:
        tensors = ctx.arg(0, "tensors")
        dim = ctx.arg(1, "dim", 0)
        if isinstance(tensors, fx.Node):  # a tuple one node made, joined whole: h.split(2, 1)
            rep = ctx.rep(tensors)
            items = rep.items if isinstance(rep, Folded) else None
            if items and len({getattr(i, "batch_axis", None) for i in items}) != 1:
                raise ctx.mixing(
                    "joined tensors carry the batch on different axes, or some none",
                    "align their batch axes first",
                )
            tensors = [tensors]
        nodes = [t for t in tensors if isinstance(t, fx.Node)]
        folded = [(t, ctx.axis(t)) for t in nodes if ctx.axis(t) is not None]
        if not folded:
            return Trivial()
        axes = {a for _, a in folded}
        if len(axes) != 1:
            raise ctx.mixing(
                "joined tensors carry the batch on different axes", "align their batch axes first"
            )
        if len(folded) != len(tensors):
            raise ctx.mixing(
                f"{_op_name(ctx)} joins batch-carrying tensors with ones that carry no batch",
                "expand the constant tensor to the batch size with x.size(0) first",
            )
        ax = axes.pop()
        rank = ctx.rank(folded[0][0])
        if dim < 0:
            d = None if rank is None else dim + rank + (1 if stack else 0)
        else:
            d = dim
        if d is None:  # a negative dim of unknown rank: a trailing sample axis
            return Folded(ax)
        if stack:
            return Folded(ax + 1 if d <= ax else ax)
        if d == ax:
            raise ctx.mixing(
                f"{_op_name(ctx)} joins tensors along the batch axis {ax}",
                "join along a sample axis instead",
            )
        return Folded(ax)

    return fn


def _shape_entries(ctx: BatchCtx, start: int) -> list | None:
    """Target-shape entries of view/reshape/expand/repeat-style calls."""
    args = ctx.node.args[start:]
    if not args:
        size = ctx.node.kwargs.get("size", ctx.node.kwargs.get("shape"))
        if size is None:
            return None
        args = (size,)
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0])
    if len(args) == 1 and isinstance(args[0], fx.Node) and isinstance(ctx.rep(args[0]), BatchSize):
        return [args[0]]  # a whole shape tuple, e.g. x.view(y.shape)
    return list(args)


def shaped(start: int = 1, produces: bool = False) -> BatchFn:
    """view / reshape / expand / repeat / factories: find where the batch size sits in the target.

    An entry that is the folded batch size (read off a folded tensor with ``x.size(0)``) marks the
    output's batch axis. A leading ``-1`` keeps the batch on axis 0. A literal int equal to (a
    multiple
    of) the example batch size is recorded for the ``to-map`` pass to rewrite; any other literal
    in the batch position is refused, because the compiled model runs on |G| times the batch.
    """

    def fn(ctx: BatchCtx) -> Rep:
        src = ctx.node.args[0] if (ctx.node.args and not produces) else None
        ax = ctx.axis(src) if src is not None else None
        entries = _shape_entries(ctx, start)
        if entries is None:
            return Folded(ax) if ax is not None else Trivial()
        if len(entries) == 1 and isinstance(entries[0], fx.Node):
            rep = ctx.rep(entries[0])
            if isinstance(rep, BatchSize) and rep.batch_dims:
                return Folded(rep.batch_dims[0])
        positions = [
            i for i, e in enumerate(entries) if isinstance(e, fx.Node) and ctx.is_batch_int(e)
        ]
        if positions:
            return Folded(positions[0])
        if ax is None:
            return Trivial()
        first = entries[0] if entries else None
        name = _op_name(ctx)
        if ctx.node.target in ("expand", "repeat") and ax is not None:
            # expand/repeat keep the batch in place when that entry is -1 (expand) or 1 (repeat)
            lead = len(entries) - (ctx.rank(src) or len(entries))
            pos = ax + lead
            e = entries[pos] if 0 <= pos < len(entries) else None
            if (ctx.node.target == "expand" and e == -1) or (
                ctx.node.target == "repeat" and e == 1
            ):
                return Folded(pos)
            first, ax_pos = e, pos
        else:
            ax_pos = 0
            if ax != 0:
                raise ctx.mixing(
                    f"{name} reshapes a tensor whose batch is on axis {ax}",
                    "move the batch to axis 0 before reshaping",
                )
        if first == -1 and ctx.node.target not in ("repeat",):
            return Folded(ax_pos)
        if isinstance(first, int) and not isinstance(first, bool):
            b = ctx.example_batch
            if b is not None and b >= 2 and first % b == 0:
                ctx.literal_batch[ctx.node] = (ax_pos, first // b)
                return Folded(ax_pos)
            if b is None:
                raise ctx.mixing(
                    f"{name} has the literal {first} where the batch size goes; equivfx cannot "
                    "tell "
                    "whether it is the batch size",
                    "use x.size(0) (or -1) instead of a literal, or pass example_inputs (batch >= "
                    "2) "
                    "so equivfx can rewrite it",
                )
            raise ctx.mixing(
                f"{name} has the literal {first} where the batch size goes, but the example batch "
                f"size is {b}: this op mixes samples of the batch",
                "keep the batch axis intact (x.size(0) or -1 in that position)",
            )
        raise ctx.mixing(
            f"{name} has {first!r} where the batch size goes",
            "use x.size(0) or -1 in the batch position",
        )

    return fn


def flatten_rule(start_pos=1, end_pos=2, start_default=0, end_default=-1) -> BatchFn:
    def fn(ctx: BatchCtx) -> Rep:
        if ctx.module is not None:
            start, end = ctx.module.start_dim, ctx.module.end_dim
        else:
            start = ctx.arg(start_pos, "start_dim", start_default)
            end = ctx.arg(end_pos, "end_dim", end_default)
        x = ctx.node.args[0]
        ax = ctx.axis(x)
        if ax is None:
            return Trivial()
        s = ctx.norm_dim(start, x)
        e = ctx.norm_dim(end, x)
        if s is None:
            s = start if start >= 0 else 10**6
        if e is None:
            e = 10**6
        if ax < s:
            return Folded(ax)
        if ax == s:
            return Folded(ax)  # batch becomes the outer factor: slot-major order is kept
        if ax <= e:
            raise ctx.mixing(
                f"flatten(start_dim={start}) puts the batch inside another axis",
                "flatten from the batch axis or after it",
            )
        return Folded(ax - (e - s))

    return fn


def permute_rule(ctx: BatchCtx) -> Rep:
    x = ctx.node.args[0]
    ax = ctx.axis(x)
    if ax is None:
        return Trivial()
    dims = ctx.node.args[1:] or ctx.node.kwargs.get("dims")
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    dims = [d % len(dims) for d in dims]
    return Folded(dims.index(ax))


def transpose_rule(ctx: BatchCtx) -> Rep:
    x = ctx.node.args[0]
    ax = ctx.axis(x)
    if ax is None:
        return Trivial()
    if ctx.node.target in ("t",) or ctx.node.target is torch.t:
        return Folded(1 - ax if ax in (0, 1) else ax)
    d0 = ctx.norm_dim(ctx.arg(1, "dim0"), x)
    d1 = ctx.norm_dim(ctx.arg(2, "dim1"), x)
    if d0 is None or d1 is None:
        r0, r1 = ctx.arg(1, "dim0"), ctx.arg(2, "dim1")
        if ax not in (r0, r1):
            return Folded(ax)
        raise ctx.mixing(
            "transpose with negative dims on a tensor of unknown rank",
            "pass example_inputs or use non-negative dims",
        )
    if ax == d0:
        return Folded(d1)
    if ax == d1:
        return Folded(d0)
    return Folded(ax)


def movedim_rule(ctx: BatchCtx) -> Rep:
    x = ctx.node.args[0]
    ax = ctx.axis(x)
    if ax is None:
        return Trivial()
    src, dst = _dims(ctx.arg(1, "source")), _dims(ctx.arg(2, "destination"))
    r = ctx.rank(x)
    if r is None:
        if any(d < 0 for d in src + dst):
            raise ctx.mixing(
                "movedim with negative dims on a tensor of unknown rank", "pass example_inputs"
            )
        r = max(src + dst + [ax]) + 1
    order = [d for d in range(r) if d not in [s % r for s in src]]
    pairs = zip([s % r for s in src], [d % r for d in dst], strict=True)
    for s, d in sorted(pairs, key=lambda p: p[1]):
        order.insert(d, s)
    return Folded(order.index(ax))


def unsqueeze_rule(ctx: BatchCtx) -> Rep:
    x = ctx.node.args[0]
    ax = ctx.axis(x)
    if ax is None:
        return Trivial()
    d = ctx.arg(1, "dim")
    if d < 0:
        r = ctx.rank(x)
        if r is None:
            return Folded(ax)  # a trailing position: the batch (axis 0 in practice) does not move
        d = d + r + 1
    return Folded(ax + 1 if d <= ax else ax)


def squeeze_rule(ctx: BatchCtx) -> Rep:
    x = ctx.node.args[0]
    ax = ctx.axis(x)
    if ax is None:
        return Trivial()
    dims = _dims(ctx.arg(1, "dim"))
    shape = ctx.shape(x)
    if dims is None:
        if shape is None:
            return Folded(ax)
        if ctx.example_batch == 1:
            raise ctx.mixing(
                "squeeze() on a batch of size 1 would squeeze the batch axis",
                "pass example_inputs with batch >= 2, or squeeze named dims",
            )
        return Folded(ax - sum(1 for i, s in enumerate(shape) if s == 1 and i < ax))
    norm = [ctx.norm_dim(d, x) for d in dims]
    if ax in norm:
        raise ctx.mixing("squeeze along the batch axis", "squeeze a sample axis")
    return Folded(ax - sum(1 for d in norm if d is not None and d < ax))


def _index_entries(idx) -> list:
    return list(idx) if isinstance(idx, tuple) else [idx]


def getitem_rule(ctx: BatchCtx) -> Rep:
    src, idx = ctx.node.args[0], ctx.node.args[1]
    rep = ctx.rep(src)
    if isinstance(rep, BatchSize):
        # indexing a shape tuple, whose length is the rank of the tensor it was read off (or
        # that of a slice of such a shape)
        value = shape_value(src)
        owner = src.args[0] if src.args else None
        rank = value.length if value is not None else None
        if rank is None and isinstance(owner, fx.Node):
            rank = ctx.rank(owner)
        if not rep.batch_dims:  # no batch size in the tuple: none in any part of it
            return BatchSize(())
        if not _literal_index(idx):
            raise ctx.mixing(
                "a shape holding the batch size is indexed with a value computed in the model, "
                "so equivfx cannot tell whether the batch size is taken",
                "index the shape with literal ints",
            )
        if rank is not None:  # the batch size at idx, or where it lies in the slice
            value = _index_shape(rank, frozenset(rep.batch_dims), idx)
            return BatchSize(tuple(sorted(value.batch)) if value is not None else ())
        if isinstance(idx, int):  # rank unknown: x.shape[-k] counts from the end, past axis 0
            return BatchSize((0,)) if idx in rep.batch_dims else BatchSize(())
        start = idx.start or 0
        if idx.step not in (None, 1) or (start < 0 and rep.batch_dims != (0,)):
            raise ctx.mixing(
                "a slice of a shape holding the batch size, with a step, or with a negative "
                "start after the batch axis, on a tensor of unknown rank: equivfx cannot tell "
                "where the batch size lands",
                "compile with example_inputs=, or slice with literal non-negative bounds",
            )
        if start < 0:  # x.shape[-k:] of a tensor batched on axis 0: its trailing sizes
            return BatchSize(())
        kept = [  # a negative stop keeps the leading positions of any longer shape
            d - start
            for d in rep.batch_dims
            if d >= start and (idx.stop is None or idx.stop < 0 or d < idx.stop)
        ]
        return BatchSize(tuple(kept))
    if isinstance(rep, Folded) and rep.container:
        if rep.items:  # entries on different axes: a constant index picks its entry's
            if not isinstance(idx, int) or not -len(rep.items) <= idx < len(rep.items):
                raise ctx.mixing(
                    f"indexing a tuple whose entries carry the batch on different axes with "
                    f"{idx!r}",
                    "index the tuple with a constant, or unpack it",
                )
            return rep.items[idx]
        return Folded(rep.batch_axis)
    ax = ctx.axis(src)
    if ax is None:
        if ctx.folded_inputs():
            raise ctx.mixing("indexing with a batch-carrying index", "index with constants")
        return Trivial()
    if isinstance(idx, str) and isinstance(src, fx.Node) and src.op == "placeholder":
        raise ModelTypeError(  # batch["image"]: the acted input is a dict, not a tensor
            explain(
                f"the model's input {src.target!r} is indexed with a key, so it is a dict or "
                "another container, but G acts on the first input as a tensor (it transforms "
                "it and folds the slots into its batch axis)",
                idx,
                "a tensor as forward's first input",
                "compile a wrapper module whose forward takes that tensor first and builds the "
                f"container: def forward(self, x, **rest): return self.model({{{idx!r}: x, "
                "**rest})",
            )
        )
    entries = _index_entries(idx)
    pos = 0  # input axis
    out = 0  # output axis
    ellipsis_seen = False
    r = ctx.rank(src)
    n_real = sum(1 for e in entries if e is not None and e is not Ellipsis)
    for e in entries:
        if e is Ellipsis:
            if r is None:
                # the batch (at axis 0) comes before an ellipsis that starts the index
                if pos <= ax and ax != 0:
                    raise ctx.mixing(
                        "indexing with ... on a tensor of unknown rank", "pass example_inputs"
                    )
                ellipsis_seen = True
                break
            skip = r - n_real
            if pos <= ax < pos + skip:
                return Folded(out + (ax - pos))
            pos += skip
            out += skip
            continue
        if e is None:
            out += 1
            continue
        if pos == ax:
            if isinstance(e, slice) and e == slice(None):
                return Folded(out)
            fix = "index sample axes only (x[:, ...])"
            if (
                isinstance(src, fx.Node)
                and src.meta.get("equivfx.rule") == OPAQUE_LEAF
                and "tensor_meta" not in src.meta
            ):  # without example inputs, a leaf's output is taken for one tensor
                fix += (
                    f"; or, if leaf module {src.target!r} returns a tuple, compile with "
                    "example_inputs= so equivfx sees its outputs"
                )
            raise ctx.mixing(f"indexing {e!r} on the batch axis selects samples", fix)
        if isinstance(e, int):
            pos += 1
            continue
        if isinstance(e, fx.Node) and ctx.axis(e) is not None:
            raise ctx.mixing("indexing with a batch-carrying index", "index with constants")
        pos += 1
        out += 1
    if ellipsis_seen:
        return Folded(out + ax - pos)
    return Folded(out + (ax - pos))


def size_rule(ctx: BatchCtx) -> Rep:
    x = ctx.node.args[0]
    ax = ctx.axis(x)
    d = ctx.arg(1, "dim")
    if ax is None:
        return Trivial() if d is not None else BatchSize(())
    if d is None:
        return BatchSize((ax,))
    nd = ctx.norm_dim(d, x)
    return BatchSize((0,)) if nd == ax else BatchSize(())


# the fields of torch.return_types (max/min/sort/topk/kthvalue/mode/median/cummax with a dim,
# aminmax, frexp, linalg's factorisations...), each with its position in the tuple
_RETURN_FIELDS = {
    "values": 0,
    "indices": 1,
    "min": 0,
    "max": 1,
    "mantissa": 0,
    "exponent": 1,
    "eigenvalues": 0,
    "eigenvectors": 1,
    "U": 0,
    "S": 1,
    "V": 2,
    "Vh": 2,
    "Q": 0,
    "R": 1,
    "sign": 0,
    "logabsdet": 1,
    "L": 0,
    "LU": 0,
    "pivots": 1,
    "info": -1,
    "solution": 0,
    "residuals": 1,
    "rank": 2,
    "singular_values": 3,
    "inverse": 0,
}


def getattr_rule(ctx: BatchCtx) -> Rep:
    x, attr = ctx.node.args[0], ctx.node.args[1]
    ax = ctx.axis(x)
    rep = ctx.rep(x)
    if isinstance(rep, Folded) and rep.container:  # a named tuple's field: h.max(-1).values
        if not rep.items:  # every entry on the tuple's batch axis (a leaf's output object too)
            return Folded(rep.batch_axis)
        i = _RETURN_FIELDS.get(attr)
        if i is None or not -len(rep.items) <= i < len(rep.items):
            raise ctx.mixing(
                f"reading {attr!r} of a tuple whose entries carry the batch on different axes",
                "index the tuple with a constant, or unpack it",
            )
        return rep.items[i]
    if attr == "shape":
        return BatchSize((ax,)) if ax is not None else BatchSize(())
    if attr in ("T", "mT", "mH", "H"):
        if ax is None:
            return Trivial()
        r = ctx.rank(x)
        if attr in ("T", "H"):
            if r is None:
                raise ctx.mixing(
                    ".T on a batch-carrying tensor of unknown rank",
                    "use transpose(...) with explicit dims",
                )
            return Folded(r - 1 - ax)
        if r is not None and ax >= r - 2:
            raise ctx.mixing(".mT moves the batch axis", "transpose sample axes only")
        return Folded(ax)
    if attr in ("real", "imag", "data", "grad"):
        return Folded(ax) if ax is not None else Trivial()
    if ax is None or attr in META_ATTRIBUTES or attr.startswith("is_"):
        return Trivial()  # dtype, device, ndim, is_cuda, requires_grad ...
    if isinstance(x, fx.Node) and x.meta.get("equivfx.rule") == OPAQUE_LEAF:
        return Folded(ax)  # a field of what a leaf returned (out.logits): per sample, as it is
    # an attribute equivfx does not know, of a batch-carrying value: taking it for metadata
    # would drop the batch (the output unpooled, |G| times too many rows)
    raise ctx.mixing(
        f"reading the attribute {attr!r} of a batch-carrying tensor, which equivfx does not know",
        "compute it with a method or function equivfx has a rule for (x.max(-1)[0] for "
        "x.max(-1).values), or register a leaf module that does",
    )


def _reads_batch_size(ctx: BatchCtx) -> bool:
    """Whether an input of the node is the batch size read off a folded tensor (|G| B there)."""
    return any(
        isinstance(r, BatchSize) and r.batch_dims
        for r in (ctx.rep(a) for a in ctx.node.all_input_nodes)
    )


def _batch_size_as_value(ctx: BatchCtx, what: str) -> BatchMixingError:
    return ctx.mixing(
        f"{what} the batch size read off a tensor's shape, as a value: the compiled model reads "
        "|G| B there, not B, so its result would differ from the model's",
        "compute the value from a sample axis, or pass the batch size in as an argument",
    )


def _counts_batch(ctx: BatchCtx, a) -> bool:
    """``a`` is a number computed from ``numel`` of a tensor with a batch axis (or of a shape
    holding the batch size): a multiple of the batch size that its rep does not show."""
    stack, seen = [a], set()
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node) or not isinstance(ctx.rep(n), BatchSize):
            continue
        seen.add(n)
        if n.target in ("numel", torch.numel):
            counted = n.args[0] if n.args else n.kwargs.get("input")
            if ctx.axis(counted) is not None or ctx.is_batch_int(counted):
                return True
        stack.extend(n.all_input_nodes)
    return False


def int_arith(ctx: BatchCtx) -> Rep:
    """Arithmetic on Python ints read off shapes: the batch size stays a batch size. With a
    batch-carrying tensor, the ints are values: the batch size may not be one of them."""
    reps = [ctx.rep(a) for a in ctx.node.args]
    if any(isinstance(r, (Folded, InputRep)) for r in reps):
        name = getattr(ctx.node.target, "__name__", str(ctx.node.target))
        if _reads_batch_size(ctx):
            raise _batch_size_as_value(ctx, f"{name!r} combines a tensor with")
        if any(_counts_batch(ctx, a) for a in ctx.node.all_input_nodes):
            raise ctx.mixing(
                f"{name!r} combines a tensor with a count of elements (numel) of a tensor or "
                "shape that holds the batch: the compiled model counts |G| B samples there, not B",
                "count the elements of one sample (x[0].numel()), or pass the count in",
            )
        return same_axis(ctx)
    if any(isinstance(r, BatchSize) and r.batch_dims for r in reps):
        return BatchSize((0,))
    if any(isinstance(r, BatchSize) for r in reps):
        return BatchSize(())
    return Trivial()


def len_rule(ctx: BatchCtx) -> Rep:
    ax = ctx.axis(ctx.node.args[0])
    return BatchSize((0,)) if ax == 0 else BatchSize(())


def matmul_rule(ctx: BatchCtx) -> Rep:
    a, b = ctx.node.args[0], ctx.node.args[1]
    aa, ab = ctx.axis(a), ctx.axis(b)
    ra, rb = ctx.rank(a), ctx.rank(b)
    if aa is None and ab is None:
        return Trivial()
    if aa is not None and ra is not None and aa == ra - 1 and ra >= 1:
        raise ctx.mixing(
            "matmul contracts the batch axis of its first operand",
            "keep the batch on a leading axis",
        )
    if ab is not None:
        if rb is not None and rb <= 2:
            raise ctx.mixing(
                "matmul uses a batch-carrying 1-D/2-D tensor as the right operand, so "
                "samples are multiplied together",
                "use a batched (3-D or more) matmul",
            )
        if rb is not None and ab >= rb - 2:
            raise ctx.mixing(
                "matmul contracts the batch axis of its second operand",
                "keep the batch on a leading axis",
            )
    if aa is not None and ab is not None and aa != ab:
        raise ctx.mixing("matmul operands carry the batch on different axes", "align them")
    return Folded(aa if aa is not None else ab)


def _explicit_einsum(eq: str, ranks: list) -> str | None:
    """``eq`` with every ``...`` written as letters (right-aligned across operands, as einsum
    broadcasts them) and the output written out where it is implicit (the ellipsis, then the
    letters used once, in alphabetical order: einsum's rule); None where an operand with ``...``
    has an unknown rank."""
    eq = eq.replace(" ", "")
    ins, arrow, out = eq.partition("->")
    specs = ins.split(",")
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in eq]
    lengths = []
    for spec, r in zip(specs, ranks, strict=False):
        if "..." in spec:
            if r is None:
                return None
            lengths.append(r - len(spec.replace("...", "")))
    width = max(lengths, default=0)
    ellipsis = "".join(free[:width])
    written = []
    for spec, r in zip(specs, ranks, strict=False):
        if "..." in spec:
            n = r - len(spec.replace("...", ""))
            spec = spec.replace("...", ellipsis[width - n :] if n else "")
        written.append(spec)
    if not arrow:
        letters = "".join(written)
        once = sorted(c for c in set(letters) if letters.count(c) == 1 and c not in ellipsis)
        out = ellipsis + "".join(once)
    else:
        out = out.replace("...", ellipsis)
    return ",".join(written) + "->" + out


def einsum_rule(ctx: BatchCtx) -> Rep:
    eq = ctx.node.args[0]
    ops = ctx.node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    if not isinstance(eq, str):
        if any(ctx.axis(o) is not None for o in ops):
            raise ctx.mixing(
                "einsum in the sublist form", "write the equation as a string, e.g. 'bij,bjk->bik'"
            )
        return Trivial()
    if "..." in eq or "->" not in eq:
        written = _explicit_einsum(
            eq, [ctx.rank(o) if isinstance(o, fx.Node) else None for o in ops]
        )
        if written is None:
            if any(ctx.axis(o) is not None for o in ops):
                raise ctx.mixing(
                    "einsum with '...' on an operand of unknown rank",
                    "compile with example_inputs=, or write the equation with explicit indices",
                )
            return Trivial()
        eq = written
    ins, out = eq.replace(" ", "").split("->")
    letters = set()
    for spec, o in zip(ins.split(","), ops, strict=False):
        ax = ctx.axis(o)
        if ax is not None:
            letters.add(spec[ax])
    if not letters:
        return Trivial()
    if len(letters) != 1 or next(iter(letters)) not in out:
        raise ctx.mixing(
            "einsum sums over or mixes the batch index",
            "keep the batch index in every batch-carrying operand and in the output",
        )
    return Folded(out.index(letters.pop()))


def sdpa_rule(ctx: BatchCtx) -> Rep:
    qkv = [ctx.arg(i, n) for i, n in enumerate(("query", "key", "value"))]
    axes = {ctx.axis(t) for t in qkv}
    if axes == {None}:
        return Trivial()
    if len(axes) != 1:
        raise ctx.mixing(
            "attention inputs carry the batch on different axes (or some carry none)",
            "give query, key and value the same batch axis",
        )
    ax = axes.pop()
    r = ctx.rank(qkv[0])
    if r is not None and ax >= r - 2:
        raise ctx.mixing("attention contracts the axis holding the batch", "keep the batch leading")
    return Folded(ax)


def mha_rule(ctx: BatchCtx) -> Rep:
    m = ctx.module
    qkv = [ctx.arg(i, n) for i, n in enumerate(("query", "key", "value"))]
    want = 0 if getattr(m, "batch_first", False) else 1
    axes = {ctx.axis(t) for t in qkv if isinstance(t, fx.Node)}
    if axes == {None}:
        return Trivial()
    if axes != {want}:
        raise ctx.mixing(
            f"MultiheadAttention(batch_first={m.batch_first}) expects the batch on axis {want}, "
            "got "
            f"{sorted(a for a in axes if a is not None)}",
            "match batch_first to the layout",
        )
    # (output, weights): the weights are (B, L, S) (or (B, heads, L, S)) whatever batch_first says
    return Folded(want, container=True, items=(Folded(want), Folded(0)))


def embedding_bag_rule(ctx: BatchCtx) -> Rep:
    """``nn.EmbeddingBag`` / ``F.embedding_bag`` on a 2D input (B, bag): one bag per sample,
    the batch stays on axis 0 (``per_sample_weights`` alongside, folded alike). With
    ``offsets`` the bags of the whole batch are packed into one 1D input: refused."""
    functional = ctx.module is None
    x = ctx.arg(0, "input")
    offsets = ctx.arg(2 if functional else 1, "offsets")
    weights = ctx.arg(8 if functional else 2, "per_sample_weights")
    ax = ctx.axis(x)
    if ax is None:
        if ctx.folded_inputs():
            raise ctx.mixing(
                f"{_op_name(ctx)} takes a batch-carrying tensor as its weight or offsets",
                "index with the batch-carrying tensor, weights from parameters only",
            )
        return Trivial()
    if offsets is not None or ctx.rank(x) == 1:
        raise ctx.mixing(
            f"{_op_name(ctx)} with offsets packs the bags of the whole batch into one 1D input",
            "pass a 2D input (batch, bag size) without offsets, one bag per sample",
        )
    if ax != 0:
        raise ctx.mixing(
            f"{_op_name(ctx)} expects the batch on axis 0, got axis {ax}",
            "move the batch to axis 0 before this op",
        )
    others = [b for b, _ in ctx.folded_inputs() if b is not x and b is not weights]
    if others or (isinstance(weights, fx.Node) and ctx.axis(weights) not in (None, 0)):
        raise ctx.mixing(
            f"{_op_name(ctx)} takes a batch-carrying tensor as a weight",
            "compute the table from parameters only; per_sample_weights with the batch on axis 0",
        )
    return Folded(0)


def _batch_first(m: nn.Module) -> bool:
    if hasattr(m, "batch_first"):
        return bool(m.batch_first)
    for sub in m.modules():  # transformer layers keep it on their attention
        if isinstance(sub, nn.MultiheadAttention):
            return bool(sub.batch_first)
    return False


def transformer_layer_rule(ctx: BatchCtx) -> Rep:
    m = ctx.module
    want = 0 if _batch_first(m) else 1
    ax = ctx.axis(ctx.node.args[0])
    if ax is None:
        return Trivial()
    if ax != want:
        raise ctx.mixing(
            f"{type(m).__name__}(batch_first={_batch_first(m)}) expects "
            f"the batch on axis {want}, got {ax}",
            "match batch_first to the layout",
        )
    return Folded(ax)


def rnn_rule(ctx: BatchCtx) -> Rep:
    m = ctx.module
    want = 0 if getattr(m, "batch_first", False) else 1
    ax = ctx.axis(ctx.node.args[0])
    if ax is None:
        return Trivial()
    if ax != want:
        raise ctx.mixing(
            f"{type(m).__name__}(batch_first={m.batch_first}) expects the batch on axis "
            f"{want}, got {ax}",
            "match batch_first to the layout",
        )
    hx = ctx.arg(1, "hx")
    if hx is not None:  # (layers, B, H) whatever batch_first says; an LSTM's (h_0, c_0)
        states = list(hx) if isinstance(hx, (tuple, list)) else [hx]
        if isinstance(m, nn.LSTM) and isinstance(hx, fx.Node):
            states = [hx]  # a previous LSTM's (h_n, c_n), passed on whole
        for state in states:
            if not isinstance(state, fx.Node) or ctx.axis(state) != 1:
                where = ctx.axis(state) if isinstance(state, fx.Node) else None
                raise ctx.mixing(
                    f"{type(m).__name__}'s initial state must carry the batch on axis 1 "
                    "(layers, batch, hidden), as one built from the input does; got "
                    + ("a state that carries no batch" if where is None else f"axis {where}"),
                    "build it from the input's batch size (torch.zeros(layers, x.size(0), "
                    "hidden), a learned state .expand(-1, x.size(0), -1), another RNN's final "
                    "state), or start from the default zero state",
                )
    # (output, h_n), or (output, (h_n, c_n)) for an LSTM: the state is (layers, B, H) whatever
    # batch_first says
    state = Folded(1, container=True) if isinstance(m, nn.LSTM) else Folded(1)
    return Folded(ax, container=True, items=(Folded(ax), state))


def split_rule(ctx: BatchCtx) -> Rep:
    x = ctx.node.args[0]
    ax = ctx.axis(x)
    if ax is None:
        return Trivial()
    # unbind(x, dim) takes dim second; split(x, size, dim) and chunk(x, chunks, dim) third
    position = 1 if _op_name(ctx) == "unbind" else 2
    d = ctx.norm_dim(ctx.arg(position, "dim", 0), x)
    if d == ax:
        raise ctx.mixing(f"{_op_name(ctx)} splits along the batch axis", "split a sample axis")
    return Folded(ax, container=True)


def max_with_dim(ctx: BatchCtx) -> Rep:
    """torch.max / min with or without dim (values, indices), or the elementwise binary form."""
    second = ctx.arg(1, "dim")
    if isinstance(second, fx.Node):  # elementwise max(x, y)
        return same_axis(ctx)
    if second is None:
        return reduction()(ctx)
    rep = reduction()(ctx)
    return Folded(rep.batch_axis, container=True) if isinstance(rep, Folded) else rep


def values_indices(dim_pos: int | None, default: int | None, drops: bool = True) -> BatchFn:
    """Ops returning (values, indices) along one dim (median, mode, kthvalue, cummax, aminmax
    with a dim): refused along the batch axis; without a dim (``default`` None) they reduce
    every axis, the batch's too, and are refused. ``dim_pos`` None: ``dim`` and ``keepdim``
    are keyword-only."""

    def fn(ctx: BatchCtx) -> Rep:
        x = ctx.node.args[0]
        ax = ctx.axis(x)
        if ax is None:
            return same_axis(ctx) if ctx.folded_inputs() else Trivial()
        kw = ctx.node.kwargs
        d = kw.get("dim", default) if dim_pos is None else ctx.arg(dim_pos, "dim", default)
        if d is None:
            raise ctx.mixing(
                f"{_op_name(ctx)} without a dim reduces every axis, the batch axis too",
                "pass dim= (a sample axis)",
            )
        d = ctx.norm_dim(d, x)
        if d == ax:
            raise ctx.mixing(
                f"{_op_name(ctx)} acts along the batch axis {ax}", "apply it along a sample axis"
            )
        keepdim = kw.get("keepdim", False) if dim_pos is None else ctx.arg(dim_pos + 1, "keepdim")
        keep = not drops or bool(keepdim)
        if not keep and ax > 0 and d is None:
            raise ctx.mixing(
                f"{_op_name(ctx)} drops a negative dim of a tensor of unknown rank, so equivfx "
                "cannot tell where the batch axis lands",
                "compile with example_inputs=, or pass a non-negative dim",
            )
        out = ax - 1 if not keep and d is not None and d < ax else ax
        return Folded(out, container=True)

    return fn


def pad_rule(ctx: BatchCtx) -> Rep:
    x = ctx.node.args[0]
    ax = ctx.axis(x)
    if ax is None:
        return Trivial()
    pads = ctx.arg(1, "pad")
    r = ctx.rank(x)
    if r is not None and len(pads) // 2 > r - 1 - ax:
        raise ctx.mixing("F.pad pads the batch axis", "pad sample axes only")
    return Folded(ax)


# ----------------------------------------------------------------------------------------------
# Commutation predicates
# ----------------------------------------------------------------------------------------------


def _acted_axes(action, rank: int | None) -> set[int] | None:
    axes = getattr(action, "axes", ())
    if rank is None:
        return None if any(a >= 0 for a in axes) else {a for a in axes}
    return {a % rank for a in axes}


def _other_operands_broadcast(ctx: BatchCtx, action) -> bool:
    """Every operand that is not the acted tensor is a scalar or constant along the acted axes
    (a number read off shapes, not the batch size: :func:`number_off_shapes`, is a scalar)."""
    main = [a for a in ctx.node.all_input_nodes if ctx.axis(a) is not None]
    for a in ctx.node.all_input_nodes:
        if a in main:
            continue
        if number_off_shapes(a):
            continue
        shape = ctx.shape(a)
        if shape is None:
            return False
        out_rank = ctx.rank(ctx.node) or len(shape)
        acted = _acted_axes(action, out_rank) or set()
        for ax_ in acted:
            i = ax_ - (out_rank - len(shape))
            if 0 <= i < len(shape) and shape[i] != 1:
                return False
    return True


def _moves_entries(action) -> bool:
    """The action only moves entries (a permutation): constants and elementwise maps commute."""
    return bool(getattr(action, "is_permutation", False))


def symmetric_reduction_invariant(dim_pos: int = 1, dim_name: str = "dim"):
    """A symmetric reduction (sum, mean, max, norm ...) over dims that include every acted axis is
    invariant under actions that only permute entries along those axes: op(g . x) == op(x)."""

    def fn(ctx: BatchCtx, action) -> bool:
        x = ctx.node.args[0]
        r = ctx.rank(x)
        dims = _dims(ctx.arg(dim_pos, dim_name))
        if r is None or not dims or not _moves_entries(action):
            return False
        acted = _acted_axes(action, r)
        reduced = {d % r for d in dims if isinstance(d, int)}
        return bool(acted) and 0 not in acted and acted <= reduced

    return fn


def pointwise_commutes(ctx: BatchCtx, action) -> bool:
    """Elementwise ops commute with any action that only moves entries, given constant operands."""
    return _moves_entries(action) and _other_operands_broadcast(ctx, action)


def _other_linear(action) -> bool:
    """A linear action that does more than move entries (a rotation by interpolation, zero
    outside the image): it does not map a constant to itself, so only linear maps commute with
    it, not affine ones (a bias, a shift, an added constant)."""
    return not _moves_entries(action) and bool(getattr(action, "linear", False))


def linear_pointwise_commutes(ctx: BatchCtx, action) -> bool:
    """Elementwise linear ops commute with every linear action: with actions that move entries
    given constant operands; with other linear ones (interpolated rotations) with no operand
    besides the acted value (x + 1 adds a constant)."""
    if _moves_entries(action):
        return _other_operands_broadcast(ctx, action)
    return _other_linear(action) and len(ctx.node.args) == 1 and not ctx.node.kwargs


def _channel_axis_untouched(ctx: BatchCtx, action, channel: int = 1) -> bool:
    x = ctx.node.args[0]
    r = ctx.rank(x)
    if r is None:
        return False
    acted = _acted_axes(action, r)
    return acted is not None and channel not in acted and 0 not in acted


def per_channel_commutes(ctx: BatchCtx, action) -> bool:
    """Per-channel maps (eval BatchNorm, PReLU) commute with actions that move entries along the
    other axes; not with other linear ones (a shift, or PReLU, does not commute with
    interpolation)."""
    return _moves_entries(action) and _channel_axis_untouched(ctx, action)


def spatial_stats_commutes(ctx: BatchCtx, action) -> bool:
    """Norms whose statistics run over the spatial axes commute with permutations of those axes."""
    return _moves_entries(action) and _channel_axis_untouched(ctx, action)


def _dim_untouched_commutes(default_dim: int | None):
    """Ops along one dim (softmax) commute with permutations that leave that dim and the batch
    alone."""

    def fn(ctx: BatchCtx, action) -> bool:
        x = ctx.node.args[0]
        r = ctx.rank(x)
        dim = ctx.arg(1, "dim", default_dim)
        if r is None or dim is None or not _moves_entries(action):
            return False
        acted = _acted_axes(action, r)
        return acted is not None and 0 not in acted and (dim % r) not in acted

    return fn


def pointwise_conv_commutes(ctx: BatchCtx, action) -> bool:
    """A 1x1, stride-1, unpadded, undilated convolution commutes with spatial actions that move
    entries, and without a bias with other linear ones (interpolated rotations)."""
    m = ctx.module
    if m is None:
        return False
    if any(k != 1 for k in m.kernel_size) or any(s != 1 for s in m.stride):
        return False
    if isinstance(m.padding, str):
        pass
    elif any(p != 0 for p in m.padding):
        return False
    if _other_linear(action) and m.bias is None:  # a linear map of the channels
        return _channel_axis_untouched(ctx, action)
    return per_channel_commutes(ctx, action)


def _cyclic_shifts(action) -> list | None:
    """The RollAction factors of ``action`` if it is made of cyclic shifts only, else None."""
    factors = action.factors if isinstance(action, ProductAction) else (action,)
    # exact type: ShiftReverseAction is a RollAction that also reverses
    return list(factors) if all(type(a) is RollAction for a in factors) else None


def circular_conv_commutes(ctx: BatchCtx, action) -> bool:
    """A stride-1 convolution with circular padding that keeps every length commutes with cyclic
    shifts of its spatial axes: it is translation equivariant on the torus, whatever its kernel.
    """
    m = ctx.module
    if m is None or getattr(m, "padding_mode", "zeros") != "circular":
        return False
    if getattr(m, "transposed", False) or any(s != 1 for s in m.stride):
        return False
    if isinstance(m.padding, str):
        if m.padding != "same":
            return False
    elif any(
        2 * p != d * (k - 1) for p, d, k in zip(m.padding, m.dilation, m.kernel_size, strict=True)
    ):
        return False  # the output is shorter or longer: shifts do not carry over
    rolls = _cyclic_shifts(action)
    r = ctx.rank(ctx.node.args[0])
    if rolls is None or r is None:
        return False
    spatial = set(range(r - len(m.kernel_size), r))
    return all(a.axis % r in spatial for a in rolls)


def conv_commutes(ctx: BatchCtx, action) -> bool:
    """1x1 convolutions under linear spatial actions; circular ones under cyclic shifts."""
    return pointwise_conv_commutes(ctx, action) or circular_conv_commutes(ctx, action)


def last_axis_commutes(ctx: BatchCtx, action) -> bool:
    """Ops on the last axis only (Linear, LayerNorm over it) commute with actions on other axes."""
    x = ctx.node.args[0]
    r = ctx.rank(x)
    n_last = 1
    if ctx.module is not None and hasattr(ctx.module, "normalized_shape"):
        n_last = len(ctx.module.normalized_shape)
    if r is None:
        return False
    acted = _acted_axes(action, r)
    if acted is None:
        return False
    if _other_linear(action):  # a linear map of the last axis only: no bias, no norm
        m = ctx.module
        if isinstance(m, nn.Linear):
            linear = m.bias is None
        else:
            linear = ctx.node.target is F.linear and ctx.arg(2, "bias") is None
        if not linear:
            return False
    elif not _moves_entries(action):
        return False
    return 0 not in acted and all(a < r - n_last for a in acted)


def tiling_pool_commutes(ctx: BatchCtx, action) -> bool:
    """Pooling whose windows tile the grid (kernel == stride, no padding, size divisible) commutes
    with exact rotations and flips of the last two axes."""
    m = ctx.module
    if m is None or not _moves_entries(action):
        return False
    if type(action).__name__ != "RotFlipAction":
        return False
    k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
    s = m.stride if isinstance(m.stride, tuple) else (m.stride,) * 2
    p = m.padding if isinstance(m.padding, tuple) else (m.padding,) * 2
    shape = ctx.shape(ctx.node.args[0])
    if shape is None or len(shape) != 4 or k[0] != k[1] or tuple(k) != tuple(s) or any(p):
        return False
    if getattr(m, "dilation", 1) not in (1, (1, 1)) or getattr(m, "ceil_mode", False):
        return False
    return shape[-1] == shape[-2] and shape[-1] % k[0] == 0


TILING_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.LPPool2d,
)  # fmt: skip
"""Pools whose commutation claim (:func:`tiling_pool_commutes`) holds only on the shapes seen."""


def tiling_window(node: fx.Node, module: nn.Module | None) -> int | None:
    """The window of a pool whose commutation with rotations the cost passes rely on: it holds
    only where the windows tile a square input (checked on the example's shape), so the passes
    put a :class:`~equivfx.passes.modules.TilingCheck` before it. None for other nodes."""
    if node.op != "call_module" or not isinstance(module, TILING_POOLS):
        return None
    k = module.kernel_size
    return int(k[0] if isinstance(k, tuple) else k)


def global_pool_commutes(ctx: BatchCtx, action) -> bool:
    """Pooling to 1x1 maps every spatial permutation to the identity on a 1x1 output."""
    m = ctx.module
    size = getattr(m, "output_size", None)
    sizes = size if isinstance(size, tuple) else (size, size)
    return (
        _moves_entries(action)
        and all(s == 1 for s in sizes)
        and type(action).__name__ == "RotFlipAction"
    )


_ADAPTIVE_POOL_DIMS = {
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}


def adaptive_pool_invariant(ctx: BatchCtx, action) -> bool:
    """An adaptive pool over the last d axes (d = 1, 2, 3) is invariant under actions that only
    permute entries along axes it pools to size 1: each output entry is then a mean (or max)
    over the whole of those axes, pool(g . x) == pool(x). An output size of None keeps its axis
    (not pooled to 1); the indices of ``return_indices=True`` move with the entries."""
    m = ctx.module
    d = next((n for cls, n in _ADAPTIVE_POOL_DIMS.items() if isinstance(m, cls)), None)
    x = ctx.node.args[0] if ctx.node.args else None
    r = ctx.rank(x) if isinstance(x, fx.Node) else None
    if d is None or r is None or r <= d or getattr(m, "return_indices", False):
        return False
    if not _moves_entries(action):
        return False
    size = m.output_size
    sizes = tuple(size) if isinstance(size, (tuple, list)) else (size,) * d
    if len(sizes) != d:
        return False
    acted = _acted_axes(action, r)
    reduced = {r - d + i for i, s in enumerate(sizes) if s == 1}
    return bool(acted) and 0 not in acted and acted <= reduced


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


class _Apply(nn.Module):
    """Example wrapper: forward applies ``fn`` to the inputs."""

    def __init__(self, fn, n_inputs: int = 1):
        super().__init__()
        self.fn = fn
        self.n_inputs = n_inputs

    def forward(self, x, y=None):
        return self.fn(x) if self.n_inputs == 1 else self.fn(x, y)


def _ex(fn, *shapes, group="C4", kind="float") -> Example:
    shapes = shapes or ((2, 3, 6, 6),)
    return Example(
        build=lambda: _Apply(fn, len(shapes)), shapes=tuple(shapes), group=group, kind=kind
    )


def _mod(factory, *shapes, group="C4", kind="float") -> Example:
    shapes = tuple(shapes or ((2, 3, 6, 6),))
    return Example(
        build=lambda: _Child(factory(), len(shapes)), shapes=shapes, group=group, kind=kind
    )


class _Child(nn.Module):
    """Example wrapper: the module under test as a child, so it is traced as one call_module
    node."""

    def __init__(self, m: nn.Module, n_inputs: int = 1):
        super().__init__()
        self.m = m
        self.n_inputs = n_inputs

    def forward(self, x, y=None):
        return self.m(x) if self.n_inputs == 1 else self.m(x, y)


IMG = (2, 3, 6, 6)
SEQ = (2, 5, 8)  # batch, tokens, features


def _pointwise(name, fn_keys, fn, linear=False):
    commute = linear_pointwise_commutes if linear else pointwise_commutes
    register(
        fn_keys,
        OpRule(name, "pointwise", same_axis, linear=linear, commutes=commute, example=_ex(fn)),
    )


# unary pointwise: functions and Tensor methods
_UNARY = {
    "relu": (torch.relu, F.relu),
    "relu6": (F.relu6,),
    "gelu": (F.gelu,),
    "silu": (F.silu,),
    "sigmoid": (torch.sigmoid, F.sigmoid),
    "tanh": (torch.tanh, F.tanh),
    "elu": (F.elu,),
    "leaky_relu": (F.leaky_relu,),
    "hardswish": (F.hardswish,),
    "hardsigmoid": (F.hardsigmoid,),
    "mish": (F.mish,),
    "softplus": (F.softplus,),
    "exp": (torch.exp,),
    "log": (torch.log,),
    "abs": (torch.abs,),
    "sqrt": (torch.sqrt,),
    "rsqrt": (torch.rsqrt,),
    "sin": (torch.sin,),
    "cos": (torch.cos,),
    "square": (torch.square,),
    "erf": (torch.erf,),
    "sign": (torch.sign,),
    "clamp": (torch.clamp, torch.clip),
    "selu": (F.selu,),
    "celu": (F.celu,),
    "hardtanh": (F.hardtanh,),
    "logsigmoid": (F.logsigmoid,),
    "tanhshrink": (F.tanhshrink,),
    "softsign": (F.softsign,),
    "floor": (torch.floor,),
    "round": (torch.round,),
    "reciprocal": (torch.reciprocal,),
    "pow": (torch.pow,),
    "log1p": (torch.log1p,),
    "expm1": (torch.expm1,),
    "log2": (torch.log2,),
    "log10": (torch.log10,),
    "ceil": (torch.ceil,),
    "trunc": (torch.trunc, torch.fix),
    "frac": (torch.frac,),
    "nan_to_num": (torch.nan_to_num,),
    "clamp_min": (torch.clamp_min,),
    "clamp_max": (torch.clamp_max,),
    "tan": (torch.tan,),
    "atan": (torch.atan, torch.arctan),
    "sinh": (torch.sinh,),
    "cosh": (torch.cosh,),
    "asinh": (torch.asinh, torch.arcsinh),
    "logit": (torch.logit,),
    "hardshrink": (F.hardshrink,),
    "softshrink": (F.softshrink,),
    "threshold": (F.threshold,),
    "logical_not": (torch.logical_not, torch.bitwise_not, operator.invert, "Tensor.bitwise_not"),
    "isnan": (torch.isnan, torch.isinf, torch.isfinite, "Tensor.isinf", "Tensor.isfinite"),
    "bool": ("Tensor.bool", "Tensor.long", "Tensor.int", "Tensor.short", "Tensor.byte"),
    "fill": (torch.fill, "Tensor.zero_", torch.zero_),  # every entry one value: per sample
}
_UNARY_FN = {
    "log1p": lambda x: torch.log1p(x.abs()),
    "log2": lambda x: torch.log2(x.abs() + 1),
    "log10": lambda x: torch.log10(x.abs() + 1),
    "clamp_min": lambda x: torch.clamp_min(x, 0.1),
    "clamp_max": lambda x: torch.clamp_max(x, 0.1),
    "logit": lambda x: torch.logit(torch.sigmoid(x)),
    "threshold": lambda x: F.threshold(x, 0.1, 20.0),
    "logical_not": lambda x: (~(x > 0)).to(x.dtype),
    "isnan": lambda x: torch.isfinite(x / (x - x.amax(dim=(1, 2, 3), keepdim=True))).to(x.dtype),
    "bool": lambda x: (x * 3).long().to(x.dtype),
    "clamp": lambda x: torch.clamp(x, -0.5, 0.5),
    "pow": lambda x: torch.pow(x, 2),
    "log": lambda x: torch.log(x.abs() + 1),
    "sqrt": lambda x: torch.sqrt(x.abs()),
    "rsqrt": lambda x: torch.rsqrt(x.abs() + 1),
    "reciprocal": lambda x: torch.reciprocal(x.abs() + 1),
    "fill": lambda x: x.clone().fill_(0.5) + x,
}
for _name, _fns in _UNARY.items():
    _f = _UNARY_FN.get(_name, _fns[0])
    _pointwise(_name, list(_fns) + [f"Tensor.{_name}", f"Tensor.{_name}_"], _f)

_LINEAR_UNARY = {
    "neg": ([torch.neg, operator.neg, "Tensor.neg"], lambda x: -x),
    "contiguous": (["Tensor.contiguous"], lambda x: x.contiguous()),
    "clone": ([torch.clone, "Tensor.clone"], lambda x: x.clone()),
    "detach": ([torch.detach, "Tensor.detach"], lambda x: x.detach()),
    "float": (
        [
            "Tensor.float",
            "Tensor.double",
            "Tensor.half",
            "Tensor.bfloat16",
            "Tensor.to",
            "Tensor.type",
            "Tensor.type_as",
            "Tensor.cpu",
            "Tensor.cuda",
        ],
        lambda x: x.to(x.dtype),
    ),
    "dropout": (
        list(DROPOUT_FUNCTIONS),
        lambda x: F.dropout(x, 0.5, training=False),
    ),
}
for _name, (_keys, _f) in _LINEAR_UNARY.items():
    register(
        _keys,
        OpRule(
            _name,
            "pointwise",
            same_axis,
            linear=True,
            commutes=linear_pointwise_commutes,
            example=_ex(_f),
            note="dropout: linear in eval mode; in training masks differ per slot",
        ),
    )

# binary pointwise
_BINARY = {
    "add": (
        [operator.add, torch.add, "Tensor.add", "Tensor.add_", operator.iadd],
        True,
        lambda x, y: x + y,
    ),
    "sub": (
        [operator.sub, torch.sub, "Tensor.sub", "Tensor.sub_", operator.isub],
        True,
        lambda x, y: x - y,
    ),
    "mul": (
        [operator.mul, torch.mul, "Tensor.mul", "Tensor.mul_", operator.imul],
        False,
        lambda x, y: x * y,
    ),
    "div": (
        [operator.truediv, torch.div, "Tensor.div", "Tensor.div_", torch.true_divide],
        False,
        lambda x, y: x / (y.abs() + 1),
    ),
    "maximum": ([torch.maximum, "Tensor.maximum"], False, lambda x, y: torch.maximum(x, y)),
    "minimum": ([torch.minimum, "Tensor.minimum"], False, lambda x, y: torch.minimum(x, y)),
    "where": ([torch.where], False, lambda x, y: torch.where(x > 0, x, y)),
    "compare": (
        [
            operator.gt,
            operator.lt,
            operator.ge,
            operator.le,
            operator.eq,
            operator.ne,
            torch.gt,
            torch.lt,
            torch.eq,
            torch.ne,
            torch.ge,
            torch.le,
            torch.greater,
            torch.less,
            torch.greater_equal,
            torch.less_equal,
            torch.not_equal,
            torch.isclose,
            *(f"Tensor.{m}" for m in ("gt", "lt", "ge", "le", "eq", "ne", "isclose")),
        ],
        False,
        lambda x, y: (x.ne(y) & x.ge(y)).to(x.dtype),
    ),
    "logical": (
        [
            operator.and_,
            operator.or_,
            operator.xor,
            torch.logical_and,
            torch.logical_or,
            torch.logical_xor,
            torch.bitwise_and,
            torch.bitwise_or,
            torch.bitwise_xor,
            *(f"Tensor.{m}" for m in ("logical_and", "logical_or", "logical_xor")),
            *(f"Tensor.bitwise_{m}" for m in ("and", "or", "xor")),
        ],
        False,
        lambda x, y: (((x > 0) & (y > 0)) | ((x < -1) ^ (y < -1))).to(x.dtype),
    ),
    "masked_fill": (
        [torch.masked_fill, "Tensor.masked_fill", "Tensor.masked_fill_"],
        False,
        lambda x, y: x.masked_fill(y > 0, -1.5),
    ),
    "binary_math": (
        [
            torch.atan2,
            torch.arctan2,
            torch.fmod,
            torch.remainder,
            torch.hypot,
            torch.copysign,
            *(f"Tensor.{m}" for m in ("atan2", "fmod", "remainder", "hypot", "copysign")),
        ],
        False,
        lambda x, y: torch.remainder(torch.atan2(x, y), 0.7),
    ),
    "addcmul": (
        [torch.addcmul, torch.addcdiv, *(f"Tensor.{m}" for m in ("addcmul", "addcdiv"))],
        False,
        lambda x, y: torch.addcdiv(torch.addcmul(x, x, y, value=0.5), y, x.abs() + 1),
    ),
    "floordiv": (
        [operator.floordiv, operator.mod, operator.pow],
        False,
        lambda x, y: (x * 4) // (y.abs() + 1),
    ),
    "lerp": ([torch.lerp], False, lambda x, y: torch.lerp(x, y, 0.3)),
}
for _name, (_keys, _lin, _f) in _BINARY.items():
    register(
        _keys,
        OpRule(
            _name,
            "pointwise",
            int_arith if _name in ("add", "sub", "mul", "floordiv", "div") else same_axis,
            linear=_lin,
            commutes=linear_pointwise_commutes if _lin else pointwise_commutes,
            example=_ex(_f, IMG, IMG),
        ),
    )
# the binary int arithmetic rule is also the pointwise rule for tensors (it defers to same_axis)

register(
    [torch.max, torch.min, "Tensor.max", "Tensor.min"],
    OpRule("max", "reduction", max_with_dim, example=_ex(lambda x: torch.max(x, 1)[0])),
)
for _keys, _name, _fn, _f in [
    (
        [torch.median, "Tensor.median", torch.nanmedian, "Tensor.nanmedian"],
        "median",
        values_indices(1, None),
        lambda x: torch.median(x, 1)[0],
    ),
    ([torch.mode, "Tensor.mode"], "mode", values_indices(1, -1), lambda x: torch.mode(x, 1)[0]),
    (
        [torch.kthvalue, "Tensor.kthvalue"],
        "kthvalue",
        values_indices(2, -1),
        lambda x: torch.kthvalue(x, 2, 1)[0],
    ),
    (
        [torch.cummax, "Tensor.cummax", torch.cummin, "Tensor.cummin"],
        "cummax",
        values_indices(1, None, drops=False),
        lambda x: torch.cummax(x, 1)[0],
    ),
    (
        [torch.aminmax, "Tensor.aminmax"],
        "aminmax",
        values_indices(None, None),
        lambda x: torch.aminmax(x, dim=1)[1],
    ),
]:
    register(_keys, OpRule(_name, "reduction", _fn, example=_ex(_f)))

# reductions: (name, keys, example, dim position, keepdim position, symmetric)
for _name, _keys, _f, _dpos, _kpos, _sym in [
    ("sum", [torch.sum, "Tensor.sum"], lambda x: x.sum((2, 3)), 1, 2, True),
    ("mean", [torch.mean, "Tensor.mean"], lambda x: x.mean(dim=(2, 3)), 1, 2, True),
    ("amax", [torch.amax, "Tensor.amax"], lambda x: x.amax(dim=(2, 3)), 1, 2, True),
    ("amin", [torch.amin, "Tensor.amin"], lambda x: x.amin(dim=1), 1, 2, True),
    ("prod", [torch.prod, "Tensor.prod"], lambda x: x.prod(1), 1, 2, True),
    ("std", [torch.std, "Tensor.std"], lambda x: x.std((2, 3)), 1, 3, True),
    ("var", [torch.var, "Tensor.var"], lambda x: x.var(1), 1, 3, True),
    (
        "norm",
        [torch.norm, "Tensor.norm", torch.linalg.vector_norm],
        lambda x: x.norm(2, (2, 3)),
        2,
        3,
        True,
    ),
    (
        "logsumexp",
        [torch.logsumexp, "Tensor.logsumexp"],
        lambda x: torch.logsumexp(x, 1),
        1,
        2,
        True,
    ),
    (
        "argmax",
        [torch.argmax, "Tensor.argmax", torch.argmin, "Tensor.argmin"],
        lambda x: x.argmax(1).to(x.dtype),
        1,
        2,
        False,  # the index of the maximum moves with the entries
    ),
    (
        "all",
        [torch.all, "Tensor.all", torch.any, "Tensor.any"],
        lambda x: (x > 0).any(1).to(x.dtype),
        1,
        2,
        True,
    ),
]:
    register(
        _keys,
        OpRule(
            _name,
            "reduction",
            reduction(dim_pos=_dpos, keepdim_pos=_kpos),
            linear=_name in ("sum", "mean"),
            example=_ex(_f),
            invariant=symmetric_reduction_invariant(_dpos) if _sym else (lambda ctx, a: False),
        ),
    )
register(
    [F.normalize],
    OpRule(
        "normalize",
        "along-dim",
        along_dim(2, "dim", 1),
        example=_ex(lambda x: F.normalize(x, dim=1)),
    ),
)

# ops along one dim
for _name, _keys, _f, _drops in [
    ("softmax", [F.softmax, torch.softmax, "Tensor.softmax"], lambda x: F.softmax(x, dim=1), False),
    (
        "log_softmax",
        [F.log_softmax, torch.log_softmax, "Tensor.log_softmax"],
        lambda x: F.log_softmax(x, dim=-1),
        False,
    ),
    (
        "cumsum",
        [torch.cumsum, "Tensor.cumsum", torch.cumprod, "Tensor.cumprod"],
        lambda x: x.cumsum(1),
        False,
    ),
    ("glu", [F.glu], lambda x: F.glu(torch.cat([x, x], 1), dim=1), False),
    ("select", [torch.select, "Tensor.select"], lambda x: x.select(1, 0), True),
    ("narrow", [torch.narrow, "Tensor.narrow"], lambda x: x.narrow(1, 0, 2), False),
    (
        "index_select",
        [torch.index_select, "Tensor.index_select"],
        lambda x: x.index_select(1, torch.tensor([2, 0])),
        False,
    ),
    (
        "sort",
        [torch.sort, "Tensor.sort", torch.topk, "Tensor.topk"],
        lambda x: torch.sort(x, 1)[0],
        False,
    ),
]:
    if _name == "sort":
        _fn = along_dim(1, "dim", -1)

        def _container(ctx, _fn=_fn):
            rep = _fn(ctx)
            return Folded(rep.batch_axis, container=True) if isinstance(rep, Folded) else rep

        register(
            ["Tensor.sort", torch.sort], OpRule(_name, "along-dim", _container, example=_ex(_f))
        )
        register(
            [torch.topk, "Tensor.topk"],
            OpRule(
                "topk",
                "along-dim",
                lambda ctx: (
                    lambda r: Folded(r.batch_axis, container=True) if isinstance(r, Folded) else r
                )(along_dim(2, "dim", -1)(ctx)),
                example=_ex(lambda x: torch.topk(x, 2, dim=1)[0]),
            ),
        )
        continue
    register(
        _keys,
        OpRule(
            _name,
            "along-dim",
            along_dim(1, "dim", None if _name != "log_softmax" else -1, _drops),
            linear=_name in ("cumsum", "select", "narrow", "index_select"),
            commutes=_dim_untouched_commutes(-1 if _name == "log_softmax" else None)
            if _name in ("softmax", "log_softmax")
            else (lambda ctx, a: False),
            example=_ex(_f),
        ),
    )
register(
    [torch.argsort, "Tensor.argsort"],
    OpRule(
        "argsort",
        "along-dim",
        along_dim(1, "dim", -1),
        example=_ex(lambda x: torch.argsort(x, 1).to(x.dtype)),
    ),
)


def cdist_rule(ctx: BatchCtx) -> Rep:
    """``torch.cdist(x1, x2)``: distances between the rows of each batch entry's two point sets
    (the last two axes); the batch may be any leading axis, on both where both carry it, or one
    set shared (carrying none) when the other carries it on axis 0."""
    x1, x2 = ctx.arg(0, "x1"), ctx.arg(1, "x2")
    axes = [ctx.axis(a) for a in (x1, x2)]
    carried = {a for a in axes if a is not None}
    if not carried:
        return Trivial()
    ax = carried.pop()
    ranks = [ctx.rank(a) for a in (x1, x2)]
    if carried or (None in axes and ax != 0):
        raise ctx.mixing(
            "cdist's point sets carry the batch on different axes",
            "give both sets the batch on axis 0, or one of them none",
        )
    if any(
        r is not None and ax >= r - 2 for r, a in zip(ranks, axes, strict=True) if a is not None
    ):
        raise ctx.mixing(
            "cdist takes the batch on an axis of its point sets (one of the last two)",
            "put the points and their coordinates on the last two axes",
        )
    return Folded(ax)


register(
    [torch.cdist],
    OpRule(
        "cdist",
        "layer",
        cdist_rule,
        example=_ex(lambda x: torch.cdist(x.flatten(2), x.flatten(2)).flatten(1)),
    ),
)
register(
    [F.unfold, F.fold],
    OpRule(
        "unfold",
        "layer",
        first_axis(0),
        linear=True,
        example=_ex(lambda x: F.unfold(x, 3, padding=1)),
    ),
)
register(
    [torch.flip, "Tensor.flip"],
    OpRule(
        "flip",
        "along-dim",
        along_dim(1, "dims"),
        linear=True,
        example=_ex(lambda x: torch.flip(x, (1,))),
    ),
)
register(  # roll(input, shifts, dims): without dims it rolls the flattened tensor
    [torch.roll, "Tensor.roll"],
    OpRule(
        "roll",
        "along-dim",
        along_dim(2, "dims"),
        linear=True,
        example=_ex(lambda x: torch.roll(x, 1, 1)),
    ),
)


def scatter_rule(ctx: BatchCtx) -> Rep:
    """``target.index_add(dim, index, src)``, ``scatter_add``, ``scatter``, ``index_copy``...:
    per sample where the target carries the batch on the axis every batch-carrying argument
    does, and ``dim`` is another; into a target without the batch they would sum (or write) the
    whole batch's values together: refused."""
    x = ctx.node.args[0]
    ax = ctx.axis(x)
    folded = ctx.folded_inputs()
    if ax is None:
        if folded:
            raise ctx.mixing(
                f"{_op_name(ctx)} writes batch-carrying values into a tensor without the batch "
                "(every sample's values into the same entries)",
                "give the target the batch: torch.zeros(x.size(0), ...)",
            )
        return Trivial()
    if any(a != ax for _, a in folded):
        raise ctx.mixing(
            f"{_op_name(ctx)}'s arguments carry the batch on different axes",
            "align their batch axes first",
        )
    if ctx.norm_dim(ctx.arg(1, "dim"), x) == ax:
        raise ctx.mixing(
            f"{_op_name(ctx)} acts along the batch axis {ax}", "index a sample axis instead"
        )
    return Folded(ax)


_SCATTERS = ["index_add", "index_copy", "index_fill", "scatter", "scatter_add", "scatter_reduce"]
register(
    [getattr(torch, n) for n in _SCATTERS if hasattr(torch, n)]
    + [f"Tensor.{n}{u}" for n in _SCATTERS for u in ("", "_")],
    OpRule(
        "scatter",
        "along-dim",
        scatter_rule,
        example=_ex(lambda x: x.index_add(1, torch.tensor([0, 0, 2]), x * 2)),
    ),
)
register(
    [torch.gather, "Tensor.gather"],
    OpRule(
        "gather",
        "along-dim",
        along_dim(1, "dim"),
        example=_ex(lambda x: x.gather(1, torch.zeros_like(x, dtype=torch.long))),
    ),
)

# shape ops
register(
    [torch.reshape, "Tensor.reshape", "Tensor.view"],
    OpRule(
        "reshape", "shape", shaped(1), linear=True, example=_ex(lambda x: x.reshape(x.size(0), -1))
    ),
)
register(
    ["Tensor.expand", "Tensor.repeat"],
    OpRule(
        "expand",
        "shape",
        shaped(1),
        linear=True,
        example=_ex(lambda x: x.unsqueeze(1).expand(-1, 2, -1, -1, -1)),
    ),
)
register(
    ["Tensor.expand_as", "Tensor.view_as", "Tensor.reshape_as"],
    OpRule(
        "expand_as",
        "shape",
        same_axis,
        linear=True,
        example=_ex(lambda x, y: x.view_as(y), IMG, IMG),
    ),
)
register(
    [torch.flatten, "Tensor.flatten"],
    OpRule(
        "flatten", "shape", flatten_rule(), linear=True, example=_ex(lambda x: torch.flatten(x, 1))
    ),
)
register(
    ["Tensor.unflatten", torch.unflatten],
    OpRule(
        "unflatten",
        "shape",
        along_dim(1, "dim"),
        linear=True,
        example=_ex(lambda x: x.unflatten(1, (3, 1))),
    ),
)
register(
    [torch.permute, "Tensor.permute"],
    OpRule(
        "permute", "shape", permute_rule, linear=True, example=_ex(lambda x: x.permute(0, 2, 3, 1))
    ),
)
register(
    [torch.transpose, "Tensor.transpose", torch.swapaxes, "Tensor.swapaxes", "Tensor.t", torch.t],
    OpRule(
        "transpose", "shape", transpose_rule, linear=True, example=_ex(lambda x: x.transpose(1, 2))
    ),
)
register(
    [torch.movedim, "Tensor.movedim", torch.moveaxis],
    OpRule("movedim", "shape", movedim_rule, linear=True, example=_ex(lambda x: x.movedim(1, -1))),
)
register(
    [torch.unsqueeze, "Tensor.unsqueeze"],
    OpRule(
        "unsqueeze", "shape", unsqueeze_rule, linear=True, example=_ex(lambda x: x.unsqueeze(1))
    ),
)
register(
    [torch.squeeze, "Tensor.squeeze"],
    OpRule(
        "squeeze", "shape", squeeze_rule, linear=True, example=_ex(lambda x: x[:, :1].squeeze(1))
    ),
)
register(
    [operator.getitem],
    OpRule("getitem", "indexing", getitem_rule, linear=True, example=_ex(lambda x: x[:, 1:, ::2])),
)
register(
    [torch.cat, torch.concat, torch.concatenate],
    OpRule(
        "cat",
        "join",
        cat_like(),
        linear=True,
        example=_ex(lambda x, y: torch.cat([x, y], 1), IMG, IMG),
    ),
)
register(
    [torch.stack],
    OpRule(
        "stack",
        "join",
        cat_like(stack=True),
        linear=True,
        example=_ex(lambda x, y: torch.stack([x, y], 1), IMG, IMG),
    ),
)
register(
    [torch.split, "Tensor.split", torch.chunk, "Tensor.chunk", torch.unbind, "Tensor.unbind"],
    OpRule(
        "split",
        "shape",
        split_rule,
        linear=True,
        example=_ex(lambda x: torch.split(x, 1, dim=1)[0]),
    ),
)
register(["Tensor.size"], OpRule("size", "size", size_rule, example=None))
register([getattr], OpRule("getattr", "size", getattr_rule, example=None))


register(
    [stop_gradient],  # equivfx.trace: where a no_grad region hands a value on
    OpRule("stop_gradient", "pointwise", lambda ctx: ctx.rep(ctx.node.args[0]), example=None),
)


def loss_rule(ctx: BatchCtx) -> Rep:
    """Losses (``nn.CrossEntropyLoss``, ``F.mse_loss``...): per sample with ``reduction="none"``
    (the batch on axis 0, as every torch loss takes it); any other reduction averages or sums
    the whole batch, every slot's samples together: refused."""
    folded = ctx.folded_inputs()
    if not folded:
        return Trivial()
    if ctx.module is not None:
        reduction = getattr(ctx.module, "reduction", "mean")
    else:
        reduction = ctx.node.kwargs.get("reduction", "mean")
    if reduction != "none":
        raise ctx.mixing(
            f"{_op_name(ctx)} with reduction={reduction!r} reduces over the batch axis",
            "pass reduction='none' (one loss per sample) and reduce over sample axes only, or "
            "compute the loss outside the compiled model",
        )
    axes = {ax for _, ax in folded}
    if axes != {0}:
        raise ctx.mixing(
            f"{_op_name(ctx)} takes the batch on axis 0, got axes {sorted(axes)}",
            "move the batch to axis 0 first",
        )
    return Folded(0)


register(
    [
        cls
        for cls in vars(nn.modules.loss).values()
        if isinstance(cls, type) and issubclass(cls, nn.modules.loss._Loss)
    ]
    + [
        getattr(F, name)
        for name in (
            "cross_entropy",
            "nll_loss",
            "mse_loss",
            "l1_loss",
            "smooth_l1_loss",
            "huber_loss",
            "binary_cross_entropy",
            "binary_cross_entropy_with_logits",
            "kl_div",
            "soft_margin_loss",
            "poisson_nll_loss",
            "gaussian_nll_loss",
        )
        if hasattr(F, name)
    ],
    OpRule("loss", "layer", loss_rule, example=None),
)


def copy_rule(ctx: BatchCtx) -> Rep:
    """``dst.copy_(src)``: ``dst`` keeps its batch axis; a batch-carrying ``src`` needs one on the
    same axis (copied into a tensor without the batch, every slot's rows would meet)."""
    dst, src = ctx.arg(0, "self"), ctx.arg(1, "src")
    ad, as_ = ctx.axis(dst), ctx.axis(src)
    if as_ is not None and as_ != ad:
        raise ctx.mixing(
            "copy_ writes a batch-carrying value into a tensor "
            + ("without the batch" if ad is None else f"with the batch on axis {ad}, not {as_}"),
            "copy into a tensor carrying the batch (torch.empty_like(h)), or reduce over sample "
            "axes only first",
        )
    return Folded(ad) if ad is not None else Trivial()


register(["Tensor.copy_"], OpRule("copy_", "pointwise", copy_rule, example=None))
register([len], OpRule("len", "size", len_rule, example=None))
register(
    ["Tensor.dim", "Tensor.element_size", "Tensor.is_contiguous"],
    OpRule("dim", "size", lambda ctx: BatchSize(()), example=None),
)
register(  # a check that an input was passed (equivfx.trace.expect_given): returns None
    [expect_given],
    OpRule("expect_given", "size", lambda ctx: Trivial(), example=None),
)
register(  # a count, not a position: used as a value with a tensor it is refused (int_arith)
    ["Tensor.numel", torch.numel],
    OpRule("numel", "size", lambda ctx: BatchSize(()), example=None),
)

# linear algebra
register(
    [
        torch.matmul,
        operator.matmul,
        "Tensor.matmul",
        torch.bmm,
        "Tensor.bmm",
        torch.mm,
        "Tensor.mm",
    ],
    OpRule(
        "matmul", "linalg", matmul_rule, example=_ex(lambda x, y: x @ y, (2, 3, 4, 5), (2, 3, 5, 4))
    ),
)
register(
    [torch.einsum],
    OpRule(
        "einsum",
        "linalg",
        einsum_rule,
        example=_ex(lambda x, y: torch.einsum("bcij,bcjk->bcik", x, y), (2, 3, 4, 5), (2, 3, 5, 4)),
    ),
)
register(
    [F.scaled_dot_product_attention],
    OpRule(
        "sdpa",
        "linalg",
        sdpa_rule,
        example=_ex(
            lambda q, k: F.scaled_dot_product_attention(q, k, k), (2, 2, 5, 4), (2, 2, 5, 4)
        ),
    ),
)
register(
    [F.linear],
    OpRule(
        "F.linear",
        "layer",
        first_axis(None, not_last=True),
        linear=True,
        commutes=last_axis_commutes,
        example=_ex(lambda x: F.linear(x, x.new_ones(4, 8)), SEQ, group="Perm5@-2"),
    ),
)

# functional layers (batch first)
for _name, _keys, _f, _comm in [
    (
        "conv",
        [F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d],
        lambda x: F.conv2d(x, x.new_ones(2, 3, 1, 1)),
        lambda ctx, a: False,
    ),
    (
        "pool",
        [
            F.max_pool1d,
            F.max_pool2d,
            F.max_pool3d,
            F.avg_pool1d,
            F.avg_pool2d,
            F.avg_pool3d,
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d,
            F.adaptive_max_pool1d,
            F.adaptive_max_pool2d,
            F.adaptive_max_pool3d,
            F.lp_pool1d,
            F.lp_pool2d,
            F.lp_pool3d,
            torch.max_pool2d,
            torch.avg_pool1d,
            torch.adaptive_avg_pool1d,
        ],
        lambda x: F.max_pool2d(x, 2),
        lambda ctx, a: False,
    ),
    (
        "layer_norm",
        [F.layer_norm, F.rms_norm],
        lambda x: F.layer_norm(x, (6,)),
        lambda ctx, a: False,
    ),
    ("group_norm", [F.group_norm], lambda x: F.group_norm(x, 1), spatial_stats_commutes),
    ("instance_norm", [F.instance_norm], lambda x: F.instance_norm(x), spatial_stats_commutes),
    (
        "interpolate",
        [F.interpolate, F.upsample, F.pixel_shuffle, F.pixel_unshuffle],
        lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
        lambda ctx, a: False,
    ),
    ("embedding", [F.embedding], None, lambda ctx, a: False),
    (
        "batch_norm",
        [F.batch_norm],
        lambda x: F.batch_norm(x, x.new_zeros(3), x.new_ones(3)),
        lambda ctx, a: False,
    ),
]:
    register(
        _keys,
        OpRule(
            f"F.{_name}",
            "layer",
            first_axis(0) if _name != "embedding" else first_axis(None),
            linear=_name in ("conv", "interpolate"),
            commutes=_comm,
            example=_ex(_f) if _f is not None else None,
        ),
    )
register(
    [F.pad],
    OpRule("F.pad", "layer", pad_rule, linear=True, example=_ex(lambda x: F.pad(x, (1, 1, 1, 1)))),
)

# creation functions: trivial unless given the batch size read off a folded tensor
for _keys, _start in [
    ([torch.zeros, torch.ones, torch.empty, torch.rand, torch.randn, torch.full], 0)
]:
    register(
        _keys,
        OpRule(
            "factory",
            "creation",
            shaped(_start, produces=True),
            example=None,
            note="a batch size read off a folded tensor gives a batch-carrying result",
        ),
    )
register(
    ["Tensor.new_zeros", "Tensor.new_ones", "Tensor.new_empty", "Tensor.new_full"],
    OpRule("new_factory", "creation", shaped(1, produces=True), example=None),
)
register(
    [torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, "Tensor.zero_"],
    OpRule(
        "like",
        "creation",
        same_axis,
        linear=True,
        commutes=pointwise_commutes,
        example=_ex(lambda x: torch.zeros_like(x) + 1),
    ),
)
register(
    [
        torch.rand_like, torch.randn_like, torch.randint_like, torch.bernoulli, torch.poisson,
        "Tensor.bernoulli", "Tensor.bernoulli_", "Tensor.uniform_", "Tensor.normal_",
        "Tensor.exponential_", "Tensor.random_", "Tensor.geometric_", "Tensor.log_normal_",
        "Tensor.cauchy_",
    ],
    OpRule(
        "random_like",
        "creation",
        same_axis,
        example=None,
        note="random per element: not equivariant unless the result is unused in eval",
    ),
)  # fmt: skip


def constant_rule(ctx: BatchCtx) -> Rep:
    """Values made from Python numbers (``torch.arange(n)``, ``math.sqrt(d)``): constants, but
    not of the batch size, which the compiled model reads as |G| B."""
    if _reads_batch_size(ctx):
        name = getattr(ctx.node.target, "__name__", str(ctx.node.target))
        raise _batch_size_as_value(ctx, f"{name!r} reads")
    return Trivial()


register(
    [torch.arange, torch.linspace, torch.eye, torch.tensor, torch.as_tensor, math.sqrt, math.log],
    OpRule("constant", "creation", constant_rule, example=None),
)
register(
    [math.ceil, math.floor, int, float, range],
    OpRule("number", "creation", int_arith, example=None),
)

# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


def _m(
    cls_list,
    name,
    batch,
    linear=False,
    commutes=lambda ctx, a: False,
    invariant=lambda ctx, a: False,
    example=None,
    note="",
):
    register(
        cls_list,
        OpRule(
            name,
            "module",
            batch,
            linear=linear,
            commutes=commutes,
            example=example,
            note=note,
            invariant=invariant,
        ),
    )


_m(
    [nn.Conv1d, nn.ConvTranspose1d],
    "conv1d",
    first_axis(0),
    linear=True,
    commutes=conv_commutes,
    example=_mod(lambda: nn.Conv1d(4, 3, 1), (2, 4, 8), group="Shift8"),
)
_m(
    [nn.Conv2d, nn.ConvTranspose2d, nn.LazyConv2d],
    "conv2d",
    first_axis(0),
    linear=True,
    commutes=conv_commutes,
    example=_mod(lambda: nn.Conv2d(3, 4, 1), IMG),
)
_m(
    [nn.Conv3d, nn.ConvTranspose3d],
    "conv3d",
    first_axis(0),
    linear=True,
    commutes=conv_commutes,
    example=_mod(lambda: nn.Conv3d(3, 2, 1), (2, 3, 4, 6, 6)),
)
_m(
    [nn.Linear, nn.LazyLinear],
    "linear",
    first_axis(None, not_last=True),
    linear=True,
    commutes=last_axis_commutes,
    example=_mod(lambda: nn.Linear(8, 4), SEQ, group="Perm5@-2"),
)
_m([nn.Bilinear], "bilinear", same_axis, example=_mod(lambda: nn.Bilinear(8, 8, 2), SEQ, SEQ))
_m(
    [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm],
    "batch_norm",
    first_axis(0),
    commutes=per_channel_commutes,
    example=_mod(lambda: _eval(nn.BatchNorm2d(3)), IMG),
    note="training mode normalises over the folded batch: still exactly equivariant (the action "
    "permutes that set), but not slot-wise equal to the original model's statistics",
)
_m(
    [nn.LayerNorm, nn.RMSNorm],
    "layer_norm",
    first_axis(None),
    commutes=last_axis_commutes,
    example=_mod(lambda: nn.LayerNorm(8), SEQ, group="Perm5@-2"),
)
_m(
    [nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm],
    "group_norm",
    first_axis(0),
    commutes=spatial_stats_commutes,
    example=_mod(lambda: nn.GroupNorm(1, 3), IMG),
)
for _cls in [
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Softplus,
    nn.SELU,
    nn.CELU,
    nn.Hardtanh,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.PReLU,
    nn.Hardshrink,
    nn.Softshrink,
]:
    _m(
        [_cls],
        _cls.__name__.lower(),
        same_axis,
        commutes=pointwise_commutes if _cls is not nn.PReLU else per_channel_commutes,
        example=_mod(_cls, IMG),
    )
_m(
    [nn.Threshold],
    "threshold",
    same_axis,
    commutes=pointwise_commutes,
    example=_mod(lambda: nn.Threshold(0.1, 0.0), IMG),
)
_m(
    [nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout],
    "identity",
    same_axis,
    linear=True,
    commutes=linear_pointwise_commutes,
    example=_mod(lambda: _eval(nn.Dropout(0.3)), IMG),
    note="dropout in training mode draws different masks per slot: verify in eval mode",
)
_m(
    [nn.Softmax, nn.LogSoftmax, nn.Softmin],
    "softmax",
    lambda ctx: along_dim(-1, "dim")(_ModuleDim(ctx)),
    example=_mod(lambda: nn.Softmax(dim=1), IMG),
)
_m(
    list(TILING_POOLS),
    "pool",
    first_axis(0),
    commutes=tiling_pool_commutes,
    example=_mod(lambda: nn.MaxPool2d(2), IMG),
)
_m(
    [
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d,
        nn.AdaptiveMaxPool3d,
    ],
    "adaptive_pool",
    first_axis(0),
    commutes=global_pool_commutes,
    invariant=adaptive_pool_invariant,
    example=_mod(lambda: nn.AdaptiveAvgPool2d(1), IMG),
)
_m([nn.Flatten], "flatten", flatten_rule(), linear=True, example=_mod(nn.Flatten, IMG))
_m(
    [nn.Unflatten],
    "unflatten",
    lambda ctx: along_dim(-1, "dim")(_ModuleDim(ctx)),
    linear=True,
    example=_mod(lambda: nn.Unflatten(1, (3, 1)), IMG),
)
_m(
    [
        nn.Upsample,
        nn.UpsamplingNearest2d,
        nn.UpsamplingBilinear2d,
        nn.PixelShuffle,
        nn.PixelUnshuffle,
    ],
    "upsample",
    first_axis(0),
    linear=True,
    example=_mod(lambda: nn.Upsample(scale_factor=2), IMG),
)
_m(
    [
        nn.ZeroPad2d,
        nn.ConstantPad1d,
        nn.ConstantPad2d,
        nn.ConstantPad3d,
        nn.ReflectionPad1d,
        nn.ReflectionPad2d,
        nn.ReplicationPad1d,
        nn.ReplicationPad2d,
        nn.CircularPad1d,
        nn.CircularPad2d,
    ],
    "pad",
    first_axis(0),
    linear=True,
    example=_mod(lambda: nn.ZeroPad2d(1), IMG),
)
_m(
    [nn.Embedding],
    "embedding",
    first_axis(None),
    example=_mod(lambda: nn.Embedding(10, 4), (2, 5), kind="index", group="Shift5"),
)
_m(
    [nn.EmbeddingBag],
    "embedding_bag",
    embedding_bag_rule,
    example=_mod(lambda: nn.EmbeddingBag(10, 4), (2, 5), kind="index", group="Shift5"),
)
register(
    [F.embedding_bag],
    OpRule("F.embedding_bag", "layer", embedding_bag_rule),
)
_m(
    [nn.MultiheadAttention],
    "multihead_attention",
    mha_rule,
    example=_mod(
        lambda: _First(nn.MultiheadAttention(8, 2, batch_first=True)), SEQ, group="Perm5@-2"
    ),
)
_m(
    [nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.TransformerDecoderLayer],
    "transformer_layer",
    transformer_layer_rule,
    commutes=lambda ctx, a: False,
    example=_mod(
        lambda: _eval(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)),
        SEQ,
        group="Perm5@-2",
    ),
)
_m(
    [nn.LSTM, nn.GRU, nn.RNN],
    "rnn",
    rnn_rule,
    example=_mod(lambda: _First(nn.GRU(8, 4, batch_first=True)), SEQ, group="Shift5@-2"),
)


class _ModuleDim:
    """Adapter: present a module's ``dim`` attribute as the node's dim argument."""

    def __init__(self, ctx: BatchCtx):
        self._ctx = ctx
        dim = getattr(ctx.module, "dim", None)
        if dim is None and isinstance(ctx.module, nn.Unflatten):
            dim = ctx.module.dim
        self._dim = dim

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def arg(self, pos, name, default=None):
        if name == "dim":
            return self._dim
        return self._ctx.arg(pos, name, default)


class _First(nn.Module):
    """Example wrapper: a module returning a tuple, first element kept (attention, RNNs)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        if isinstance(self.m, nn.MultiheadAttention):
            return self.m(x, x, x, need_weights=False)[0]
        return self.m(x)[0]


def _eval(m: nn.Module) -> nn.Module:
    return m.eval()


def unique_rules() -> list[OpRule]:
    """Each distinct rule once (a rule usually serves several keys)."""
    seen: dict[int, OpRule] = {}
    for r in RULES.values():
        seen.setdefault(id(r), r)
    return list(seen.values())
