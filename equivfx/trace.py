"""The front end: capture a model as a torch.fx graph, falling back step by step, never silently.

The cascade:

1. ``torch.fx.symbolic_trace`` with a leaf registry (:data:`LEAF_MODULES`, each entry with its
reason).
   torch.nn's own modules are leaves already (fx's default); the registry adds modules that trace
   but
   should stay whole, and users add theirs with :func:`register_leaf`.
2. When tracing fails inside a submodule (data-dependent control flow, say), that submodule is made
a
   leaf and tracing starts again; the submodule then runs whole, as an opaque call.
3. When the model's own ``forward`` cannot be traced, the whole model becomes one opaque node.

The :class:`TraceResult` records the path taken (``"symbolic_trace"``, ``"symbolic_trace+leaves"``
or
``"opaque"``) and every leaf discovered with its reason, and a :class:`FallbackWarning` tells the
user
whenever a fallback was used.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import hashlib
import inspect
import linecache
import logging
import math
import operator
import os
import re
import threading
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from equivfx.errors import (
    FixedArgumentError,
    ModelTypeError,
    TraceError,
    explain,
    user_stacklevel,
)
from equivfx.meta import FIXED

__all__ = [
    "FallbackWarning",
    "SideEffectWarning",
    "LEAF_MODULES",
    "OPAQUE_ATTR",
    "MODE_SWITCH",
    "ModeSwitch",
    "TraceResult",
    "TrainingModeWarning",
    "by_mode",
    "expect_given",
    "expect_value",
    "mode_dependent",
    "register_leaf",
    "source_line",
    "trace",
]

log = logging.getLogger(__name__)

OPAQUE_ATTR = "equivfx_opaque"
"""Attribute under which an opaque model is held by its graph module."""

LEAF_MODULES: dict[type, str] = {
    nn.MultiheadAttention: "its fast path branches on tensor properties; run whole",
    nn.TransformerEncoderLayer: "its fast path branches on tensor properties; run whole",
    nn.TransformerDecoderLayer: "its fast path branches on tensor properties; run whole",
    nn.TransformerEncoder: "its nested-tensor fast path branches on the mask; run whole",
    nn.TransformerDecoder: "branches on its arguments; run whole",
    nn.Transformer: "branches on its arguments; run whole",
    torch.jit.ScriptModule: "a TorchScript module (scripted or traced), which torch.fx cannot "
    "trace into; run whole",
}
"""Module types traced as single nodes, each with the reason. Extend with :func:`register_leaf`."""

_MAX_DISCOVERED_LEAVES = 64


class FallbackWarning(UserWarning):
    """The front end fell back from a full trace (leaves discovered, or the model made opaque)."""


class TrainingModeWarning(UserWarning):
    """The traced graph depends on modules' training flags: it computes the branch of the mode
    they were in when compiled, in either mode (see :func:`mode_dependent`)."""


def register_leaf(module_type: type, reason: str) -> None:
    """Trace every module of ``module_type`` as one node.

    Args:
        module_type: an ``nn.Module`` subclass.
        reason: why it must stay whole (shown by ``equivfx inspect`` and in warnings).

    Raises:
        ModelTypeError: if ``module_type`` is not an nn.Module subclass.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ModelTypeError(
            explain(
                "register_leaf takes an nn.Module subclass",
                module_type,
                "a class such as torch.nn.LSTM",
                "pass the class, not an instance",
            )
        )
    LEAF_MODULES[module_type] = reason


@dataclass
class TraceResult:
    """What the front end captured and how.

    Attributes:
        gm: the captured graph module. In the opaque path its graph is one ``call_module`` node on
            :data:`OPAQUE_ATTR`.
        path: ``"symbolic_trace"``, ``"symbolic_trace+leaves"`` or ``"opaque"``.
        leaves: qualified module name -> reason, for the leaves discovered or taken from the
        registry.
        error: the trace error that caused the opaque fallback, if any.
        modes_read: modules whose training flag the graph reads at each call (see
            :func:`mode_dependent`).
        fixed: forward parameter -> the value the graph was traced with, for non-tensor
            arguments (``mask=None``, ``flag=False``) whose value changes the graph: the graph
            checks each call passes that value (:func:`expect_value`). See :func:`trace`.
        required: forward parameters with a None default that ``example_inputs`` passed a
            tensor for, and whose None changes the graph: the graph refuses a call that omits
            them (:func:`expect_given`).
        not_one_value: submodules traced through a call of which returned something other
            than one traced value (a tuple, None): as a leaf, its caller's code would see a
            Proxy there instead.
        hooked: submodules with hooks that the graph traced through: their hooks ran while
            tracing, not at each call (:func:`warn_hooks`).
        writers: modules whose attributes tracing set (``self.k = ...``), found by
            :func:`mode_dependent` (None: not known): as a leaf, such a module would no longer
            set them while traced, and other code would read a stale value.
    """

    gm: fx.GraphModule
    path: str
    leaves: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    modes_read: tuple[str, ...] = ()
    fixed: dict[str, Any] = field(default_factory=dict)
    fixed_from: dict[str, str] = field(default_factory=dict)  # name -> "default" / "example"
    not_one_value: frozenset[str] = frozenset()
    hooked: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    writers: frozenset[str] | None = None
    # the flag search's trace with some flags negated, for compile to annotate without tracing
    # again: frozenset of qualified names -> (graph, tensor constants, not_one_value)
    flipped: dict = field(default_factory=dict, repr=False)


_SIZED = ("zeros", "ones", "empty", "rand", "randn")  # torch factories taking sizes as *args


