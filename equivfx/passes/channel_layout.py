"""``keep-channel-layout``: between fused mixing layers, the slots stay on the channel axis.

A fused mixing convolution (``mix_layout="fused"``) moves the folded slots onto the channel axis,
(|G| B, C, ...) -> (B, |G| C, ...), runs one convolution with the block weight and moves its output
back. Ops between two such layers that treat every channel of every sample alike (activations,
pools, residual sums) give the same values in either layout, so the moves between them cancel::

    conv2 (fused) -> [move back] -> relu -> [move] -> conv3 (fused)

    conv2 (fused, channels_out) -> relu -> conv3 (fused, channels_in)

This is the layout a G-CNN library keeps throughout (e2cnn's regular fields are (B, |G| C, H, W)).
The values between are :class:`~equivfx.meta.ChannelFolded`; each is moved back to folded slots
right before any other op that reads it (a flatten, a readout, a softmax). Fused linear layers
(:class:`~equivfx.passes.mixing.MixingLinear`) do the same on their feature layout
(B, ..., |G| F) (``ChannelFolded(axis=-1)``), through the ops that act on every element alike:
not pools (they would pool across the blocks on the last axis), and batch norms only where the
example inputs show the values are two-dimensional (checked again at each call: the same graph
may be called on other ranks). A pool keeps a convolution's layout only where it pools exactly
its spatial axes (a 2-D pool on a Conv1d's output would pool the channels too).

The outputs are those of the fused layout without the pass, bitwise: the layers read the same
tensors, and the ops between are elementwise or per channel; but PyTorch's CPU kernels for
exp-based activations (sigmoid, SiLU, ELU, SELU, CELU, Mish, softplus, tanh-approximated GELU)
compute a tensor's last partial vector with scalar code, so an element the two layouts place
differently there may differ in its last bit (rows of fewer than 32 elements per slot); and a
value moved in is a contiguous copy where without the pass it may have been channels-last or a
transposed view (strides that eager elementwise ops hand on): ops that compute in memory order
(dropout's masks, RMS norms) do not read values computed from it (it stays in folded slots
there), but a reduction outside the region reads a contiguous copy and may differ in its last
bits (a ViT's mean over its tokens, a transposed view of its patches: 6e-8; a ResNet's mean
over the spatial axes once converted to channels-last after compiling), as may a batch norm's
statistics in training on such a model. Gradients
are equal too, up to that and the order in which autograd sums a value's gradient terms (where a
value is read both inside the region and outside it, or twice by one op outside, some terms are
summed before the others: 1e-9 to 3e-8 apart in tests).

The ops that keep the layout (:func:`_keeps_layout`): the activations of :data:`UNARY_MODULES`,
:data:`UNARY_FUNCTIONS` and :data:`UNARY_METHODS`; max, average and adaptive pools (without
indices); ``nn.Identity``; sums, differences and products of two such values with the same
channels per slot (a residual sum), or of one with a number; batch norms (``nn.BatchNorm1d``
to ``3d``); layer and RMS norms of rows within one slot (:data:`ROW_NORMS`, and their functional
forms with the model's weights, :data:`ROW_NORM_FUNCTIONS`); and dropout
modules (:data:`DROPOUTS`). Modules stay the model's own, called by
:func:`channel_call`: a batch norm in eval mode on a view of the layout as (B |G|, C, ...) (the
same samples in another order), in training on the slots moved back and forth (batch
statistics must sum in the same order); dropout in eval mode (the identity) on the layout, in
training on the slots moved back and forth (its masks are drawn in the folded slots' order, the
same masks as without the pass); and any module with hooks added after compiling, or put in its
place, on the slots moved back and forth too.
Modules with hooks at compile time do not keep it (nor does anything while global module hooks
exist: they would see the mixing layers' channel layout), nor other modules with
per-channel parameters (PReLU with several weights), anything that reads a dimension (softmax,
flatten), or draws random numbers in functional form (``F.dropout`` with ``training=True``
written out; ``training=False`` is the identity, which keeps the layout: :func:`_eval_dropout`;
``training=self.training``, which compile reads at each call, is called like a dropout module
by :func:`dropout_call`: :func:`_mode_dropout`). A value in folded
slots that such an op reads moves in once, and feeds the fused layers reading it too (a residual
stream, a shortcut ``nn.Identity`` beside a block's first convolution). A value is kept in the
channel layout only where it reaches a fused layer's input through such ops (an in-place op on
it joins it, ``y.relu_()`` as a statement), and not where a write in place follows its first
reader outside the region (that reader gets a copy, which the write would not reach) or a fused
layer's read (that layer saved it for backward), nor a value moved in that a write reaches
afterwards (directly, or through an alias such as a shortcut ``nn.Identity``).

The fused layers that take or give the layout are called through :func:`mixer_call` (their
``channels_in``/``channels_out`` keywords), which calls a layer hooked after compiling on folded
slots as before. Not covered (compile after such a change, or with ``optimize=False``): which
modules write in place is read at compile time (``inplace = True`` set later on a module whose
input is kept may write a copy that another reader does not see).
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from equivfx.meta import REP, ChannelFolded, Folded, Trivial, set_rep, slot_major
from equivfx.passes.infra import Pass, PassResult, new_node_origin
from equivfx.passes.mixing import (
    MixingLayer,
    MixingLinear,
    _MixingConv,
    channels_to_slots,
    slots_to_channels,
)
from equivfx.passes.modules import global_hooks, hooked
from equivfx.passes.rules import DROPOUT_FUNCTIONS, draws_random, mutates
from equivfx.trace import by_mode

__all__ = [
    "KeepChannelLayout",
    "channel_call",
    "mixer_call",
    "row_norm_call",
    "UNARY_MODULES",
    "UNARY_FUNCTIONS",
    "UNARY_METHODS",
]

UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
"""Module types (exactly these: a subclass may override ``forward``) that act on every channel
of every sample alike."""

UNARY_FUNCTIONS = frozenset(
    {
        torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
        F.gelu, F.silu, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardtanh,
        F.hardswish, F.hardsigmoid, F.softplus, F.softsign, torch.abs,
        F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    }
)  # fmt: skip
"""Functions of one tensor (and numbers) that act on every channel of every sample alike."""

UNARY_METHODS = frozenset(
    {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "abs_", "clamp", "clamp_"}
)
"""Tensor methods of the same kind."""

BINARY_FUNCTIONS = frozenset(
    {
        operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
        torch.add, torch.sub, torch.mul,
    }
)  # fmt: skip
"""Elementwise sums, differences and products."""

BINARY_METHODS = frozenset({"add", "add_", "sub", "sub_", "mul", "mul_"})
"""Tensor methods of the same kind."""

POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}  # fmt: skip
"""The pools of :data:`UNARY_MODULES`, with the number of trailing axes they pool. They keep
the channel layout (B, |G| C, *spatial) where they pool exactly the spatial axes: a pool of d
axes on a tensor of d + 1 (an unbatched input to it) pools the channel axis too, across the
slots' blocks, and every pool would on the feature layout of linear layers."""

POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
    F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
}  # fmt: skip
"""The pools of :data:`UNARY_FUNCTIONS`, likewise."""

_POOLS_WITH_INDICES = {  # the position of return_indices among the function's arguments
    F.max_pool1d: 6, F.max_pool2d: 6, F.max_pool3d: 6,
    F.adaptive_max_pool1d: 2, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 2,
}  # fmt: skip


NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
"""Batch norms (exactly these types) that keep the channel layout."""

ROW_NORMS = (nn.LayerNorm, nn.RMSNorm)
"""Norms over a value's trailing axes (exactly these types), row by row: they keep a linear
layer's feature layout where they normalise the features, (F,) (:func:`channel_call` views the
layout as (B, ..., |G|, F)), and a convolution's channel layout where they normalise spatial
axes only (rows within one channel). RMS norms sum in their input's memory order: like dropout,
not after a value moved in (a contiguous copy of what may have been channels-last or a
transposed view)."""

DROPOUTS = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout
)  # fmt: skip
"""Dropout modules (exactly these types): the identity in eval mode, so they keep any layout;
in training :func:`channel_call` runs them on the slots moved back. Their masks are drawn in the
input's memory order, so they keep the layout only where their input is computed from fused
layers' outputs and values moved in that are contiguous at every call (a linear layer's output:
:func:`_contiguous`), as without the pass; a value moved in that may have had
other strides (channels-last, a transposed view, which eager elementwise ops hand on) stays in
folded slots where such an op, kept or not, reads a value computed from it (a copy moved back
would be contiguous too). RMS norms likewise (see :data:`ROW_NORMS`)."""


ROW_NORM_FUNCTIONS = {"layer_norm": F.layer_norm, "rms_norm": F.rms_norm}
"""The functional forms of :data:`ROW_NORMS` (a ``nn.LayerNorm`` subclass with its own
``forward``, as timm's, traces into ``F.layer_norm``): they keep a layout where the module
would, with the weights as ``get_attr`` arguments; :func:`row_norm_call` calls them."""


