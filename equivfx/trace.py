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

import contextlib
import functools
import linecache
import logging
import os
import re
import warnings
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from equivfx.errors import ModelTypeError, TraceError, explain, user_stacklevel

__all__ = [
    "FallbackWarning",
    "LEAF_MODULES",
    "OPAQUE_ATTR",
    "TraceResult",
    "TrainingModeWarning",
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
    """

    gm: fx.GraphModule
    path: str
    leaves: dict[str, str] = field(default_factory=dict)
    error: str | None = None


class _Tracer(fx.Tracer):
    """A tracer that honours the leaf registry and remembers which module it was inside."""

    def __init__(self, extra_leaves: dict[str, str] | None = None):
        super().__init__()
        # fx rebuilds an unpickled graph module with its tracer class, called without arguments
        self.extra_leaves = extra_leaves or {}
        self.registry_leaves: dict[str, str] = {}
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.extra_leaves:
            return True
        for typ, reason in LEAF_MODULES.items():
            if isinstance(m, typ):
                self.registry_leaves[qualname] = reason
                return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self.stack.append(qualname)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = qualname
            raise
        self.stack.pop()
        return out


def _is_trace_failure(err: Exception) -> bool:
    # torch.fx.proxy.TraceError (control flow, iteration) and the TypeError/RuntimeError that
    # Proxies raise when user code needs a concrete value.
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


def trace(model: nn.Module) -> TraceResult:
    """Capture ``model`` as a torch.fx GraphModule through the cascade described in the module doc.

    Args:
        model: any ``nn.Module``. It is not modified; the graph module shares its submodules and
            parameters.

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
    discovered: dict[str, str] = {}
    with _no_new_attributes(model) as before:  # fx sets tensor constants on the model it traces
        while True:
            tracer = _Tracer(discovered)
            try:
                graph = tracer.trace(model)
            except Exception as err:  # noqa: BLE001 - classify below
                if not _is_trace_failure(err):
                    raise
                _drop_new_attributes(model, before)  # the next attempt names constants anew
                where = tracer.failed_in
                if where and where not in discovered and len(discovered) < _MAX_DISCOVERED_LEAVES:
                    discovered[where] = (
                        f"could not be traced ({type(err).__name__}: {err}); run whole"
                    )
                    log.info("equivfx: making %s a leaf: %s", where, err)
                    continue
                return _opaque(model, err, discovered)
            break
        leaves = {**tracer.registry_leaves, **discovered}
        name = type(model).__name__
        for node in graph.nodes:
            if isinstance(node.type, str):  # an annotation under `from __future__ import
                node.type = None  # annotations`: fx cannot write it into a pickle's imports
        gm = fx.GraphModule(model, graph, class_name=f"Traced{name}")  # copies the constants
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
    return TraceResult(gm=gm, path=path, leaves=leaves)


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


def _opaque(model: nn.Module, err: Exception, discovered: dict[str, str]) -> TraceResult:
    """The last resort: one graph node that calls the whole model.

    The model is held as submodule :data:`OPAQUE_ATTR`; state-dict hooks strip and restore that
    prefix
    so the graph module's ``state_dict()`` has exactly the model's keys.
    """
    name = type(model).__name__
    root = nn.Module()
    setattr(root, OPAQUE_ATTR, model)
    graph = fx.Graph()
    sig_params = _forward_params(model)
    placeholders = [graph.placeholder(p) for p in sig_params]
    out = graph.call_module(OPAQUE_ATTR, tuple(placeholders))
    graph.output(out)
    gm = fx.GraphModule(root, graph, class_name=f"Opaque{name}")
    install_prefix_hooks(gm, OPAQUE_ATTR)
    warnings.warn(
        f"equivfx fallback: {name}.forward could not be traced ({type(err).__name__}: {err}); the "
        "whole "
        "model runs as one opaque node. The global lift is still exact where it treats each "
        "sample on its own (checked on example_inputs); layer-wise passes cannot "
        "look "
        "inside. Run equivfx.verify to check the result.",
        FallbackWarning,
        stacklevel=user_stacklevel(),
    )
    leaves = {**discovered, "": "the model's forward could not be traced"}
    return TraceResult(gm=gm, path="opaque", leaves=leaves, error=f"{type(err).__name__}: {err}")


def _forward_params(model: nn.Module) -> list[str]:
    import inspect

    sig = inspect.signature(model.forward)
    names = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TraceError(
                explain(
                    f"{type(model).__name__}.forward could not be traced and takes *args/**kwargs",
                    str(sig),
                    "a forward with named positional parameters",
                    "give forward explicit parameters, or make the untraceable part a "
                    "submodule so only it runs opaque",
                )
            )
        names.append(p.name)
    return names


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
    target and arguments (nodes by name, constants by repr: ``training=False`` shows)."""
    return tuple(
        (n.op, _CONSTANT.sub("_tensor_constant", str(n.target)), repr(n.args), repr(n.kwargs))
        for n in graph.nodes
    )


_CONSTANT = re.compile(r"_tensor_constant\d+")


def _retrace(model: nn.Module, result: TraceResult, stack_traces: bool = False) -> fx.Graph:
    """``model`` traced again with ``result``'s leaves, quietly, leaving no attribute on it."""
    tracer = _Tracer(dict(result.leaves))
    tracer.record_stack_traces = stack_traces
    with warnings.catch_warnings(), _no_new_attributes(model):
        warnings.simplefilter("ignore")
        return tracer.trace(model)


def _flipped_key(model: nn.Module, result: TraceResult, flipped: list[nn.Module]):
    """The graph key of ``model`` traced again (with ``result``'s leaves) with the training
    flags of ``flipped`` negated (restored after); None where that trace fails."""
    for m in flipped:
        m.training = not m.training
    try:
        return _graph_key(_retrace(model, result))
    except Exception as err:  # noqa: BLE001 - the other branch does not trace: it differs
        log.debug("equivfx: retrace with flipped training flags failed: %s", err)
        return None
    finally:
        for m in flipped:
            m.training = not m.training


def mode_dependent(model: nn.Module, result: TraceResult) -> dict[str, bool]:
    """The modules of ``model`` whose training flag the traced graph depends on: qualified name
    ("" for the model itself) -> the flag it had when traced.

    ``symbolic_trace`` runs the model's Python once: ``if self.training:`` takes one branch,
    and ``F.dropout(x, p, self.training)`` records the flag as a constant, so the graph computes
    that mode's branch in either mode (leaves, run whole, read their flags at each call). Found by
    tracing again with flags negated: all at once (one more trace; nothing more where the graph
    is the same), then halves of the modules whose flip changes it, down to single modules
    (about 2 log2(n) traces per such module). Empty for the opaque path (the model runs whole).
    """
    if result.path == "opaque":
        return {}
    base = _graph_key(result.gm.graph)
    named = list(model.named_modules(remove_duplicate=True))
    if _flipped_key(model, result, [m for _, m in named]) == base:
        return {}
    if _flipped_key(model, result, []) != base:  # traced again as it is, it differs already
        log.info(
            "equivfx: %s traces differently each time (random numbers or counters read while "
            "tracing): its dependence on training flags is not checked",
            type(model).__name__,
        )
        return {}

    def search(part: list) -> list:
        if len(part) == 1:
            return part
        half = len(part) // 2
        found = []
        for side in (part[:half], part[half:]):
            if _flipped_key(model, result, [m for _, m in side]) != base:
                found += search(side)
        return found or part  # only flipped together (flags compared): name them all

    return {name: m.training for name, m in search(named)}


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
