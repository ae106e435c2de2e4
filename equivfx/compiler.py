"""``equivfx.compile``: trace a model, run the pass pipeline, return an equivariant GraphModule."""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from equivfx.errors import (
    BatchMixingError,
    EquivFXError,
    GroupSpecError,
    ModelTypeError,
    NotYetSupportedError,
    ReadoutError,
    explain,
    user_stacklevel,
)
from equivfx.groups import Action, CallableAction, FiniteGroup, check_action_law
from equivfx.groups import group as as_group
from equivfx.meta import RULE, annotated_output_action
from equivfx.passes.annotate import AnnotateReps, BatchMixingWarning, opaque_leaves
from equivfx.passes.channel_layout import KeepChannelLayout
from equivfx.passes.chunks import chunked_module
from equivfx.passes.codegen import (
    direct_module_access,
    keep_state_through_copies,
    with_direct_module_access,
)
from equivfx.passes.coset_lift import DeferLiftToCosets
from equivfx.passes.dead_slots import EliminateDeadSlots
from equivfx.passes.defer import DeferLift
from equivfx.passes.hoist import HoistProjection
from equivfx.passes.infra import Pipeline
from equivfx.passes.leaf_check import (
    copy_tensors,
    describe_mixing,
    outputs_differ,
    per_slot_difference,
)
from equivfx.passes.lift import LIFT_NAME, InsertLift
from equivfx.passes.mixing import MixLayers, MixOptions, TiedWeightsWarning
from equivfx.passes.modules import POOLS, READOUTS, Lift
from equivfx.passes.options import LiftOptions
from equivfx.passes.projection import FuseProjection
from equivfx.passes.rules import OPAQUE_LEAF, describe_node
from equivfx.passes.to_map import ToMap
from equivfx.trace import (
    HOOK_ATTRIBUTES,
    SideEffectWarning,
    TraceResult,
    TrainingModeWarning,
    kept_buffers,
    mode_dependent,
    restore_unused_state,
    run_whole_model,
    source_line,
    trace,
    untouched,
    warn_buffer_updates,
    warn_hooks,
)

__all__ = ["compile", "CompileInfo", "as_action", "global_pipeline", "layerwise_pipeline"]

log = logging.getLogger(__name__)

MODES = ("global", "layerwise")


@dataclass(frozen=True)
class CompileInfo:
    """What a compiled model knows about itself (``emodel.equivfx_info``).

    Attributes:
        group: the FiniteGroup.
        mode: ``"global"`` or ``"layerwise"``.
        readout, pool: the readout and its pool.
        input_action, output_action: the actions (bound to ``group``); ``output_action`` is None
            unless the readout is ``equivariant``.
        acted_input: name of the input G acts on.
        trace_path: ``"symbolic_trace"``, ``"symbolic_trace+leaves"`` or ``"opaque"``.
        leaves: qualified module name -> why it was traced as one node.
        passes: the pipeline's pass names, in order.
        mixed: layer-wise mode: qualified names of the layers that became mixing layers.
        output_rep_action: how G acts on the compiled model's output (the output node's
            representation; a model rebuilt by unpickling has lost its nodes' annotations).
        unchecked_leaves: opaque leaves compile could not check on example inputs (all of them
            without example inputs): ``chunk="auto"`` checks them at the first call, and
            ``equivfx.verify`` where every slot is folded.
        mode_dependent: modules whose training flag the traced graph depends on (their code
            branches on ``self.training``): qualified name ("" for the model) -> the flag when
            compiled, whose branch the compiled model computes in either mode
            (:func:`equivfx.trace.mode_dependent`).
        modes_read: modules whose training flag only chose constants of the traced graph
            (``F.dropout(x, p, self.training)``, ``x * (2.0 if self.training else 1.0)``): the
            compiled model reads their flags at each call, so ``train()`` and ``eval()`` switch
            those constants (:func:`equivfx.trace.by_mode`).
        required: forward parameters with a None default that ``example_inputs`` passed a
            tensor for, where None would take another branch: a call omitting one raises
            :class:`~equivfx.errors.FixedArgumentError` (:func:`equivfx.trace.expect_given`).
        modes_run_whole: submodules whose own code branches on their training flag (``if
            self.training:``, a stochastic-depth ``DropPath``): traced as leaves, which run
            whole and so follow ``train()`` and ``eval()`` (in layer-wise mode only those
            without parameters, whose layers would otherwise not mix).
        fixed: forward parameters traced with a fixed non-tensor value, because the model's code
            branches on it (``if mask is not None:``, ``if return_features:``): name -> the value
            (the one ``example_inputs`` passed there, else forward's default). A call with
            another value raises :class:`~equivfx.errors.FixedArgumentError`
            (:func:`equivfx.trace.trace`).
    """

    group: FiniteGroup
    mode: str
    readout: str
    pool: str
    input_action: Action
    output_action: Action | None
    acted_input: str
    trace_path: str
    leaves: dict = field(default_factory=dict)
    passes: tuple[str, ...] = ()
    mixed: tuple[str, ...] = ()
    output_rep_action: Action | None = None
    unchecked_leaves: tuple[str, ...] = ()
    mode_dependent: dict = field(default_factory=dict)
    modes_read: tuple[str, ...] = ()
    fixed: dict = field(default_factory=dict)
    modes_run_whole: tuple[str, ...] = ()
    required: tuple[str, ...] = ()