def row_norm_call(x: torch.Tensor, name: str, n: int, axis: int, *args, **kwargs) -> torch.Tensor:
    """``F.layer_norm`` or ``F.rms_norm`` (``name``) with the arguments after the input on the
    layout of n slots (``axis`` 1: (B, n C, ...), -1: (B, ..., n F)), as :func:`channel_call`
    calls the modules: on the layout where it normalises spatial axes of the channel layout, on
    a view (B, ..., n, F) where it normalises the features; on the slots moved back and forth
    while autograd records its weights' gradients (they sum over the rows in the rows' order)."""
    if isinstance(x, fx.Proxy):  # traced again (torch.load of the module): one call, as here
        return x.tracer.create_proxy(
            "call_function", row_norm_call, (x, name, n, axis, *args), kwargs
        )
    norm = ROW_NORM_FUNCTIONS[name]
    shape = tuple(args[0] if args else kwargs["normalized_shape"])
    weights = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not (torch.is_grad_enabled() and any(w.requires_grad for w in weights)):
        if axis % x.dim() == 1 and len(shape) <= x.dim() - 2:  # rows within one channel
            return norm(x, *args, **kwargs)
        if axis % x.dim() == x.dim() - 1 and shape == (x.shape[-1] // n,):
            return norm(x.unflatten(-1, (n, -1)), *args, **kwargs).flatten(-2)
    slots = channels_to_slots(x, n, axis)
    return slots_to_channels(norm(slots, *args, **kwargs), n, axis)


def _row_norm_function(node: fx.Node) -> tuple | None:
    """The normalised shape of a call of a :data:`ROW_NORM_FUNCTIONS` function on one value
    whose other tensor arguments are the model's own (``get_attr``: weights) and whose shape
    is literal; else None."""
    if node.op != "call_function" or node.target not in ROW_NORM_FUNCTIONS.values():
        return None
    if not node.args or not isinstance(node.args[0], fx.Node) or "out" in node.kwargs:
        return None
    if any(a.op != "get_attr" for a in node.all_input_nodes if a is not node.args[0]):
        return None
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not all(type(d) is int for d in shape):
        return None
    return tuple(shape)


def _row_norm_keeps(shape: tuple, layout: Layout) -> bool:
    """A norm of the trailing ``shape`` keeps ``layout``: rows of a slot's features, or spatial
    axes of a convolution's channel layout."""
    if layout.axis == -1:
        return shape == (layout.channels,)
    return layout.rank is not None and len(shape) <= layout.rank - 2


_NOT_DROPOUT = object()


def _dropout_flag(node: fx.Node):
    """The training flag ``node`` passes to a functional dropout
    (:data:`~equivfx.passes.rules.DROPOUT_FUNCTIONS`; their third argument, True where left
    out): a constant, or a node (:func:`equivfx.trace.by_mode`); ``_NOT_DROPOUT`` for other
    nodes."""
    if node.op != "call_function" or node.target not in DROPOUT_FUNCTIONS:
        return _NOT_DROPOUT
    if len(node.args) > 2:
        return node.args[2]
    return node.kwargs.get(DROPOUT_FUNCTIONS[node.target], True)


def _eval_dropout(node: fx.Node) -> bool:
    """``node`` is a functional dropout whose training flag is literally False: it returns its
    input, the identity in any layout. Otherwise it draws masks in the input's memory order and
    ends the layout (or, with a flag read at each call, is called like a dropout module:
    :func:`_mode_dropout`)."""
    return _dropout_flag(node) is False


def _qualified(fn) -> str:
    return f"{fn.__module__}.{fn.__name__}"


DROPOUT_NAMES = {_qualified(fn): fn for fn in DROPOUT_FUNCTIONS}
"""The functional dropouts by qualified name (``torch.nn.functional.dropout``, ``torch.dropout``):
how :func:`dropout_call` names the one it calls in generated code."""


def _mode_dropout(node: fx.Node) -> bool:
    """``node`` is a functional dropout on one tensor whose training flag the compiled model
    reads at each call (:func:`equivfx.trace.by_mode`, from ``F.dropout(x, p,
    self.training)``): like a dropout module, the identity in eval mode and masks in training
    (:func:`dropout_call`)."""
    flag = _dropout_flag(node)
    if not isinstance(flag, fx.Node):  # a constant, or not a dropout
        return False
    rest = [*node.args[1:], *node.kwargs.values()]
    inplace = node.kwargs.get("inplace", node.args[3] if len(node.args) > 3 else False)
    return (
        inplace is False  # an in-place dropout writes its input: on the layout it would not
        and flag.op == "call_function"
        and flag.target is by_mode
        and all(not isinstance(a, fx.Node) or a.target is by_mode for a in rest)
    )


def _data_inputs(node: fx.Node) -> list[fx.Node]:
    """The values ``node`` computes on: its inputs, less a flag-read dropout's flag and
    probability (:func:`_mode_dropout`)."""
    return [node.args[0]] if _mode_dropout(node) else node.all_input_nodes


def dropout_call(x: torch.Tensor, name: str, n: int, axis: int, *args, **kwargs) -> torch.Tensor:
    """The functional dropout ``name`` (:data:`DROPOUT_NAMES`) with the arguments after the
    input, its training flag read at each call, on the layout of n slots (``axis`` 1: (B, n C,
    ...), -1: (B, ..., n F)), as :func:`channel_call` calls dropout modules: in eval mode (the
    identity) on the layout, in training on the slots moved back and forth (its masks are drawn
    in the folded slots' order, the masks it drew without the pass)."""
    if isinstance(x, fx.Proxy):  # traced again (torch.load of the module): one call, as here
        args = (x, name, n, axis, *args)
        return x.tracer.create_proxy("call_function", dropout_call, args, kwargs)
    fn = DROPOUT_NAMES[name]
    flag = DROPOUT_FUNCTIONS[fn]
    if not (args[1] if len(args) > 1 else kwargs.get(flag, True)):
        return fn(x, *args, **kwargs)  # the identity: x itself
    slots = channels_to_slots(x, n, axis)
    return slots_to_channels(fn(slots, *args, **kwargs), n, axis)


def channel_call(x: torch.Tensor, module: nn.Module, n: int, axis: int = 1) -> torch.Tensor:
    """``module`` (the model's own, called: hooks run) on the channel layout (B, n C, ...) of n
    slots (``axis=-1``: the feature layout (B, ..., n F)), as the compiled graph calls every
    module that keeps the layout.

    - an activation or pool of :data:`UNARY_MODULES`: on the layout itself (a pool only where
      it pools exactly the spatial axes of the channel layout);
    - a dropout module of :data:`DROPOUTS` in eval mode (the identity): on the layout;
    - a layer norm or RMS norm of :data:`ROW_NORMS`: on the layout where it normalises spatial
      axes of the channel layout, on a view of the feature layout as (B, ..., n, F) where it
      normalises the features (rows of the same values, alone); but while autograd records
      the gradients of its weights, on the slots moved back and forth (they sum over the rows
      in the rows' order);
    - a batch norm in eval mode with running statistics: on a view of the layout as
      (B n, C, ...), the same samples as the folded slots in another order, each sample and
      channel normalised alone (per element the same arithmetic);
    - otherwise on the slots moved back, then moved in again: a batch norm in training (batch
      statistics, whose sums would run in another order), dropout in training (masks drawn in
      the folded slots' order), a module with hooks (added after
      compiling: they see the folded slots as before), a module put in its place after compiling
      (``emodel.bn = nn.Identity()`` after folding it into the convolution). What the module
      wrote into its input is written into ``x`` (whether a module writes in place is otherwise
      read at compile time: ``inplace`` set later is not seen by the pass's analysis)."""
    if isinstance(x, fx.Proxy):  # traced again (torch.load of the module): one call, as here
        args = (x, module, n) if axis == 1 else (x, module, n, axis)
        return x.tracer.create_proxy("call_function", channel_call, args, {})
    kind = type(module)
    channels = axis % x.dim() == 1  # the blocks on the channel axis (for 2-D: the last one)
    if not hooked(module):
        if (
            kind in UNARY_MODULES
            and not getattr(module, "return_indices", False)
            and (kind not in POOL_MODULES or (channels and POOL_MODULES[kind] == x.dim() - 2))
        ):
            return module(x)
        if kind in DROPOUTS and not module.training:
            return module(x)
        if kind in ROW_NORMS and not _learns(module):
            rows = len(module.normalized_shape)
            if channels and rows <= x.dim() - 2:  # spatial axes: rows within one channel
                return module(x)
            if axis % x.dim() == x.dim() - 1 and tuple(module.normalized_shape) == (
                x.shape[-1] // n,
            ):
                return module(x.unflatten(-1, (n, -1))).flatten(-2)
        if kind in NORMS and channels and not module.training and module.running_mean is not None:
            samples = x.unflatten(1, (n, -1)).flatten(0, 1)
            return module(samples).unflatten(0, (-1, n)).flatten(1, 2)
    slots = channels_to_slots(x, n, axis)
    version = slots._version
    out = module(slots)
    if slots._version != version:
        x.copy_(slots_to_channels(slots, n, axis))  # what it wrote into its input, written into x
    # a module that returns its input (an identity, dropout with p = 0 or in eval mode) returns
    # x, whose later writes reach its input as without the pass
    return x if out is slots else slots_to_channels(out, n, axis)


def mixer_call(
    x: torch.Tensor, mixer: nn.Module, n: int, cin: bool, cout: bool, axis: int = 1
) -> torch.Tensor:
    """The fused mixing layer ``mixer`` taking (``cin``) or giving (``cout``) the channel layout
    of n slots (``axis=-1``: a linear layer's feature layout (B, ..., n F)), as the compiled
    graph calls it where the values around it keep that layout. A
    mixer hooked after compiling (global hooks included), or another module put in its place, is
    called on folded slots, as without the pass (its hooks see (|G| B, C, ...)), and the moves are
    made around it."""
    if isinstance(x, fx.Proxy):  # traced again (torch.load of the module): one call, as here
        args = (x, mixer, n, cin, cout) if axis == 1 else (x, mixer, n, cin, cout, axis)
        return x.tracer.create_proxy("call_function", mixer_call, args, {})
    if (
        isinstance(mixer, MixingLayer)
        and mixer.layout == "fused"
        and isinstance(mixer, MixingLinear) == (axis == -1)
        and not hooked(mixer)
    ):
        return mixer(x, channels_in=cin, channels_out=cout)
    y = mixer(channels_to_slots(x, n, axis) if cin else x)
    return slots_to_channels(y, n, axis) if cout else y


class KeepChannelLayout(Pass):
    name = "keep-channel-layout"
    requires = frozenset({REP, "equivfx.mixed"})
    provides = frozenset({REP})

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modules = dict(gm.named_modules())
        mixers = {n: m for n in gm.graph.nodes if (m := _fused_mixer(n, modules)) is not None}
        if len(mixers) < 2 or global_hooks():  # global hooks would see the mixers' layout
            return PassResult(gm, False)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        refused: set[fx.Node] = set()
        while True:
            kept, entries, clashes = _region(gm.graph, mixers, modules, refused, order)
            hazards = clashes | _hazards(kept, entries, mixers, modules, order)
            if not hazards:
                break
            refused |= hazards
        if not kept:
            return PassResult(gm, False)
        slots = next(iter(mixers.values())).module.order
        graph = gm.graph
        for value, layout in entries.items():  # moved once, right after it is computed
            with graph.inserting_after(value):
                moved = graph.call_function(slots_to_channels, _move_args(value, slots, layout))
            new_node_origin(moved, self.name)
            set_rep(moved, ChannelFolded(slots, layout.axis), "channel-layout")
            for user in list(value.users):
                if user is not moved and _reads_kept(user, value, kept, mixers, layout):
                    user.replace_input_with(value, moved)
            kept[moved] = layout
        for node in list(graph.nodes):
            if node not in kept:
                continue
            layout = kept[node]
            for user in [u for u in node.users if not _reads_kept(u, node, kept, mixers)]:
                with graph.inserting_before(user):  # a copy in folded slots, made right before
                    back = graph.call_function(channels_to_slots, _move_args(node, slots, layout))
                new_node_origin(back, self.name)
                set_rep(back, Folded(0), "channel-layout")
                if "tensor_meta" in node.meta:
                    back.meta["tensor_meta"] = node.meta["tensor_meta"]
                user.replace_input_with(node, back)
            set_rep(node, ChannelFolded(slots, layout.axis), node.meta.get("equivfx.rule"))
            node.meta.pop("tensor_meta", None)  # its shape is (B, |G| C, ...) now
        # through mixer_call where they take or give the channel layout (decided for all first:
        # replacing one changes its readers' arguments)
        flags = {n: (_reads_kept(n, n.args[0], kept, mixers), n in kept) for n in mixers}
        for node, (cin, cout) in flags.items():
            if cin or cout:
                axis = () if mixers[node].reads.axis == 1 else (-1,)
                _call_through(gm, node, mixer_call, (node.args[0], None, slots, cin, cout, *axis))
        for node in [n for n in graph.nodes if n in kept and n.op == "call_module"]:
            if node not in mixers:  # modules: through channel_call (see there)
                args = _move_args(node.args[0], slots, kept[node])
                _call_through(gm, node, channel_call, (args[0], None, *args[1:]))
        for node in [n for n in graph.nodes if n in kept and _mode_dropout(n)]:
            name = _qualified(node.target)
            node.target = dropout_call
            node.args = (node.args[0], name, slots, kept[node].axis, *node.args[1:])
        for node in [n for n in graph.nodes if n in kept and _row_norm_function(n) is not None]:
            name = node.target.__name__
            node.target = row_norm_call
            node.args = (node.args[0], name, slots, kept[node].axis, *node.args[1:])
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)


