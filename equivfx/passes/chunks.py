"""Evaluating k slots at a time (``compile(..., chunk=k)`` or ``chunk="auto"``).

Folding all |G| slots into the batch is fastest for small batches, but a folded batch of |G| B
samples can fall out of cache (and needs |G| times the activation memory). :class:`SlotChunks` runs
the part of the compiled graph between the lift and the readouts k slots at a time, so peak
activation memory is about that of the base model at batch k B.

The flat compiled graph is split into three parts that share its modules:

- *pre*: everything that does not depend on the lifted input (other inputs, deferred ops);
- *body*: the lift, the inputs repeated per slot, and every node computed from them before a
  readout (or a hoisted pool), run once per chunk of k slots;
- *post*: the readouts (or pools) and what follows them, run once.

Invariant readouts and hoisted pools *accumulate*: each chunk's slots are pooled as soon as they
are computed (a running sum, max or logsumexp), so nothing of size |G| B is ever kept. Readouts that
output every slot (``slots``, ``pose``, ``equivariant``) concatenate the chunks' values first.

``chunk="auto"`` measures, at the first call for each input shape (in eval mode), the time of a
whole forward for each chunk size that divides the number of slots (:func:`fold_sizes`: for large
groups about one per factor of 2, of at most :data:`MAX_PASSES` passes) and keeps the fastest. It
measures at most :attr:`SlotChunks.MEASURED_SHAPES` inputs per model: past that it never measures,
and a new input takes the decision of the measured one nearest in size with the same structure,
dtypes, devices and ranks (other arguments, such as a scalar that changes at every call, are
ignored), or folds every slot where none compares; so dynamic batch sizes, sequence lengths or
per-call scalars do not pay a measurement at every call. In
training mode, and while being traced or exported, all slots run in one pass (batch statistics must
see every slot), through the flat graph's own generated code. "Training" means any of the model's
own modules is in training mode (the model's own flag counts where its code reads it at each call:
its :class:`~equivfx.trace.ModeSwitch`). So do models that take batch statistics in eval mode too
(a batch norm without running statistics, ``F.batch_norm(..., training=True)``): k of |G| slots
would be normalised together, which no action permutes.
"""

from __future__ import annotations

import logging
import math
import operator
import random
import time
import warnings
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from equivfx.errors import NotYetSupportedError, explain, user_stacklevel
from equivfx.passes.annotate import BatchMixingWarning, OpaqueLeafWarning
from equivfx.passes.codegen import (
    copy_keeping_state,
    deepcopy_keeping_state,
    direct_module_access,
    with_direct_module_access,
)
from equivfx.passes.hoist import POOL_NAME
from equivfx.passes.leaf_check import describe_mixing, outputs_differ
from equivfx.passes.lift import LIFT_NAME
from equivfx.passes.modules import (
    MEASURING,
    Lift,
    averageable,
    devices_of,
    exp_mass,
    hooked,
    is_tracing,
    repeat_per_slot,
    synchronize,
)
from equivfx.passes.projection import READOUT_NAME
from equivfx.passes.rules import BATCH_STAT_MODULES
from equivfx.trace import MODE_SWITCH, OPAQUE_ATTR, hide_state, install_prefix_hooks, kept_buffers

__all__ = ["SlotChunks", "chunked_module", "run_chunks", "CHUNKS_NAME"]

log = logging.getLogger(__name__)

CHUNKS_NAME = "equivfx_chunks"

_TRAINING = operator.attrgetter("training")

_REGISTRATIONS = [0]
"""Submodules registered anywhere in the process so far (set, replaced or added by name at any
depth): a chunk runner scans its model's modules again when the count moved since its last scan,
so a layer replaced below the top level (``emodel.layers[0].bn = nn.BatchNorm2d(16)``, in
training mode) still sends every slot through one pass. One global counter, bumped by a
registration hook: a comparison per call instead of a walk over every module."""


def _count_registration(module, name, submodule):
    _REGISTRATIONS[0] += 1


def _count_statistics(module, name, buffer):
    """A batch norm's running statistics set (``bn.running_mean = None``: batch statistics in
    eval mode from then on) count as a registration: the runners scan again."""
    if name in ("running_mean", "running_var"):
        _REGISTRATIONS[0] += 1


if "_REGISTRATION_HOOK" not in globals():  # once per process, also if this module is reloaded
    _REGISTRATION_HOOK = nn.modules.module.register_module_module_registration_hook(
        _count_registration
    )
    _STATISTICS_HOOK = nn.modules.module.register_module_buffer_registration_hook(_count_statistics)


