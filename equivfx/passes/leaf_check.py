"""Whether opaque leaves treat each sample of a batch on its own (``compile``'s check).

A leaf module with no op rule runs on the folded batch of |G| B samples. That computes the lift
only where the leaf treats each sample alone; a leaf reading ``len(x)``, centring on the batch
mean or reversing the batch computes something else on |G| B samples than on each slot's B.
:func:`per_slot_difference` runs a leaf once more on each slot's part of its folded input and
compares (``compile`` on ``example_inputs``); :func:`outputs_differ` compares two outputs (also
``chunk="auto"``'s first measurement, one slot per pass against every slot in one pass).
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from equivfx.meta import REP, BatchSize, Folded
from equivfx.verify.tolerance import abs_error, tolerance

__all__ = [
    "MIXING_SCALE",
    "MIXING_CAP",
    "copy_tensors",
    "describe_mixing",
    "outputs_differ",
    "per_slot_difference",
]

log = logging.getLogger(__name__)

MIXING_SCALE = 100.0
"""Outputs differ where they differ by more than this many times the dtype's verify tolerance
(capped at :data:`MIXING_CAP`): batch-size-dependent kernels round differently (float32 on the
CPU: about 2e-6), a leaf that reads ``len(x)`` or sums over the batch differs by far more."""

MIXING_CAP = (0.05, 0.05)
"""The largest (rtol, atol) :data:`MIXING_SCALE` may give (bfloat16's tolerance times 100 would
pass almost any pair)."""


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def outputs_differ(a, b) -> float:
    """0.0 where the tensors of ``a`` and ``b`` (pytrees) agree, else their largest difference
    (inf where their structures or shapes differ: a leaf whose output shape follows the batch).

    Each pair of tensors is bounded by its own scale, ``max |a - b| <= atol + rtol * max(|a|,
    |b|)`` over the tensor, with the dtype's tolerance times :data:`MIXING_SCALE` (capped at
    :data:`MIXING_CAP`): a kernel that rounds a batch of 8 B rows otherwise than one of B rows
    moves small outputs as much as large ones (2.7e-4 on outputs near 33 in float32 on the CPU),
    which an element-wise bound would take for mixing. Equal infinities and NaNs agree."""
    if pytree.tree_structure(a) != pytree.tree_structure(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(_tensors(a), _tensors(b), strict=True):
        if x.shape != y.shape:
            return float("inf")
        if x.numel() == 0 or not (x.is_floating_point() or x.is_complex()):
            if not torch.equal(x, y):
                worst = max(worst, abs_error(x, y))
            continue
        error = abs_error(x, y)  # equal infinities: 0; an infinity against a number: inf
        scaled = zip(tolerance(x.dtype), MIXING_CAP, strict=True)
        rtol, atol = (min(MIXING_SCALE * t, cap) for t, cap in scaled)
        finite = [t.detach().abs()[torch.isfinite(t)] for t in (x, y)]
        scale = max((float(f.max()) for f in finite if f.numel()), default=0.0)
        if error > atol + rtol * scale:
            worst = max(worst, error)
    return worst


def copy_tensors(tree):
    """``tree`` with every tensor copied (what a leaf reads, before it may write it)."""
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if type(tree) is tuple and all(type(t) in _FLAT for t in tree):  # most calls' arguments
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in tree)
    if type(tree) is dict and not tree:
        return {}
    return pytree.tree_map_only(torch.Tensor, torch.clone, tree)


_FLAT = frozenset({torch.Tensor, torch.nn.Parameter, int, float, bool, str, type(None)})
"""Types :func:`copy_tensors` copies without flattening (no containers, no subclasses)."""


def describe_mixing(leaves) -> str:
    """ "opaque leaf module(s) ... treat the samples of a batch together", naming ``leaves``
    (names, or a dict name -> largest difference)."""
    if isinstance(leaves, dict):
        names = ", ".join(f"{name!r} (max difference {err:.3g})" for name, err in leaves.items())
    else:
        names = ", ".join(map(repr, leaves))
    return f"opaque leaf module(s) {names} treat the samples of a batch together"


def per_slot_difference(module, node: fx.Node, args, kwargs, out, slots: int) -> float | None:
    """How far the leaf ``module`` (called by ``node`` on ``args``, ``kwargs`` as they were before
    the call, giving ``out``) is from computing on the folded batch what it computes on each
    slot's part alone: 0.0 where it is not (inf where the slots' outputs differ in shape from
    each other or the folded output), None where this cannot tell.

    Folded inputs (values of nodes annotated :class:`Folded`, also inside lists and dicts) are
    cut slot-major along their batch axis, other inputs passed whole, as the folded call gets
    them; the per-slot outputs are joined along the output's batch axis (tensors of a tuple
    each). Cannot tell: inputs or outputs that cannot be cut into ``slots`` parts, a count
    holding the batch size among the inputs (``leaf(h, x.shape[0])``: what would one slot's
    count be?), a leaf that fails on one part, and a leaf whose output changes with the random
    state (run once more, from another seed: dropout in training, noise). The first-call check
    of ``chunk="auto"`` takes the leaves this cannot tell. The calls get copies (a leaf may
    write its input) and the module's buffers are restored after them."""
    out_rep = node.meta.get(REP)
    if not isinstance(out_rep, Folded):
        return None
    arg_nodes, spec = pytree.tree_flatten((node.args, node.kwargs))
    values, value_spec = pytree.tree_flatten((args, kwargs))
    if spec != value_spec:  # a node whose value is itself a container
        return None
    cuts = {}
    for i, (arg, value) in enumerate(zip(arg_nodes, values, strict=True)):
        rep = arg.meta.get(REP) if isinstance(arg, fx.Node) else None
        if isinstance(rep, BatchSize) and rep.batch_dims:  # a count holding |G| B: per slot?
            return None
        if not isinstance(rep, Folded):
            continue
        axis = rep.batch_axis
        if rep.container or not isinstance(value, torch.Tensor) or value.shape[axis] % slots:
            return None
        cuts[i] = value.chunk(slots, axis)
    out_axis = out_rep.batch_axis
    if not cuts or any(t.dim() <= out_axis or t.shape[out_axis] % slots for t in _tensors(out)):
        return None
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    devices = [t.device for t in values if isinstance(t, torch.Tensor) and t.is_cuda]
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(torch.initial_seed() + 1)
            again = module(*copy_tensors(args), **copy_tensors(kwargs))
        if outputs_differ(out, again) != 0.0:  # random draws: the parts would draw others
            return None
        parts = []
        for s in range(slots):
            part = [cuts[i][s] if i in cuts else v for i, v in enumerate(values)]
            args_s, kwargs_s = copy_tensors(pytree.tree_unflatten(part, spec))
            parts.append(module(*args_s, **kwargs_s))
    except Exception as err:  # noqa: BLE001 - the folded call ran; this one cannot tell
        log.info("equivfx: leaf %s fails on one slot's part: %s", node.target, err)
        return None
    finally:
        for name, b in module.named_buffers():
            if name in buffers and b.shape == buffers[name].shape:
                b.copy_(buffers[name])
    structure = pytree.tree_structure(out)
    if any(pytree.tree_structure(p) != structure for p in parts):
        return float("inf")  # its output's structure follows the batch
    leaves = zip(*(pytree.tree_leaves(p) for p in parts), strict=True)
    try:
        joined = [
            torch.cat(ts, out_axis) if isinstance(ts[0], torch.Tensor) else ts[0] for ts in leaves
        ]
    except RuntimeError:  # the slots' outputs differ in shape: it follows the batch
        return float("inf")
    return outputs_differ(out, pytree.tree_unflatten(joined, structure))
