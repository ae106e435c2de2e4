"""The runtime modules the global passes insert: the lift at the input and the readout at the
output.

They hold no parameters and no persistent buffers, so a compiled model's ``state_dict()`` keeps
exactly
the original keys.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from equivfx.errors import InputShapeError, ReadoutError, explain, user_stacklevel
from equivfx.groups.actions import Action

__all__ = [
    "CheckInput",
    "CosetLift",
    "Lift",
    "TilingCheck",
    "Broadcast",
    "Readout",
    "READOUTS",
    "POOLS",
    "PoseAction",
    "pose_action",
]

READOUTS = ("slots", "pose", "invariant", "equivariant")
POOLS = ("mean", "max", "logsumexp")


MEASURING = threading.RLock()
"""Held while a compiled model times its alternatives at a first call (``chunk="auto"``, the
mixing layers' memory format): one measurement at a time in the process, so threads do not time
each other's work, and a thread that waited finds the decision made. Reentrant: a measured layer
may run another that measures."""


def pool_dtype(s: torch.Tensor) -> torch.dtype:
    """The dtype the logsumexp readout sums exp(x - max) in: float64 on the CPU and CUDA (on an
    output-sized tensor, or one slot block at a time), float32 elsewhere (MPS has no float64)."""
    return torch.float64 if s.device.type in ("cpu", "cuda") else torch.float32


PRECISE_POOL_LIMIT = 1 << 13
"""Largest output (elements per slot) the ``logsumexp`` readout pools with :func:`logmeanexp`'s
exact formula; larger ones (dense maps) take the fused ``torch.logsumexp`` minus log n, 3 to 5x
faster there (8 slots of 8x10x64x64 on 2 cores: 3.5 against 10 to 18 ms) and a few float32 ulps of
log n less precise."""


def logmeanexp(s: torch.Tensor) -> torch.Tensor:
    """log(mean(exp(s))) over axis 0: the ``logsumexp`` readout (minus log n, so that equal slots
    pool to their common value), as m + log(sum(exp(s - m)) / n) with m the maximum and the sum
    in :func:`pool_dtype`. ``torch.logsumexp(s, 0) - log n`` rounds to float32 a value of about
    log n + the result, whose ulp is that of log n: slots of about 0.02 under a group of 64
    elements pooled 1e-6 apart when permuted (50 ulps of the output); here 1e-8 from the float64
    value (64 float32 slots within 0.05 of each other; 5e-7 before), for 15 to 30 us more per
    call on a small head (2 cores, a timing script run beside the change). Outputs over
    ``PRECISE_POOL_LIMIT`` elements and integer slots: the plain formula."""
    n = s.shape[0]
    if not s.is_floating_point() or s[0].numel() > PRECISE_POOL_LIMIT:
        return torch.logsumexp(s, 0) - math.log(n)
    m, p = exp_mass(s)
    return torch.log(p / n).add_(m).to(s.dtype)


def exp_mass(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots' max ``m`` over axis 0 and ``p`` = sum of exp(s - m) in :func:`pool_dtype`, so
    log(mean(exp(s))) = m + log(p / n) (:func:`logmeanexp`; the chunk runner joins chunks' pairs).
    Infinite maxima (all -inf, or some +inf) shift by 0, as logsumexp's; a nan slot stays nan.
    Outputs over ``PRECISE_POOL_LIMIT`` elements: p from the fused ``torch.logsumexp``.

    ``m`` is a shift, not a function of the slots for autograd (detached): the value does not
    depend on it, so gradients reach the slots through ``p`` alone, softmax(s) as
    ``torch.logsumexp``'s. Through m they would add terms that cancel only up to rounding, and
    with a +inf slot in one chunk nan (inf - inf) for the finite slots of the others."""
    if s[0].numel() > PRECISE_POOL_LIMIT:  # shifted by the logsumexp itself: p = 1 where finite
        lse = torch.logsumexp(s, 0)
        m = lse.detach().nan_to_num(0.0, posinf=0.0, neginf=0.0)
        # an infinite logsumexp is p itself (+inf) or no mass (0), not exp(+-inf), whose
        # gradient (inf x 0) would be nan for every slot (the branch not taken too: exp(0)
        # there). A chunk of -inf slots only still gets nan, as torch.logsumexp's backward gives.
        inf, zero = lse.isinf(), torch.zeros_like(lse)
        p = torch.where(
            inf, torch.where(lse > 0, lse, zero), torch.exp((lse - m).masked_fill(inf, 0))
        )
        return m, p.to(pool_dtype(s))
    m = s.detach().amax(0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    return m, torch.exp(s - m).sum(0, dtype=pool_dtype(s))


def devices_of(*values) -> set[torch.device]:
    """The devices other than the CPU that the tensors in ``values`` (and in the lists, tuples and
    dicts among them, and the parameters and buffers of the modules among them) live on."""
    found: set[torch.device] = set()
    stack = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            found.add(v.device)
        elif isinstance(v, nn.Module):
            stack.extend(v.parameters())
            stack.extend(v.buffers())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return {d for d in found if d.type != "cpu"}


def synchronize(devices) -> None:
    """Wait until the work queued on ``devices`` has run. Kernels on CUDA (and other accelerators)
    run asynchronously: a timer that reads the clock without waiting measures how long they took
    to queue, not to run. Device types without a ``synchronize`` (meta) are skipped."""
    for device in devices:
        backend = getattr(torch, device.type, None)
        sync = getattr(backend, "synchronize", None)
        if sync is None:
            continue
        if device.type in ("cuda", "xpu"):
            sync(device)
        else:
            sync()


def eager_tensor(x) -> bool:
    """``x`` is a plain tensor in an eager call: not traced, compiled, exported or vmapped, so a
    cached index or a reused buffer may stand in for the ops a tracer would have to record."""
    return (
        not is_tracing()  # first: torch.compile cannot trace the functorch query below
        and type(x) is torch.Tensor
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


_GLOBAL_HOOKS = (
    nn.modules.module._global_forward_hooks,
    nn.modules.module._global_forward_pre_hooks,
    nn.modules.module._global_backward_hooks,
    nn.modules.module._global_backward_pre_hooks,
)  # the dicts themselves (torch registers into them): no lookups on the hot path


def global_hooks() -> bool:
    """Hooks registered for every module (``register_module_forward_hook`` and kin)."""
    return any(_GLOBAL_HOOKS)


def hooked(module: nn.Module) -> bool:
    """``module`` has forward or backward hooks of its own, or hooks for every module exist:
    ``nn.Module.__call__`` would run them."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or global_hooks()
    )


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5


def is_tracing() -> bool:
    """torch.compile, torch.export or torch.jit.trace is recording this call. (The compiler's
    flags first: dynamo folds them; then jit's own, without ``torch.jit.is_tracing``'s extra
    Python frames: the lift asks at every call.)"""
    return bool(torch.compiler.is_compiling() or _is_exporting() or torch._C._is_tracing())


class Lift(nn.Module):
    """The group-axis lift F^(x)(g) = F(g^-1 . x), folded slot-major into the batch axis.

    ``forward(x)`` checks ``x`` against the action (a non-square image under C4 raises
    :class:`~equivfx.errors.InputShapeError`) and returns ``cat([g_0^-1 . x, ..., g_{n-1}^-1 . x],
    0)`` of shape ``(|G| * B, ...)``: block i holds slot g_i. Under actions that only move
    entries, small inputs are lifted by one gather with an index cached per per-sample shape
    (bitwise the same), and a shape checked once is not checked again.
    """

    def __init__(self, group, action):
        super().__init__()
        self.group = group
        self.action = action
        self.inverses = tuple(group.inverse_table)
        # which slots are computed (eliminate-dead-slots keeps one per coset of ``kernel``, the
        # elements whose slots equal the identity's: those acting trivially on the lifted value,
        # ``shape_kernel``, found on ``kernel_shape`` (None: any shape), and those the ops after
        # the lift are invariant under)
        self.slots: tuple[int, ...] = tuple(range(group.order))
        self.kernel: tuple[int, ...] = (0,)
        self.kernel_shape: tuple[int, ...] | None = None
        self.shape_kernel: tuple[int, ...] = (0,)  # the part of kernel the action gives there
        self._kernels: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._gathers: dict[tuple, _Gather | None] = {}  # see _gather_key, _gather_for
        self._gathers_for = None  # the (action, inverses, kernel, kernel_shape) they were for

    _hit = None  # the last input lifted by a gather (see forward); None in older pickles

    mode_watch: tuple = ()
    """``(module, flag, name)`` for each module whose training flag the traced graph depends on
    (``CompileInfo.mode_dependent``; the model itself is watched through this lift's own flag,
    which ``train()``/``eval()`` on the compiled model set too): a call with another flag warns
    (:meth:`_check_modes`). A plain attribute, not registered: the modules are the model's."""

    _mode_warned = False

    def _check_modes(self) -> None:
        """Warn once (until the flags match again) where a watched module's training flag is
        not the one its branch was compiled for."""
        off = [name for module, flag, name in self.mode_watch if module.training != flag]
        if not off:
            self._mode_warned = False
            return
        if self._mode_warned or torch.compiler.is_compiling():
            return
        self._mode_warned = True
        from equivfx.trace import TrainingModeWarning

        names = ", ".join(repr(n) if n else "the model" for n in off)
        warnings.warn(
            f"equivfx: {names} changed mode since compiling, but the compiled graph keeps the "
            "branch of the mode it was compiled in (their code branches on self.training, "
            "which tracing ran once): outputs are those of that mode. Compile the model in the "
            "mode you run it in, once per mode.",
            TrainingModeWarning,
            stacklevel=user_stacklevel(),
        )

    @staticmethod
    @contextlib.contextmanager
    def watch_paused(modules):
        """While equivfx itself runs the model in eval mode (compile's test run, verify, the
        leaf check): lifts among ``modules`` do not warn about it, a run that is not the user's
        call in another mode; their watch is put back after."""
        paused = [(m, m.__dict__.pop("mode_watch")) for m in modules if "mode_watch" in m.__dict__]
        try:
            yield
        finally:
            for m, watch in paused:
                m.mode_watch = watch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every call pays this module's Python, and inside a forward that costs several times
        # what it costs alone (benchmarks/diagnose_overhead.py). An input like the last one
        # gathered (same shape, dtype, device; the module unchanged) takes that gather with
        # only the checks that shape does not settle.
        if self.mode_watch:
            self._check_modes()
        hit = self._hit
        if (
            hit is not None
            and not is_tracing()  # first: a traced shape comparison would specialise the batch
            and type(x) is torch.Tensor
            and x.shape == hit.shape
            and x.dtype is hit.dtype
            and x.device == hit.device
            and x.layout is torch.strided
            and self._made_for(hit.made_for)
            and hit.slots is self.slots
            and hit.limit == self.GATHER_LIMIT
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        ):
            return hit.run(x)
        return self.lift_slots(x, self.slots)

    def lift_slots(self, x: torch.Tensor, slots) -> torch.Tensor:
        """Slots ``slots`` only, folded in their order: (len(slots) B, ...)."""
        if self.mode_watch:  # chunked runs call this directly
            self._check_modes()
        slots = tuple(slots)
        keyed = self._gather_key(x, slots)
        if keyed is None:
            self._check(x)
            return self._each_slot(x, slots)
        key, made_for = keyed
        gather = self._gathers.get(key, _UNSEEN)
        if gather is _UNSEEN:  # a per-sample shape not lifted before: check it once
            self._check(x)
            gather = self._gather_for(x, slots, key)
        if gather is None:  # refused for this shape (see _gather_for): op by op
            return self._each_slot(x, slots)
        run = gather.bound(x.shape)  # one gather instead of one op per slot, then a cat
        if slots == self.slots:
            self._hit = _Hit(
                x.shape,
                x.dtype,
                x.device,
                made_for,  # what the cache was checked for, even if another thread changed it
                self.slots,
                self.GATHER_LIMIT,
                run,
            )
        return run(x)

    def _check(self, x: torch.Tensor) -> None:
        """``x`` fits the action, and on its per-sample shape the elements found acting trivially
        on the shape the computed slots were chosen for still do (more may)."""
        self.action.check(x)
        shape = tuple(x.shape[1:])
        if self.kernel_shape is not None and shape != self.kernel_shape:
            if shape not in self._kernels:
                self._kernels[shape] = self.action.kernel((1, *shape))
            assumed = self.__dict__.get("shape_kernel", self.kernel)  # older pickles: kernel
            if not set(assumed) <= set(self._kernels[shape]):
                raise InputShapeError(
                    explain(
                        "this model computes one slot per coset of the elements that act "
                        "trivially on the lifted value's shape, found at compile time; on a "
                        "value of this shape some of them do not (per-sample shape)",
                        shape,
                        f"{self.kernel_shape}, or a shape on which elements "
                        f"{list(assumed)} act trivially",
                        "compile with example inputs of the shape you run, or optimize=False",
                    )
                )

    def _each_slot(self, x: torch.Tensor, slots) -> torch.Tensor:
        """The lift op by op: g^-1 . x for each slot g, folded. Always a new tensor (cat copies
        even one block): ops after the lift may work in place."""
        return torch.cat([self.action._apply(self.inverses[i], x) for i in slots], 0)

    GATHER_LIMIT = 1 << 15
    """Largest input on the CPU (elements, all samples) lifted by one gather. Below it the
    per-slot ops and the cat cost more than the data they move (D4 on one 3x32x32 image: 68 us op
    by op, 20 us by gather; Perm5's 120 slots on a set of 5: 686 -> 11 us); above it both move the
    same data, and rolls, which copy whole blocks, are faster op by op (ShiftRev4 on 64 sequences
    of 8x128: 176 against 326 us); ``benchmarks/diagnose_overhead.py``. On other devices every
    size is gathered (``INDEX_LIMIT`` still holds): a GPU call is bound by its launches, one per
    slot and the cat op by op (on an H200, D4 on 64 3x32x32 images: 11 kernels and 149 us of
    CPU per call op by op, 1 kernel and 36 us by gather; ``benchmarks/diagnose_cuda.py``)."""

    INDEX_LIMIT = 1 << 18
    """Largest gather index (int64 entries: |slots| x per-sample size, 2 MiB), and 4x that cached
    in all; at most ``CACHED_SHAPES`` keys (refused shapes included). The last gather used stays
    alive too (``forward``'s fast path) after the cache drops it: one index more at most."""

    CACHED_SHAPES = 64

    def _gather_key(self, x: torch.Tensor, slots: tuple) -> tuple[tuple, tuple] | None:
        """The cache key of a gather for ``x`` and the (action, inverses, kernel, kernel_shape)
        the cache holds gathers for, or None where ``x`` is lifted op by op (and
        checked at every call): in traced, compiled, exported or vmapped calls (the ops are what
        a tracer records), under actions that do more than move entries or that act on the batch
        axis (the index, and the checks, would depend on the batch size), for inputs with one
        axis, quantized or not strided (no gather kernel), and for inputs on the CPU over
        ``GATHER_LIMIT``."""
        if not eager_tensor(x) or not self.action.is_permutation or x.dim() < 2:
            return None
        if x.is_quantized or x.layout != torch.strided:
            return None
        if over_gather_limit(x, x.numel(), self.GATHER_LIMIT):
            return None
        if any(a % x.dim() == 0 for a in self.action.axes):
            return None
        built = self.__dict__.get("_gathers_for")  # absent in older pickles
        if not self._made_for(built):
            self._gathers = {}
            self._gathers_for = built = (
                self.action,
                self.inverses,
                self.kernel,
                self.kernel_shape,
            )
        return (tuple(x.shape[1:]), x.device, slots), built

    def _made_for(self, state: tuple | None) -> bool:
        """``state`` holds this module's action, inverses, kernel and kernel shape, object for
        object: an equal action may still act differently (its group's elements realised by
        other permutations, or fields left out of comparisons)."""
        return (
            state is not None
            and state[0] is self.action
            and state[1] is self.inverses
            and state[2] is self.kernel
            and state[3] is self.kernel_shape
        )

    def _gather_for(self, x: torch.Tensor, slots: tuple, key: tuple) -> _Gather | None:
        """Build (and cache) the gather that lifts inputs of ``x``'s per-sample shape: slot s
        takes per-sample entry ``index[s, j]`` to entry j, read by lifting a probe of entry
        numbers op by op (two samples, float64: exact), and checked to reproduce that lift on
        the probe (an action that mixed samples would not). None: lift op by op."""
        size = math.prod(x.shape[1:])
        if len(slots) * size > self.INDEX_LIMIT:
            gather = None
        else:  # on the CPU (float64 is not on every device); a normal tensor even when built
            # under inference_mode, so autograd may save it later
            with torch.inference_mode(False):
                probe = torch.arange(2 * size, dtype=torch.float64).view(2, *x.shape[1:])
                lifted = self._each_slot(probe, slots)
                source = lifted.view(len(slots), 2, size)[:, 0]  # entry numbers of sample 0
                gather = None
                if bool((source < size).all()):  # else sample 0 took another sample's entries
                    gather = _Gather(source.to(torch.int64))
                    if not torch.equal(gather(probe), lifted):
                        gather = None
                if gather is not None:
                    gather = _Gather(gather.index.to(x.device))
        cache_bounded(self._gathers, key, gather, gather.index.numel() if gather else 0, self)
        return gather

    def __getstate__(self):
        state = super().__getstate__()
        state["_gathers"], state["_gathers_for"] = {}, None  # a cache: not pickled
        state.pop("_hit", None)
        return state

    def slot_permutation(self, h: int) -> list[int]:
        """The regular action of ``h`` on the computed slots: position j of ``h.s`` holds position
        ``perm[j]`` of ``s``."""
        where = slot_positions(self.group, self.slots, self.kernel)
        regular = self.group.regular_permutation(h)
        return [where[regular[i]] for i in self.slots]

    def extra_repr(self) -> str:
        computed = ""
        if len(self.slots) < self.group.order and len(self.kernel) > 1:
            computed = (
                f", slots={list(self.slots)} (one per coset of the {len(self.kernel)} elements "
                "whose slots equal the identity's)"
            )
        elif len(self.slots) < self.group.order:  # defer-lift-to-cosets
            computed = f", slots={list(self.slots)} (one per coset; a coset lift makes the rest)"
        return f"group={self.group!r}, action={self.action.describe()}{computed}"


_UNSEEN = object()


def _index_entries(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    return 0 if value is None else value.index.numel()  # a _Gather, or a refused shape


def cache_bounded(cache: dict, key, value, entries: int, limits=None) -> None:
    """Store ``value`` (an index of ``entries`` int64 entries, a gather holding one, or None
    for a refused shape) in a lift's cache, emptied first where it would hold more than
    ``CACHED_SHAPES`` keys or 4 ``INDEX_LIMIT`` entries (of ``limits``, a lift; default
    :class:`Lift`'s)."""
    limits = Lift if limits is None else limits
    cached = list(cache.values())  # a snapshot: other threads may be adding
    total = sum(map(_index_entries, cached)) + entries
    if len(cached) >= limits.CACHED_SHAPES or total > 4 * limits.INDEX_LIMIT:
        cache.clear()
    cache[key] = value


def over_gather_limit(x: torch.Tensor, elements: int, limit: int) -> bool:
    """A lift of ``elements`` entries of ``x`` goes op by op rather than by one gather: on the
    CPU above ``limit`` (:attr:`Lift.GATHER_LIMIT`); never on other devices (see there)."""
    return x.device.type == "cpu" and elements > limit


@dataclass(frozen=True)
class _Gather:
    """The lift of inputs of one per-sample shape as one gather: slot s takes per-sample entry
    ``index[s, j]`` to entry j."""

    index: torch.Tensor  # (slots, per-sample size), int64

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.bound(x.shape)(x)

    def bound(self, shape: torch.Size) -> Callable[[torch.Tensor], torch.Tensor]:
        """The gather for inputs of exactly ``shape``, its index and shapes made up front."""
        slots, size = self.index.shape
        batch = shape[0]
        out_shape = (slots * batch, *shape[1:])
        if batch == 1:  # the slot-major lift of one sample is the flat gather itself
            flat = self.index.view(-1)
            return lambda x: x.reshape(size).index_select(0, flat).view(out_shape)
        # each sample gathered into every slot: index and input expanded, not copied
        expanded = (slots, batch, size)
        index = self.index.unsqueeze(1).expand(expanded)
        return lambda x: torch.gather(
            x.reshape(batch, size).unsqueeze(0).expand(expanded), 2, index
        ).view(out_shape)


class _Hit(NamedTuple):
    """What :meth:`Lift.forward` compares an input with to reuse the last gather."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    made_for: tuple  # the action, inverses, kernel and kernel shape the index was read for
    slots: tuple[int, ...]
    limit: int  # GATHER_LIMIT when it was made
    run: Callable[[torch.Tensor], torch.Tensor]


def slot_positions(group, slots, kernel) -> tuple[int, ...]:
    """For each element g, the position in ``slots`` of the computed slot equal to slot g.

    ``slots`` holds one element per left coset r K of ``kernel``, a subgroup (not necessarily
    normal) whose slots are copies where the lift sits: slot g = slot r for the r in ``slots`` with
    r^-1 g in ``kernel``."""
    table, inv, kernel = group.table, group.inverse_table, set(kernel)
    return tuple(
        next(j for j, r in enumerate(slots) if table[inv[r]][g] in kernel)
        for g in range(group.order)
    )


class CheckInput(nn.Module):
    """Checks the model's input against the action (kept at the input when the lift moves later)."""

    def __init__(self, action):
        super().__init__()
        self.action = action

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.action.check(x)
        return x


class CosetLift(nn.Module):
    """The lift after ops that commute with a subgroup K's action (``defer-lift-to-cosets``): it
    reads one slot per left coset gK, folded (block j holds F(r_j^-1 . x) for the representative
    r_j), and makes slot g = r k (k in K) as k^-1 . F(r^-1 . x), which is F(g^-1 . x).

    Args:
        group: G.
        action: K's action on the value read, bound to a group whose slot i is ``elements[i]``.
        elements: K's elements as slot indices of G.
        reps: the coset representatives, in the order of the blocks read.
    """

    def __init__(self, group, action, elements, reps):
        super().__init__()
        self.group = group
        self.action = action
        self.reps = tuple(reps)
        self.slots: tuple[int, ...] = tuple(range(group.order))
        table, inv = group.table, group.inverse_table
        position = {k: i for i, k in enumerate(elements)}
        where = []
        for g, j in enumerate(slot_positions(group, self.reps, elements)):
            k = table[inv[self.reps[j]]][g]  # g = r k
            where.append((j, position[inv[k]]))  # block j, acted on by k^-1
        self.where: tuple[tuple[int, int], ...] = tuple(where)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.lift_slots(y, self.slots)

    def lift_slots(self, y: torch.Tensor, slots) -> torch.Tensor:
        """Slots ``slots`` only, folded in their order: (len(slots) B, ...). One sample's slots
        are one gather (an index cached per shape, as the lift's); otherwise one action per
        slot, then a cat."""
        slots = tuple(slots)
        if (
            y.shape[0] == len(self.reps)
            and not over_gather_limit(y, y.numel() * len(slots), Lift.GATHER_LIMIT)
            and len(slots) * (y.numel() // len(self.reps)) <= Lift.INDEX_LIMIT  # the index
            and eager_tensor(y)
            and self.action.is_permutation
        ):
            key = (tuple(y.shape), y.device, slots)
            indices = self.__dict__.setdefault("_indices", {})
            index = indices.get(key)
            if index is None:
                index = self._index_for(y, slots)
                cache_bounded(indices, key, index, index.numel())
            return y.reshape(-1).index_select(0, index).view(len(slots), *y.shape[1:])
        return self._each_slot(y, slots)

    def _each_slot(self, y: torch.Tensor, slots) -> torch.Tensor:
        """The slots op by op: k^-1 . block j for each slot's (block j, k), folded."""
        blocks = torch.unflatten(y, 0, (len(self.reps), -1))
        return torch.cat(
            [self.action._apply(i, blocks[j]) for j, i in map(self.where.__getitem__, slots)], 0
        )

    def _index_for(self, y: torch.Tensor, slots) -> torch.Tensor:
        """The entries of ``y`` (one sample per coset) that slots ``slots`` read, in order: the
        actions applied to a probe of entry numbers (float64: exact)."""
        with torch.inference_mode(False):
            probe = torch.arange(y.numel(), dtype=torch.float64).view(y.shape)
            return self._each_slot(probe, slots).reshape(-1).to(torch.int64).to(y.device)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_indices", None)  # a cache: not pickled
        return state

    def slot_permutation(self, h: int) -> list[int]:
        """The regular action of ``h`` on the slots (all are made here)."""
        return list(self.group.regular_permutation(h))

    def extra_repr(self) -> str:
        if len(self.reps) == 1:  # the subgroup is the whole group: a lift deferred past a region
            return f"group={self.group!r}, from one slot: {self.action.describe()}"
        return (
            f"group={self.group!r}, from {len(self.reps)} cosets of the subgroup on which "
            f"{self.action.describe()}"
        )


class TilingCheck(nn.Module):
    """Checks that a pool's windows tile its input: the last two axes equal and divisible by the
    window. A cost pass relied on the pool commuting with rotations, which it does only then (on
    a 7x7 input, MaxPool2d(2) drops the last row and column, and a rotated input loses others)."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        if h != w or h % self.window:
            raise InputShapeError(
                explain(
                    "the cost passes rely on a pool commuting with rotations, found on the "
                    f"example's shape, which holds only where its {self.window}x{self.window} "
                    "windows tile a square input (the pool's input shape)",
                    tuple(x.shape),
                    f"equal last two axes divisible by {self.window}",
                    "compile with example inputs of the shape you run, or optimize=False",
                )
            )
        return x

    def extra_repr(self) -> str:
        return f"window={self.window}"


class Broadcast(nn.Module):
    """An input G acts on trivially, repeated once per slot so it lines up with the folded batch."""

    def __init__(self, order: int):
        super().__init__()
        self.order = order

    def forward(self, x):
        return repeat_per_slot(x, self.order)

    def extra_repr(self) -> str:
        return f"order={self.order}"


def repeat_per_slot(x, slots: int):
    """``x`` repeated ``slots`` times along the batch axis (non-tensors and scalars unchanged)."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    return x.repeat((slots,) + (1,) * (x.dim() - 1))


class Readout(nn.Module):
    """Unfold the slots from the batch axis and read the result out.

    Readouts (for a folded value y whose slot i is F(g_i^-1 . x)):

    - ``slots``: shape ``(B, |G|, ...)`` (batch axis, then the slot axis);
    - ``pose``: ``(B, |G| * K)``, flattened slot-major (index i*K + k), the paper's R^(|G| K);
    - ``invariant``: pooled over slots: ``mean``, ``max`` or ``logsumexp`` (minus log|G|, so a
    constant
      slot value comes out unchanged);
    - ``equivariant``: (1/|G|) sum_i rho_out(g_i) y_i, for outputs with their own action rho_out.
    """

    def __init__(self, group, readout: str, pool: str = "mean", output_action=None):
        super().__init__()
        if readout not in READOUTS:
            raise ReadoutError(explain("unknown readout", readout, f"one of {READOUTS}"))
        if pool not in POOLS:
            raise ReadoutError(explain("unknown pool", pool, f"one of {POOLS}"))
        self.group = group
        self.readout = readout
        self.pool = pool
        self.output_action = output_action
        self.order = group.order
        # eliminate-dead-slots: for each element, the position of the computed slot equal to it
        self.slot_map: tuple[int, ...] | None = None

    def forward(self, y, batch_axis: int = 0):
        if not isinstance(y, torch.Tensor):
            if isinstance(y, (tuple, list)):
                return type(y)(self.forward(t, batch_axis) for t in y)
            return y
        if batch_axis != 0:
            y = y.movedim(batch_axis, 0)
        computed = self.order if self.slot_map is None else max(self.slot_map) + 1
        # torch.unflatten: Tensor.unflatten adds a Python frame (named dimensions) at every call
        s = torch.unflatten(y, 0, (computed, -1))  # (slots computed, B, ...)
        if self.readout == "invariant":  # every coset has |K| elements: pool the computed slots
            if self.pool == "mean":
                out = (s if s.is_floating_point() else averageable(s)).mean(0)
            elif self.pool == "max":
                out = s.amax(0)
            else:
                out = logmeanexp(s)
            return out.movedim(0, batch_axis) if batch_axis else out
        if self.slot_map is not None:  # (|G|, B, ...): slot g is a copy of its coset's slot
            s = s.index_select(0, torch.tensor(self.slot_map, device=s.device))
        if self.readout == "slots":
            out = s.transpose(0, 1)
            return out.movedim((0, 1), (batch_axis, batch_axis + 1)) if batch_axis else out
        if self.readout == "pose":
            return s.transpose(0, 1).flatten(1)
        act = self.output_action
        try:
            out = torch.stack([act.apply(i, s[i]) for i in range(self.order)], 0).mean(0)
        except InputShapeError as err:  # one output of several lacks the action's axes
            raise InputShapeError(
                explain(
                    "readout='equivariant' applies output_action to every output of the model, "
                    f"and it cannot act on one of shape {tuple(s.shape[1:])}, which lacks the "
                    "axes it acts on",
                    act.describe(),
                    "every output shaped for output_action",
                    "pass output_action as a callable (g, y) -> g.y that leaves outputs without "
                    "those axes as they are (invariant ones: log-determinants, scores), or use "
                    "readout='slots' and read them out yourself",
                )
            ) from err
        return out.movedim(0, batch_axis) if batch_axis else out

    def extra_repr(self) -> str:
        extra = f", pool={self.pool}" if self.readout == "invariant" else ""
        if self.readout == "equivariant":
            extra = f", output_action={self.output_action.describe()}"
        return f"group={self.group!r}, readout={self.readout}{extra}"


def averageable(t: torch.Tensor) -> torch.Tensor:
    """``t``, in the default float dtype if it holds bools or integers (their mean is not one of
    them; a pool moved before ``+ 0.5`` may meet the integer value)."""
    if t.is_floating_point() or t.is_complex():
        return t
    return t.to(torch.get_default_dtype())


def pose_action(group) -> Action:
    """The regular action on the pose readout (B, |G| K): blocks of K entries permuted as slots."""
    return PoseAction().bind(group)


@dataclass(frozen=True)
class PoseAction(Action):
    """(h.y)[:, j*K + k] = y[:, perm[j]*K + k] with perm = G.regular_permutation(h)."""

    @property
    def is_permutation(self) -> bool:
        return True

    @property
    def axes(self) -> tuple[int, ...]:
        return (1,)

    def describe(self) -> str:
        return f"{self._label()} permutes the |G| blocks of the pose axis (regular action)"

    def _apply(self, index: int, x: torch.Tensor) -> torch.Tensor:
        G = self._need_group()
        perm = torch.tensor(G.regular_permutation(index), device=x.device)
        return x.unflatten(1, (G.order, -1)).index_select(1, perm).flatten(1)