MAX_PASSES = 64
"""``chunk="auto"`` measures no fold size that takes more passes than this (|G| / k), where
measuring every divisor would cost more than that many passes per round (Perm6's 30 divisors:
2,418 passes, seconds of a first call): a pass runs the graph's Python once, and so many passes
lose to fewer at any batch size."""


def fold_sizes(n: int) -> list[int]:
    """The slots per pass ``chunk="auto"`` measures for ``n`` slots: every divisor of ``n`` where
    one forward with each takes at most :data:`MAX_PASSES` passes in all (every group of order
    below 30: C4, D4, D8, Perm4, ...); else, for j = 0, 1, ..., the largest divisor at most
    n / 2^j, while it takes at most :data:`MAX_PASSES` passes (Perm5: 120, 60, 30, 15, 6, 3;
    Perm6: 720, 360, 180, 90, 45, 20): one per factor of 2, as the measured cost moves with the
    batch size by factors."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    if sum(n // d for d in divisors) <= MAX_PASSES:
        return divisors
    sizes: set[int] = set()
    target = float(n)
    while target >= 1:
        d = max(d for d in divisors if d <= target)
        if n // d > MAX_PASSES:
            break
        sizes.add(d)
        target /= 2
    return sorted(sizes)


class SlotChunks(nn.Module):
    """Runs a flat compiled graph k slots at a time. See the module docstring.

    Args:
        flat: the flat compiled GraphModule (held, not registered: its modules are registered on
            the graph module that owns this one, so the state dict keeps the original keys).
        chunk: slots per pass, or ``"auto"``.
    """

    unchecked_leaves: tuple[str, ...] = ()
    """Opaque leaves the first measurement checks (models pickled before it have none)."""

    mixing_leaves: tuple[str, ...] = ()
    """Opaque leaves found to treat a batch's samples together: one slot per pass, always."""

    MEASURED_SHAPES = 8
    """``chunk="auto"`` measures at most this many input shapes; later new shapes reuse the
    decision of the nearest measured one (see the module docstring)."""

    def __init__(
        self, flat: fx.GraphModule, chunk: int | str, unchecked_leaves=(), mixing_leaves=()
    ):
        super().__init__()
        object.__setattr__(self, "flat", flat)  # shared, not a child: no duplicate state-dict keys
        self.chunk = chunk
        self.chosen: dict[tuple, int] = {}
        self.unchecked_leaves = tuple(unchecked_leaves)
        self.mixing_leaves = tuple(mixing_leaves)
        self._build(flat)

    # The structure derived from flat's graph: its fx nodes are not pickled (a pickled graph
    # module is rebuilt from its code, with new nodes); unpickling derives it again.
    _DERIVED = (
        "slots", "order", "lift", "repeats", "joins", "_accumulated", "_pools", "_joined",
        "_read", "_pre_out", "_body_in", "_post_from_pre", "_post_from_chunks", "graphs",
        "_user_modules", "_scanned", "_batch_stats_in_graph", "_batch_stats",
    )  # fmt: skip

    def __getstate__(self):
        return {k: v for k, v in super().__getstate__().items() if k not in self._DERIVED}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._build(self.flat)  # flat came back with its code generator (deepcopy, its reduction)

    def _build(self, flat: fx.GraphModule) -> None:
        self.slots = tuple(flat.equivfx_lift.slots)  # fewer than |G| after eliminate-dead-slots
        self.order = len(self.slots)
        pre, body, post, self.lift, self.repeats, self.joins = _split(flat)
        # invariant readouts (and hoisted pools) accumulate chunk by chunk; other readouts need
        # every slot: the values they read are concatenated (one cat per value, on its batch axis)
        self._accumulated = [j for j in self.joins if _pool_of(flat, j) is not None]
        self._pools = [_pool_of(flat, j) for j in self._accumulated]
        joined: dict[fx.Node, int] = {}
        for j in self.joins:
            if j not in self._accumulated:
                joined.setdefault(j.args[0], _axis(j))
        self._joined = list(joined.items())
        self._read = list(dict.fromkeys(j.args[0] for j in self.joins))
        # three graphs with generated code, sharing flat's modules: no per-node interpreter cost
        sources = [self.lift, *self.repeats]
        post_run = [n for n in post if n not in self._accumulated]
        body_in = _reads(body, outside=set(body) | set(sources))
        post_in = _reads(post_run, outside=set(post_run))
        pre_out = list(
            dict.fromkeys(
                [*body_in, *(a for a in post_in if a in set(pre))] + [n.args[0] for n in sources]
            )
        )
        post_from_pre = [a for a in post_in if a in set(pre)]
        post_from_chunks = [a for a in post_in if a not in set(pre)]
        self._pre_out = pre_out
        self._body_in = body_in
        self._post_from_pre = post_from_pre
        self._post_from_chunks = post_from_chunks
        graphs = {
            "pre": _subgraph(flat, pre, [], pre_out),
            "body": _subgraph(flat, body, [*sources, *body_in], self._read),
            "post": _subgraph(flat, post_run, [*post_from_pre, *post_from_chunks], None),
        }
        object.__setattr__(self, "graphs", graphs)
        self._batch_stats_in_graph = any(map(_batch_stats_always, flat.graph.nodes))
        self._find_user_modules()

    def _find_user_modules(self) -> None:
        """The modules whose training flag sends every slot through one pass (batch statistics);
        again when a submodule is registered anywhere (``_REGISTRATIONS``)."""
        count = _REGISTRATIONS[0]  # before the walk: a registration during it scans again
        # fx and equivfx make plain nn.Module containers for dotted paths: their flag means
        # nothing; a ModeSwitch's is the flag of the module it belongs to (at the top: the model's)
        self._user_modules = [
            m
            for name, m in self.flat.named_modules()
            if name
            and (not name.startswith("equivfx") or name == MODE_SWITCH)
            and type(m) is not nn.Module
        ]
        # batch statistics in eval mode too (no running statistics, or training=True written
        # out): like training, every slot in one pass, whatever the chunk (k slots would
        # normalise over k |G|-ths of the fold: not equivariant)
        self._batch_stats = self._batch_stats_in_graph or any(
            isinstance(m, BATCH_STAT_MODULES) and m._buffers.get("running_mean") is None
            for m in self._user_modules
        )
        self._scanned = count

    # -------------------------------------------------------------------- running
    def forward(self, *args):
        k = self._decided(args)
        if k is None:  # chunk="auto", first call for this input: measure
            k = self._measured(args)
        return self._run(args, k)

    def _run(self, args, k: int):
        """One forward, k slots per pass."""
        if k >= self.order:  # one pass: the flat graph's code (its call only where hooked)
            return self.flat(*args) if hooked(self.flat) else self.flat.forward(*args)
        env = dict(zip(self._pre_out, self.graphs["pre"](*args), strict=True))
        lifted_input = env[self.lift.args[0]]
        body_args = [env[n] for n in self._body_in]
        parts: list[list] = [[] for _ in self._joined]
        acc: list = [None] * len(self._accumulated)
        for s in range(0, self.order, k):
            chunk = self.slots[s : s + k]
            lifted = self.flat.equivfx_lift.lift_slots(lifted_input, list(chunk))
            repeated = [repeat_per_slot(env[r.args[0]], len(chunk)) for r in self.repeats]
            values = dict(
                zip(self._read, self.graphs["body"](lifted, *repeated, *body_args), strict=True)
            )
            del lifted, repeated
            for i, (j, pool) in enumerate(zip(self._accumulated, self._pools, strict=True)):
                part = _pool_chunk(pool, values[j.args[0]], len(chunk), _axis(j))
                # the first part is copied (it may be a view of a body value); later ones are
                # folded in place, so the running pool needs one buffer
                acc[i] = _tree(_copy, part) if acc[i] is None else _combine(pool, acc[i], part)
            for i, (value, _) in enumerate(self._joined):
                parts[i].append(values[value])
            del values
        for i, (value, axis) in enumerate(self._joined):
            env[value] = _join(parts[i], axis)
        for i, (j, pool) in enumerate(zip(self._accumulated, self._pools, strict=True)):
            env[j] = _finish(pool, acc[i], self.order, _axis(j))
        return self.graphs["post"](
            *(env[n] for n in self._post_from_pre), *(env[n] for n in self._post_from_chunks)
        )

    @staticmethod
    def _key(args) -> tuple:
        return tuple(_key_of(a) for a in args)

    def _decided(self, args) -> int | None:
        """Slots per pass, or None where chunk="auto" has not measured this input yet."""
        if self.mixing_leaves:  # exact only so, in training and traced too
            return 1
        if is_tracing():  # first: torch.compile would guard on the registration count
            if self.unchecked_leaves:
                self._unchecked_when_traced()
            return self.order
        if self._scanned != _REGISTRATIONS[0]:  # a submodule was set somewhere: ours?
            self._find_user_modules()
        if self._batch_stats:  # in every mode: one slot per pass differs by design, so the
            return self.order  # leaf check (one slot per pass against all) cannot tell
        if any(map(_TRAINING, self._user_modules)):
            if self.unchecked_leaves:  # a first call in training: check the leaves first
                self._check_leaves(args)
                if self.mixing_leaves:
                    return 1
            return self.order  # training: batch statistics must see every slot
        if self.chunk != "auto":
            return int(self.chunk)
        if self.order == 1:  # one slot computed: nothing to choose
            return 1
        key = self._key(args)
        k = self.chosen.get(key)
        if k is None and len(self.chosen) >= self.MEASURED_SHAPES:
            k = self._nearest(key)
        return k

    def _nearest(self, key: tuple) -> int:
        """Past the bound: the decision for the measured input nearest in size to ``key`` (the
        sum over tensors of |log numel ratio|) among those with the same structure, dtypes,
        devices and ranks, other arguments ignored; every slot in one pass where none compares."""
        best = None
        for measured, k in list(self.chosen.items()):  # another thread may be measuring
            distance = _distance(key, measured)
            if distance is not None and (best is None or distance < best[0]):
                best = (distance, k)
        k = self.order if best is None else best[1]
        log.debug("equivfx: chunk='auto' reuses %d slots per pass for %s", k, key)
        return k

    def _measured(self, args) -> int:
        key = self._key(args)
        with MEASURING:  # one measurement at a time; another thread may have made this one
            if self.unchecked_leaves:  # the first measurement checks the leaves first
                self._check_leaves(args)
                if self.mixing_leaves:
                    self.chosen[key] = 1
            if self.mixing_leaves:  # ... or found leaves that mix samples
                return 1
            if key not in self.chosen:
                # the timed passes run forward's recorded updates (and those of modules run
                # whole) many times: put the buffers back, the call itself runs them once
                with torch.no_grad(), kept_buffers(self.flat):
                    self.chosen[key] = self._measure(args)
                log.info(
                    "equivfx: chunk='auto' chose %d of %d slots per pass for %s",
                    self.chosen[key],
                    self.order,
                    key,
                )
        return self.chosen[key]

    def _measure(self, args) -> int:
        """Time a whole forward for each k of :func:`fold_sizes`, interleaved (machine
        noise spreads over every candidate) in a new order each round (a fixed-seed shuffle, so
        a candidate does not always follow the same other one, whose freed memory the allocator
        may hand on): a warm-up round, then at least 3 and at most 20 rounds, until the
        measurement has taken about 0.3 s; keep each candidate's minimum.

        Folding every slot wins ties within 3 %: it runs one generated graph and has no chunk
        bookkeeping, so a chunk size must be clearly faster to be chosen."""
        sizes = fold_sizes(self.order)
        best = {k: float("inf") for k in sizes}
        devices = devices_of(args, self)  # CUDA kernels run after the call returns
        start = time.perf_counter()
        shuffle = random.Random(0).shuffle
        for round_ in range(21):
            order = list(sizes)
            shuffle(order)
            for k in order:
                synchronize(devices)
                t = time.perf_counter()
                self._run(args, k)
                synchronize(devices)
                if round_:  # round 0 warms caches and the allocator
                    best[k] = min(best[k], time.perf_counter() - t)
            if round_ >= 3 and time.perf_counter() - start > 0.3:
                break
        fastest = min(sizes, key=lambda k: (best[k], -k))
        return self.order if best[self.order] <= 1.03 * best[fastest] else fastest

    def _unchecked_when_traced(self) -> None:
        """Traced (torch.jit.trace, non-strict torch.export) before the first eager call: the
        leaves are not checked, and the recording folds every slot; say so, once (not while
        dynamo compiles: torch.compile and strict export cannot record a warning)."""
        if getattr(self, "_warned_unchecked", False) or torch.compiler.is_dynamo_compiling():
            return  # dynamo cannot trace warnings.warn (fullgraph=True, strict export)
        self._warned_unchecked = True
        warnings.warn(
            f"equivfx: traced before opaque leaf module(s) "
            f"{', '.join(map(repr, self.unchecked_leaves))} were checked to treat each sample "
            "on its own: the recording folds every slot into the batch. Call the model once "
            "in eval mode first, or compile with example_inputs=, to have them checked.",
            OpaqueLeafWarning,
            stacklevel=user_stacklevel(),
        )

    def _check_leaves(self, args) -> None:
        """:meth:`_leaves_mix` on ``args`` in eval mode without autograd (the modules' modes
        restored), at the first measurement or a first call in training."""
        with MEASURING:
            if not self.unchecked_leaves:  # another thread checked
                return
            modes = [(m, m.training) for m in self.flat.modules()]
            try:
                self.flat.eval()
                with (
                    torch.no_grad(),
                    Lift.watch_paused(self.flat.modules()),
                    kept_buffers(self.flat),
                ):
                    one = self._run(args, 1)
                    folded, again = self._run(args, self.order), self._run(args, self.order)
                self._leaves_mix(one, folded, again)
            finally:
                for m, mode in modes:
                    m.training = mode

    def _leaves_mix(self, per_slot, folded, again) -> bool:
        """For a model with opaque leaves not checked at compile (no example inputs, or inputs
        the check could not cut): where one slot per pass (``per_slot``) and
        every slot in one pass (``folded``) give different outputs, the leaves treat a batch's
        samples together; from then on this model runs one slot per pass, in every mode (each
        leaf sees the batch the loop over g gives it). A model whose folded outputs change from
        one call to the next (``again``: random draws) cannot be checked. Once per model."""
        leaves, self.unchecked_leaves = self.unchecked_leaves, ()
        if outputs_differ(folded, again) != 0.0:
            log.info("equivfx: outputs change between calls: leaves %s not checked", leaves)
            return False
        error = outputs_differ(per_slot, folded)
        if not error:
            return False
        self.mixing_leaves, self.chunk = leaves, 1
        warnings.warn(
            f"equivfx: the compiled model's outputs with one slot per pass and with every slot in "
            f"one pass differ by {error:.3g}: {describe_mixing(leaves)}. It runs one "
            "slot per pass from now on (chunk=1), like the hand-written loop over g; pass "
            "example_inputs to compile to have this checked (and the leaf named) beforehand.",
            BatchMixingWarning,
            stacklevel=user_stacklevel(),
        )
        return True

    def extra_repr(self) -> str:
        chosen = f", chosen={sorted(set(self.chosen.values()))}" if self.chosen else ""
        return f"chunk={self.chunk!r}, slots={self.order}{chosen}"


