"""Numeric equivariance checks and the localisation of the first node that breaks equivariance.

For each checked element h the verifier compares ``model(h . x)`` with ``h . model(x)`` (the output
action: trivial for an invariance check). It checks every generator always (equivariance on the
generators implies it on the whole group, for an exact action), every element when |G| <= 64, and a
seeded sample beyond.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from equivfx.errors import GroupSpecError, ModelTypeError, explain, user_stacklevel
from equivfx.groups import FiniteGroup, TrivialAction
from equivfx.groups import group as as_group
from equivfx.meta import (
    REP,
    ChannelFolded,
    Folded,
    InputRep,
    OutputRep,
    annotated_output_action,
)
from equivfx.verify.report import INTERPOLATED_NOTE, Report
from equivfx.verify.tolerance import abs_error, check_tolerance, tolerance, within

__all__ = ["verify", "elements_to_check", "ALL_ELEMENTS_UP_TO"]

ALL_ELEMENTS_UP_TO = 64
"""Groups of at most this order are checked on every element."""


def elements_to_check(G: FiniteGroup, samples: int = 32, seed: int = 0) -> list:
    """Generators first, then every other element (|G| <= 64) or a seeded sample of them."""
    chosen = list(dict.fromkeys(G.generators))
    rest = [g for g in G.elements if g not in chosen and g != G.identity]
    if G.order > ALL_ELEMENTS_UP_TO:
        rng = random.Random(seed)
        rest = rng.sample(rest, min(samples, len(rest)))
    return chosen + rest


def _act_tree(action, g, tree):
    leaves, spec = pytree.tree_flatten(tree)
    return pytree.tree_unflatten(
        [action.apply(g, t) if isinstance(t, torch.Tensor) else t for t in leaves], spec
    )


def _leaves(tree) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def verify(
    model: nn.Module,
    example_inputs: Any,
    group: FiniteGroup | str | None = None,
    input_action: Any = None,
    output_action: Any = None,
    rtol: float | None = None,
    atol: float | None = None,
    samples: int = 32,
    seed: int = 0,
    eval_mode: bool = True,
    localize: bool = True,
) -> Report:
    """Check numerically that ``model(g . x) == g . model(x)`` for the group's elements.

    A model compiled by :func:`equivfx.compile` knows its group and actions. For any other model,
    give ``group``; the input action defaults to the group's own and the output action to trivial
    (an invariance check).

    Args:
        model: a compiled model or any nn.Module.
        example_inputs: a tensor, or a tuple whose first entry is the tensor G acts on.
        group: the group (required for models not compiled by equivfx).
        input_action, output_action: override the actions (an Action, a spec string or fn(g, x)).
        rtol, atol: tolerance; default from the per-dtype table.
        samples, seed: elements sampled beyond the generators when |G| > 64.
        eval_mode: run in eval mode (dropout would otherwise draw different masks); the model's
            modes are restored afterwards.
        localize: on failure of a compiled model, find the first node that breaks its
        representation.

    Returns:
        A :class:`~equivfx.verify.report.Report`.

    Raises:
        ModelTypeError: ``model`` is not an nn.Module, or bad example inputs.
        GroupSpecError: no group given for a model equivfx did not compile.

    Example:
        >>> import torch, equivfx
        >>> net = torch.nn.Conv2d(1, 1, 3)
        >>> equivfx.verify(equivfx.compile(net, "C4"), torch.randn(2, 1, 6, 6)).ok
        True
        >>> equivfx.verify(net, torch.randn(2, 1, 6, 6), group="C4").ok
        False
    """
    from equivfx.compiler import as_action, as_example_inputs
    from equivfx.compiler import eval_mode as _eval_mode

    if not isinstance(model, nn.Module):
        raise ModelTypeError(
            explain(
                "equivfx.verify needs a torch.nn.Module",
                type(model).__name__,
                "a model",
                "pass the model object",
            )
        )
    check_tolerance("rtol", rtol)
    check_tolerance("atol", atol)
    inputs = as_example_inputs(example_inputs)
    info = getattr(model, "equivfx_info", None)
    if group is None:
        if info is None:
            raise GroupSpecError(
                explain(
                    "verify needs a group for a model equivfx did not compile",
                    None,
                    "group=...",
                    "pass group='C4' (or the group the model should respect)",
                )
            )
        G = info.group
    else:
        G = as_group(group)
    if input_action is not None:
        in_action = as_action(input_action, G, "input_action")
    elif info is not None and info.group == G:
        in_action = info.input_action
    else:
        in_action = G.action
    if output_action is not None:
        out_action = as_action(output_action, G, "output_action")
    elif info is not None and info.group == G:
        out_action = _output_action_of(getattr(model, "equivfx_flat", model), info)
    else:
        out_action = TrivialAction().bind(G)
    rtol_, atol_ = rtol, atol
    x = inputs[0]
    in_action.check(x)
    elems = elements_to_check(G, samples, seed)
    ctx = _eval_mode(model) if eval_mode else torch.no_grad()
    with ctx:
        y = model(*inputs)
        ys = _leaves(y)
        dtype = ys[0].dtype if ys else x.dtype
        rtol_, atol_ = tolerance(dtype, rtol, atol)
        per: dict[str, float] = {}
        passed = True
        worst = None
        for h in elems:
            hx = in_action.apply(h, x)
            y_h = model(hx, *inputs[1:])
            expected = _act_tree(out_action, h, y)
            got_l, exp_l = _leaves(y_h), _leaves(expected)
            err = 0.0
            ok_h = len(got_l) == len(exp_l)
            for a, b in zip(got_l, exp_l, strict=False):
                err = max(err, abs_error(a, b))
                ok_h = ok_h and within(a, b, rtol_, atol_)
            per[h.name] = err
            if not ok_h:
                passed = False
                if worst is None or err > per[worst.name]:
                    worst = h
        bad_node, detail = None, None
        graph_model = getattr(model, "equivfx_flat", model)  # chunked models keep their flat graph
        if (
            not passed
            and localize
            and isinstance(graph_model, fx.GraphModule)
            and worst is not None
        ):
            bad_node, detail = _first_bad_node(
                graph_model, G, in_action, inputs, worst, rtol_, atol_
            )
    notes = []
    nan = sum(int(torch.isnan(t).sum()) for t in ys if t.is_floating_point() or t.is_complex())
    if nan:  # NaN agrees with NaN below: such values are not checked at all
        passed = False
        total = sum(t.numel() for t in ys)
        notes.append(
            f"the model's outputs on the example contain NaN ({nan} of {total} values): "
            "equivariance cannot be checked there, so the check fails; find where the NaN "
            "comes from (verify compares NaN with NaN as equal)"
        )
    if not G.action.exact or not in_action.exact:
        notes.append(INTERPOLATED_NOTE)
    if info is not None:
        notes.extend(_mixing_leaves(model, info, inputs))
        trained = [n for n, flag in getattr(info, "mode_dependent", {}).items() if flag]
        if trained:
            names = ", ".join(repr(n) if n else "the model" for n in trained)
            notes.append(
                f"compiled with {names} in training mode, and the traced graph depends on that "
                "flag: it computes the training branch here too (verify runs "
                "in eval mode; random draws there make outputs differ between calls); compile "
                "the model in eval mode to verify it for inference"
            )
    return Report(
        ok=passed,
        max_error=max(per.values(), default=0.0),
        per_element=per,
        first_bad_node=bad_node,
        first_bad_node_detail=detail,
        group=G.spec,
        exact=bool(in_action.exact),
        rtol=rtol_,
        atol=atol_,
        dtype=str(dtype).replace("torch.", ""),
        checked=tuple(g.name for g in elems),
        input_action=in_action.describe(),
        output_action=out_action.describe(),
        notes=tuple(notes),
        nan_outputs=nan,
    )


def _mixing_leaves(model: nn.Module, info, inputs: Sequence) -> list[str]:
    """Opaque leaves compile could not check (``info.unchecked_leaves``) of a compiled model
    that folds every slot into the batch, checked here on verify's inputs: where they treat the
    samples of a batch together the model is equivariant but not the lift of the original (a
    note, and a BatchMixingWarning). Models running one slot per pass (``chunk=1``, or found
    mixing) are exact, and ``chunk="auto"`` checks at its first call (verify's calls) itself."""
    from equivfx.compiler import _test_run
    from equivfx.passes.annotate import BatchMixingWarning, opaque_leaves
    from equivfx.passes.leaf_check import describe_mixing

    unchecked = getattr(info, "unchecked_leaves", ())
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    runner = getattr(model, "equivfx_chunks", None)
    if not unchecked or (
        runner is not None and (runner.chunk in (1, "auto") or runner.mixing_leaves)
    ):
        return []
    flat = getattr(model, "equivfx_flat", model)
    leaves = (
        tuple(n for n in opaque_leaves(flat) if n in unchecked)
        if isinstance(flat, fx.GraphModule)
        else ()
    )
    if not leaves:  # a reloaded model: its graph lost the annotations the check reads
        return [
            f"opaque leaf module(s) {', '.join(map(repr, unchecked))} could not be checked to "
            "treat each sample on its own (the model's graph lost its annotations: reloaded or "
            "wrapped); compile with example_inputs= to have them checked"
        ]
    with torch.no_grad():
        mixing, _ = _test_run(flat, tuple(inputs), leaves)
    if not mixing:
        return []
    fix = (
        "make them treat each sample on its own, register an op rule, or use mode='global'"
        if info.mode == "layerwise"
        else "recompile with example_inputs= (one slot per pass) or chunk=1"
    )
    note = (
        f"{describe_mixing(mixing)}: with every slot folded into the batch the model is not the "
        f"lift of the original (it may still be equivariant); {fix}"
    )
    warnings.warn(f"equivfx.verify: {note}", BatchMixingWarning, stacklevel=user_stacklevel())
    return [note]


def _output_action_of(model: fx.GraphModule, info):
    action = annotated_output_action(model.graph)
    if action is None:  # unpickled: the graph lost its annotations
        action = getattr(info, "output_rep_action", None)
    return action if action is not None else TrivialAction().bind(info.group)


def _first_bad_node(gm: fx.GraphModule, G, in_action, inputs: Sequence, h, rtol, atol):
    """Run the graph on x and on h.x; return the first node whose values break its
    representation."""
    env_x = _record(gm, inputs)
    env_h = _record(gm, (in_action.apply(h, inputs[0]), *inputs[1:]))
    lift = getattr(gm, "equivfx_lift", None)  # fewer slots computed after eliminate-dead-slots
    h_index = G.element(h).index
    perm = torch.tensor(
        lift.slot_permutation(h_index) if lift is not None else G.regular_permutation(h)
    )
    for node in gm.graph.nodes:
        rep = node.meta.get(REP)
        if node not in env_x or node not in env_h or rep is None:
            continue
        vx, vh = env_x[node], env_h[node]
        expected = _expected(rep, G, h, vx, perm)
        if expected is None:
            continue
        got_l, exp_l = _leaves(vh), _leaves(expected)
        if len(got_l) != len(exp_l):
            continue
        for a, b in zip(got_l, exp_l, strict=True):
            if not within(a, b, rtol, atol):
                from equivfx.passes.rules import describe_node

                err = abs_error(a, b)
                detail = (
                    f"value of node {node.name} breaks its representation {rep.describe()} "
                    f"under {h.name}: max error {err:.3g}\n{describe_node(node)}"
                )
                return node.name, detail
    return None, None


def _expected(rep, G, h, vx, perm):
    if isinstance(rep, InputRep):
        return _act_tree(rep.action, h, vx)
    if isinstance(rep, OutputRep):
        return _act_tree(rep.action, h, vx)
    if isinstance(rep, (Folded, ChannelFolded)):
        at = rep.batch_axis if isinstance(rep, Folded) else rep.axis  # the slots' blocks

        def permute(t):
            if not isinstance(t, torch.Tensor) or not -t.dim() <= at < t.dim():
                return t
            axis = at % t.dim()
            n, slots = t.shape[axis], len(perm)
            if n % slots:
                return t
            s = t.unflatten(axis, (slots, n // slots))
            s = s.index_select(axis, perm.to(t.device))
            return s.flatten(axis, axis + 1)

        return pytree.tree_map(permute, vx)
    return None


def _record(gm: fx.GraphModule, inputs: Sequence) -> dict:
    env: dict = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            env[n] = out
            return out

    _Rec(gm).run(*inputs)
    return env