def _call_through(gm: fx.GraphModule, node: fx.Node, fn, args: tuple) -> None:
    """Make the call of a module a call of ``fn(*args)``, the module (a ``get_attr`` of it) in
    place of the None in ``args``: the same node, so its name (which ``verify`` reports), its
    metadata and its users stay."""
    with gm.graph.inserting_before(node):
        module = gm.graph.get_attr(node.target)
    new_node_origin(module, KeepChannelLayout.name)
    set_rep(module, Trivial(), "channel-layout")
    node.op, node.target = "call_function", fn
    node.args, node.kwargs = tuple(module if a is None else a for a in args), {}


class Layout(NamedTuple):
    """Where a kept value's slot blocks lie: ``axis`` 1 (convolutions' channels,
    (B, |G| C, *spatial)) or -1 (the features of linear layers, (B, ..., |G| F), whatever the
    rank at run time: a graph compiled on 2-D example inputs may be called on 3-D ones), its
    rank where known (convolutions: always; linear layers: from the example inputs), and the
    channels (features) per slot."""

    axis: int
    rank: int | None
    channels: int


class _Mixer(NamedTuple):
    """A fused mixing layer the pass may hand the layout to: the layout it reads and gives."""

    module: MixingLayer
    reads: Layout
    gives: Layout