class _Spec(NamedTuple):
    """A tensor argument in ``chunk="auto"``'s keys."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device


class _Seq(NamedTuple):
    """A list, tuple or dict argument in ``chunk="auto"``'s keys: its kind and its items' keys."""

    kind: str
    items: tuple


def _key_of(value):
    """A hashable key for one argument: tensors by shape, dtype and device; containers by their
    items; other values as they are (unhashable ones by type and repr)."""
    if isinstance(value, torch.Tensor):
        return _Spec(tuple(value.shape), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return _Seq(type(value).__name__, tuple(_key_of(v) for v in value))
    if isinstance(value, dict):
        return _Seq("dict", tuple((k, _key_of(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return (type(value).__name__, repr(value))
    return value


def _distance(a, b) -> float | None:
    """How far apart two keys are in size (the sum over tensors of |log numel ratio|), or None
    if their structure, dtypes, devices or ranks differ; other values are ignored."""
    if isinstance(a, _Spec) or isinstance(b, _Spec):
        if not (isinstance(a, _Spec) and isinstance(b, _Spec)):
            return None
        if a.dtype != b.dtype or a.device != b.device or len(a.shape) != len(b.shape):
            return None
        return abs(math.log(max(math.prod(a.shape), 1)) - math.log(max(math.prod(b.shape), 1)))
    if isinstance(a, _Seq) or isinstance(b, _Seq):
        if not (isinstance(a, _Seq) and isinstance(b, _Seq)) or a.kind != b.kind:
            return None
        a, b = a.items, b.items
    if isinstance(a, tuple) and isinstance(b, tuple) and type(a) is type(b):
        if len(a) != len(b):
            return None
        total = 0.0
        for x, y in zip(a, b, strict=True):
            d = _distance(x, y)
            if d is None:
                return None
            total += d
        return total
    return 0.0  # other values: ignored


def _axis(join: fx.Node) -> int:
    return join.kwargs.get("batch_axis", 0)


def _pool_of(flat: fx.GraphModule, join: fx.Node) -> str | None:
    """The pool of an invariant readout (or hoisted pool) node, else None."""
    module = flat.get_submodule(join.target)
    return module.pool if getattr(module, "readout", None) == "invariant" else None


class _MeanExp(NamedTuple):
    """The running ``logsumexp`` readout over the n slots seen so far: their max ``m`` and ``p``
    = sum of exp(x - m), summed in :func:`~equivfx.passes.modules.pool_dtype` (see
    :func:`~equivfx.passes.modules.logmeanexp`, which the unchunked readout computes in one go;
    a running logaddexp rounded log n + the result once per chunk), ``dtype`` at the end."""

    m: torch.Tensor
    p: torch.Tensor
    n: int
    dtype: torch.dtype

    @staticmethod
    def of(s: torch.Tensor) -> _MeanExp:
        """Of the slots on axis 0 of ``s``."""
        m, p = exp_mass(s)
        return _MeanExp(m.to(p.dtype), p, s.shape[0], s.dtype)

    def join(self, other: _MeanExp) -> _MeanExp:
        """Both sets of slots, rescaled to the larger max of the parts holding any (a part of
        -inf slots only, p = 0, adds n slots of exp 0)."""
        parts = (self, other)
        m = torch.maximum(*(torch.where(q.p == 0, -math.inf, q.m) for q in parts))
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # no part holds any: -inf
        p = 0
        for q in parts:
            empty = q.p == 0
            d = torch.where(empty, 0.0, q.m - m)  # no overflow on the masked side
            p = p + torch.where(empty, 0.0, q.p * torch.exp(d))
        return _MeanExp(m, p, self.n + other.n, self.dtype)

    def value(self) -> torch.Tensor:
        return (self.m + torch.log(self.p / self.n)).to(self.dtype)


def _tree(fn, *values):
    first = values[0]
    if isinstance(first, _MeanExp):
        return fn(*values)
    if isinstance(first, (tuple, list)):
        return type(first)(_tree(fn, *parts) for parts in zip(*values, strict=True))
    return fn(*values) if isinstance(first, torch.Tensor) else first


def _copy(value):
    """A copy of a chunk's pooled part (it may be a view of a body value); running logsumexps
    are new tensors already."""
    return value if isinstance(value, _MeanExp) else torch.clone(value)


def _pool_chunk(pool: str, y, slots: int, axis: int):
    """The pool's partial result over one chunk's slots (folded on ``axis``): a sum or a max over
    the chunk on axis 0 (a view of ``y`` for a single slot), or its running logsumexp
    (:class:`_MeanExp`)."""

    def fn(t):
        if pool == "mean":  # bools would add as a logical or, integers as integers
            t = averageable(t)
        s = t.movedim(axis, 0).unflatten(0, (slots, -1))
        if pool == "logsumexp":  # integer slots pool to the default float dtype, as unchunked
            return _MeanExp.of(s if s.is_floating_point() else s.to(torch.get_default_dtype()))
        if slots == 1:
            return s[0]
        return s.sum(0) if pool == "mean" else s.amax(0)

    return _tree(fn, y)


def _combine(pool: str, acc, part):
    """Fold ``part`` into the running pool ``acc``: in place, unless autograd records the forward
    (``out=`` and in-place updates of recorded tensors do not differentiate)."""

    def fn(a, b):
        if isinstance(a, _MeanExp):  # logsumexp
            return a.join(b)
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return torch.add(a, b) if pool == "mean" else torch.maximum(a, b)
        return a.add_(b) if pool == "mean" else torch.maximum(a, b, out=a)

    return _tree(fn, acc, part)


def _finish(pool: str, total, slots: int, axis: int):
    """The readout's value from the accumulated pool over ``slots`` computed slots (a running
    logsumexp divides its mass by the slots it saw; with dead slots eliminated every coset counts
    once)."""

    def fn(t):
        if isinstance(t, _MeanExp):
            t = t.value()
        elif pool == "mean":
            t = t / slots
        return t.movedim(0, axis) if axis else t

    return _tree(fn, total)


def _join(parts: list, axis: int):
    """Concatenate the chunks' values of one folded value (tensors, or tuples of tensors)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, (tuple, list)):
        return type(first)(_join([p[i] for p in parts], axis) for i in range(len(first)))
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, axis)
    return first