def as_action(spec: Any, group: FiniteGroup, what: str = "input_action") -> Action:
    """Turn a user's action argument into an Action bound to ``group``.

    Accepts None (the group's own action), an :class:`Action`, a group spec string (that group's
    action, e.g. ``output_action="C4"``), or a callable ``fn(g, x)``.
    """
    if spec is None:
        return group.action
    if isinstance(spec, Action):
        return spec if spec.group == group else spec.bind(group)
    if isinstance(spec, (str, FiniteGroup)):
        other = as_group(spec)
        if other == group:
            return group.action
        return other.action.bind(group)
    if callable(spec):
        return CallableAction(fn=spec).bind(group)
    raise GroupSpecError(
        explain(
            f"{what} must be an Action, a group spec or a callable fn(g, x)",
            type(spec).__name__,
            "e.g. 'C4', equivfx.groups.RollAction(8, axis=-1), or lambda g, x: ...",
            f"pass one of those as {what}",
        )
    )


def global_pipeline(options: LiftOptions, check: bool = False, optimize: bool = True) -> Pipeline:
    """The global construction: annotate-reps, insert-lift, to-map, fuse-projection, and with
    ``optimize`` the cost passes defer-lift, hoist-projection, eliminate-dead-slots and
    defer-lift-to-cosets."""
    passes = [AnnotateReps(options), InsertLift(options), ToMap()]
    passes += [DeferLift()] if optimize else []
    passes += [FuseProjection(options)]
    passes += [HoistProjection(), EliminateDeadSlots(), DeferLiftToCosets()] if optimize else []
    return Pipeline(passes, check=check)


def layerwise_pipeline(
    options: LiftOptions, mix: MixOptions, check: bool = False, optimize: bool = True
) -> Pipeline:
    """The layer-wise construction: the global passes with mix-layers before the readout (and,
    for the fused layout, keep-channel-layout)."""
    # mix-layers decides on the unoptimised graph (which layers are past the input stage); the
    # gathers it inserts do not commute with the action, so defer-lift never moves them
    passes = [AnnotateReps(options), InsertLift(options), ToMap(), MixLayers(mix)]
    passes += [DeferLift()] if optimize else []
    passes += [FuseProjection(options)]
    passes += [HoistProjection()] if optimize else []
    # the fused layout's moves between layers cancel where the ops between keep the channels
    passes += [KeepChannelLayout()] if optimize and mix.layout == "fused" else []
    return Pipeline(passes, check=check)


def as_example_inputs(example_inputs) -> tuple:
    """A tensor or a sequence of inputs as a tuple whose first entry (the acted input) is a tensor.

    Raises:
        ModelTypeError: anything else.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        if not example_inputs or not isinstance(example_inputs[0], torch.Tensor):
            raise ModelTypeError(
                explain(
                    "the first example input must be a tensor",
                    type(example_inputs[0]).__name__ if example_inputs else None,
                    "a tensor G acts on",
                    "pass the tensor G acts on first (a model that takes a dict or another "
                    "container: compile a wrapper module whose forward takes that tensor first "
                    "and builds the container)",
                )
            )
        return tuple(example_inputs)
    raise ModelTypeError(
        explain(
            "example_inputs must be a tensor or a tuple of tensors",
            type(example_inputs).__name__,
            "torch.Tensor or tuple",
        )
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run in eval mode and without autograd, restoring every submodule's mode afterwards, and
    the buffers and random state: equivfx's own runs of the model (shape propagation, the test
    run, verify) leave it as it was, though a graph may hold a training branch that updates a
    buffer in place or draws random numbers (a branch written into the graph runs whatever the
    flags say)."""
    modes = {m: m.training for m in model.modules()}
    lazy = nn.parameter.UninitializedTensorMixin  # no data yet: nothing to put back
    buffers = [(b, b.clone()) for b in model.buffers() if not isinstance(b, lazy)]
    tensors = [*model.parameters(), *model.buffers()]
    devices = sorted(
        {t.device.index or 0 for t in tensors if t.is_cuda and not isinstance(t, lazy)}
    )
    for m in modes:  # set the flag directly: exported modules refuse .eval() but ignore the flag
        m.training = False
    try:
        with torch.no_grad(), Lift.watch_paused(modes), torch.random.fork_rng(devices=devices):
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)


def _with_source(err: EquivFXError, model: nn.Module, result) -> EquivFXError:
    """``err`` (a refusal naming a node: ``  node: %name ...``) with the user's source line of
    that node after it, as a new error of the same class; ``err`` itself where there is none."""
    message = str(err)
    found = re.search(r"^  node: %(\w+) ", message, flags=re.MULTILINE)
    if not found or "\n  source: " in message:
        return err
    line = source_line(model, result, found.group(1))
    if line is None:
        return err
    end = message.index("\n", found.end()) if "\n" in message[found.end() :] else len(message)
    try:
        return type(err)(f"{message[:end]}\n  source: {line}{message[end:]}")
    except TypeError:  # an error class with another signature
        return err


def _warn_tied(model: nn.Module, mixed: tuple[str, ...]) -> None:
    """Warn where a layer that became a mixing layer shared a parameter with another module."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    ties = []
    for layer in mixed:
        for pname, param in model.get_submodule(layer).named_parameters(recurse=False):
            others = [o for o in owners.get(id(param), []) if o != f"{layer}.{pname}"]
            if others:
                ties.append(f"{layer}.{pname} = {', '.join(others)}")
    if ties:
        warnings.warn(
            f"equivfx: layer-wise mode gives each mixing layer a weight |G| times wider of its "
            f"own, so these tied parameters are tied no more: {'; '.join(ties)}. Keep the tie "
            "with mix= (leave those layers out: mix={...} of the layers to mix), or use "
            "mode='global', which keeps every parameter as it is.",
            TiedWeightsWarning,
            stacklevel=user_stacklevel(),
        )


def _watch_modes(gm: fx.GraphModule, modes: dict[str, bool], training: bool) -> None:
    """Have the lift warn at a call where a module of ``modes`` has another training flag than
    when compiled (:attr:`~equivfx.passes.modules.Lift.mode_watch`). The model itself, and
    modules the compiled model does not hold (traced through, without state), are watched
    through the lift's own flag: ``train()``/``eval()`` on the compiled model set it."""
    lift = gm.get_submodule(LIFT_NAME)
    watch = []
    for name, flag in modes.items():
        try:
            module = gm.get_submodule(name) if name else None
        except AttributeError:
            module = None
        # the lift's flag will be ``training``, the model's (compile sets equivfx's modules to it)
        watch.append((lift, training, name) if module is None else (module, flag, name))
    lift.mode_watch = tuple(watch)