@contextlib.contextmanager
def _sizes_packed():
    """While tracing: ``torch.zeros(x.size(0), 4)`` (a traced size first among the sizes given
    one by one) reads to torch as ``zeros(size, ...)`` with one argument too many (fx fails the
    same); hand such sizes over as one tuple, as ``torch.zeros((x.size(0), 4))``."""
    originals = {name: getattr(torch, name) for name in _SIZED}

    def packing(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if len(args) > 1 and any(isinstance(a, fx.Proxy) for a in args):
                return fn(tuple(args), **kwargs)
            return fn(*args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(torch, name, packing(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


NO_GRAD = "equivfx.no_grad"
"""``node.meta[NO_GRAD]``: the traced op ran with gradients off (forward's ``torch.no_grad()``,
``@torch.no_grad()`` methods, ``set_grad_enabled(False)``, ``inference_mode``), which fx does
not record: :func:`_detach_no_grad` keeps gradients from flowing out of such ops."""
_COMPUTING = ("call_function", "call_method", "call_module")
HOOK_ATTRIBUTES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class _Tracer(fx.Tracer):
    """A tracer that honours the leaf registry and remembers which module it was inside."""

    def __init__(self, extra_leaves: dict[str, str] | None = None):
        super().__init__()
        # fx rebuilds an unpickled graph module with its tracer class, called without arguments
        self.extra_leaves = extra_leaves or {}
        self.registry_leaves: dict[str, str] = {}
        self.stack: list[str] = []
        self.failed_in: str | None = None
        self.not_one_value: set[str] = set()  # modules a call of which returned no single Proxy
        self.hooked: list[str] = []  # modules with hooks traced through (not leaves)

    def trace(self, root, concrete_args=None):
        # with gradients on, whatever the caller's mode: the ops of forward's own no_grad
        # regions are then the ones made with them off (create_node)
        with torch.enable_grad(), _sizes_packed():
            return super().trace(root, concrete_args)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind in _COMPUTING and not torch.is_grad_enabled():
            node.meta[NO_GRAD] = True  # made in ``with torch.no_grad():`` or a @no_grad method
        return node

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.extra_leaves:
            return True
        for typ, reason in LEAF_MODULES.items():
            if isinstance(m, typ):
                self.registry_leaves[qualname] = reason
                return True
        if super().is_leaf_module(m, qualname):
            return True  # torch.nn's own: a call node, its hooks run at each call
        if any(getattr(m, h, None) for h in HOOK_ATTRIBUTES):
            self.hooked.append(qualname)  # traced through: its hooks run now only
        return False

    def path_of_module(self, mod: nn.Module) -> str:
        # fx lists the submodules when the trace starts: one that forward installed (a layer
        # made at the first call, ``self.proj = nn.Linear(...)``) is found by listing again
        try:
            return super().path_of_module(mod)
        except NameError:
            if not self.submodule_paths:
                raise
            self.submodule_paths = {m: name for name, m in self.root.named_modules()}
            return super().path_of_module(mod)

    def call_module(self, m, forward, args, kwargs):
        try:
            qualname = self.path_of_module(m)
        except NameError:  # made inside forward and called there: ``nn.ReLU()(h)``
            return _inline(m, forward, args, kwargs)
        self.stack.append(qualname)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = qualname
            raise
        self.stack.pop()
        if not isinstance(out, fx.Proxy):  # a tuple, None, a number: its caller saw those
            self.not_one_value.add(qualname)
        return out


def _inline(m: nn.Module, forward, args, kwargs):
    """Trace through ``m``, a module the traced code calls that is no submodule of the model
    (made there, ``nn.ReLU()(h)``, or held outside the module tree): its ops join its caller's,
    as if written there. One holding parameters or buffers is refused: made in forward, each
    call makes them anew (new random weights, reset statistics); held outside, the compiled
    model would not own them (no state_dict, no ``.to``)."""
    state = [n for n, _ in m.named_parameters()] + [n for n, _ in m.named_buffers()]
    if state:
        raise ModelTypeError(
            explain(
                f"the model's forward calls a {type(m).__name__} that is not one of its "
                "submodules (made inside forward, or held outside the module tree) and holds "
                "parameters or buffers, which the compiled model would not own",
                state,
                "modules called in forward that are not submodules to hold no parameters or "
                "buffers (nn.ReLU(), nn.Flatten(), pools)",
                f"make the {type(m).__name__} a submodule: create it in __init__ "
                "(self.layer = ...) and call self.layer in forward",
            )
        )
    return forward(*args, **kwargs)


def _is_trace_failure(err: Exception) -> bool:
    # torch.fx.proxy.TraceError (control flow, iteration) and the TypeError/RuntimeError that
    # Proxies raise when user code needs a concrete value; not equivfx's refusal of the model
    # (a ModelTypeError raised while tracing, see _inline), which no leaf would avoid.
    if isinstance(err, ModelTypeError):
        return False
    return isinstance(
        err,
        (
            fx.proxy.TraceError,
            TypeError,
            RuntimeError,
            ValueError,
            AttributeError,
            NotImplementedError,
        ),
    )


def trace(
    model: nn.Module, example_inputs: tuple | None = None, leaves: dict[str, str] | None = None
) -> TraceResult:
    """Capture ``model`` as a torch.fx GraphModule through the cascade described in the module doc.

    Non-tensor arguments: fx passes every forward parameter as a Proxy, which is never None and
    cannot be branched on, so ``if mask is not None:`` traces the branch that reads ``mask`` for
    calls that omit it too, and ``if return_features:`` fails the trace. Each parameter after the
    first that calls pass as None, a bool, an int, a float or a str (the value ``example_inputs``
    passes there, else forward's default) is traced both ways, as a Proxy and with that value.
    Where the graphs agree (the value only flows into ops that take it as an argument, such as
    ``attn_mask=mask`` of a leaf, or into Python arithmetic, ``1 - alpha``, computed for the
    comparison), the Proxy's graph is kept. Where they differ, the graph is traced with the
    value fixed (only for the parameters whose value changes it), and calls with another value
    raise :class:`~equivfx.errors.FixedArgumentError` (see :func:`expect_value`);
    ``TraceResult.fixed`` names them. Where the value's path fails on a Proxy (branches on data,
    ``len`` of a tensor), the model runs whole (the Proxy's graph is not the calls' either); where
    the code fails on the value itself (``None.abs()``: calls pass others), the Proxy's graph
    is kept. Not seen here: tests Python answers without a trace, ``isinstance(mask,
    torch.Tensor)``, ``table.get(mode, default)`` (a Proxy is no tensor, nor a key);
    ``equivfx.compile`` with example inputs compares the graph with the model on them.

    Args:
        model: any ``nn.Module``. It is not modified; the graph module shares its submodules and
            parameters.
        example_inputs: the positional inputs calls pass (a tuple; the first is the acted input),
            or None: calls pass the first input only.
        leaves: qualified module name -> reason: submodules traced as leaves too (run whole),
            beside the registry's.

    Returns:
        A :class:`TraceResult`.

    Raises:
        ModelTypeError: if ``model`` is not an nn.Module.

    Example:
        >>> r = trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        >>> r.path
        'symbolic_trace'
    """
    if not isinstance(model, nn.Module):
        raise ModelTypeError(
            explain(
                "equivfx needs a torch.nn.Module",
                type(model).__name__,
                "an instance of torch.nn.Module",
                "wrap the function in an nn.Module whose forward calls it",
            )
        )
    if isinstance(model, torch.jit.ScriptModule):  # fx asserts on it
        why = f"{type(model).__name__} is a TorchScript module, which torch.fx cannot trace"
        return run_whole_model(model, why)
    fixable, origins = _fixable_arguments(model, example_inputs)
    # fx sets tensor constants on the model it traces; forward may update buffers
    with _no_new_attributes(model) as before, kept_buffers(model) as kept:
        leaves = dict(leaves or {})
        chosen = _capture(model, {}, before, leaves, strict=not fixable)
        if fixable:
            fixed = _capture(model, fixable, before, leaves)
            if fixed.graph is None and not _on_a_proxy(fixed.error):
                # the code fails on these values themselves (``None.abs()``: calls pass others),
                # or fx did not make the placeholders expected: the free graph
                if chosen.hard:  # not a trace failure either way: the user's own error
                    raise chosen.error
            elif not _agree(chosen, fixed, fixable):
                # the calls' values change the graph (or their path branches on data, which
                # tracing cannot follow: then the free graph is not theirs either, and the
                # model runs whole); then free each argument whose value does not change it
                chosen = fixed
                for name in fixable:
                    freed = {k: v for k, v in chosen.fixed.items() if k != name}
                    trial = _capture(model, freed, before, leaves)
                    if _agree(trial, chosen, {name: fixable[name]}):
                        chosen = trial
        name = type(model).__name__
        kept.restore()  # before the graph module takes the buffers the graph reads
        if chosen.graph is None:
            return _opaque(model, chosen.error, chosen.discovered)
        graph = chosen.graph
        required = _required_tensors(model, example_inputs, chosen, before, leaves)
        for node in graph.nodes:
            if isinstance(node.type, str):  # an annotation under `from __future__ import
                node.type = None  # annotations`: fx cannot write it into a pickle's imports
        model.__dict__.update(chosen.constants)
        gm = fx.GraphModule(model, graph, class_name=f"Traced{name}")  # copies the constants
    discovered = chosen.discovered
    path = "symbolic_trace+leaves" if discovered else "symbolic_trace"
    if discovered:
        warnings.warn(
            f"equivfx fallback: {len(discovered)} submodule(s) of {name} could not be traced and "
            "run "
            f"whole as opaque leaves: {', '.join(discovered)}. Layer-wise passes treat them as "
            "black "
            "boxes; the global lift is still exact where they treat each sample on its own "
            "(checked on example_inputs). Run equivfx.verify to check the result.",
            FallbackWarning,
            stacklevel=user_stacklevel(),
        )
    if chosen.fixed:
        log.info("equivfx: %s traced with %s fixed", name, chosen.fixed)
    return TraceResult(
        gm=gm,
        path=path,
        leaves=chosen.leaves,
        required=required,
        fixed=dict(chosen.fixed),
        fixed_from={k: origins[k] for k in chosen.fixed},
        not_one_value=chosen.not_one_value,
        hooked=chosen.hooked,
    )


_FX_DIR = os.path.dirname(fx.__file__) + os.sep


def _on_a_proxy(err: Exception | None) -> bool:
    """``err`` came from a Proxy (control flow, ``len``, ``range``, a Proxy where Python needs a
    value), not from the user's code failing on a value (``None.abs()``, ``torch.where(c, x,
    None)``, whose message lists the Proxies beside the None): fx's own TraceError, an error
    raised inside torch.fx, or Python refusing a Proxy (``'Proxy' object cannot be interpreted
    as an integer``, ``int() argument must be ..., not 'Proxy'``, ``type Proxy doesn't define
    __round__``)."""
    if err is None:
        return False
    message = str(err)
    if isinstance(err, fx.proxy.TraceError):
        return True
    # torch's argument parser lists every argument's type, Proxies beside the None it refused
    if "invalid combination of arguments" not in message and re.search(r"\bProxy\b", message):
        return True
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_FX_DIR)


class SideEffectWarning(UserWarning):
    """Forward has side effects that tracing ran once and the compiled graph does not repeat:
    buffer updates (:func:`warn_buffer_updates`), hooks of modules traced through
    (:func:`warn_hooks`)."""


class _Buffers:
    """The model's buffers as they were: each object, its version counter and a copy of its
    values (and whether it had no autograd history)."""

    def __init__(self, model: nn.Module):
        self.entries = [
            (module, key, t, _version(t), None if t is None else (t.detach().clone(), leaf))
            for module in model.modules()
            if not isinstance(module, torch.jit.ScriptModule)  # state in TorchScript's objects
            for key, t in module._buffers.items()
            if t is None or not nn.parameter.is_lazy(t)  # a lazy module's, not yet made
            for leaf in [t is None or t.grad_fn is None]
        ]
        self.names = {id(module): prefix for prefix, module in model.named_modules()}
        self.seen: set[str] = set()  # written before a restore

    def _name(self, module: nn.Module, key: str) -> str:
        prefix = self.names.get(id(module), "")
        return f"{prefix}.{key}" if prefix else key

    def written(self) -> set[str]:
        """The buffers set or updated in place since the snapshot (restores put them back): set
        to another object, or their values changed (not only their version: a copy of the same
        values back, as ``eval_mode`` makes, is no update). A buffer registered as None and set
        to a tensor is forward's setup at the first call (a lazy value), not an update."""
        return self.seen | {
            self._name(module, key)
            for module, key, t, version, saved in self.entries
            if self._changed(module._buffers.get(key), t, version, saved)
        }

    @staticmethod
    def _changed(now, t, version, saved) -> bool:
        if t is None:
            return isinstance(now, fx.Proxy)  # a stand-in of the trace, not a first-call value
        if now is not t:
            return True
        if version is None or _version(t) == version:
            return False
        try:
            return t.shape != saved[0].shape or not torch.equal(t.detach(), saved[0])
        except (RuntimeError, NotImplementedError):  # values it cannot compare (meta, sparse)
            return True

    def restore(self) -> None:
        """Put back each buffer set or updated in place, with its values."""
        self.seen = self.written()
        for i, (module, key, t, version, saved) in enumerate(self.entries):
            now = module._buffers.get(key)
            if now is not t and (t is not None or isinstance(now, fx.Proxy)):
                module._buffers[key] = t  # (a buffer registered as None, set to a stand-in)
            if t is not None and version is not None and t._version != version:
                values, leaf = saved
                with torch.no_grad():
                    t.copy_(values)
                if leaf and t.grad_fn is not None:  # updated from a parameter while traced
                    t.detach_()
                self.entries[i] = (module, key, t, t._version, saved)


def _version(t: torch.Tensor | None) -> int | None:
    """``t``'s version counter; None for None and for inference tensors (they keep none)."""
    if t is None or t.is_inference():
        return None
    return t._version


_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its _Buffers


@contextlib.contextmanager
def kept_buffers(model: nn.Module):
    """Leave ``model``'s buffers as they were once this ends (values, objects): tracing runs
    forward's Python once, so an update of a buffer there (``self.steps += 1``,
    ``self.ema.mul_(0.9)``) ran on the tensor itself, and compile advanced the user's model.
    Re-entrant: the outermost snapshot serves. See :func:`warn_buffer_updates`."""
    if model in _KEPT:
        yield _KEPT[model]
        return
    kept = _KEPT[model] = _Buffers(model)
    try:
        yield kept
    finally:
        kept.restore()
        del _KEPT[model]


def warn_buffer_updates(names: set[str]) -> None:
    """Say that forward updates the buffers ``names``: fx records no update of a buffer that
    reads only buffers and constants (``self.steps += 1`` is run once, on the tensor itself,
    while tracing), so the compiled graph does not repeat it (one reading a traced value,
    ``self.ema.add_(h.mean())``, is recorded, beside what ran once)."""
    listed = ", ".join(repr(n) for n in sorted(names))
    warnings.warn(
        f"equivfx: forward updates buffer(s) {listed} (in place or by setting them). Tracing "
        "runs forward once and records only operations on traced values, so the compiled "
        "graph does not repeat such updates (compile put the buffers back as they were). Fix: "
        "make the module that updates them a leaf (equivfx.trace.register_leaf), which runs "
        "whole at each call, or update them outside forward (in the training loop).",
        SideEffectWarning,
        stacklevel=user_stacklevel(),
    )


def warn_hooks(names: list[str]) -> None:
    """Say that the submodules ``names`` have hooks, which ran while tracing went through them
    and do not run at each call of the compiled model (fx records what a hook computes, as
    part of the graph, not the hook)."""
    listed = ", ".join(repr(n) for n in names)
    warnings.warn(
        f"equivfx: submodule(s) {listed} have hooks (forward or backward). Tracing went "
        "through them: what a hook computes into the output is part of the compiled graph, but "
        "the hooks themselves ran once, while tracing, and do not run at each call (an "
        "activation a hook keeps is not kept). Fix: make those modules leaves "
        "(equivfx.trace.register_leaf): they then run whole at each call, hooks included, on "
        "the |G| folded slots.",
        SideEffectWarning,
        stacklevel=user_stacklevel(),
    )


@dataclass
class _Capture:
    """One run of the cascade's first two steps: the graph (None where the model's own forward
    failed: ``error``; ``hard`` where that error is not a trace failure, ``unfixable`` where fx
    did not make the placeholders expected for the fixed arguments), the leaves (registry and
    ``discovered``), the arguments traced with fixed values and the tensor constants fx set on
    the model while tracing."""

    graph: fx.Graph | None
    leaves: dict[str, str]
    discovered: dict[str, str]
    fixed: dict[str, Any]
    constants: dict[str, Any] = field(default_factory=dict)
    error: Exception | None = None
    hard: bool = False
    unfixable: bool = False
    not_one_value: frozenset[str] = frozenset()
    hooked: tuple[str, ...] = ()


def _capture(
    model: nn.Module,
    fixed: dict[str, Any],
    before: set,
    leaves: dict[str, str],
    strict: bool = False,
) -> _Capture:
    """Trace ``model`` with the arguments of ``fixed`` given those values and ``leaves`` run
    whole, making each submodule whose trace fails a leaf and starting again; leaves no
    attribute on ``model`` (those of the trace are in the capture's ``constants``). ``strict``:
    an error that is not a trace failure is raised, not recorded."""
    discovered: dict[str, str] = {}
    while True:
        tracer = _Tracer({**leaves, **discovered})
        try:
            graph = tracer.trace(model, concrete_args=dict(fixed) or None)
        except Exception as err:  # noqa: BLE001 - classify below
            _drop_new_attributes(model, before)  # the next attempt names constants anew
            if not _is_trace_failure(err):
                if strict:
                    raise
                return _Capture(None, {}, discovered, dict(fixed), error=err, hard=True)
            where = tracer.failed_in
            if where and where not in discovered and len(discovered) < _MAX_DISCOVERED_LEAVES:
                discovered[where] = f"could not be traced ({type(err).__name__}: {err}); run whole"
                log.info("equivfx: making %s a leaf: %s", where, err)
                continue
            return _Capture(None, {}, discovered, dict(fixed), error=err)
        break
    constants = {k: model.__dict__[k] for k in set(model.__dict__) - before}
    _drop_new_attributes(model, before)
    if not _normalised(graph, model, fixed):
        return _Capture(None, {}, discovered, dict(fixed), unfixable=True)
    every = {**tracer.registry_leaves, **leaves, **discovered}
    capture = _Capture(graph, every, discovered, dict(fixed), constants)
    capture.not_one_value = frozenset(tracer.not_one_value)
    capture.hooked = tuple(dict.fromkeys(tracer.hooked))
    return capture


def _normalised(graph: fx.Graph, model: nn.Module, fixed: dict[str, Any], required=()) -> bool:
    """Rewrite a fresh trace of ``model`` as every trace of it is rewritten (the first ones and
    those :func:`mode_dependent` and :func:`source_line` compare with them): the ``fixed``
    arguments' placeholders and checks (:func:`_fix_arguments`), namedtuple outputs, the checks
    of ``required`` tensors (:func:`_check_given`). False where fx did not make the
    placeholders expected for ``fixed``."""
    params = _forward_parameters(model) or []
    keyword_only = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    if fixed and not _fix_arguments(graph, fixed, _parameter_names(model), keyword_only):
        return False
    _output_namedtuples(graph)
    _check_given(graph, required)
    _detach_no_grad(graph)
    return True


def _detach_no_grad(graph: fx.Graph) -> None:
    """fx records the ops of forward's no_grad regions as any others, so in the graph gradients
    would flow through them. Detach each value such an op makes where an op outside the regions
    (or the output) uses it: the values are the same, and, as in eager mode, nothing
    differentiates through them. (An in-place update of a parameter inside a region is still
    recorded as one, which autograd refuses in training: not handled.)"""
    for node in list(graph.nodes):
        if not node.meta.get(NO_GRAD):
            continue
        first = node.args[0] if node.args else None
        if in_place_op(node) and isinstance(first, fx.Node) and not first.meta.get(NO_GRAD):
            # an update of a tensor from outside (a buffer, ``self.avg.mul_(0.9)``): made on an
            # alias without history, as no_grad makes it, the tensor gains none
            with graph.inserting_before(node):
                alias = graph.call_method("detach", (first,))
            alias.meta[NO_GRAD] = True
            node.args = (alias, *node.args[1:])
        outside = [u for u in node.users if not u.meta.get(NO_GRAD)]
        if not outside or _makes_no_tensor(node):
            continue
        with graph.inserting_after(node):
            detached = graph.call_function(stop_gradient, (node,))
        for user in outside:
            user.replace_input_with(node, detached)


def stop_gradient(value):
    """``value`` detached: a tensor, or the tensors of a tuple (a named one too), list or dict;
    anything else as it is (what a no_grad region hands on, see :func:`_detach_no_grad`)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        items = [stop_gradient(v) for v in value]
        if hasattr(value, "_fields"):  # a namedtuple
            return type(value)(*items)
        return type(value)(items)  # tuple, list, torch.return_types
    if isinstance(value, dict):
        out = copy.copy(value)  # its class and its own state (a defaultdict's factory)
        for k, v in value.items():
            out[k] = stop_gradient(v)
        return out
    return value


# methods and attributes that give no tensor (sizes, counts, flags): nothing to detach
_NO_TENSOR_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "element_size", "item"}
_NO_TENSOR_METHODS |= {"tolist", "stride", "storage_offset", "is_contiguous", "data_ptr"}
_NO_TENSOR_METHODS |= {"get_device", "is_floating_point", "is_complex", "__len__"}
META_ATTRIBUTES = frozenset(
    {"shape", "dtype", "device", "ndim", "layout", "requires_grad", "names", "is_leaf"}
    | {"grad_fn", "itemsize", "output_nr", "_version"}
)
"""Attributes of a tensor that hold none of its samples' values (with those named ``is_*``)."""


def _makes_no_tensor(node: fx.Node) -> bool:
    """``node`` gives a size, a count or a flag, or computes one from such values only (``B =
    h.size(0)``, ``h.shape[1] * 2``): what a no_grad region hands on there needs no detaching."""
    if node.op == "call_method":
        return node.target in _NO_TENSOR_METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:  # metadata; a field (.values of a max) is a tensor
        return node.args[1] in META_ATTRIBUTES or str(node.args[1]).startswith("is_")
    if node.target is len or getattr(node.target, "__module__", None) == "math":
        return True
    inputs = node.all_input_nodes
    return (
        getattr(node.target, "__module__", None) in ("_operator", "operator")
        and bool(inputs)
        and all(_makes_no_tensor(a) for a in inputs)
    )


IN_PLACE_OPERATORS = frozenset(
    {
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
        operator.setitem,
    }
)


def in_place_op(node: fx.Node) -> bool:
    """An in-place method or function call: ``add_``, ``torch.relu_``, ``x[i] = v``, ``+=``."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in IN_PLACE_OPERATORS or (
            name.endswith("_") and not name.startswith("__")
        )
    return False


def _output_namedtuples(graph: fx.Graph) -> None:
    """A namedtuple the model returns (``Out(logits, feats)``) is a node calling its class in
    fx's graph, an op no rule knows: put the namedtuple itself, holding its fields' nodes, in
    the output instead (fx writes it into the code; passes map over its fields, as over a
    tuple's). Not one holding another namedtuple (fx's code would not import the inner class):
    that stays a node, refused with the op named."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    made: list[fx.Node] = []

    def inline(node: fx.Node):
        if (
            _is_namedtuple_call(node)
            and set(node.users) == {output}
            # fx writes the outermost namedtuple's class into the code, not those inside it
            and not any(_is_namedtuple_call(a) for a in node.all_input_nodes)
        ):
            made.append(node)
            return node.target(*node.args, **node.kwargs)
        return node

    output.args = fx.node.map_arg(output.args, inline)
    for node in made:
        graph.erase_node(node)


def _is_namedtuple_call(node: fx.Node) -> bool:
    cls = node.target
    return (
        node.op == "call_function"
        and isinstance(cls, type)
        and issubclass(cls, tuple)
        and hasattr(cls, "_fields")
    )


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter] | None:
    """``model.forward``'s parameters, in order (fx makes one placeholder for each); None for a
    forward without a signature or with ``*args`` or ``**kwargs``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        schema = getattr(getattr(model, "forward", None), "schema", None)
        if schema is None:
            return None
        # a torch.jit.trace'd module: its method has a TorchScript schema (self first)
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        return [inspect.Parameter(a.name, kind) for a in schema.arguments[1:]]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return params


def _parameter_names(model: nn.Module) -> list[str] | None:
    """The names of :func:`_forward_parameters`; None where that is None."""
    params = _forward_parameters(model)
    return None if params is None else [p.name for p in params]


def _fixable_arguments(
    model: nn.Module, example_inputs: tuple | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The forward parameters after the first that calls pass as None, a bool, an int, a float
    or a str: name -> that value (the example's where ``example_inputs`` reaches the parameter,
    else forward's default), and name -> ``"example"`` or ``"default"``. None for a forward
    with ``*args`` or ``**kwargs``."""
    params = _forward_parameters(model)
    if params is None:  # nothing fixed
        return {}, {}
    given = tuple(example_inputs) if example_inputs is not None else ()
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for i, p in enumerate(params[1:], 1):
        if i < len(given):
            value, origin = given[i], "example"
        elif p.default is not p.empty:
            value, origin = p.default, "default"
        else:
            continue
        if value is None or type(value) in (bool, int, float, str):
            values[p.name], origins[p.name] = value, origin
    return values, origins


def _fix_arguments(
    graph: fx.Graph,
    fixed: dict[str, Any],
    names: list[str] | None,
    keyword_only: frozenset[str] | set[str] = frozenset(),
) -> bool:
    """Rewrite a graph traced with ``concrete_args=fixed``: fx names each such placeholder
    ``<name>_1`` and checks its value with asserts of its own; give each placeholder its
    parameter's name back (keyword calls) and one :func:`expect_value` check instead. ``names``:
    forward's parameters, one placeholder each, in order; ``keyword_only``: those of them no
    example input can pass (the check's error says so). False (the graph unchanged) where the
    placeholders are not one per parameter."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if names is None or len(names) != len(placeholders):
        return False
    found = {name: placeholders[names.index(name)] for name in fixed}
    checks: set[fx.Node] = set()
    stack = [u for node in found.values() for u in node.users]
    while stack:  # fx's own checks: everything computed from the placeholders
        user = stack.pop()
        if user not in checks:
            checks.add(user)
            stack.extend(user.users)
    for node in reversed(list(graph.nodes)):
        if node in checks:
            graph.erase_node(node)
    for name, node in found.items():
        node.target = name
        if node.name != name and hasattr(node, "_rename"):
            node._rename(name)  # the variable's name in the generated code (free here)
        node.meta[FIXED] = fixed[name]
    _checks_after_inputs(
        graph,
        [
            (expect_value, (node, name, fixed[name], *((True,) if name in keyword_only else ())))
            for name, node in found.items()
        ],
    )
    return True


def _checks_after_inputs(graph: fx.Graph, checks: list[tuple]) -> None:
    """A call of each ``(function, args)`` of ``checks``, in order, right after the graph's
    placeholders."""
    if not checks:
        return
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for function, args in checks:
        with graph.inserting_after(last):
            last = graph.call_function(function, args)


def expect_value(value, name: str, expected, keyword_only: bool = False):
    """The check at the top of a graph traced with ``name=expected`` fixed (see :func:`trace`):
    raise :class:`~equivfx.errors.FixedArgumentError` where a call passes another value
    (``keyword_only``: forward takes ``name`` after a ``*``, where example inputs cannot pass
    it). Traced (fx rebuilding a pickled module), it records itself."""
    if isinstance(value, fx.Proxy):
        args = (value, name, expected, *((True,) if keyword_only else ()))
        return value.tracer.create_proxy("call_function", expect_value, args, {})
    if _same_value(value, expected):
        return None
    got = (
        f"a tensor of shape {tuple(value.shape)}"
        if isinstance(value, torch.Tensor)
        else f"{name}={value!r}"
    )
    raise FixedArgumentError(
        explain(
            f"this compiled model was traced with {name}={expected!r}, and the model's forward "
            f"computes something else for other values of {name} (tracing resolves such a "
            f"branch once): got {got}",
            None,
            f"{name}={expected!r}",
            (
                f"{name} is keyword-only (after * in forward), which example_inputs cannot "
                f"pass: make {name} a positional parameter of forward, or compile a wrapper "
                f"module whose forward takes it positionally, then compile with "
                f"example_inputs that pass the {name} you run, once per value"
            )
            if keyword_only
            else (
                f"compile with example_inputs that pass the {name} you run, positionally (a "
                "tensor there is traced as a tensor input), once per value"
            ),
        )
    )


def _required_tensors(
    model: nn.Module, example_inputs, chosen: _Capture, before: set, leaves: dict[str, str]
) -> tuple[str, ...]:
    """The parameters with a None default that ``example_inputs`` passes a tensor for, whose
    None would change ``chosen``'s graph (traced with None once more each: ``if bias is not
    None:``): an :func:`expect_given` check is added to the graph for each."""
    params = _forward_parameters(model)
    if example_inputs is None or params is None:
        return ()
    required = []
    for p, example in zip(params[1:], tuple(example_inputs)[1:], strict=False):
        name = p.name
        if name in chosen.fixed or not isinstance(example, torch.Tensor) or p.default is not None:
            continue
        omitted = _capture(model, {**chosen.fixed, name: None}, before, leaves)
        if not _agree(chosen, omitted, {name: None}):
            required.append(name)
    _check_given(chosen.graph, required)
    return tuple(required)


def _check_given(graph: fx.Graph, names) -> None:
    """An :func:`expect_given` check of each placeholder of ``names``, after the last."""
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    _checks_after_inputs(graph, [(expect_given, (placeholders[name], name)) for name in names])


def expect_given(value, name: str):
    """The check at the top of a graph traced with a tensor for ``name``, whose forward
    computes something else where it is None (its default): raise
    :class:`~equivfx.errors.FixedArgumentError` for a call that omits it. Traced, it records
    itself."""
    if isinstance(value, fx.Proxy):
        return value.tracer.create_proxy("call_function", expect_given, (value, name), {})
    if value is not None:
        return None
    raise FixedArgumentError(
        explain(
            f"this compiled model was traced with a tensor for {name}, as example_inputs passed "
            f"it, and the model's forward computes something else where {name} is None (its "
            f"default; tracing resolves such a branch once): got {name}=None",
            None,
            f"a tensor for {name}",
            f"pass {name}, or compile with example_inputs that leave it out for calls that do",
        )
    )


def _same_value(value, expected) -> bool:
    """``value`` is the value traced: None for None, else of the same type and equal (a NaN
    for a NaN); ``3.0`` is not ``3``, nor ``1`` ``True``, as the traced code may tell."""
    if value is None or expected is None:
        return value is expected
    if type(value) is not type(expected):
        return False
    if isinstance(expected, float) and math.isnan(expected):
        return math.isnan(value)
    return value == expected


class _Ref(int):
    """A node in :func:`_structure`'s keys, by position (not an int constant)."""

    def __repr__(self) -> str:
        return f"<node {int(self)}>"


_FOLDED_MODULES = frozenset({"_operator", "operator", "math", "builtins"})
"""Functions that tracing with a value computes in Python (``1 - alpha``, ``dim ** -0.5``) and
with a Proxy records: :func:`_structure` computes them where their arguments are constants."""


def _structure(capture: _Capture, values: dict[str, Any]) -> tuple:
    """What ``capture``'s graph computes, comparable with another capture's: each node's op,
    target and arguments, nodes by their position, without the fixed placeholders and their
    checks, with the placeholders of ``values`` read as those values and Python's own operators
    on constants computed (as tracing with the values did)."""
    index: dict[fx.Node, _Ref] = {}
    known: dict[fx.Node, Any] = {}
    out = []

    def read(a):
        if isinstance(a, fx.Node):
            return known[a] if a in known else index[a]
        return a

    for n in capture.graph.nodes:
        if n.op == "placeholder" and n.target in values:
            known[n] = values[n.target]
            continue
        if n.op == "placeholder" and n.target in capture.fixed:
            continue
        if n.op == "call_function" and n.target in (expect_value, expect_given):
            continue
        args = fx.node.map_aggregate(n.args, read)
        kwargs = fx.node.map_aggregate(n.kwargs, read)
        if (
            n.op == "call_function"
            and getattr(n.target, "__module__", None) in _FOLDED_MODULES
            and all(a in known for a in n.all_input_nodes)
        ):
            try:
                known[n] = n.target(*args, **kwargs)
                continue
            except Exception:  # noqa: BLE001 - not computable here: compared as a node
                pass
        index[n] = _Ref(len(index))
        out.append((n.op, _name(n.target), repr(args), repr(kwargs)))
    return tuple(out)


def _agree(free: _Capture, fixed: _Capture, values: dict[str, Any]) -> bool:
    """``free`` (the arguments of ``values`` traced as Proxies) computes what ``fixed`` (them
    traced with those values) does, with the same leaves."""
    return (
        free.graph is not None
        and fixed.graph is not None
        and free.discovered.keys() == fixed.discovered.keys()
        and _structure(free, values) == _structure(fixed, {})
    )


@contextlib.contextmanager
def _no_new_attributes(model: nn.Module):
    """Remove the attributes tracing adds to ``model`` (fx stores a tensor the traced code
    creates, ``torch.ones(4)``, as ``_tensor_constant0`` on the traced module): compile does not
    modify the model, and a second trace names its constants as the first did. Yields the
    attributes the model had (for :func:`_drop_new_attributes` between attempts)."""
    before = set(model.__dict__)
    try:
        yield before
    finally:
        _drop_new_attributes(model, before)


def _drop_new_attributes(model: nn.Module, before: set) -> None:
    for key in set(model.__dict__) - before:
        del model.__dict__[key]


def _opaque(
    model: nn.Module, err: Exception | None, discovered: dict[str, str], why: str | None = None
) -> TraceResult:
    """The last resort: one graph node that calls the whole model.

    The model is held as submodule :data:`OPAQUE_ATTR`; state-dict hooks strip and restore that
    prefix so the graph module's ``state_dict()`` has exactly the model's keys. ``why`` says
    why, for the warning and ``leaves[""]`` (default: the trace failed with ``err``).
    """
    name = type(model).__name__
    root = nn.Module()
    setattr(root, OPAQUE_ATTR, model)
    graph = fx.Graph()
    params = _forward_params(model)
    # a call may omit what forward gives a default (where the generated code can write it, and
    # only after the last parameter without one); keyword-only parameters are passed so
    trailing = len(params)
    while trailing and _writable_default(params[trailing - 1]):
        trailing -= 1
    args, kwargs = [], {}
    for i, p in enumerate(params):
        if i >= trailing:
            node = graph.placeholder(p.name, default_value=p.default)
        else:
            node = graph.placeholder(p.name)
        if p.kind is p.KEYWORD_ONLY:
            kwargs[p.name] = node
        else:
            args.append(node)
    out = graph.call_module(OPAQUE_ATTR, tuple(args), kwargs)
    graph.output(out)
    gm = fx.GraphModule(root, graph, class_name=f"Opaque{name}")
    install_prefix_hooks(gm, OPAQUE_ATTR)
    if why is None:
        why = f"{name}.forward could not be traced ({type(err).__name__}: {err})"
    warnings.warn(
        f"equivfx fallback: {why}; the whole model runs as one opaque node. The global lift is "
        "still exact where it treats each sample on its own (checked on example_inputs); "
        "layer-wise passes cannot look inside. Run equivfx.verify to check the result.",
        FallbackWarning,
        stacklevel=user_stacklevel(),
    )
    reason = "the model's forward could not be traced" if err is not None else why
    leaves = {**discovered, "": reason}
    error = why if err is None else f"{type(err).__name__}: {err}"
    return TraceResult(gm=gm, path="opaque", leaves=leaves, error=error)


def run_whole_model(model: nn.Module, why: str) -> TraceResult:
    """The opaque path chosen after a trace that succeeded (its graph is not the model's: see
    ``equivfx.compile``), with the reason ``why``; warns (:class:`FallbackWarning`)."""
    return _opaque(model, None, {}, why)


def _forward_params(model: nn.Module) -> list[inspect.Parameter]:
    """:func:`_forward_parameters`, refused where there are none to name."""
    params = _forward_parameters(model)
    if params is None:
        raise TraceError(
            explain(
                f"{type(model).__name__}.forward could not be traced and takes *args/**kwargs",
                str(inspect.signature(model.forward)),
                "a forward with named positional parameters",
                "give forward explicit parameters, or make the untraceable part a "
                "submodule so only it runs opaque",
            )
        )
    return params


def _writable_default(p: inspect.Parameter) -> bool:
    """``p`` has a default the generated code can write as a literal."""
    return p.default is not p.empty and (
        p.default is None or type(p.default) in (bool, int, float, str)
    )


def install_prefix_hooks(module: nn.Module, prefix: str) -> None:
    """Hide ``prefix.`` in ``module``'s state-dict keys, on saving and on loading.

    Used for the opaque path, so a compiled model's checkpoint keys are the original model's.
    """
    module.register_state_dict_post_hook(functools.partial(_strip_prefix, prefix + "."))
    module.register_load_state_dict_pre_hook(functools.partial(_add_prefix, prefix + "."))


# module level (with the prefix bound by functools.partial): a compiled model pickles its hooks
def _strip_prefix(dotted, mod, state_dict, sd_prefix, local_metadata):
    head = sd_prefix + dotted
    items = list(state_dict.items())
    state_dict.clear()  # re-insert in the original order, prefix removed
    for key, value in items:
        if key.startswith(head):
            key = sd_prefix + key[len(head) :]
        state_dict[key] = value


def _add_prefix(
    dotted, mod, state_dict, sd_prefix, local_metadata, strict, missing, unexpected, errors
):
    head = sd_prefix + dotted
    for key in list(state_dict.keys()):
        if key.startswith(sd_prefix) and not key.startswith(head):
            state_dict[head + key[len(sd_prefix) :]] = state_dict.pop(key)


def restore_unused_state(gm: fx.GraphModule, model: nn.Module) -> None:
    """Carry over parameters and buffers the graph does not reference (GraphModule drops them).

    Afterwards ``gm.state_dict()`` has every key of ``model.state_dict()``, with the same tensors,
    and no other: buffers the model does not persist are not persisted.
    """
    have = set(gm.state_dict().keys())
    for key in model.state_dict().keys():
        if key in have:
            continue
        modpath, _, attr = key.rpartition(".")
        src = model.get_submodule(modpath) if modpath else model
        if modpath and _uninitialized(src) and _holds_nothing_else(gm, modpath, src):
            _set_submodule(gm, modpath, src)  # a lazy module saves and loads them itself
            have = set(gm.state_dict().keys())
            continue
        dst = _ensure_submodule(gm, modpath)
        if attr in src._parameters:
            dst.register_parameter(attr, src._parameters[attr])
        elif attr in src._buffers:
            dst.register_buffer(attr, src._buffers[attr])
        else:  # extra state or a custom state-dict hook: fall back to the owning module
            _set_submodule(gm, modpath, src)
        have = set(gm.state_dict().keys())
    # fx registers every buffer it copies as persistent: the model's non-persistent ones stay so
    for path, src in model.named_modules():
        if not src._non_persistent_buffers_set:
            continue
        try:
            dst = gm.get_submodule(path)
        except AttributeError:
            continue
        for name in src._non_persistent_buffers_set:
            if name in dst._buffers:
                dst._non_persistent_buffers_set.add(name)
    # a module held whole (a leaf) saves what the model's own state-dict hooks leave out
    extra = set(gm.state_dict().keys()) - set(model.state_dict().keys())
    if extra:
        hide_state(gm, extra)


def hide_state(module: nn.Module, keys) -> None:
    """Leave ``keys`` out of ``module``'s state dict, and have loading keep their tensors as they
    are (a checkpoint of the model lacks them)."""
    keys = tuple(sorted(keys))
    module.equivfx_hidden_state = keys  # for a module built around this one (chunked_module)
    module.register_state_dict_post_hook(functools.partial(_drop_keys, keys))
    module.register_load_state_dict_pre_hook(functools.partial(_keep_keys, keys))


# module level (keys bound by functools.partial): a compiled model pickles its hooks
def _drop_keys(keys, mod, state_dict, sd_prefix, local_metadata):
    for key in keys:
        state_dict.pop(sd_prefix + key, None)


def _keep_keys(
    keys, mod, state_dict, sd_prefix, local_metadata, strict, missing, unexpected, errors
):
    for key in keys:
        if sd_prefix + key in state_dict:
            continue
        modpath, _, attr = key.rpartition(".")
        owner = mod.get_submodule(modpath) if modpath else mod
        tensor = owner._parameters.get(attr, owner._buffers.get(attr))
        if tensor is not None:
            state_dict[sd_prefix + key] = tensor.detach()


def _uninitialized(module: nn.Module) -> bool:
    """``module`` holds parameters or buffers a lazy module has not materialised yet (only its
    own state-dict methods save them; a plain module's fail on them)."""
    lazy = (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer)
    held = (*module._parameters.values(), *module._buffers.values())
    return any(isinstance(t, lazy) for t in held)


def _holds_nothing_else(root: nn.Module, path: str, module: nn.Module) -> bool:
    """``root`` has nothing at ``path``, or a plain container fx made for ``module`` (holding
    some of its submodules, parameters and buffers, the same objects): ``module`` itself may
    stand there."""
    try:
        here = root.get_submodule(path)
    except AttributeError:
        return True
    if type(here) is not nn.Module or here is module:
        return here is module
    held = (
        (here._modules, module._modules),
        (here._parameters, module._parameters),
        (here._buffers, module._buffers),
    )
    return all(theirs.get(k) is v for ours, theirs in held for k, v in ours.items())


def _ensure_submodule(root: nn.Module, path: str) -> nn.Module:
    mod = root
    if not path:
        return mod
    for part in path.split("."):
        if not hasattr(mod, part) or not isinstance(getattr(mod, part), nn.Module):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    return mod


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    _ensure_submodule(root, parent_path).add_module(name, module)


# ------------------------------------------------------------------------- training flags
def _graph_key(graph: fx.Graph) -> tuple:
    """What a traced graph computes, comparable between traces of one model: each node's op,
    target and arguments (nodes by name, constants by repr: ``training=False`` shows; tensor
    constants fx stores on the model by their values, :func:`_constant_value`)."""
    root = graph.owning_module
    return tuple(
        (n.op, _name(n.target), repr(n.args), repr(n.kwargs), _constant_value(n, root))
        for n in graph.nodes
    )


_VALUE = "equivfx.constant_value"


def _constant_value(node: fx.Node, root: nn.Module | None = None):
    """For a ``get_attr`` of a tensor constant fx made (``torch.tensor(2.0 if self.training
    else 1.0)``), what it holds (dtype, shape, a hash of its bytes: :func:`_fingerprint`), from
    the node's meta (:func:`_mark_constants`) or ``root``; None for other nodes."""
    if node.op != "get_attr" or not _CONSTANT.fullmatch(str(node.target)):
        return None
    if _VALUE in node.meta:
        return node.meta[_VALUE]
    root = root if root is not None else node.graph.owning_module
    return _fingerprint(getattr(root, str(node.target), None) if root is not None else None)


def _fingerprint(value):
    """What ``value`` (a tensor constant) holds: dtype, shape and a hash of its bytes; only its
    kind where it cannot be read so (sparse, quantized, meta tensors: their values unseen)."""
    if not isinstance(value, torch.Tensor):
        return repr(value)
    try:
        t = value.detach().resolve_conj().resolve_neg().cpu().contiguous()
        digest = hashlib.blake2b(t.reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=16)
    except Exception:  # noqa: BLE001 - sparse, quantized, meta tensors: by their kind only
        return ("unreadable", str(value.dtype), str(value.layout), tuple(value.shape))
    return (str(value.dtype), tuple(value.shape), digest.hexdigest())


def _mark_constants(graph: fx.Graph, root: nn.Module) -> None:
    """Record in each tensor constant's node what it holds (fx stores them on ``root``, which a
    retrace leaves without them)."""
    for node in graph.nodes:
        if node.op == "get_attr" and _CONSTANT.fullmatch(str(node.target)):
            node.meta[_VALUE] = _fingerprint(getattr(root, str(node.target), None))


_CONSTANT = re.compile(r"_tensor_constant\d+")

_NORMS = (F.batch_norm, F.instance_norm)

_DATA_ARGUMENTS = {F.scaled_dot_product_attention: (4, "dropout_p")}
"""Functions whose other arguments shape the computation: the one argument (position, keyword)
that may follow a training flag."""


def _retrace(model: nn.Module, result: TraceResult, stack_traces: bool = False) -> fx.Graph:
    """``model`` traced again with ``result``'s leaves and fixed arguments, quietly, leaving no
    attribute on it."""
    return _retrace_with(model, result, stack_traces)[0]


def _retrace_with(
    model: nn.Module,
    result: TraceResult,
    stack_traces: bool = False,
    as_module: bool = False,
    tracer: _Tracer | None = None,
    constants: dict | None = None,
):
    """:func:`_retrace`, with the tracer's ``not_one_value``; ``as_module``: a graph module
    (holding the tensor constants the trace made) instead of the graph; ``tracer``: one to
    trace with (a :class:`_RegionTracer`), else a new :class:`_Tracer`; ``constants``: filled
    with the tensor constants the trace made (for :func:`graph_module_of`)."""
    if tracer is None:
        tracer = _Tracer(dict(result.leaves))
    tracer.record_stack_traces = stack_traces
    fixed = getattr(result, "fixed", None) or {}
    with warnings.catch_warnings(), _no_new_attributes(model) as before:
        warnings.simplefilter("ignore")
        graph = tracer.trace(model, concrete_args=dict(fixed) or None)
        if not _normalised(graph, model, fixed, getattr(result, "required", ())):
            raise TraceError(f"equivfx: the fixed arguments {sorted(fixed)} were not found again")
        _mark_constants(graph, model)
        if constants is not None:
            constants.update({k: model.__dict__[k] for k in set(model.__dict__) - before})
        out = fx.GraphModule(model, graph) if as_module else graph
    return out, frozenset(tracer.not_one_value)


def graph_module_of(model: nn.Module, graph: fx.Graph, constants: dict) -> fx.GraphModule:
    """A graph module of ``graph``, a trace of ``model`` that made the tensor ``constants``
    (:func:`_retrace_with`), leaving no attribute on ``model``."""
    with _no_new_attributes(model):
        model.__dict__.update(constants)
        return fx.GraphModule(model, graph)


def _flipped_graph(model: nn.Module, result: TraceResult, flipped: list[nn.Module]):
    """``model`` traced again (with ``result``'s leaves) with the training flags of ``flipped``
    negated (restored after, with whatever that trace set: :func:`restored`, added to
    ``result.writers`` where those are known); None where that trace fails."""
    changed: set[str] = set()
    for m in flipped:
        m.training = not m.training
    try:
        with restored(model) as changed:
            return _retrace(model, result)
    except Exception as err:  # noqa: BLE001 - the other branch does not trace: it differs
        log.debug("equivfx: retrace with flipped training flags failed: %s", err)
        return None
    finally:
        for m in flipped:
            m.training = not m.training
        if getattr(result, "writers", None) is not None:  # what the other branches set
            result.writers = result.writers | changed


@contextlib.contextmanager
def restored(model: nn.Module):
    """Every attribute and registered parameter, buffer and submodule of ``model``'s modules
    put back as it was after this (:func:`_set_by_trace`), and the contents of the lists, dicts,
    sets and deques they hold; yields the set of the modules' names
    whose attributes changed, filled on the way out. For traces with flags flipped: what the
    other branch sets (``self.scale = 2.0`` in training only) is not the model's state in its
    own mode, and an earlier version left it on the model (its own eval forward then computed
    something else)."""
    names = {m: n for n, m in model.named_modules()}
    before = _module_state(model)
    held = [  # (most are empty: hooks)
        (v, copy.copy(v) if v else None)
        for state in before.values()
        for v in state[0].values()
        if isinstance(v, _MUTABLE)
    ]
    changed: set[str] = set()
    try:
        yield changed
    finally:
        changed |= _set_by_trace(model, before, names)
        for now, then in held:  # lists, dicts, sets filled in place (a copy of a module whose
            if then is None:  # flag the trace held, one more log entry, a hook)
                if now:
                    now.clear()
            elif not _same_contents(now, then):
                _refill(now, then)


def _flipped_key(model: nn.Module, result: TraceResult, flipped: list[nn.Module]):
    """The graph key of :func:`_flipped_graph`; None where that trace fails."""
    graph = _flipped_graph(model, result, flipped)
    return None if graph is None else _graph_key(graph)


_ROOT_CALL = ("", 0)


class _RegionTracer(_Tracer):
    """A :class:`_Tracer` that records, for each module call (qualified name, how many calls of
    that module came before), what it was passed, the nodes its own code made (not its
    submodules' calls') and what it returned; and, for each module whose ``training`` flag was
    read, which modules' code read it (:func:`_reading_flags`)."""

    def __init__(self, extra_leaves: dict[str, str] | None = None):
        super().__init__(extra_leaves)
        self.calls: list[tuple[str, int]] = []
        self.counts: dict[str, int] = {}
        self.owner: dict[fx.Node, tuple[str, int]] = {}
        self.passed: dict[tuple[str, int], Any] = {}
        self.returned: dict[tuple[str, int], Any] = {}
        self.reads: dict[nn.Module, set[str]] = {}
        self.writers: set[str] = set()  # modules whose attributes the trace set
        self.through: set[str] = set()  # modules traced through (their code ran), not leaves

    def call_module(self, m, forward, args, kwargs):
        try:
            qualname = self.path_of_module(m)
        except NameError:  # made inside forward and called there: ``nn.ReLU()(h)``
            return _inline(m, forward, args, kwargs)
        call = (qualname, self.counts.get(qualname, 0))
        self.counts[qualname] = call[1] + 1
        if not self.is_leaf_module(m, qualname):
            self.through.add(qualname)
        self.passed[call] = _as_nodes((args, kwargs))
        self.calls.append(call)
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self.calls.pop()
        self.returned[call] = _as_nodes(out)
        return out

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        self.owner[node] = self.calls[-1] if self.calls else _ROOT_CALL
        return node


_FLAG_READS = threading.local()  # .tracers: this thread's region tracers, innermost last
_PROPERTY_USERS = [0]  # traces (of all threads) reading flags now: the property is installed
_PROPERTY_LOCK = threading.Lock()


_MOVED: dict[int, bool] = {}  # id(module) -> its flag, held while its model is region-traced


def _tracing_here():
    """This thread's innermost region tracer and the module whose code runs in it ("" for the
    model's), or None."""
    tracers = getattr(_FLAG_READS, "tracers", None)
    if not tracers:
        return None
    tracer = tracers[-1]
    return tracer, tracer.stack[-1] if tracer.stack else ""


def _read_flag(module):
    value = module.__dict__.get("training", _MOVED.get(id(module), _NOT_SET))
    if value is _NOT_SET:
        raise AttributeError("training")
    here = _tracing_here()
    if here is not None:
        tracer, reader = here
        tracer.reads.setdefault(module, set()).add(reader)
    return value


def _write_flag(module, value):
    if id(module) in _MOVED and "training" not in module.__dict__:
        _MOVED[id(module)] = value
    else:
        module.__dict__["training"] = value


_NOT_SET = object()
_FLAG_PROPERTY = property(_read_flag, _write_flag)
_SETATTR = nn.Module.__setattr__


def _recording_setattr(module, name, value):
    """``nn.Module.__setattr__``, recording which module's code set an attribute, even to the
    value it had (:func:`_set_by_trace` sees writes around it that change one)."""
    here = _tracing_here()
    if here is not None and name != "training" and not _CONSTANT.fullmatch(name):
        tracer, writer = here
        if _in_model(tracer, module):  # not a module forward makes (nn.ReLU() sets inplace)
            tracer.writers.add(writer)
    _SETATTR(module, name, value)


def _in_model(tracer: _RegionTracer, module: nn.Module) -> bool:
    """Whether ``module`` is one of the traced model's modules (:meth:`_Tracer.path_of_module`,
    which lists them again on a miss: forward may have installed it)."""
    try:
        tracer.path_of_module(module)
    except NameError:
        return False
    return True


@contextlib.contextmanager
def _reading_flags(tracer: _RegionTracer, model: nn.Module, hold: bool = True):
    """While tracing ``model``: each read of a module's ``training`` attribute in this thread is
    recorded in ``tracer.reads`` (module -> qualified names of the modules whose code read it,
    "" for the model's). A property on ``nn.Module`` while any thread traces so, which holds the
    flags of ``model``'s modules for that time: a read around it (``vars(self)["training"]``)
    fails the trace (the search then bisects) rather than go unseen (not
    ``self.__dict__.get("training")``, which reads None then; a stand-in that fails there was
    tried and dropped: copies of a module made while tracing kept it). ``hold=False``: the flags
    stay in the modules (reads around the property not seen; attribute writes recorded)."""
    tracers = _FLAG_READS.__dict__.setdefault("tracers", [])
    moved: list[nn.Module] = []
    with _PROPERTY_LOCK:
        if not _PROPERTY_USERS[0]:
            nn.Module.training = _FLAG_PROPERTY
            nn.Module.__setattr__ = _recording_setattr
        _PROPERTY_USERS[0] += 1
    tracers.append(tracer)
    try:
        with _PROPERTY_LOCK:
            for m in model.modules() if hold else ():
                if "training" in m.__dict__ and id(m) not in _MOVED:
                    _MOVED[id(m)] = m.__dict__.pop("training")
                    moved.append(m)
        yield
    finally:
        tracers.pop()
        with _PROPERTY_LOCK:
            for m in moved:
                m.__dict__["training"] = _MOVED.pop(id(m))
            _PROPERTY_USERS[0] -= 1
            if not _PROPERTY_USERS[0]:
                del nn.Module.training
                nn.Module.__setattr__ = _SETATTR


_STATE_DICTS = ("_parameters", "_buffers", "_modules")


def _state_of(m: nn.Module) -> tuple[dict, ...]:
    """``m``'s attributes (its ``__dict__`` less the flag and the dicts of
    :data:`_STATE_DICTS`), then each of those dicts, copied: the objects they hold."""
    attrs = {k: v for k, v in m.__dict__.items() if k not in _STATE_DICTS and k != "training"}
    return (attrs, *(dict(getattr(m, d)) for d in _STATE_DICTS))


def _module_state(model: nn.Module) -> dict:
    """:func:`_state_of` each module: what a trace may set on the model (TorchScript modules
    left out: their state lives in TorchScript's objects)."""
    return {m: _state_of(m) for m in model.modules() if not isinstance(m, torch.jit.ScriptModule)}


def _same_objects(now: dict, before: dict) -> bool:
    """The same keys holding the same objects (not ``==``: tensors compare element-wise)."""
    return set(now.keys()) == set(before.keys()) and all(now[k] is v for k, v in before.items())


def _set_by_trace(model: nn.Module, before: dict, names: dict) -> set[str]:
    """The modules whose attributes a trace changed (against :func:`_module_state` taken
    before it), put back as they were: a value one module sets (``self.k = ...``) may be read
    by another's code, and a Proxy left there would reach the next trace."""
    changed = set()
    for m, state in before.items():
        now = _state_of(m)
        if all(_same_objects(a, b) for a, b in zip(now, state, strict=True)):
            continue
        changed.add(names.get(m, ""))
        attrs, *dicts = state
        for k in now[0].keys() - attrs.keys():
            del m.__dict__[k]
        m.__dict__.update(attrs)
        for name, saved in zip(_STATE_DICTS, dicts, strict=True):
            held = getattr(m, name)
            held.clear()
            held.update(saved)
    return changed


_MUTABLE = (list, dict, set, collections.deque)  # and their subclasses (OrderedDict, ...)
_MODULE_OWN = frozenset(vars(nn.Module()))  # what nn.Module keeps (hooks, flag, state dicts)


def _holds_proxy(value, depth: int = 6) -> bool:
    """``value`` is an fx Proxy, or holds one (``depth`` levels down) in a list, tuple (a
    namedtuple too), dict, set, deque or ``SimpleNamespace``."""
    if isinstance(value, fx.Proxy):
        return True
    if not depth:
        return False
    if isinstance(value, dict):
        items = (*value.keys(), *value.values())
    elif isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        items = value
    elif isinstance(value, types.SimpleNamespace):
        items = vars(value).values()
    else:
        return False
    return any(_holds_proxy(v, depth - 1) for v in items)


@contextlib.contextmanager
def untouched(model: nn.Module):
    """The Proxies ``model``'s code leaves on its modules while this runs are taken off after
    it: an attribute set to one (``self.last = h``, or a tuple holding one) gets its value back
    (or goes, on a module made while tracing), and the lists, dicts, sets and deques its modules
    held lose the entries that hold one (``self.history.append(h)``; a dict entry replaced gets
    its value back). Tracing runs forward's Python with Proxies, which mean nothing outside the
    trace: without this, compile left them on the user's modules, one more in ``self.history``
    per trace, and the model could no longer be pickled. What the code sets to plain values
    stays, as after a call of the model: the compiled graph runs the user's modules (leaves,
    modules run whole), which may need it (``self.act.negative_slope = s`` before calling it, a
    parameter made at the first call, a hook registered once). So does a plain value that
    stands for work done on tensors (``self.initialized = True`` after an in-place update that
    tracing only recorded): forward's side effects are not part of the graph."""
    before = {m: dict(m.__dict__) for m in model.modules()}
    held = {  # (``before`` keeps them alive: their ids stay theirs)
        id(v): copy.copy(v)
        for attrs in before.values()
        for k, v in attrs.items()
        if k not in _MODULE_OWN and isinstance(v, _MUTABLE) and v
    }
    try:
        yield
    finally:
        for m in model.modules():
            attrs = before.get(m, {})
            for key, value in list(m.__dict__.items()):
                if key in _MODULE_OWN or not _holds_proxy(value):
                    continue
                if attrs.get(key, _NOT_SET) is value:  # the same container, filled in place
                    _drop_proxies(value, held.get(id(value)))
                elif key in attrs:
                    m.__dict__[key] = attrs[key]
                else:
                    del m.__dict__[key]


def _same_contents(a, b) -> bool:
    """Two lists, dicts, sets or deques holding the same objects (not ``==``: tensors compare
    element-wise, Proxies make Proxies)."""
    if isinstance(a, dict):
        return _same_objects(a, b)
    if isinstance(a, set):
        return {id(x) for x in a} == {id(x) for x in b}
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _drop_proxies(container, then=None) -> None:
    """Take the entries holding a Proxy out of ``container`` (a list, dict, set, deque or
    ``SimpleNamespace``; ``then``: a copy of it from before a trace, or None): a dict entry that
    was there before gets its value back, containers inside are cleaned in place (one that
    cannot be, a tuple, goes). Sets are rebuilt (a Proxy's ``==`` makes a Proxy)."""
    if isinstance(container, types.SimpleNamespace):
        container = vars(container)
    if isinstance(container, dict):
        for key, value in list(container.items()):
            if _holds_proxy(key):
                del container[key]
                continue
            if not _holds_proxy(value):
                continue
            old = then.get(key, _NOT_SET) if isinstance(then, dict) else _NOT_SET
            if old is not _NOT_SET and old is not value and not _holds_proxy(old):
                container[key] = old
            elif isinstance(value, (*_MUTABLE, types.SimpleNamespace)):
                _drop_proxies(value)
            else:
                del container[key]
        return
    if not any(_holds_proxy(v) for v in container):
        return
    kept = []
    for v in container:
        if isinstance(v, (*_MUTABLE, types.SimpleNamespace)):
            _drop_proxies(v)
            kept.append(v)
        elif not _holds_proxy(v):
            kept.append(v)
    _refill(container, kept)


def _refill(container, items) -> None:
    """``container`` (a list, dict, set or deque, the same object) holding ``items`` (a dict's
    for a dict) instead of what it holds."""
    container.clear()
    (container.update if isinstance(container, (dict, set)) else container.extend)(items)


def _defines_training(cls: type) -> bool:
    """A class of its own says what ``training`` is (a property, a class attribute): its reads
    are not seen by :func:`_reading_flags`."""
    return any("training" in vars(k) for k in cls.__mro__ if k is not nn.Module)


class _Regions:
    """A graph traced by a :class:`_RegionTracer`, cut into its module calls' own nodes."""

    def __init__(self, graph: fx.Graph, tracer: _RegionTracer, constants: dict):
        self.graph = graph
        self.constants = constants  # the tensor constants the trace made
        self.not_one_value = frozenset(tracer.not_one_value)
        self.reads = tracer.reads
        self.through = frozenset(tracer.through) | {""}
        self.passed = tracer.passed
        self.returned = tracer.returned
        self.own: dict[tuple[str, int], list[fx.Node]] = {}
        self.tags: dict[fx.Node, set] = {}
        for node in graph.nodes:  # nodes the trace's own rewrites added belong to the model
            if node.op == "get_attr" and not _CONSTANT.fullmatch(str(node.target)):
                # fx makes one per parameter per trace, where it is first read: no call's own
                self.tags[node] = {("attr", node.target)}
                continue
            call = tracer.owner.get(node, _ROOT_CALL)
            nodes = self.own.setdefault(call, [])
            self.tags[node] = {("own", call, len(nodes))}
            nodes.append(node)
        for call, out in self.returned.items():
            if isinstance(out, fx.Node) and out in self.tags:  # what its caller reads
                self.tags[out].add(("out", call))


def _as_nodes(value):
    """``value`` (what a module call was passed or returned) with Proxies replaced by their
    nodes."""
    if isinstance(value, fx.Proxy):
        return value.node
    if type(value) in (tuple, list):
        return type(value)(_as_nodes(v) for v in value)
    if type(value) is dict:
        return {k: _as_nodes(v) for k, v in value.items()}
    return value


def _traced_regions(
    model: nn.Module, result: TraceResult, flipped: list[nn.Module], hold: bool = True
):
    """``model`` traced again with the flags of ``flipped`` negated, cut into regions
    (:class:`_Regions`); None where that trace fails. ``hold=False``: the flags stay where
    code around the property reads them (``vars(self)["training"]``), their reads not all seen:
    for the attributes the trace sets only."""
    tracer = _RegionTracer(dict(result.leaves))
    constants: dict = {}
    changed: set[str] = set()
    for m in flipped:
        m.training = not m.training
    try:
        with restored(model) as changed, _reading_flags(tracer, model, hold):
            graph, _ = _retrace_with(model, result, tracer=tracer, constants=constants)
    except Exception as err:  # noqa: BLE001 - the other branch does not trace
        log.debug("equivfx: retrace with flipped training flags failed: %s", err)
        return None
    finally:
        for m in flipped:
            m.training = not m.training
        tracer.writers |= changed
        if result.writers is not None:  # every region trace adds what it saw set
            result.writers = result.writers | tracer.writers
    return _Regions(graph, tracer, constants)


def _region_changes(ours: _Regions, theirs: _Regions) -> dict | None:
    """Each module call whose own nodes or return value differ between the two traces ->
    the constants that differ ((node of ``ours``, where, our value, their value)), or None
    where more than constants differ. References to nodes compare by what they are (the i-th
    node a call made, or what a call returned: the same node may be both). None overall where
    the two cannot be told apart call by call: the calls made differ (a call in one branch
    only, or more of them), a call is passed something else (a value its caller chose on a
    flag), or a call that differs returned something else than one traced value (its caller's
    code may then differ because of it)."""

    def same(a: fx.Node, b: fx.Node) -> bool:
        return bool(ours.tags.get(a, set()) & theirs.tags.get(b, set()))

    if ours.returned.keys() != theirs.returned.keys():
        return None
    changed: dict = {}
    for call in ours.returned.keys() | {_ROOT_CALL}:
        passed: list = []
        if call != _ROOT_CALL and (
            not _differences(ours.passed[call], theirs.passed[call], (), passed, same) or passed
        ):
            return None
        a, b = ours.own.get(call, []), theirs.own.get(call, [])
        found: list | None = []
        if len(a) != len(b):
            found = None
        else:
            for x, y in zip(a, b, strict=True):
                here: list = []
                if (
                    (x.op, _name(x.target)) != (y.op, _name(y.target))
                    or _constant_value(x) != _constant_value(y)
                    or not _differences((x.args, x.kwargs), (y.args, y.kwargs), (), here, same)
                    or (here and not _takes_mode_values(x, here))
                ):
                    found = None
                    break
                found += [(x, where, u, v) for where, u, v in here]
        out_a, out_b = ours.returned.get(call), theirs.returned.get(call)
        spare: list = []
        if not _differences(out_a, out_b, (), spare, same) or spare:
            found = None
        if found is None or found:
            one_value = isinstance(out_a, fx.Node) and isinstance(out_b, fx.Node)
            if call != _ROOT_CALL and not one_value:  # the model's own: the graph's output
                return None
            changed[call] = found
    return changed


def _flip_sets(items: list) -> list[list]:
    """``items`` all together, then the sets of those whose numbers (from 1) have each bit set:
    any two of them are apart in one set at least, so two flips that cancel each other (a
    flag choosing a value another module's flag undoes) do not cancel in all of them."""
    if not items:
        return []
    bits = range(len(items).bit_length()) if len(items) > 1 else ()
    return [items] + [[x for i, x in enumerate(items, 1) if i >> b & 1] for b in bits]


def _patched_key(graph: fx.Graph, changes: list) -> tuple:
    """:func:`_graph_key` of ``graph`` with each constant of ``changes`` ((node, where, value,
    other value)) taking its other value."""
    other: dict[fx.Node, list] = {}
    for node, where, _, value in changes:
        other.setdefault(node, []).append((where, value))
    key = []
    for n in graph.nodes:
        args, kwargs = n.args, n.kwargs
        for where, value in other.get(n, ()):
            args, kwargs = _replaced((args, kwargs), where, value)
        key.append((n.op, _name(n.target), repr(args), repr(kwargs), _constant_value(n)))
    return tuple(key)


def _mode_dependent_by_regions(
    model: nn.Module, result: TraceResult, base: tuple, named: list
) -> tuple[dict[str, bool], dict[str, list]] | None:
    """:func:`mode_dependent` in a number of traces that does not grow with the number of
    modules (the constants' check: with its logarithm): the graph as it is and with every flag
    that was read flipped, each cut into module calls; a call whose own nodes differ is its
    module's flag's doing where only that module's code read flags. Then checked: the other
    modules' flags flipped together change nothing (nor do flags read around the property),
    and each module found to choose constants does, alone (sets of them flipped by the bits of
    their numbers: a constant another flag chooses differs in one of them). Returns the modules
    whose flag changes the graph, and for those whose flip changes only constants the constants
    (nodes of ``result.gm``); None where that cannot be told so (a flag read by other code, a
    class saying what ``training`` is, calls that differ other than in their own code, a check
    failing): the search then bisects."""
    names = {m: n for n, m in named}

    def owners_only(regions: _Regions) -> bool:
        return all(m in names and readers == {names[m]} for m, readers in regions.reads.items())

    result.writers = frozenset()
    as_is = _traced_regions(model, result, [])
    if as_is is None and _traced_regions(model, result, [], hold=False) is None:
        result.writers = None  # not known (a trace that fails only with the flags held: the
        # search bisects, and compile runs whole the modules that set nothing)
    if any(_defines_training(type(m)) for _, m in named):
        return None
    if as_is is None or _graph_key(as_is.graph) != base or not owners_only(as_is):
        return None
    read = list(as_is.reads)
    changed: dict = {}
    if read:
        other = _traced_regions(model, result, read)
        if other is not None:  # compile annotates the other branches of modules it runs whole
            key = frozenset(names.get(m, "") for m in read)
            result.flipped[key] = (other.graph, other.constants, other.not_one_value)
        if other is None or not owners_only(other):
            return None
        changed = _region_changes(as_is, other)  # even where the graphs are equal: flips cancel
        if changed is None:
            return None
    dependent = {call[0] for call in changed}
    if not dependent <= {names[m] for m in read}:
        return None
    # the other flags change nothing: those of the modules whose code ran (the model and the
    # submodules traced through; a leaf's flag is read where it runs, a module not called is
    # not read), flipped together, and apart (flips that cancel in pairs). Only where one of
    # them was read: the property holds every flag while a region trace runs, so a flag no code
    # read cannot change what the code did (a read around the property fails the trace). With
    # the read ones, the unread are flipped too: a read flag's other branch may read them.
    rest = [m for n, m in named if n in as_is.through and n not in dependent]
    read_rest = [m for m in rest if m in as_is.reads]
    for part in ([rest] + _flip_sets(read_rest)[1:]) if read_rest else []:
        again = _traced_regions(model, result, part)
        if again is None or _graph_key(again.graph) != base or _region_changes(as_is, again):
            return None
    structure = {name for (name, _), found in changed.items() if found is None}
    constants: dict[str, list] = {}
    for (name, _), found in changed.items():
        if name not in structure:
            constants.setdefault(name, []).extend(found)
    chosen = [n for n, _ in named if n in constants]
    for bit in range(len(chosen).bit_length()):  # each constant follows its module's flag
        flip = [n for i, n in enumerate(chosen, 1) if i >> bit & 1]
        graph = _flipped_graph(model, result, [model.get_submodule(n) for n in flip])
        expected = _patched_key(as_is.graph, [c for n in flip for c in constants[n]])
        if graph is None or _graph_key(graph) != expected:
            return None
    where = dict(zip(as_is.graph.nodes, result.gm.graph.nodes, strict=True))
    constants = {n: [(where[node], w, u, v) for node, w, u, v in constants[n]] for n in chosen}
    modes = {n: m.training for n, m in named if n in dependent}
    return modes, constants


def mode_dependent(
    model: nn.Module, result: TraceResult, read_at_call: bool = False
) -> dict[str, bool]:
    """The modules of ``model`` whose training flag the traced graph depends on: qualified name
    ("" for the model itself) -> the flag it had when traced.

    ``symbolic_trace`` runs the model's Python once: ``if self.training:`` takes one branch,
    and ``F.dropout(x, p, self.training)`` records the flag as a constant, so the graph computes
    that mode's branch in either mode (leaves, run whole, read their flags at each call). Found by
    tracing again with flags negated: all at once (one more trace; nothing more where the graph
    is the same), then halves of the modules whose flip changes it, down to single modules
    (about 2 log2(n) traces per such module). Empty for the opaque path (the model runs whole).

    ``read_at_call=True`` also rewrites ``result.gm`` so that it reads, at each call, the flag of
    each module whose flip changes only constants of the graph (``training=True`` becoming
    ``False``, ``p=0.1`` becoming ``0.0``): each such constant becomes :func:`by_mode` of the
    module's flag (see :func:`_read_flags_at_call`). Those modules are recorded in
    ``result.modes_read`` and left out of the returned dict, which keeps the modules whose flip
    changes the graph's structure (a branch), or whose constants depend on several flags at once.
    Call it so once per trace: a second call sees the rewritten graph (nothing left to read).
    """
    if result.path == "opaque":
        return {}
    _mark_constants(result.gm.graph, result.gm)
    base = _graph_key(result.gm.graph)
    named = list(model.named_modules(remove_duplicate=True))
    fast = _mode_dependent_by_regions(model, result, base, named)
    if fast is not None:
        modes, constants = fast
        if read_at_call and constants:
            read = _apply_read_at_call(model, result, constants)
            result.modes_read = tuple(read)
            modes = {n: flag for n, flag in modes.items() if n not in read}
        return modes
    everything = _flipped_graph(model, result, [m for _, m in named])
    if everything is not None and _graph_key(everything) == base:
        for part in _flip_sets([m for _, m in named])[1:]:  # flips that cancel: apart in one
            graph = _flipped_graph(model, result, part)
            if graph is None or _graph_key(graph) != base:
                break
        else:
            return {}
    if _flipped_key(model, result, []) != base:  # traced again as it is, it differs already
        log.info(
            "equivfx: %s traces differently each time (random numbers or counters read while "
            "tracing): its dependence on training flags is not checked",
            type(model).__name__,
        )
        return {}
    singles: dict[str, fx.Graph | None] = {}  # one module flipped alone: the graph it gave
    if len(named) == 1:
        singles[named[0][0]] = everything

    def changes(side: list) -> bool:
        # together, then apart by the bits of their numbers: flips that cancel in pairs
        for flip in _flip_sets([m for _, m in side]):
            graph = _flipped_graph(model, result, flip)
            if graph is None or _graph_key(graph) != base:
                if len(side) == 1:
                    singles[side[0][0]] = graph
                return True
        return False

    def search(part: list) -> list:
        if len(part) == 1:
            return part
        half = len(part) // 2
        found = []
        for side in (part[:half], part[half:]):
            if changes(side):
                found += search(side)
        return found or part  # only flipped together (flags compared): name them all

    modes = {name: m.training for name, m in search(named)}
    if read_at_call:
        read = _read_flags_at_call(model, result, {n: singles.get(n) for n in modes})
        result.modes_read = tuple(read)
        modes = {n: flag for n, flag in modes.items() if n not in read}
    return modes


MODE_SWITCH = "equivfx_mode"
"""The name of the :class:`ModeSwitch` a compiled model holds beside (as a child of) each module
whose training flag it reads at each call, and at its top level for the model's own flag."""


class ModeSwitch(nn.Module):
    """Returns its own training flag: the flag of the module it is a child of (``train()`` and
    ``eval()`` reach it as they reach that module), read at each call. A module call, not an
    attribute read: fx rebuilds an unpickled graph module by tracing its code again, which reads
    an attribute as a constant but records a module call (and :func:`by_mode` records itself)."""

    def forward(self) -> bool:
        return self.training


def by_mode(training, if_training, if_eval):
    """The value of a constant that the model's code chose by a module's training flag
    (``F.dropout(x, p, self.training)``, ``p if self.training else 0.0``): the compiled graph
    calls this with the flag its :class:`ModeSwitch` read, so the constant follows ``train()``
    and ``eval()``. Traced (fx rebuilding a pickled module), it records itself."""
    if isinstance(training, fx.Proxy):
        return training.tracer.create_proxy(
            "call_function", by_mode, (training, if_training, if_eval), {}
        )
    return if_training if training else if_eval


def _read_flags_at_call(
    model: nn.Module, result: TraceResult, singles: dict[str, fx.Graph | None]
) -> list[str]:
    """Rewrite ``result.gm`` to read the training flag of each module of ``singles`` whose flip
    alone (the graph it gave: ``singles[name]``) changes only constants, each constant changed by
    no other module's flip; return those modules' names."""
    graph = result.gm.graph
    changes: dict[str, list] = {}
    for name, flipped in singles.items():
        found = None if flipped is None else _constant_changes(graph, flipped)
        if found:
            changes[name] = found
    return _apply_read_at_call(model, result, changes)


def _apply_read_at_call(model: nn.Module, result: TraceResult, changes: dict[str, list]) -> list:
    """Rewrite ``result.gm`` to read, at each call, the flag of each module of ``changes`` (name
    -> the constants its flip alone changes: (node, where, compiled value, other value)), where
    a switch can be held beside it and no other module's flip changes those constants; return
    those modules' names."""
    graph = result.gm.graph
    changes = {n: found for n, found in changes.items() if _can_hold_switch(result.gm, n)}
    owners: dict[tuple, int] = {}
    for found in changes.values():
        for node, where, _, _ in found:
            owners[(node, where)] = owners.get((node, where), 0) + 1
    changes = {  # a constant that more flags than one change is a function of several: a branch
        name: found
        for name, found in changes.items()
        if all(owners[(node, where)] == 1 for node, where, _, _ in found)
    }
    if not changes:
        return []
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for name, found in changes.items():
        module = model.get_submodule(name) if name else model
        switch = ModeSwitch().train(module.training)
        _ensure_submodule(result.gm, name).add_module(MODE_SWITCH, switch)
        with graph.inserting_before(first):
            flag = graph.call_module(f"{name}.{MODE_SWITCH}" if name else MODE_SWITCH)
        for node, where, compiled, other in found:
            if_training, if_eval = (compiled, other) if module.training else (other, compiled)
            with graph.inserting_before(node):
                value = graph.call_function(by_mode, (flag, if_training, if_eval))
            _set_at(node, where, value)
        log.info(
            "equivfx: %s reads its training flag at each call (%d constant(s))",
            repr(name) if name else "the model",
            len(found),
        )
    graph.lint()
    result.gm.recompile()
    return list(changes)


def _can_hold_switch(gm: fx.GraphModule, name: str) -> bool:
    """Whether a :class:`ModeSwitch` can be added at ``name`` of ``gm`` without touching the
    user's modules: each step of the path is missing or a plain container fx made, not the
    model's own module (a leaf the graph calls, or one :func:`restore_unused_state` put there
    for its extra state: compile runs it first)."""
    here = gm
    for step in name.split(".") if name else ():
        here = here._modules.get(step)
        if here is None:
            return True
        if type(here) is not nn.Module:
            return False
    return MODE_SWITCH not in here._modules


def _constant_changes(graph: fx.Graph, other: fx.Graph) -> list | None:
    """Where ``other`` (a trace of the same model) differs from ``graph`` only in constants: a
    list of (node of ``graph``, where in its (args, kwargs), its value, ``other``'s value);
    None where the graphs differ otherwise (other nodes, targets or node arguments)."""
    ours, theirs = list(graph.nodes), list(other.nodes)
    if len(ours) != len(theirs):
        return None
    found: list = []
    for a, b in zip(ours, theirs, strict=True):
        if (a.op, _name(a.target), _name(a.name)) != (b.op, _name(b.target), _name(b.name)):
            return None
        if _constant_value(a) != _constant_value(b):
            return None
        here: list = []
        if not _differences((a.args, a.kwargs), (b.args, b.kwargs), (), here):
            return None
        if here and not _takes_mode_values(a, here):
            return None
        found += [(a, where, x, y) for where, x, y in here]
    return found


_ARITHMETIC = frozenset(
    {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
     torch.div, "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}
)  # fmt: skip


def _takes_mode_values(node: fx.Node, changes: list) -> bool:
    """Whether ``node`` may read its changed constants at each call: numbers or flags (bool,
    float) that are data, not structure (no shape or dim depends on them): the arguments of
    dropout, of ``F.batch_norm`` and ``F.instance_norm``, the scalars of arithmetic
    (``x * (2.0 if self.training else 1.0)``), and attention's ``dropout_p``. Others (a dim, a
    size, an int, ``is_causal``) stay branches."""
    from equivfx.passes.rules import DROPOUT_FUNCTIONS

    if not all(type(x) in (bool, float) and type(y) in (bool, float) for _, x, y in changes):
        return False
    if node.op == "call_method":
        return node.target in _ARITHMETIC
    if node.op != "call_function":
        return False
    if node.target in _DATA_ARGUMENTS:  # only that argument: (position, keyword)
        position, keyword = _DATA_ARGUMENTS[node.target]
        return all(where[:2] in ((0, position), (1, keyword)) for where, _, _ in changes)
    return node.target in DROPOUT_FUNCTIONS or node.target in _NORMS or node.target in _ARITHMETIC


def _name(target) -> str:
    """A target or node name with fx's numbering of tensor constants left out."""
    return _CONSTANT.sub("_tensor_constant", str(target))


def _same_name(a: fx.Node, b: fx.Node) -> bool:
    return _name(a.name) == _name(b.name)


def _differences(x, y, where: tuple, found: list, same: Callable = _same_name) -> bool:
    """Collect into ``found`` the (path, x's value, y's value) of each constant where ``x`` and
    ``y`` differ; False where they differ in structure or in a node (nodes compared by
    ``same``: by name)."""
    if isinstance(x, fx.Node) or isinstance(y, fx.Node):
        return isinstance(x, fx.Node) and isinstance(y, fx.Node) and same(x, y)
    if isinstance(x, (tuple, list)) or isinstance(y, (tuple, list)):
        if type(x) is not type(y) or len(x) != len(y):
            return False
        pairs = enumerate(zip(x, y, strict=True))
        return all(_differences(a, b, (*where, i), found, same) for i, (a, b) in pairs)
    if isinstance(x, dict) or isinstance(y, dict):
        if type(x) is not type(y) or list(x) != list(y):
            return False
        return all(_differences(x[k], y[k], (*where, k), found, same) for k in x)
    if type(x) is not type(y) or repr(x) != repr(y):
        found.append((where, x, y))
    return True


def _set_at(node: fx.Node, where: tuple, value) -> None:
    """Replace the constant at ``where`` (0: args, 1: kwargs, then indices and keys) of
    ``node``'s arguments with ``value``."""
    node.args, node.kwargs = _replaced((node.args, node.kwargs), where, value)


def _replaced(container, path: tuple, value):
    """``container`` (nested tuples, lists and dicts) with the entry at ``path`` replaced by
    ``value`` (copies along the path; the rest shared)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(container, dict):
        return {k: _replaced(v, rest, value) if k == key else v for k, v in container.items()}
    items = [_replaced(v, rest, value) if i == key else v for i, v in enumerate(container)]
    return type(container)(items) if isinstance(container, tuple) else items


# ------------------------------------------------------------------------- source lines
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)')
_LIBRARY = (os.path.dirname(fx.__file__).rsplit(os.sep, 1)[0], os.path.dirname(__file__))


def _in_library(path: str) -> bool:
    """``path`` lies inside torch's or equivfx's folder (whole folder names: a user's
    ``equivfx_examples/`` beside them is the user's)."""
    return path.startswith(tuple(d + os.sep for d in _LIBRARY))


def source_line(model: nn.Module, result: TraceResult, node_name: str) -> str | None:
    """``file:line: code`` of the user's code that made node ``node_name`` of ``result``'s graph,
    found by tracing ``model`` again recording stack traces (not recorded in the first trace:
    they double its cost, and only an error message reads them); None where not found."""
    if result.path == "opaque":
        return None
    try:
        graph = _retrace(model, result, stack_traces=True)
    except Exception as err:  # noqa: BLE001 - an error message's extra line: best effort
        log.debug("equivfx: no source line for %s: %s", node_name, err)
        return None
    node = next((n for n in graph.nodes if n.name == node_name), None)
    frames = [m.groupdict() for m in _FRAME.finditer((node and node.stack_trace) or "")]
    user = [f for f in frames if not _in_library(f["file"])]
    if not user:
        return None
    frame = user[-1]
    code = linecache.getline(frame["file"], int(frame["line"])).strip()
    where = f"{frame['file']}:{frame['line']} in {frame['fn']}"
    return f"{where}: {code}" if code else where