def _reads(nodes: list[fx.Node], outside: set) -> list[fx.Node]:
    """The nodes that ``nodes`` read and that are not in ``outside``, in first-use order."""
    seen: dict[fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in outside:
                seen.setdefault(a)
    return list(seen)


def _subgraph(flat: fx.GraphModule, nodes, inputs, outputs) -> fx.GraphModule:
    """A GraphModule running ``nodes`` of ``flat`` (sharing its modules): placeholders for
    ``inputs``, a tuple of ``outputs`` (``None``: ``nodes`` end with flat's own output node)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs):
        env[n] = graph.placeholder(f"in{i}_{n.name}")
    for n in nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    if outputs is not None:
        graph.output(tuple(env[o] for o in outputs))
    with_direct_module_access(graph)  # before its code is generated: once
    sub = fx.GraphModule(flat, graph)
    # fx copies dotted attributes into new containers; read flat's own children instead (the same
    # dict), so .to(), .double(), load_state_dict(assign=True) and a top-level submodule replaced
    # later reach what this graph reads
    sub.__dict__["_modules"] = flat._modules
    _share_root_tensors(sub, flat)
    return sub


def _share_root_tensors(module: nn.Module, flat: fx.GraphModule) -> None:
    """Make ``module`` hold ``flat``'s root-level parameters and buffers in the same dicts, not
    copies: what ``.to()`` (with parameters overwritten on conversion) or
    ``load_state_dict(assign=True)`` puts in one is in the other, and pickling keeps them one."""
    module.__dict__["_parameters"] = flat._parameters
    module.__dict__["_buffers"] = flat._buffers
    module.__dict__["_non_persistent_buffers_set"] = flat._non_persistent_buffers_set


def _split(flat: fx.GraphModule):
    """pre (run once), body (per chunk: everything computed from the lifted or repeated inputs
    before a readout), post (the readouts or hoisted pools, and what follows them), the lift, the
    repeat nodes and the joins (readouts and pools)."""
    nodes = list(flat.graph.nodes)
    lifts = [n for n in nodes if n.op == "call_module" and n.target == LIFT_NAME]
    joins = [n for n in nodes if n.op == "call_module" and n.target in (POOL_NAME, READOUT_NAME)]
    repeats = [
        n for n in nodes if n.op == "call_module" and str(n.target).startswith("equivfx_repeat_")
    ]
    why = None
    if len(lifts) != 1:
        why = "a single lifted input"
    elif any(n.meta.get("equivfx.mixing") for n in nodes):
        why = "global mode (mixing layers read every slot at once)"
    elif not joins:
        why = "a model whose output is read out"
    if why:
        raise NotYetSupportedError(
            explain("chunk= is supported for " + why + " only", why, why, "use chunk=None")
        )
    lift = lifts[0]
    sources = {lift, *repeats}
    join_set = set(joins)
    from_slots: set[fx.Node] = set(sources)
    after_join: set[fx.Node] = set(join_set)
    body: list[fx.Node] = []
    post: list[fx.Node] = []
    pre: list[fx.Node] = []
    for n in nodes:
        inputs = n.all_input_nodes
        if n in join_set or any(a in after_join for a in inputs) or n.op == "output":
            after_join.add(n)
            post.append(n)
        elif n in sources:
            continue
        elif any(a in from_slots for a in inputs):
            from_slots.add(n)
            body.append(n)
        else:
            pre.append(n)
    body_set = set(body) | sources
    for n in post:
        if n not in join_set and any(a in body_set for a in n.all_input_nodes):
            raise NotYetSupportedError(
                explain(
                    "chunk= needs every output to depend on the slots through a readout",
                    n.name,
                    "outputs computed from readouts (or pools) only",
                    "use chunk=None",
                )
            )
    return pre, body, post, lift, repeats, joins


def _batch_stats_always(node: fx.Node) -> bool:
    """``node`` is ``F.batch_norm`` with ``training=True`` written out (batch statistics in
    every mode)."""
    if node.op != "call_function" or node.target is not F.batch_norm:
        return False
    flag = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
    return flag is True


def run_chunks(runner: SlotChunks, *args):
    """The chunked model's forward: its runner's, without ``nn.Module.__call__`` unless a hook
    is set on it (the compiled model's own hooks run at its call; each Python layer of a forward
    costs more inside it than alone: ``benchmarks/diagnose_overhead.py``)."""
    return runner(*args) if hooked(runner) else runner.forward(*args)


class _Chunked(fx.GraphModule):
    """The graph module :func:`chunked_module` returns.

    A top-level submodule replaced, added or deleted on it (``emodel.head = ...``) is replaced in
    ``flat`` too (whose code, and the chunk runner's, reads it). Pickled as what rebuilds it
    (``flat``, the chunk setting, ``chunk="auto"``'s decisions, and every other attribute): fx
    would pickle its code and, on loading, register ``equivfx_flat`` as a submodule (every
    state-dict key twice) and give it root-level tensors of its own."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        self._mirror(name)

    def __delattr__(self, name):
        super().__delattr__(name)
        self._mirror(name)

    def add_module(self, name, module):  # register_module calls it too
        super().add_module(name, module)
        self._mirror(name)

    def _mirror(self, name: str) -> None:
        flat = self.__dict__.get("equivfx_flat")
        if flat is None or name == CHUNKS_NAME or name in _STRUCTURE:
            return
        if name in self._modules:
            flat._modules[name] = self._modules[name]
        elif name in flat._modules:
            del flat._modules[name]
        else:
            return
        self._modules[CHUNKS_NAME]._find_user_modules()

    __deepcopy__ = deepcopy_keeping_state  # hooks and attributes set on it, too
    __copy__ = copy_keeping_state  # fx's rebuilds it from its graph: no state-dict keys

    def __reduce__(self):
        runner = self._modules[CHUNKS_NAME]
        kept = {k: v for k, v in self.__dict__.items() if k not in _STRUCTURE}
        leaves = (runner.unchecked_leaves, runner.mixing_leaves)
        return (
            _unpickle_chunked,
            (self.equivfx_flat, runner.chunk, dict(runner.chosen), kept, leaves),
        )


# what chunked_module builds (everything else a pickled chunked module had is put back)
_STRUCTURE = frozenset(
    {"_graph", "_code", "_lineno_map", "_prologue_start", "equivfx_flat", "_modules"}
    | {"_parameters", "_buffers", "_non_persistent_buffers_set"}
)


def _unpickle_chunked(
    flat: fx.GraphModule, chunk, chosen: dict, kept: dict, leaves=((), ())
) -> fx.GraphModule:  # leaves: (unchecked, mixing); pickles before them have none
    gm = chunked_module(flat, chunk, *leaves)
    gm._modules[CHUNKS_NAME].chosen.update(chosen)
    gm.__dict__.update(kept)
    gm._modules[CHUNKS_NAME].training = gm.training  # a fresh runner's flag: the model's
    return direct_module_access(gm)


def _restore_flat(copied: fx.GraphModule) -> None:
    """fx's deep copy keeps only what the graph reads, in dicts of its own: ``equivfx_flat`` is
    the copy's own, and its root-level tensors are shared again."""
    flat = copied._modules[CHUNKS_NAME].flat
    object.__setattr__(copied, "equivfx_flat", flat)
    _share_root_tensors(copied, flat)


def chunked_module(
    flat: fx.GraphModule, chunk: int | str, unchecked_leaves=(), mixing_leaves=()
) -> fx.GraphModule:
    """A graph module computing what ``flat`` computes, k slots at a time.

    ``unchecked_leaves``: opaque leaves whose independence of the batch's other samples
    ``chunk="auto"`` checks at its first measurement (see :meth:`SlotChunks._leaves_mix`);
    ``mixing_leaves``: leaves found to mix them (one slot per pass in every mode).

    It registers ``flat``'s submodules, parameters and buffers under the same names (so the state
    dict has the original keys) and keeps ``flat`` as ``equivfx_flat`` for localisation and
    inspection.
    """
    if chunk != "auto" and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise NotYetSupportedError(
            explain(
                "chunk must be a positive int, 'auto' or None",
                chunk,
                "e.g. chunk=2",
                "pass the number of slots per pass",
            )
        )
    runner = SlotChunks(flat, chunk, unchecked_leaves, mixing_leaves)
    root = nn.Module()
    root.add_module(CHUNKS_NAME, runner)
    graph = fx.Graph()
    placeholders = [  # with the model's own defaults: forward(x, scale=2.0) keeps its default
        graph.placeholder(n.target, default_value=n.args[0])
        if n.args
        else graph.placeholder(n.target)
        for n in flat.graph.nodes
        if n.op == "placeholder"
    ]
    runner_node = graph.get_attr(CHUNKS_NAME)
    graph.output(graph.call_function(run_chunks, (runner_node, *placeholders)))
    gm = _Chunked(root, graph, class_name=type(flat).__name__)
    # the same modules, parameters and buffers under the same names: the original state-dict keys
    for name, child in flat.named_children():
        gm.add_module(name, child)
    _share_root_tensors(gm, flat)
    if hasattr(flat, OPAQUE_ATTR):  # the opaque path hides its prefix in state-dict keys
        install_prefix_hooks(gm, OPAQUE_ATTR)
    if getattr(flat, "equivfx_hidden_state", ()):  # and keys the model's own hooks leave out
        hide_state(gm, flat.equivfx_hidden_state)
    object.__setattr__(gm, "equivfx_flat", flat)
    gm._deepcopy_hooks.append(_restore_flat)
    return gm