MODE_LEAF_REASON = (
    "its code branches on its training flag: run whole, so that train() and eval() switch it"
)


def _trace_following_modes(
    model: nn.Module, examples: tuple | None, mode: str, G: FiniteGroup, in_action: Action
) -> tuple[TraceResult, dict[str, bool], tuple[str, ...], frozenset[str]]:
    """``model`` traced (:func:`~equivfx.trace.trace`), its unread state restored and its
    training flags searched (:func:`~equivfx.trace.mode_dependent`, which makes the graph read
    at each call the flags that only chose constants). Tracing runs a branch on a flag once:
    each submodule whose own flag changes the graph's structure is traced again as a leaf, which
    runs whole and so takes the branch of its flag at each call. Only where that is safe: the
    submodule returned one traced value (as a leaf, its caller's code would see a Proxy where it
    saw a tuple or None), both of its branches treat the samples of a batch on their own (the
    op rules, on each branch's graph: a leaf is checked on example inputs in eval mode only),
    in layer-wise mode it has no parameters (a leaf's layers do not mix), and the trace with it
    run whole falls back no further. Returns the result, the modules whose branch stays the
    compile mode's (the model's own, and those whose flag other code reads), the submodules
    run whole, and those of them whose code the op rules checked (they call no leaf without a
    rule, in either branch). Warnings (fallbacks) are those of the trace kept."""

    def traced(leaves: dict[str, str]):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result = trace(model, examples, leaves)
            if result.path != "opaque":  # first: it may put the model's own modules in gm
                restore_unused_state(result.gm, model)
            return result, mode_dependent(model, result, read_at_call=True), seen

    result, modes, seen = traced({})
    writers = result.writers  # None: not known, then none is run whole
    eligible = [  # the model: no leaf; nor modules whose code sets attributes others may read
        n
        for n in modes
        if n
        and writers is not None
        and n not in result.not_one_value
        and not any(w == n or w.startswith(n + ".") for w in writers)
    ]
    if mode == "layerwise":
        eligible = [n for n in eligible if next(model.get_submodule(n).parameters(), None) is None]
    checked: frozenset[str] = frozenset()
    if eligible:
        eligible, checked = _folding_both_ways(model, result, eligible, G, in_action, examples)
    run_whole: list[str] = []
    given_up: set[str] = set()
    for _ in range(_MODE_LEAF_ROUNDS):
        names = [n for n in eligible if n not in given_up]
        names = [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost
        if not names:
            break
        again, again_modes, again_seen = traced(dict.fromkeys(names, MODE_LEAF_REASON))
        # (a leaf discovered inside one of them is gone: the path may lose its "+leaves")
        if again.path == "opaque" or not set(_discovered(again)) <= set(_discovered(result)):
            break  # running them whole makes other code untraceable: keep the branches
        try:  # a value one of them left where other code reads it (a container it fills)
            again.gm.graph.lint()
        except Exception:  # noqa: BLE001 - keep the branches
            break
        stuck = {n for n in names if n in again_modes}  # their flag is read by other code
        if not stuck:
            result, modes, seen, run_whole = again, again_modes, again_seen, names
            break
        given_up |= stuck  # their descendants may still be run whole
    for caught in seen:
        warnings.warn(caught.message, stacklevel=user_stacklevel())
    return result, modes, tuple(run_whole), checked & set(run_whole)


_MODE_LEAF_ROUNDS = 3
"""Traces :func:`_trace_following_modes` tries at most (each with the flag search): a module
whose flag other code reads is given up, and its submodules tried in the next round."""


def _discovered(result: TraceResult) -> list[str]:
    return [n for n, why in result.leaves.items() if why.startswith("could not be traced")]


def _folding_both_ways(
    model: nn.Module,
    result: TraceResult,
    names: list[str],
    G: FiniteGroup,
    in_action: Action,
    examples: tuple | None,
) -> tuple[list[str], frozenset[str]]:
    """The modules of ``names`` whose code, in either branch of their flag, returns one traced
    value and lets the op rules fold the slots into the batch (annotated as compile annotates:
    shapes propagated on ``examples`` where given; the graph as traced, and traced again with
    the module's flag flipped); none where the graph as traced does not annotate (compile
    raises its error on it then). And those of them whose branches call no leaf without an op
    rule: the rules checked all of their code (run whole, they need no check on examples)."""
    from equivfx.trace import _retrace_with, graph_module_of, restored

    placeholders = [n for n in result.gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return [], frozenset()
    batch = None
    if examples is not None and examples[0].dim():
        batch = int(examples[0].shape[0])
    options = LiftOptions(
        group=G, input_action=in_action, acted_input=placeholders[0].target, example_batch=batch
    )

    def folds(gm: fx.GraphModule) -> set[str] | None:
        # None where it does not fold, else the modules holding a leaf without an op rule
        saved = {n: dict(n.meta) for n in gm.graph.nodes}  # the pipeline annotates afresh
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if examples is not None:
                    _propagate_shapes(gm, examples)
                AnnotateReps(options)(gm)
                return _holding_opaque_leaves(gm, names)
        except Exception:  # noqa: BLE001 - an error compile reports on the graph it keeps
            return None
        finally:
            for n, meta in saved.items():
                n.meta.clear()
                n.meta.update(meta)

    as_traced = folds(result.gm)
    if as_traced is None:
        return [], frozenset()

    canonical = {m: n for n, m in model.named_modules()}

    def other_branches_fold(flip: list[str]) -> set[str] | None:
        # their submodules' flags flipped too, as train() and eval() flip them: a submodule's
        # other branch may call what the rules cannot check (a leaf without a rule)
        modules = list({m: None for n in flip for m in model.get_submodule(n).modules()})
        key = frozenset(canonical.get(m, "") for m in modules)
        if key in result.flipped:  # traced so by the flag search
            graph, constants, not_one_value = result.flipped[key]
            if not_one_value & set(flip):
                return None
            try:  # (it may read an attribute its own trace made and took back)
                module = graph_module_of(model, graph, constants)
            except Exception as err:  # noqa: BLE001 - traced again below
                log.debug("equivfx: the flag search's trace of %s: %s", flip, err)
            else:
                return folds(module)
        for module in modules:
            module.training = not module.training  # the other branch, traced and annotated so
        try:
            with restored(model):  # what the other branch sets is not the model's state
                flipped, not_one_value = _retrace_with(model, result, as_module=True)
            return None if not_one_value & set(flip) else folds(flipped)
        except Exception as err:  # noqa: BLE001 - the other branch does not trace: not whole
            log.debug("equivfx: the other branch of %s does not trace: %s", flip, err)
            return None
        finally:
            for module in modules:
                module.training = not module.training

    # all at once (one trace, whatever their number), else one by one
    together = other_branches_fold(names) if len(names) > 1 else None
    if together is not None:
        both = {name: together for name in names}
    else:
        both = {name: other_branches_fold([name]) for name in names}
        both = {name: held for name, held in both.items() if held is not None}
    checked = frozenset(n for n, held in both.items() if n not in held and n not in as_traced)
    return list(both), checked


def _holding_opaque_leaves(gm: fx.GraphModule, names: list[str]) -> set[str]:
    """The modules of ``names`` whose code calls (inside, at any depth) a leaf annotated without
    an op rule; all of them where fx did not record which modules a leaf's call was made in."""
    held: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.meta.get(RULE) == OPAQUE_LEAF:
            stack = n.meta.get("nn_module_stack")
            if not stack:
                return set(names)
            held.update(path for path, _ in stack.values())
    return held


def _warn_mode_dependent(model: nn.Module, modes: dict[str, bool]) -> None:
    names = ", ".join(repr(n) if n else f"the model ({type(model).__name__})" for n in modes)
    flags = set(modes.values())
    mode = ("training" if True in flags else "eval") if len(flags) == 1 else "their current"
    warnings.warn(
        f"equivfx: the traced graph depends on the training flag of {names} (code that "
        "branches on self.training, which tracing ran once, or passes a value it chose where "
        "the graph cannot read it at each call: a dim, a size, an int). The "
        f"compiled model computes the branch of {mode} mode, the mode when compiled, in either "
        "mode: train() or eval() on it does not switch that branch (a submodule whose own code "
        "branches on its flag runs whole instead, and follows it: in layer-wise mode only those "
        "without parameters). Compile the model in the mode you will run it in (model.eval() "
        "before equivfx.compile for inference), once per mode, or move the branch into a "
        "submodule of its own.",
        TrainingModeWarning,
        stacklevel=user_stacklevel(),
    )


def _collecting_after(fn: Callable) -> Callable:
    """``fn`` with Python's cyclic garbage collector paused while it runs, and restored as it
    was: tracing makes many objects, and each full collection walks every object the process
    holds (the model, torch's own), a fifth to a quarter of compile's time (docs/benchmarks.md,
    "After the run"). What the traces leave is collected once collection resumes (on a
    10,000-node chain the peak resident memory grew by 5 %). torch's ``distributed.checkpoint``
    pauses it the same way. A wrapper in this file, not a context manager's: warnings name the
    first frame outside equivfx."""

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return paused


def _refuse_wrappers(model: nn.Module) -> None:
    """Refuse the wrappers whose forward hands the call to machinery torch.fx cannot trace
    (torch.compile's compiled code; DataParallel's replicas and scatter), naming the module
    inside and how to wrap the compiled model instead.

    Raises:
        ModelTypeError: for a ``torch.compile``'d module, ``nn.DataParallel`` or
            ``DistributedDataParallel``.
    """
    if type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    ):
        what, inner = "torch.compile", "model._orig_mod"
        fix = "torch.compile(equivfx.compile(model._orig_mod, group))"
    elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        what, inner = type(model).__name__, "model.module"
        fix = f"{type(model).__name__}(equivfx.compile(model.module, group), ...)"
    else:
        return
    raise ModelTypeError(
        explain(
            f"equivfx.compile got a model wrapped by {what}, whose forward torch.fx cannot trace",
            type(model).__name__,
            f"the plain nn.Module it wraps ({inner})",
            f"compile that module and wrap the compiled model instead: {fix}",
        )
    )


@_collecting_after
def compile(  # noqa: A001 - the public name is part of the API contract
    model: nn.Module,
    group: FiniteGroup | str,
    mode: str = "global",
    readout: str = "invariant",
    pool: str = "mean",
    input_action: Any = None,
    output_action: Any = None,
    example_inputs: Any = None,
    mix: Callable | set | None = None,
    chunk: int | str | None = "auto",
    twist: bool = False,
    mix_layout: str = "gather",
    mix_format: str = "auto",
    optimize: bool = True,
    check: bool = False,
) -> fx.GraphModule:
    """Make ``model`` equivariant (or invariant) to the finite group ``group``.

    Global mode lifts the whole network: slot g holds the unchanged model applied to g^-1 . x, all
    slots computed in one pass with the slots folded into the batch axis.

    Layer-wise mode is the paper's construction: after the input stage, every Conv/Linear layer that
    reads a Map(G, .) value becomes a mixing layer reading the concatenation over u of s(g u), with
    |G| times the input width and one shared weight set. Its new input blocks start at zero, so the
    converted model computes exactly what global mode computes, ready to fine-tune.

    Args:
        model: any ``nn.Module``. It is not modified; the result shares its parameters.
        group: a :class:`~equivfx.groups.FiniteGroup` or a spec string (``"C4"``, ``"D4"``, ...).
        mode: ``"global"`` or ``"layerwise"``.
        readout: ``"invariant"`` (pool over slots), ``"slots"`` (B, |G|, ...), ``"pose"`` (B, |G| K)
            or ``"equivariant"`` (needs ``output_action``).
        pool: ``"mean"``, ``"max"`` or ``"logsumexp"`` for the invariant readout.
        input_action: how G acts on the model's first input; default: the group's own action.
        output_action: how G acts on the output, for ``readout="equivariant"``.
        example_inputs: optional tensor or tuple: enables shape-aware analysis (rewriting a literal
            batch size), a check that the traced graph computes what the model does on them
            (where not, the model runs whole, with a ``FallbackWarning``) and a test run of the
            compiled graph.
        mix: layer-wise mode: which layers mix. None: every Conv/Linear after the input stage; a set
            of qualified module names; or a predicate ``(name, module) -> bool`` asked about every
            Conv/Linear that reads a lifted value.
        chunk: global mode: evaluate k slots per pass (an int), or ``"auto"`` (the default): at
            the first call in eval mode for each input shape, measure every k dividing |G| (for
            groups of order 30 and more, about one per factor of 2, of at most 64 passes:
            ``equivfx.passes.chunks.fold_sizes``) and keep the fastest. Peak activation memory
            is about that of the base model at batch k B. In training mode, and while traced or
            exported, all slots run in one pass (batch
            statistics must see every slot). Invariant readouts accumulate chunk by chunk.
            ``"auto"`` falls back to one pass where chunking does not apply (layer-wise mode, whose
            mixing layers read every slot). None: one flat graph, always one pass. A chunked
            module keeps its flat graph as ``emodel.equivfx_flat``.
        twist: layer-wise mode: read the slots through Phi(s)(u) = u . s(u) in mixing layers, which
            makes them G-CNN group convolutions (needs an exact action that fits the feature maps).
        mix_layout: layer-wise mode: ``"gather"`` (copy the |G| permuted slot blocks, then one wide
            layer: bitwise equivariant; without autograd on the CPU the copy reuses a per-thread
            buffer, see ``equivfx.passes.mixing.release_workspace``, and 2D layers measure
            channels-first against channels-last at their first call per input shape, see
            ``equivfx.passes.mixing.GATHER_FORMAT``) or ``"fused"`` (one layer
            with a |G| x |G| block weight on the slots moved onto the feature axis: no permuted
            copy, equivariant up to float rounding; verify such models with a looser ``rtol``).
            ``groups > 1`` convolutions and ``twist=True`` always gather.
        mix_format: layer-wise mode, gather layout: the memory format of this model's gather
            convolutions where the buffer is used: ``"auto"`` follows
            ``equivfx.passes.mixing.GATHER_FORMAT`` (itself ``"auto"``: measured per shape),
            ``"nchw"`` fixes channels-first (conversion stays bitwise), ``"nhwc"`` channels-last.
        optimize: run the cost passes: ``defer-lift`` (ops that commute with the input action,
            or are invariant under it like a sum over a set axis, run once, before the lift; needs
            example inputs for shapes), ``hoist-projection`` (with the mean readout, slots are
            pooled before trailing affine layers) and ``eliminate-dead-slots`` (where elements of
            G act trivially on the value the lift reads, one slot per coset is computed: an
            already invariant DeepSets model under Perm5 runs once, not 120 times). Outputs are
            unchanged up to float rounding; ``optimize=False`` gives the plain construction.
        check: lint the graph and check metadata after every pass (for tests and debugging).

    Returns:
        A ``torch.fx.GraphModule`` with attribute ``equivfx_info`` (:class:`CompileInfo`). In global
        mode its ``state_dict()`` has exactly the keys and tensors of ``model.state_dict()``; in
        layer-wise mode the keys are the same and mixing layers' weights are |G| times wider (new
        tensors: the original model is not changed).

    Raises:
        ModelTypeError: ``model`` is not an nn.Module.
        GroupSpecError: ``group`` is not a valid spec.
        ReadoutError: unknown readout or pool, or ``equivariant`` without ``output_action``.
        BatchMixingError: an op mixes samples of the batch axis; or, on ``example_inputs``, an
            opaque leaf (a module with no op rule) computes something else on the folded batch
            than per slot while ``chunk`` is None, an int above 1, or the mode layer-wise (with
            ``chunk="auto"`` the model runs one slot per pass instead, with a
            ``BatchMixingWarning``; without example inputs ``"auto"`` checks at the first call).
        MissingRuleError: an op on batch-carrying tensors has no rule.
        NotYetSupportedError: ``chunk=k`` in layer-wise mode, or for a graph whose output reads
            the slots other than through a readout.

    Example:
        >>> import torch, equivfx
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(),
        ...                           torch.nn.LazyLinear(10))
        >>> _ = net(torch.zeros(1, 1, 8, 8))
        >>> emodel = equivfx.compile(net, "C4")
        >>> x = torch.randn(2, 1, 8, 8)
        >>> torch.allclose(emodel(x), emodel(torch.rot90(x, 1, (-2, -1))), atol=1e-5)
        True
    """
    if not isinstance(model, nn.Module):
        raise ModelTypeError(
            explain(
                "equivfx.compile needs a torch.nn.Module",
                type(model).__name__,
                "an instance of torch.nn.Module",
                "pass the model object (not its class, a function or a state_dict)",
            )
        )
    _refuse_wrappers(model)
    G = as_group(group)
    if mode not in MODES:
        raise EquivFXError(explain("unknown mode", mode, f"one of {MODES}", "use mode='global'"))
    if mix_layout not in ("gather", "fused"):
        raise EquivFXError(
            explain("unknown mix_layout", mix_layout, "'gather' or 'fused'", "use 'gather'")
        )
    if mix_format not in ("auto", "nchw", "nhwc"):
        raise EquivFXError(
            explain("unknown mix_format", mix_format, "'auto', 'nchw' or 'nhwc'", "use 'auto'")
        )
    if mix_format != "auto" and mix_layout != "gather":
        raise EquivFXError(
            explain(
                "mix_format= applies to mix_layout='gather' only",
                mix_format,
                "mix_layout='gather'",
                "drop mix_format= (the fused layout has one format)",
            )
        )
    layerwise_only = [
        (what, value)
        for what, value, given in (
            ("mix=", mix, mix is not None),
            ("twist=", twist, bool(twist)),
            ("mix_layout=", mix_layout, mix_layout != "gather"),
            ("mix_format=", mix_format, mix_format != "auto"),
        )
        if given
    ]
    if mode == "global" and layerwise_only:
        what, value = layerwise_only[0]
        raise EquivFXError(
            explain(
                f"{what} applies to mode='layerwise' only",
                value,
                "mode='layerwise'",
                f"drop {what} or pass mode='layerwise'",
            )
        )
    if chunk == "auto" and mode == "layerwise":
        chunk = None  # mixing layers read every slot at once: one pass
    if chunk is not None and mode == "layerwise":
        raise NotYetSupportedError(
            explain(
                "chunk= applies to mode='global' only",
                chunk,
                "chunk=None in layer-wise mode",
                "drop chunk=: mixing layers read every slot at once",
            )
        )
    if readout not in READOUTS:
        raise ReadoutError(
            explain("unknown readout", readout, f"one of {READOUTS}", "e.g. readout='invariant'")
        )
    if pool not in POOLS:
        raise ReadoutError(explain("unknown pool", pool, f"one of {POOLS}", "e.g. pool='mean'"))
    if readout == "equivariant" and output_action is None:
        raise ReadoutError(
            explain(
                "readout='equivariant' needs to know how G acts on the output",
                None,
                "output_action",
                f"pass output_action (e.g. output_action={G.spec!r} for outputs "
                "acted on like the input, such as segmentation maps), or use readout='slots'",
            )
        )
    if readout != "equivariant" and output_action is not None:
        raise ReadoutError(
            explain(
                "output_action is only used by readout='equivariant'",
                readout,
                "readout='equivariant'",
                "drop output_action or change readout",
            )
        )
    in_action = as_action(input_action, G, "input_action")
    out_action = as_action(output_action, G, "output_action") if output_action is not None else None
    examples = None if example_inputs is None else as_example_inputs(example_inputs)

    # what forward sets while traced and run on the examples; the buffers it updates
    with untouched(model), kept_buffers(model) as kept:
        result, modes, run_whole, checked = _trace_following_modes(
            model, examples, mode, G, in_action
        )
        _updates_not_repeated(model, kept, result, run_whole)
        propagated = False
        if examples is not None:
            in_action.check(examples[0])
            unfaithful, propagated = _unfaithful(result, model, examples, modes)
            if unfaithful is not None:
                result, modes, run_whole = run_whole_model(model, unfaithful), {}, ()
                checked = frozenset()
                propagated = False
    gm = result.gm
    if modes:
        _warn_mode_dependent(model, modes)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise ModelTypeError(
            explain(
                "the model's forward takes no inputs",
                type(model).__name__,
                "a forward(x, ...) with at least one tensor input",
            )
        )
    acted = placeholders[0].target
    example_batch = None
    if examples is not None:
        first = examples[0]
        if input_action is not None:  # a user's action: its law is checked on the example
            check_action_law(G, in_action, first.detach()[:1])
        example_batch = int(first.shape[0]) if first.dim() else None
        if not propagated:
            with untouched(model), kept_buffers(model):
                _propagate_shapes(gm, copy_tensors(examples))
    options = LiftOptions(
        group=G,
        input_action=in_action,
        acted_input=acted,
        readout=readout,
        pool=pool,
        output_action=out_action,
        example_batch=example_batch,
        checked_leaves=checked,
    )
    if mode == "layerwise":
        twist_action = None
        if twist:
            if not (in_action.exact and in_action.is_permutation):
                raise EquivFXError(
                    explain(
                        "twist=True needs an exact action that only moves entries",
                        in_action.describe(),
                        "e.g. C4, D4 or a shift",
                        "drop twist= for interpolated groups",
                    )
                )
            twist_action = in_action
        pipeline = layerwise_pipeline(
            options,
            MixOptions(
                group=G, mix=mix, twist=twist_action, layout=mix_layout, memory_format=mix_format
            ),
            check=check,
            optimize=optimize,
        )
        mixer = next(p for p in pipeline.passes if isinstance(p, MixLayers))
    else:
        mixer = None
        pipeline = global_pipeline(options, check=check, optimize=optimize)
    with_direct_module_access(gm.graph)  # the code the pipeline's last pass generates
    try:
        gm = pipeline(gm).graph_module
    except EquivFXError as err:
        raise _with_source(err, model, result) from err
    if modes:
        _watch_modes(gm, modes, model.training)
    if mixer is not None and mixer.mixed:
        _warn_tied(model, mixer.mixed)
    gm.equivfx_info = CompileInfo(
        group=G,
        mode=mode,
        readout=readout,
        pool=pool,
        input_action=in_action,
        output_action=out_action,
        acted_input=acted,
        trace_path=result.path,
        leaves=dict(result.leaves),
        passes=tuple(pipeline.names),
        mixed=mixer.mixed if mixer is not None else (),
        output_rep_action=annotated_output_action(gm.graph),
        mode_dependent=modes,
        modes_read=result.modes_read,
        fixed=dict(result.fixed),
        required=result.required,
        modes_run_whole=run_whole,
    )
    leaves = tuple(leaf for leaf in opaque_leaves(gm) if leaf not in checked)
    mixing: dict[str, float] = {}
    unchecked = leaves  # without example inputs, chunk="auto" checks them at the first call
    if examples is not None:
        with untouched(model):
            mixing, unchecked = _test_run(gm, examples, leaves)
        if mixing:
            chunk = _one_slot_per_pass(mixing, mode, chunk)
    gm.equivfx_info = replace(gm.equivfx_info, unchecked_leaves=tuple(unchecked))
    direct_module_access(gm)
    keep_state_through_copies(gm)
    if chunk is not None:
        info = gm.equivfx_info
        try:
            gm = chunked_module(
                gm,
                chunk,
                unchecked_leaves=unchecked if chunk == "auto" else (),
                mixing_leaves=tuple(mixing),
            )
        except NotYetSupportedError as err:
            if mixing:
                raise BatchMixingError(
                    f"{err}\nThe compiled model must run one slot per pass here: "
                    f"{describe_mixing(list(mixing))}. Fix: make them per-sample, or register an "
                    "op rule for them."
                ) from err
            if chunk != "auto":
                raise
            log.info("equivfx: chunk='auto' does not apply to this graph; all slots in one pass")
        else:
            gm.equivfx_info = info
    direct_module_access(gm)  # the chunked module (its own graphs have it: SlotChunks)
    _survive_deepcopy(gm)
    _take_modes(gm, model)
    return gm


def _take_modes(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give the modules compile made the training flag of what they stand for (a fresh module
    has training=True): equivfx's own modules and the root the model's, the plain containers fx
    makes for dotted paths (``block`` of ``block.conv``) the flag of the module they replace."""
    for name, module in gm.named_modules():
        if not name or name.startswith("equivfx"):
            module.training = model.training
        elif type(module) is nn.Module:
            try:
                module.training = model.get_submodule(name).training
            except AttributeError:  # a path the model does not have
                module.training = model.training


def _survive_deepcopy(gm: fx.GraphModule) -> None:
    """``copy.deepcopy`` of a GraphModule keeps only what its graph reads: keep ``equivfx_info``
    (fx's preserved attributes; chunked models keep ``equivfx_flat`` themselves)."""
    gm.meta.setdefault("_user_preserved_attributes", {})["equivfx_info"] = gm.equivfx_info


def _updates_not_repeated(
    model: nn.Module, kept, result: TraceResult, run_whole: tuple[str, ...]
) -> None:
    """Warn of the buffers the traces updated (:func:`~equivfx.trace.warn_buffer_updates`) and
    put them back, and of the hooks of modules traced through (:func:`~equivfx.trace.
    warn_hooks`), those of modules that run whole at each call left out (their code and hooks
    run then)."""
    written = kept.written()
    kept.restore()
    if result.path == "opaque":  # the model runs whole at each call: its own code does all
        return
    whole = [w for w in (*result.leaves, *run_whole) if w]

    def repeated(name: str) -> bool:  # in a module that runs whole at each call
        return any(name == w or name.startswith(f"{w}.") for w in whole)

    written = {name for name in written if not repeated(name)}
    if written:
        warn_buffer_updates(written)
    hooked = [name for name in result.hooked if not repeated(name)]
    if hooked:
        warn_hooks(hooked)
    if any(getattr(model, h, None) for h in HOOK_ATTRIBUTES):
        warnings.warn(  # the compiled model is another module: the model's own are not called
            f"equivfx: the model ({type(model).__name__}) has hooks (forward or backward): the "
            "compiled model is another module, whose calls do not run them. Fix: register them "
            "on the compiled model (emodel.register_forward_hook(...)), which sees its input "
            "and pooled output.",
            SideEffectWarning,
            stacklevel=user_stacklevel(),
        )


def _propagate_shapes(gm: fx.GraphModule, examples: tuple):
    """Run ``gm`` on the examples in eval mode (:func:`eval_mode`), recording each node's
    shapes (``ShapeProp``); returns its output. A model that fails on its own examples is
    refused."""
    with eval_mode(gm):
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints a traceback
                return ShapeProp(gm).propagate(*examples)
        except Exception as err:  # the user's model fails on its own example
            cause = err.__cause__ or err  # ShapeProp wraps it in "ShapeProp error for: ..."
            raise ModelTypeError(
                explain(
                    "the model fails on its example inputs",
                    f"{type(cause).__name__}: {cause}",
                    "example_inputs the model itself runs on",
                    "check the shapes of example_inputs",
                )
            ) from err


def _unfaithful(
    result: TraceResult, model: nn.Module, examples: tuple, modes: dict[str, bool]
) -> tuple[str | None, bool]:
    """Why the traced graph is not the model, judged on the examples: None where both compute
    the same (:func:`~equivfx.passes.leaf_check.outputs_differ`, in eval mode, from the same
    random state), else a reason naming the difference and the arguments the graph does not
    read; and whether the graph's shapes were propagated on the way (:func:`_propagate_shapes`).
    Tracing runs the model's Python once, with Proxies: a test Python answers without them
    (``isinstance(mask, torch.Tensor)`` is False for a Proxy, ``table.get(key)`` misses) takes
    one branch for every call. Not judged for the opaque path (the model itself), where the
    graph holds the training branch of a module that reads its flag (``modes``: eval mode runs
    the other), and for a model that does not reproduce its own output (a generator of its own).
    A model that fails on its examples where its graph runs is refused (ModelTypeError)."""
    placeholders = [n for n in result.gm.graph.nodes if n.op == "placeholder"]
    if result.path == "opaque" or any(modes.values()) or not placeholders:
        return None, False  # (compile refuses a forward without inputs)
    failed = None
    try:
        expected = _run_model(model, examples)
    except Exception as err:  # noqa: BLE001 - reported below, or by the graph's own run
        failed = err
    name = type(model).__name__
    try:
        got = _propagate_shapes(result.gm, copy_tensors(examples))
    except ModelTypeError as err:
        if failed is not None:
            raise  # both fail: the examples do not fit the model
        cause = err.__cause__ or err  # ShapeProp's error, whose cause is the node's
        cause = cause.__cause__ or cause
        why = f"{name}'s traced graph fails on example_inputs where its forward runs "
        return why + f"({type(cause).__name__}: {cause})" + _TRACE_CAUSES, False
    if failed is not None:
        raise ModelTypeError(
            explain(
                "the model fails on its example inputs (its traced graph does not: tracing took "
                "another path)",
                f"{type(failed).__name__}: {failed}",
                "example_inputs the model itself runs on",
                "check the shapes of example_inputs",
            )
        ) from failed
    difference = outputs_differ(got, expected)
    if not difference:
        return None, True
    if outputs_differ(_run_model(model, examples), expected):
        log.info("equivfx: %s does not reproduce its own output: its graph is not checked", name)
        return None, True
    unread = [
        n.target
        for n, value in zip(placeholders[1:], examples[1:], strict=False)
        if not n.users and value is not None
    ]
    hint = (
        f"; it does not read argument(s) {', '.join(map(repr, unread))} that example_inputs passes"
        if unread
        else ""
    )
    return (
        f"{name}'s traced graph computes something else than its forward on example_inputs "
        f"(largest difference {difference:.3g}){hint}" + _TRACE_CAUSES
    ), True


def _run_model(model: nn.Module, examples: tuple):
    """``model`` on copies of the examples in eval mode (:func:`eval_mode`), its lists and dicts
    as fx's interpreter returns them (``immutable_list``, ``immutable_dict``)."""
    with eval_mode(model):
        return fx.node.map_aggregate(model(*copy_tensors(examples)), lambda v: v)


_TRACE_CAUSES = (
    ". Tracing runs forward's Python once, with stand-ins for tensors: a test Python answers "
    "without them (isinstance(arg, torch.Tensor), dict.get on an argument) takes one branch "
    "for every call, a value made while tracing stays a constant (random numbers of a fixed "
    "shape, a buffer updated in place), and the model's own forward hooks do not run"
)


def _test_run(
    gm: fx.GraphModule, examples: tuple, leaves: tuple[str, ...] = ()
) -> tuple[dict, tuple]:
    """Run the compiled graph once on the examples; name the node where it fails.

    Each opaque leaf (a module with no op rule, ``leaves``) is also run on each slot's part of
    its folded input alone (:func:`~equivfx.passes.leaf_check.per_slot_difference`). Returns
    {leaf: largest difference} for the leaves whose output on the folded batch is not the
    concatenation of their outputs per slot (they treat the samples of a batch together, so
    folding the slots into the batch changes what they compute), and the leaves this could not
    tell (inputs it cannot cut, random draws)."""
    failed: list[fx.Node] = []
    mixing: dict[str, float] = {}
    undecided: list[str] = []
    lift = getattr(gm, LIFT_NAME, None)
    slots = len(lift.slots) if lift is not None else 1

    class _Locate(fx.Interpreter):
        def run_node(self, n):
            leaf = n.op == "call_module" and n.target in leaves and slots > 1
            if leaf:  # its inputs as it reads them (it may write them)
                inputs = copy_tensors(self.fetch_args_kwargs_from_env(n))
            try:
                out = super().run_node(n)
            except Exception:
                if not failed:
                    failed.append(n)
                raise
            if leaf:
                err = per_slot_difference(self.fetch_attr(n.target), n, *inputs, out, slots)
                if err is None:
                    undecided.append(n.target)
                elif err:
                    mixing[n.target] = max(err, mixing.get(n.target, 0.0))
            return out

    with eval_mode(gm):
        try:
            _Locate(gm).run(*examples)
        except EquivFXError:
            raise
        except Exception as err:
            node = failed[0] if failed else None
            where = describe_node(node) if node is not None else ""
            raise BatchMixingError(
                f"the compiled model fails on the example inputs at node "
                f"{node.name if node is not None else '?'} ({type(err).__name__}: {err}). With the "
                "slots folded into the batch axis, the batch is |G| times larger: a tensor whose "
                "batch "
                "size is baked in (a literal, or created with a fixed size) no longer lines up. "
                "Fix: "
                "derive batch sizes from x.size(0).\n" + where
            ) from err
    return mixing, tuple(dict.fromkeys(u for u in undecided if u not in mixing))


def _one_slot_per_pass(mixing: dict, mode: str, chunk) -> int:
    """What compile does when opaque leaves treat a batch's samples together (``mixing``, leaf ->
    difference): chunk="auto" runs one slot per pass (each leaf then sees the batch the
    hand-written loop gives it: exact); any other choice is refused."""
    what = (
        f"{describe_mixing(mixing)}: on the |G| slots folded into the batch they compute "
        "something else than on each slot's batch alone"
    )
    if mode == "layerwise":
        raise BatchMixingError(
            explain(
                what,
                mode,
                "leaves that treat each sample on its own (mixing layers read every slot at once)",
                "make the module per-sample (no len(x), batch sums or batch statistics), register "
                "an op rule for it, or use mode='global'",
            )
        )
    if chunk not in ("auto", 1):
        raise BatchMixingError(
            explain(what, chunk, "chunk=1 or chunk='auto'", "pass chunk=1: one slot per pass")
        )
    if chunk == "auto":
        warnings.warn(
            f"equivfx: {what}; the compiled model runs one slot per pass (chunk=1), like the "
            "hand-written loop over g.",
            BatchMixingWarning,
            stacklevel=user_stacklevel(),
        )
    return 1