def _fused_mixer(node: fx.Node, modules) -> _Mixer | None:
    """The fused mixing layer ``node`` calls on folded slots in axis 0, if it does."""
    if node.op != "call_module" or not node.meta.get("equivfx.mixing"):
        return None
    m = modules.get(node.target)
    if not isinstance(m, MixingLayer) or m.layout != "fused":
        return None
    if (
        node.kwargs.get("batch_axis", 0)
        or len(node.args) != 1
        or not node.kwargs.keys() <= {"batch_axis"}
    ):
        return None
    rep = node.args[0].meta.get(REP) if isinstance(node.args[0], fx.Node) else None
    if not slot_major(rep):
        return None
    if isinstance(m, _MixingConv):
        rank = m.weight.dim()
        return _Mixer(m, Layout(1, rank, m.in_channels // m.order), Layout(1, rank, m.out_channels))
    rank = _rank(node.args[0]) or _rank(node)
    return _Mixer(m, Layout(-1, rank, m.in_features // m.order), Layout(-1, rank, m.out_features))


def _rank(node: fx.Node) -> int | None:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return None if shape is None else len(shape)


def _move_args(value: fx.Node, slots: int, layout: Layout) -> tuple:
    """The arguments of a move of ``value`` between folded slots and ``layout``."""
    return (value, slots) if layout.axis == 1 else (value, slots, layout.axis)


def _region(graph: fx.Graph, mixers: dict, modules, refused: set, order: dict):
    """The values kept in the channel layout (fused mixing layers' outputs and ops that keep the
    layout, where they reach a fused layer's input through such ops), and the values in folded
    slots moved into it once (``entries``: the other operand of a residual sum). ``order``: each
    node's position in the graph."""
    shapes: dict[fx.Node, Layout] = {}  # kept value -> its layout
    movable: dict[fx.Node, frozenset[Layout]] = {}  # folded value -> the layouts it could take
    reads: dict[fx.Node, list[fx.Node]] = {}  # kept op -> the folded values it would move
    # values computed from values moved in (-> those values), kept or from a copy moved back:
    # contiguous, where without the pass they had their strides (channels-last, a transposed
    # view; eager elementwise ops hand strides on), so a dropout would draw another mask and an
    # RMS norm sum in another order (_memory_order): such values do not move in
    restrided: dict[fx.Node, set[fx.Node]] = {}
    strided_reads: set[fx.Node] = set()
    for node in graph.nodes:
        if node in refused:
            continue
        # computed from kept values (or copies moved back) that may have other strides
        inherited = set().union(*(restrided.get(a, ()) for a in node.all_input_nodes))
        if inherited and _memory_order(node, modules):
            strided_reads |= inherited
        if node in mixers:
            shapes[node] = mixers[node].gives
            continue
        if _fresh(node, modules):  # a new tensor in its own order, whatever its input's strides
            inherited = set()
        kept = _keeps_layout(node, modules, shapes, movable, refused)
        if kept is None:
            kept = _moves_in(node, modules, mixers, movable, refused)
        strided = {v for v in kept[1] if not _contiguous(v, modules)} if kept else set()
        if kept is not None and _memory_order(node, modules) and strided:
            kept = None  # it reads the value itself, as without the pass
        sources = (strided if kept is not None else set()) | inherited
        if sources:
            restrided[node] = sources
        if kept is not None:
            shapes[node], reads[node] = kept
        else:
            shape = _slot_shape(node, modules, movable)
            if shape is not None:
                movable[node] = shape
    useful: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node in shapes and any(
            (u in mixers and u.args[0] is node and mixers[u].reads == shapes[node])
            or (u in useful and u not in mixers)
            for u in node.users
        ):
            useful.add(node)
    # an op writing a kept value in place (``y.relu_()`` as a statement, its result unread) writes
    # it in the region: read outside, the write would land in a copy
    grown = True
    while grown:
        writers = {
            n
            for n in shapes
            if n not in useful and mutates(n, modules) and n.args and n.args[0] in useful
        }
        useful |= writers
        grown = bool(writers)
    entries: dict[fx.Node, Layout] = {}
    clashes = set(strided_reads)  # and ops that would move a value into a second layout
    for n in sorted(useful, key=order.__getitem__):
        for v in reads.get(n, ()):
            if entries.setdefault(v, shapes[n]) != shapes[n]:
                clashes.add(n)
    return {n: shapes[n] for n in useful}, entries, clashes


def _reads_kept(user: fx.Node, node: fx.Node, kept: dict, mixers: dict, layout=None) -> bool:
    """``user`` reads ``node`` in the channel layout (it keeps it, or is a fused layer reading it
    as its input, in its layout: ``node``'s, or ``layout`` for a value moved in)."""
    if user in mixers:
        return user.args[0] is node and (layout or kept.get(node)) == mixers[user].reads
    return user in kept


def _hazards(kept: dict, entries: dict, mixers: dict, modules, order: dict) -> set[fx.Node]:
    """What must not keep the layout because of writes in place.

    - A kept value read outside the region gets a copy made right before that reader: a later
      write to the value (by a kept op) would not reach the copy, and a later write outside
      (to an alias the reader made, or by the reader itself) would not reach the value.
    - A fused layer reading a kept value saves that tensor for its weight's gradient (without
      the pass it saved the copy it made): a later kept write to it would make backward fail.
    - A value moved in (an entry) is copied once: a later write outside the region may be a
      write to it or an alias; an in-place sum into an entry would write the copy.

    Kept ops write only kept values (an in-place op's result is its input: they share storage);
    those are tracked exactly, other writes by position."""
    writes = {n for n in order if mutates(n, modules)}
    storage: dict[fx.Node, fx.Node] = {}  # kept value -> the kept value whose memory it is
    kept_writes: list[tuple[int, fx.Node]] = []
    for n in sorted(kept, key=order.__getitem__):
        alias = (
            n in writes
            or (n.op == "call_method" and n.target == "detach")  # shares its storage
            or type(modules.get(n.target)) in (nn.Identity, *DROPOUTS)
            or _eval_dropout(n)
            or _mode_dropout(n)
        )
        source = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if alias and source in entries:  # an alias of a value moved in (without the pass: of it)
            storage[n] = source
        else:
            storage[n] = storage.get(source, source) if alias and source in kept else n
        if n in writes and (source in kept or source in entries):
            kept_writes.append((order[n], storage[n]))
    foreign = [order[n] for n in writes if n not in kept or n.args[0] in entries]
    hazards = set()
    for node in kept:
        outside = [order[u] for u in node.users if not _reads_kept(u, node, kept, mixers)]
        saved = [order[u] for u in node.users if u in mixers and _reads_kept(u, node, kept, mixers)]
        written = [at for at, where in kept_writes if where is storage[node]]
        if outside and (
            any(w >= min(outside) for w in foreign) or any(w > min(outside) for w in written)
        ):
            hazards.add(node)
        if saved and any(w > min(saved) for w in written):
            hazards.add(node)
    for value in entries:  # written outside later, or by a kept op through an alias
        if any(w > order[value] for w in foreign) or any(w is value for _, w in kept_writes):
            hazards.add(value)
    return hazards


def _slot_shape(node: fx.Node, modules, movable: dict) -> frozenset[Layout] | None:
    """The layouts a value in folded slots could move into, where known: from the example
    inputs' shapes, a convolution's or linear layer's module, or a batch norm or an op that
    keeps the layout of one such value."""
    if not slot_major(node.meta.get(REP)):
        return None
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    if shape is not None:
        rank = len(shape)
        if rank < 2:
            return None
        linear = Layout(-1, rank, shape[-1])
        return frozenset({linear, Layout(1, rank, shape[1])} if rank > 2 else {linear})
    m = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not isinstance(m, MixingLayer):
        return frozenset({Layout(1, m.weight.dim(), m.out_channels)})
    if type(m) is nn.Linear:
        return frozenset({Layout(-1, None, m.out_features)})
    inputs = _data_inputs(node)
    if len(inputs) == 1 and inputs[0] in movable:
        layouts = movable[inputs[0]]
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, *DROPOUTS, *ROW_NORMS)):  # same shape
            return layouts
        if _mode_dropout(node):
            return layouts
        kept = frozenset(k for k in layouts if _unary(node, modules, k))
        return kept or None  # a pool keeps the channels (its output's last axis changes)
    return None


def _keeps_layout(node: fx.Node, modules, shapes: dict, movable: dict, refused: set):
    """(layout, folded values to move in) if ``node`` keeps the channel layout of the kept
    values it reads (``shapes``), else None."""
    if node.op not in ("call_module", "call_function", "call_method") or "out" in node.kwargs:
        return None
    if not slot_major(node.meta.get(REP)):
        return None
    inputs = _data_inputs(node)
    kept = [a for a in inputs if a in shapes]
    if not kept:
        return None
    binary = {"call_function": BINARY_FUNCTIONS, "call_method": BINARY_METHODS}.get(node.op, ())
    if node.target in binary:
        if len(node.args) != 2 or any(
            not isinstance(v, (int, float)) for v in node.kwargs.values()
        ):
            return None  # alpha= only
        moved = [a for a in inputs if a not in shapes]
        if any(a not in movable or a in refused for a in moved):
            return None
        layout = shapes[kept[0]]
        if any(shapes[a] != layout for a in kept) or any(layout not in movable[a] for a in moved):
            return None
        return layout, moved
    shape = _row_norm_function(node)
    if shape is not None:  # its weights are the other inputs
        layout = shapes.get(node.args[0])
        return (layout, []) if layout is not None and _row_norm_keeps(shape, layout) else None
    if len(inputs) != 1:
        return None
    layout = shapes[kept[0]]
    if not _unary(node, modules, layout) and not _norm(node, modules, layout):
        return None
    return layout, []


def _moves_in(node: fx.Node, modules, mixers: dict, movable: dict, refused: set):
    """(layout, [its input]) if ``node`` is an op that keeps the layout
    applied to a value in folded slots that could move in (``movable``) and that others read
    too: moved in, the value also feeds the fused layers reading it (a shortcut ``nn.Identity``
    beside a block's first convolution: one move instead of two), else None."""
    shape = _row_norm_function(node)
    inputs = [node.args[0]] if shape is not None else _data_inputs(node)  # not its weights
    if len(inputs) != 1 or inputs[0] not in movable or inputs[0] in refused:
        return None
    if len(inputs[0].users) < 2:  # read by this op alone: moving its result in costs the same
        return None
    if not slot_major(node.meta.get(REP)):
        return None
    # the layout the fused layers reading the value, or this op's value, take; then a
    # convolution's
    wanted = {mixers[u].reads for u in (*inputs[0].users, *node.users) if u in mixers}
    for layout in sorted(movable[inputs[0]], key=lambda k: (k not in wanted, -k.axis)):
        if shape is not None:
            if _row_norm_keeps(shape, layout):
                return layout, [inputs[0]]
        elif _unary(node, modules, layout) or _norm(node, modules, layout):
            return layout, [inputs[0]]
    return None


def _norm(node: fx.Node, modules, layout: Layout) -> bool:
    """``node`` calls (on one tensor, without hooks) a norm or dropout module (of exactly a
    torch type) that keeps ``layout``: a batch norm whose channels are the layout's blocks (a
    convolution's, or a linear layer's two-dimensional one, which ``channel_call`` checks again
    at run time); a layer or RMS norm of rows within one slot (a linear layer's features, or a
    convolution's spatial axes); a dropout module (any layout)."""
    if _mode_dropout(node):  # as a dropout module (any layout)
        return True
    m = modules.get(node.target) if node.op == "call_module" else None
    if len(node.args) != 1 or node.kwargs or m is None or hooked(m):
        return False
    kind = type(m)
    if kind in DROPOUTS:
        return True
    if kind in ROW_NORMS:
        return _row_norm_keeps(tuple(m.normalized_shape), layout)
    return kind in NORMS and (layout.axis == 1 or layout.rank == 2)


def _contiguous(node: fx.Node, modules) -> bool:
    """``node``'s value is contiguous at every call (a copy moved in has its strides): a linear
    layer's output. Other values may be channels-last or transposed views, also where the
    example inputs showed them contiguous (a model converted to channels-last after compiling)."""
    return node.op == "call_module" and type(modules.get(node.target)) is nn.Linear


_FRESH_METHODS = frozenset(
    {"mean", "sum", "amax", "amin", "prod", "std", "var", "logsumexp", "norm", "contiguous"}
)
_FRESH_FUNCTIONS = frozenset(
    {torch.mean, torch.sum, torch.amax, torch.amin, torch.prod, torch.std, torch.var,
     torch.logsumexp, torch.matmul, torch.bmm, torch.mm, F.linear, F.layer_norm}
)  # fmt: skip


def _fresh(node: fx.Node, modules) -> bool:
    """``node`` makes a new tensor whose memory order does not follow its input's strides (a
    reduction, a linear layer, a matrix product, a layer norm): values computed from it saw the
    same strides with and without the pass (a dropout after a head's mean)."""
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    return node.op == "call_module" and type(modules.get(node.target)) in (nn.Linear, nn.LayerNorm)


def _memory_order(node: fx.Node, modules) -> bool:
    """``node`` computes in its input's memory order, so that a contiguous copy of a strided
    value (a channels-last or transposed one moved in) changes its result: an op that draws
    random numbers (dropout modules, functional dropout unless traced in eval mode: its masks)
    or an RMS norm (its sums of squares; a layer norm makes its input contiguous first).
    Reductions also sum in memory order, in their last bits: not covered (see the module
    docstring)."""
    if node.op == "call_function" and node.target is F.rms_norm:
        return True
    module = modules.get(node.target) if node.op == "call_module" else None
    if type(module) is nn.RMSNorm:
        return True
    return draws_random(node, module) and not _eval_dropout(node)


def _learns(module: nn.Module) -> bool:
    """Autograd records the gradient of the module's weight or bias."""
    if not torch.is_grad_enabled():
        return False
    return any(
        p is not None and p.requires_grad
        for p in (getattr(module, "weight", None), getattr(module, "bias", None))
    )


def _pools(dims: int | None, layout: Layout | None) -> bool:
    """A pool of ``dims`` trailing axes (None: not a pool) keeps ``layout``: it pools exactly
    the spatial axes of a convolution's channel layout."""
    if dims is None:
        return True
    return layout is not None and layout.axis == 1 and layout.rank == dims + 2


def _unary(node: fx.Node, modules, layout: Layout | None = None) -> bool:
    """``node`` applies an op of one tensor (and numbers) that acts on every channel of every
    sample alike (activations; pools of the spatial axes of ``layout``) to its first
    argument."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if _eval_dropout(node):
        return True
    if node.op == "call_module":
        m = modules.get(node.target)
        return (
            type(m) in UNARY_MODULES
            and _pools(POOL_MODULES.get(type(m)), layout)
            and not getattr(m, "return_indices", False)
            and not hooked(m)
        )
    unary = UNARY_FUNCTIONS if node.op == "call_function" else UNARY_METHODS
    if node.op not in ("call_function", "call_method") or node.target not in unary:
        return False
    if not _pools(POOL_FUNCTIONS.get(node.target), layout):
        return False
    at = _POOLS_WITH_INDICES.get(node.target)
    return not node.kwargs.get("return_indices") and (at is None or len(node.args) <= at)
