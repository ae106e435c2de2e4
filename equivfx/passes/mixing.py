"""``mix-layers``: the paper's layer-wise construction, with mixing layers.

After the input stage (the lift, then the first layer applied slot-wise), every ``Conv1d/2d/3d`` and
``Linear`` that consumes a Map(G, .) value becomes a *mixing layer*: for slot g it reads the
concatenation over u of s(g u) (on channels for convolutions, on features for linear layers), with
|G| times the original input width and one weight set shared by all slots. It is the lift of an
ordinary layer F(s) = sum_u W_u s(u), so the network stays equivariant for any weights.

Conversion preserves the function: the block W_e (u = identity) holds the original weights and the
other blocks start at zero, so out(g) = W s(g), the slot-wise application of global mode.

Before::

    h = conv2(relu)                       conv2: Conv2d(80, 80, 3)

After (convolutions, the default gather layout)::

    h = conv2(relu)                       conv2: MixingConv2d(|G| 80, 80, 3), layout="gather"

The mixing convolution gathers its own input, (|G| B, 80, H, W) -> (|G| B, |G| 80, H, W), with one
row indexing by the precomputed Cayley table T[g][u] = index(g u) (no Python loop over slots),
then runs the widened convolution on it. Linear layers, ``groups > 1`` convolutions and
``twist=True`` get a separate gather node instead::

    m = equivfx_gather_fc(h)              (|G| B, 80) -> (|G| B, |G| 80)
    y = fc(m)                             fc: Linear(|G| 80, 10)

With ``twist=True`` the gather reads the slots through Phi(s)(u) = u . s(u) (the group's action on
the hidden feature maps): the mixing layers are then exactly G-CNN group convolutions (see
docs/gcnn.md). ``layout="fused"`` trades bitwise equivariance for no permuted copy (see
:class:`MixingLayer`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as forward_ad
import torch.fx as fx
from torch import nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from equivfx.errors import EquivFXError, InputShapeError, ModelTypeError, explain
from equivfx.meta import REP, Folded, set_rep
from equivfx.passes.infra import Pass, PassResult, new_node_origin
from equivfx.passes.modules import (
    MEASURING,
    devices_of,
    eager_tensor,
    is_tracing,
    synchronize,
)

__all__ = [
    "TiedWeightsWarning",
    "MixLayers",
    "MixOptions",
    "MixingLayer",
    "MixingConv1d",
    "MixingConv2d",
    "MixingConv3d",
    "MixingLinear",
    "SlotGather",
    "WORKSPACE_LIMIT",
    "GATHER_FORMAT",
    "release_workspace",
    "widen",
    "slots_to_channels",
    "channels_to_slots",
    "MIXABLE",
]

MIXABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Layer types that become mixing layers."""


class TiedWeightsWarning(UserWarning):
    """A layer that became a mixing layer shared a parameter with another module (tied
    weights): the mixing layer's |G| times wider weight is its own, so the tie is broken."""


def slot_rows(table: torch.Tensor, batch: int) -> torch.Tensor:
    """Row indices of the gathered input: row (g, b, u) is sample b of slot g u.

    ``table`` is the Cayley table T[g][u] = index(g u); the rows index the folded slots
    (|G| B, ...) flattened to one row per sample.
    """
    return (table[:, None, :] * batch + torch.arange(batch, device=table.device)[:, None]).flatten()


class _Buffers:
    """One thread's buffers for mixing layers' gathered inputs, by dtype and device."""

    __slots__ = ("buffers", "__weakref__")

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}


_EVERY_THREAD: weakref.WeakSet = weakref.WeakSet()  # a thread's entry goes when the thread ends


class _Workspace(threading.local):
    def __init__(self):  # once per thread, at its first gather
        self.own = _Buffers()
        _EVERY_THREAD.add(self.own)


_WORKSPACE = _Workspace()

log = logging.getLogger(__name__)

GATHER_FORMAT = "auto"
"""Memory format of the gather layout's 2D convolutions where the gathered input lives in the
workspace (no autograd, eager CPU): ``"auto"`` measures both at the first call per input shape,
like ``chunk="auto"``; ``"nchw"`` or ``"nhwc"`` fixes it. Channels-last gathers into (|G| B, H, W,
|G| C) and returns a contiguous output; on this project's CPU it took 0.54x to 1.50x the
channels-first time over 40 shapes, faster on larger maps and slower on small ones
(``benchmarks/mixing_formats.py``, docs/benchmarks.md). The two differ by
float rounding, and each is bitwise equivariant; channels-first computes, on the identity block,
what the original layer computes, bitwise."""

FORMATS_MEASURED = 8
"""Input shapes a layer measures :data:`GATHER_FORMAT` for (see ``_channels_last``)."""

WORKSPACE_LIMIT = 64 << 20
"""Bytes held in the buffer between calls. A larger gathered input is gathered and convolved a
few slots at a time in the buffer (:func:`slots_per_gather`), or, where not even one slot's rows
fit, into a fresh tensor."""


def release_workspace(every_thread: bool = False) -> int:
    """Free the gather buffers of the calling thread (or of every thread); returns the bytes
    released.

    Gather-layout mixing convolutions on the CPU write their gathered input, the |G| permuted slot
    blocks, into a buffer kept between calls when autograd does not need it (under
    ``torch.no_grad()`` or ``torch.inference_mode()``): a fresh tensor of that size is
    page-faulted in by glibc's allocator at every call, which made the layer up to 3x slower
    than one convolution on a ready-made input (docs/layerwise.md). The buffer is the size of the
    largest gathered input seen in the thread, at most :data:`WORKSPACE_LIMIT` bytes (64 MiB;
    larger inputs are gathered and convolved a few slots at a time, each part in the buffer, or
    get a fresh tensor where one slot's rows do not fit; set it to 0 to never keep one). There
    is one buffer per thread, dtype and device, so a pool of N threads may hold N of them; each
    lives until its thread ends or it is released here. Releasing another thread's buffer while
    that thread runs a mixing layer is safe: the layer keeps its own reference until its
    convolution is done.

    Example:
        >>> release_workspace() >= 0
        True
    """
    owners = list(_EVERY_THREAD) if every_thread else [_WORKSPACE.own]
    freed = 0
    for owner in owners:
        buffers = owner.buffers
        freed += sum(b.numel() * b.element_size() for b in list(buffers.values()))
        buffers.clear()
    return freed


def _workspace(numel: int, like: torch.Tensor) -> torch.Tensor:
    key = (like.dtype, like.device)
    buffers = _WORKSPACE.own.buffers
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers.pop(key, None)  # free the old one before the larger allocation
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        buffers[key] = buf
    return buf[:numel]


def _workspace_if_fits(numel: int, like: torch.Tensor, workspace: bool) -> torch.Tensor | None:
    """The calling thread's buffer for ``numel`` entries, where ``workspace`` asks for it and they
    fit :data:`WORKSPACE_LIMIT`; else None (the caller makes a fresh tensor)."""
    if workspace and numel * like.element_size() <= WORKSPACE_LIMIT:
        return _workspace(numel, like)
    return None


def _reuses_workspace(x: torch.Tensor) -> bool:
    """Whether the gathered input may live in the workspace: nothing keeps it after the layer."""
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()  # autograd would save the gathered input for backward
        and forward_ad._current_level < 0  # forward-mode AD: index_select(out=) has no rule
        and eager_tensor(x)
        and get_proxy_mode() is None  # make_fx would record writes into the shared buffer
    )


def _keeps_block(*params) -> bool:
    """Whether a fused mixing layer may reuse its block weight built at an earlier call: no
    autograd, forward-mode AD, tracing or dispatch mode (``make_fx``, fake tensors) in this call,
    and each of ``params`` (None for a missing bias) a plain parameter or tensor."""
    return (
        not torch.is_grad_enabled()
        and forward_ad._current_level < 0
        and not is_tracing()
        and get_proxy_mode() is None
        and not _dispatch_modes()
        and all(
            p is None
            or (
                type(p) in (nn.Parameter, torch.Tensor)
                and not torch._C._functorch.is_functorch_wrapped_tensor(p)
            )
            for p in params
        )
    )


def _dispatch_modes() -> int:
    """How many torch dispatch modes are active (FakeTensorMode, make_fx's, ...)."""
    count = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return count() if count is not None else 0


def _same_values(kept, now) -> bool:
    """``now`` holds what ``kept`` (a copy) held: same shape, dtype, device and values."""
    if kept is None or now is None:
        return kept is now
    return (
        kept.shape == now.shape
        and kept.dtype == now.dtype
        and kept.device == now.device
        and bool(torch.equal(kept, now))
    )


def gather_rows(
    x: torch.Tensor, table: torch.Tensor, workspace: bool = False, slots: slice | None = None
) -> torch.Tensor:
    """The mixing input on the channel axis: (|G| B, C, ...) -> (|G| B, |G| C, ...) in one gather.

    Slot g's channel block u is s(g u), for ``table`` the Cayley table; ``slots`` gathers the
    rows of those slots g only, (k B, |G| C, ...). With ``workspace`` the result is written into
    the calling thread's reused buffer (see :func:`release_workspace`): it is valid only until
    the next gather in this thread.
    """
    n = table.shape[0]
    batch = x.shape[0] // n
    part = table if slots is None else table[slots]
    rows = slot_rows(part, batch)
    flat = x.flatten(1)
    buf = _workspace_if_fits(rows.numel() * flat.shape[1], flat, workspace)
    if buf is not None:
        out = buf.view(rows.numel(), flat.shape[1])
        torch.index_select(flat, 0, rows, out=out)
    else:  # functional: autograd may record it
        out = flat.index_select(0, rows)
    return out.view(part.shape[0] * batch, n * x.shape[1], *x.shape[2:])  # explicit: B may be 0


def slots_per_gather(order: int, x: torch.Tensor) -> int:
    """How many slots' rows a workspace gather of ``x`` (|G| B, C, ...) takes at a time: all
    |G| where they fit :data:`WORKSPACE_LIMIT`, else the most slots that fit and divide |G|
    (every part then has the same shape, so every slot is computed alike), else all |G| (one
    fresh tensor). Slot g's rows, (B, |G| C, ...), hold as many entries as ``x``."""
    per_slot = x.numel() * x.element_size()
    if order * per_slot <= WORKSPACE_LIMIT:
        return order
    fits = [
        k for k in range(order - 1, 0, -1) if order % k == 0 and k * per_slot <= WORKSPACE_LIMIT
    ]
    return fits[0] if fits else order


def gather_channels_last(
    x: torch.Tensor, table: torch.Tensor, workspace: bool = False, slots: slice | None = None
) -> torch.Tensor:
    """:func:`gather_rows` for channels-last 2D maps: the same (k B, |G| C, H, W) values in
    channels-last memory, (k B, H, W, |G| C), one index per slot g over the slot axis of ``x``
    read as (B, H W, |G|, C) (contiguous runs of C channels when ``x`` is channels-last)."""
    n = table.shape[0]
    rows, c, h, w = x.shape
    batch = rows // n
    part = table if slots is None else table[slots]
    src = x.permute(0, 2, 3, 1).reshape(n, batch, h * w, c).permute(1, 2, 0, 3)
    numel = part.shape[0] * batch * h * w * n * c
    flat = _workspace_if_fits(numel, x, workspace)
    if flat is None:
        flat = torch.empty(numel, dtype=x.dtype, device=x.device)
    out = flat.view(part.shape[0], batch, h * w, n, c)
    for j in range(part.shape[0]):
        torch.index_select(src, 2, part[j], out=out[j])
    return flat.view(part.shape[0] * batch, h, w, n * c).permute(0, 3, 1, 2)


def slots_to_channels(x: torch.Tensor, n: int, axis: int = 1) -> torch.Tensor:
    """Folded slots (n B, C, ...) to the channel layout (B, n C, ...): channel block i is slot i.
    With ``axis=-1`` the feature layout of linear layers instead: (n B, ..., F) to
    (B, ..., n F) (the same tensor for two dimensions)."""
    at = axis % x.dim()
    return x.unflatten(0, (n, -1)).movedim(0, at).flatten(at, at + 1)


def channels_to_slots(y: torch.Tensor, n: int, axis: int = 1) -> torch.Tensor:
    """The channel layout (B, n C, ...) (or with ``axis=-1`` the feature layout (B, ..., n F))
    back to folded slots (n B, C, ...): a cat of the blocks (a permute-then-flatten makes
    exporters guard on the batch size being 1)."""
    at = axis % y.dim()
    return torch.cat(y.unflatten(at, (n, -1)).unbind(at), 0)


class SlotGather(nn.Module):
    """For each slot g, concatenate s(g u) over u on the feature axis (the input of a mixing layer).

    Args:
        group: the FiniteGroup.
        feature_axis: the axis to concatenate on, counted in the per-sample tensor with the batch
            axis included (1 for convolutions' channels, -1 for linear layers' features).
        groups: the convolution's ``groups``: channels are interleaved so each group of the widened
            convolution sees its own channels from every slot.
        twist: an exact action on the feature maps, for reading the slots through Phi (G-CNN mode).
    """

    def __init__(self, group, feature_axis: int, groups: int = 1, twist=None):
        super().__init__()
        self.group = group
        self.order = group.order
        self.feature_axis = feature_axis
        self.groups = groups
        self.twist = twist
        self.register_buffer("table", torch.tensor(group.table, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, batch_axis: int = 0) -> torch.Tensor:
        n = self.order
        if batch_axis:
            x = x.movedim(batch_axis, 0)
        if self.twist is None and self.groups == 1 and self.feature_axis % x.dim() == 1:
            # one row gather: row (g, b, u) of the result is sample b of slot g u, so the rows
            # read as (n B, n C, ...) with no further copy
            out = gather_rows(x, self.table)
            return out.movedim(0, batch_axis) if batch_axis else out
        s = x.unflatten(0, (n, -1))  # (n, B, ...)
        g = s[self.table]  # (n[g], n[u], B, ...): slot g's block u is s(g u)
        if self.twist is not None:  # read through Phi: block u becomes u . s(g u)
            self._check_twist(s)
            g = torch.stack([self.twist._apply(u, g[:, u]) for u in range(n)], 1)
        # the feature axis of x, in g's coordinates (x's axis 0, the batch, is g's axis 2)
        axis = self.feature_axis + 2 if self.feature_axis >= 0 else g.dim() + self.feature_axis
        if self.groups > 1:  # (.., C, ..) -> (.., gr, u, C/gr, ..): each group sees every slot
            g = g.unflatten(axis, (self.groups, -1)).movedim(1, axis)
            g = g.flatten(axis - 1, axis + 1)
        else:  # (.., C, ..) -> (.., u, C, ..) -> (.., u*C + c, ..)
            g = g.movedim(1, axis - 1).flatten(axis - 1, axis)
        out = g.flatten(0, 1)
        return out.movedim(0, batch_axis) if batch_axis else out

    def _check_twist(self, s: torch.Tensor) -> None:
        try:
            self.twist.check(s[0])
        except InputShapeError as err:
            raise EquivFXError(
                explain(
                    "twist=True reads hidden feature maps through the group's action, which does "
                    "not fit them",
                    tuple(s[0].shape),
                    "feature maps the action applies to (square for C4 and D4)",
                    "keep the feature maps square, or use twist=False (plain mixing layers need "
                    "no action on hidden features)",
                )
                + f" ({err})"
            ) from err

    def extra_repr(self) -> str:
        twist = ", twist=Phi" if self.twist is not None else ""
        return (
            f"group={self.group!r}, feature_axis={self.feature_axis}, groups={self.groups}{twist}"
        )


class MixingLayer:
    """A widened Conv/Linear that reads the folded slots (|G| B, C, ...) itself.

    For slot g the mixing layer computes out(g) = sum_u W_u s(g u) = sum_v W_(g^-1 v) s(v), in
    one of two layouts (``layout``):

    - ``"gather"`` (convolutions only): one row gather writes the permuted concatenation
      (|G| B, |G| C, ...) (:func:`gather_rows`), then the widened convolution runs on it. Every slot
      sums its blocks in the order of u, so the layer is bitwise equivariant. Without autograd on
      the CPU the gathered input goes to a per-thread buffer kept between calls
      (:func:`release_workspace`): no graph value holds it (only a dispatch mode recording every
      op's inputs would see it), and a fresh tensor of that size cost more than the convolution
      itself under glibc's allocator.
    - ``"fused"``: the slots are moved onto the feature axis once, (|G| B, C, ...) ->
      (B, |G| C, ...), and one layer with the |G| x |G| block weight [W_(g^-1 v)]_(g, v) (built
      from the |G| blocks of ``weight`` at every call, so gradients reach the one shared weight
      set) computes every slot; its output (B, |G| Cout, ...) is moved back. No permuted copy,
      but each slot sums its blocks in an order the group permutes: equivariant up to float
      rounding.

    Parameters and state-dict keys are those of the widened layer; ``slot_index[g][v] =
    index(g^-1 v)`` and the Cayley ``table`` are non-persistent buffers.

    Subclasses: :class:`MixingConv1d`, :class:`MixingConv2d`, :class:`MixingConv3d`,
    :class:`MixingLinear` (fused only). Build them with :func:`widen` and ``group=``.
    """

    order: int
    slot_index: torch.Tensor
    table: torch.Tensor
    layout: str = "fused"  # modules pickled before the gather layout existed were fused
    gather_format: str = "auto"  # "auto": follow GATHER_FORMAT; "nchw" or "nhwc": fixed

    def _set_group(self, group, layout: str = "fused") -> None:
        device = self.weight.device  # a model compiled where it lives (on a GPU) keeps it there
        table = torch.tensor(group.table, dtype=torch.long, device=device)
        inverse = torch.tensor(group.inverse_table, dtype=torch.long, device=device)
        self.order = group.order
        self.layout = layout
        self.formats: dict[tuple, str] = {}  # gather layout: input (shape, dtype) -> memory format
        self.register_buffer("slot_index", table[inverse], persistent=False)
        self.register_buffer("table", table, persistent=False)

    def _block_weight(self) -> torch.Tensor:
        n = self.order
        w = self.weight  # (Cout, n C, *k): block u on dim 1
        blocks = w.unflatten(1, (n, -1)).transpose(0, 1)  # (n_u, Cout, C, *k)
        big = blocks[self.slot_index]  # (n_g, n_v, Cout, C, *k): W_(g^-1 v)
        return big.transpose(1, 2).flatten(2, 3).flatten(0, 1)  # (n Cout, n C, *k)

    def _block_bias(self):
        return None if self.bias is None else self.bias.repeat(self.order)

    def _block_params(self) -> tuple:
        """The block weight and bias of the fused layout. Built at every call while autograd may
        record (gradients must reach the one shared weight), under tracing, functorch
        transforms, forward-mode AD and dispatch modes (``make_fx``, fake tensors); otherwise
        kept between calls while the weight, bias and slot index hold the same values as when it
        was built: a copy of each is kept and compared (``torch.equal``), since neither identity
        nor version counters see every write (fused optimizers and ``.data`` writes do not bump
        the version; a new tensor may reuse a freed address). The comparison reads the weight
        twice where building the block writes it |G| times: C4 with 16 channels at 16x16, the
        layer took 1.14 to 1.17x one convolution building the block at every call, 1.04 to 1.07x
        with it kept. Kept memory: the block (|G| times the weight) and the copies; ``train()``
        and :meth:`release_block` drop them."""
        w, b, index = self.weight, self.bias, self.slot_index
        if not _keeps_block(w, b):
            return self._block_weight(), self._block_bias()
        kept = self.__dict__.get("_block")
        if (
            kept is not None
            and _same_values(kept[0], w)
            and _same_values(kept[1], b)
            and _same_values(kept[2], index)
        ):
            return kept[3], kept[4]
        weight, bias = self._block_weight(), self._block_bias()
        copies = tuple(None if t is None else t.detach().clone() for t in (w, b, index))
        self.__dict__["_block"] = (*copies, weight, bias)
        return weight, bias

    def release_block(self) -> None:
        """Drop the block weight kept between calls (see :meth:`_block_params`)."""
        self.__dict__.pop("_block", None)

    def train(self, mode: bool = True):
        if mode:  # training records autograd, which rebuilds the block at every call
            self.release_block()
        return super().train(mode)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_block", None)  # a cache: not pickled or deep-copied
        return state

    def extra_repr(self) -> str:
        measured = self.__dict__.get("formats") or {}
        chose = f", measured={sorted(set(measured.values()))}" if measured else ""
        if self.gather_format != "auto":
            chose = f", gather_format={self.gather_format!r}"
        return f"{super().extra_repr()}, slots={self.order}, layout={self.layout!r}{chose}"


class _MixingConv(MixingLayer):
    def forward(
        self,
        x: torch.Tensor,
        batch_axis: int = 0,
        channels_in: bool = False,
        channels_out: bool = False,
    ) -> torch.Tensor:
        """The folded slots (|G| B, C, ...) to (|G| B, Cout, ...). The fused layout takes and
        gives (B, |G| C, ...) instead with ``channels_in`` and ``channels_out``
        (``keep-channel-layout`` sets them where the values between fused layers keep it)."""
        n = self.order
        if (channels_in or channels_out) and self.layout != "fused":
            raise EquivFXError(
                explain(
                    "channels_in/channels_out need the fused layout",
                    self.layout,
                    "layout='fused'",
                    "call the gather layout on folded slots (|G| B, C, ...)",
                )
            )
        if batch_axis:
            x = x.movedim(batch_axis, 0)
        if self.layout == "gather":
            # the parameters first: a parametrization may run other mixing layers, whose
            # gathers would reuse the buffer before this layer's convolution reads it
            weight, bias = self.weight, self.bias
            if _reuses_workspace(x):
                out = self._gather_conv(x, weight, bias, self._channels_last(x, weight, bias))
            else:
                out = self._conv_forward(gather_rows(x, self.table), weight, bias)
        else:
            t = x if channels_in else slots_to_channels(x, n)  # (B, n C, *spatial)
            y = self._conv_forward(t, *self._block_params())
            if channels_out:  # (B, n Cout, *spatial): the next fused layer reads it as it is
                return y
            out = channels_to_slots(y, n)
        return out.movedim(0, batch_axis) if batch_axis else out

    def _gather_conv(self, x, weight, bias, channels_last: bool) -> torch.Tensor:
        """The gather layout in the workspace: all slots, or (past its limit) a few at a time;
        with ``channels_last`` the gathered input and the convolution are channels-last, the
        output contiguous again."""
        n = self.order
        k = slots_per_gather(n, x)
        if channels_last:
            x, gather = x.contiguous(memory_format=torch.channels_last), gather_channels_last
        else:
            x, gather = x.contiguous(), gather_rows  # once, not once per part
        if k == n:
            out = self._conv_forward(gather(x, self.table, True), weight, bias)
            return out.contiguous() if channels_last else out
        batch, out = x.shape[0] // n, None
        for i in range(0, n, k):  # slots i to i + k - 1, into their rows of one output
            part = self._conv_forward(gather(x, self.table, True, slice(i, i + k)), weight, bias)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[i * batch : (i + k) * batch].copy_(part)
        return out

    def _channels_last(self, x, weight, bias) -> bool:
        """Whether this input's gather and convolution run channels-last (see
        :data:`GATHER_FORMAT`): measured at the first call per input shape, for at most
        :data:`FORMATS_MEASURED` shapes; later new shapes take the decision of the measured one
        with the same per-sample shape nearest in batch size (else channels-first)."""
        fmt = self.gather_format if self.gather_format != "auto" else GATHER_FORMAT
        if fmt not in ("auto", "nchw", "nhwc"):
            raise EquivFXError(
                explain(
                    "unknown equivfx.passes.mixing.GATHER_FORMAT",
                    fmt,
                    "'auto', 'nchw' or 'nhwc'",
                    "set it to 'auto' (measure), 'nchw' (channels-first) or 'nhwc'",
                )
            )
        if x.dim() != 4:  # 2D convolutions only
            return False
        if fmt != "auto":
            return fmt == "nhwc"
        formats = self.__dict__.get("formats")
        if formats is None:  # modules pickled before the attribute existed
            formats = self.formats = {}
        key = (tuple(x.shape), x.dtype)
        if key not in formats:
            if len(formats) >= FORMATS_MEASURED:
                near = [
                    (abs(math.log(max(shape[0], 1) / max(x.shape[0], 1))), chosen)
                    for (shape, dtype), chosen in list(formats.items())  # other threads add
                    if dtype == x.dtype and shape[1:] == tuple(x.shape[1:])
                ]
                return min(near)[1] == "nhwc" if near else False
            with MEASURING:  # one measurement at a time; another thread may have made it
                if key not in formats:
                    formats[key] = self._measure_format(x, weight, bias)
                    log.info("equivfx: mixing layer chose %s for %s", formats[key], key)
        return formats[key] == "nhwc"

    def _measure_format(self, x, weight, bias) -> str:
        """Time the layer both ways: a warm-up round, then rounds in alternating order until
        about 0.1 s has passed (at least 1, at most 5); each format's minimum. Channels-last must
        be at least 3 % faster (channels-first computes what the original layer computes on the
        identity block, bitwise)."""
        best = {False: math.inf, True: math.inf}
        devices = devices_of(x, weight)  # CUDA kernels run after the call returns
        start = time.perf_counter()
        for round_ in range(6):
            for channels_last in (False, True) if round_ % 2 == 0 else (True, False):
                synchronize(devices)
                t = time.perf_counter()
                self._gather_conv(x, weight, bias, channels_last)
                synchronize(devices)
                if round_:
                    best[channels_last] = min(best[channels_last], time.perf_counter() - t)
            if round_ and time.perf_counter() - start > 0.1:
                break
        return "nhwc" if best[True] <= 0.97 * best[False] else "nchw"


class MixingConv1d(_MixingConv, nn.Conv1d):
    """A Conv1d mixing layer: see :class:`MixingLayer`."""


class MixingConv2d(_MixingConv, nn.Conv2d):
    """A Conv2d mixing layer: see :class:`MixingLayer`."""


class MixingConv3d(_MixingConv, nn.Conv3d):
    """A Conv3d mixing layer: see :class:`MixingLayer`."""


class MixingLinear(MixingLayer, nn.Linear):
    """A Linear mixing layer on the last axis: see :class:`MixingLayer`."""

    def forward(
        self,
        x: torch.Tensor,
        batch_axis: int = 0,
        channels_in: bool = False,
        channels_out: bool = False,
    ) -> torch.Tensor:
        """The folded slots (|G| B, ..., F) to (|G| B, ..., Fout). ``channels_in`` and
        ``channels_out`` take and give the feature layout (B, ..., |G| F) instead
        (``keep-channel-layout``)."""
        n = self.order
        if batch_axis:
            x = x.movedim(batch_axis, 0)
        t = x if channels_in else slots_to_channels(x, n, -1)  # (B, ..., n F)
        y = nn.functional.linear(t, *self._block_params())
        if channels_out:  # (B, ..., n Fout): the next fused layer reads it as it is
            return y
        out = channels_to_slots(y, n, -1)  # (n B, ..., Fout)
        return out.movedim(0, batch_axis) if batch_axis else out


_MIXING = {
    nn.Conv1d: MixingConv1d,
    nn.Conv2d: MixingConv2d,
    nn.Conv3d: MixingConv3d,
    nn.Linear: MixingLinear,
}


def _uninitialized(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and bool(
        module.has_uninitialized_params()
    )


def widen(module: nn.Module, order: int, group=None, layout: str = "fused") -> nn.Module:
    """A copy of ``module`` with ``order`` times the input width, computing the same function on the
    identity block: the new input blocks are zero.

    With ``group`` (of that order) the copy is the :class:`MixingLayer` of the same kind in
    ``layout`` (same parameters and state-dict keys), which reads folded slots. Layers without a
    mixing class for that layout stay plain and take the :class:`SlotGather` path: ``groups > 1``
    convolutions (their channels interleave per group) and, for ``"gather"``, linear layers.

    Example:
        >>> lin = widen(nn.Linear(3, 2), 4)
        >>> lin.weight.shape
        torch.Size([2, 12])
    """
    if layout not in ("gather", "fused"):
        raise EquivFXError(
            explain("unknown mixing layout", layout, "'gather' or 'fused'", "use 'gather'")
        )
    w = module.weight.detach()
    base = next(b for b in MIXABLE if isinstance(module, b))
    mixing = (
        group is not None
        and getattr(module, "groups", 1) == 1
        and (layout == "fused" or base is not nn.Linear)
    )
    cls = _MIXING[base] if mixing else base
    if isinstance(module, nn.Linear):
        new = cls(
            module.in_features * order,
            module.out_features,
            bias=module.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        per_block = module.in_features
    else:
        new = cls(
            module.in_channels * order,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
        per_block = module.in_channels // module.groups
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :per_block].copy_(w)
        if module.bias is not None:
            new.bias.copy_(module.bias.detach())
    new.train(module.training)
    _carry_extra_state(module, new)
    if isinstance(new, MixingLayer):
        new._set_group(group, layout)
    return new


def _carry_extra_state(module: nn.Module, new: nn.Module) -> None:
    """Parameters and buffers a user registered on the layer beside its weight and bias (read by
    the model's own code, e.g. ``self.conv.gain``): the same tensors, on the widened layer."""
    for name, p in module._parameters.items():
        if name not in ("weight", "bias") and p is not None:
            new.register_parameter(name, p)
    for name, b in module._buffers.items():
        if name in ("slot_index", "table"):
            raise EquivFXError(
                explain(
                    f"the layer holds a buffer named {name!r}, which a mixing layer uses itself",
                    name,
                    "buffer names other than 'slot_index' and 'table'",
                    "rename the buffer, or leave the layer out with mix=",
                )
            )
        if b is not None:
            new.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)


@dataclass(frozen=True)
class MixOptions:
    """Options of the mix-layers pass.

    Attributes:
        group: the FiniteGroup.
        mix: None (every Conv/Linear on a Map(G, .) value, i.e. after the input stage), a set of
            qualified module names, or a predicate ``(name, module) -> bool`` asked about every
            Conv/Linear that reads a lifted value (the input stage included).
        twist: an action on hidden feature maps for G-CNN mode (reading the slots through Phi).
        layout: ``"gather"`` (copy the permuted slots, then the wide layer: bitwise equivariant)
            or ``"fused"`` (:class:`MixingLayer`: no permuted copy, about the cost of one layer of
            the same shape, equivariant up to float rounding since each slot sums its blocks in
            another order).
        memory_format: the gather layout's memory format (``MixingLayer.gather_format``):
            ``"auto"`` follows :data:`GATHER_FORMAT`; ``"nchw"`` or ``"nhwc"`` fixes it.
    """

    group: object
    mix: object = None
    twist: object = None
    layout: str = "gather"
    memory_format: str = "auto"


class MixLayers(Pass):
    name = "mix-layers"
    requires = frozenset({REP})
    provides = frozenset({REP, "equivfx.mixed"})

    def __init__(self, options: MixOptions):
        self.options = options
        self.mixed: tuple[str, ...] = ()

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        opts = self.options
        G = opts.group
        modules = dict(gm.named_modules())
        stage = _input_stage(gm, modules)
        calls: dict[str, list[fx.Node]] = {}
        candidates: dict[str, bool] = {}  # name -> reads the input stage only
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            m = modules.get(node.target)
            if not isinstance(m, MIXABLE) or type(m).forward is not _base_forward(m):
                continue
            arg = node.args[0] if node.args else None
            rep = arg.meta.get(REP) if isinstance(arg, fx.Node) else None
            if not isinstance(rep, Folded) or rep.container:
                continue
            calls.setdefault(node.target, []).append(node)
            first = arg in stage
            if node.target in candidates and candidates[node.target] != first:
                raise EquivFXError(
                    explain(
                        f"module {node.target!r} is called both on the input stage and on "
                        "lifted features",
                        node.target,
                        "each mixing candidate called on one kind of value",
                        f"pass mix= without {node.target!r}, or use separate "
                        "modules for the two calls",
                    )
                )
            candidates[node.target] = first
        chosen = self._choose(candidates, modules)
        lazy = [n for n in chosen if _uninitialized(modules[n])]
        if lazy:
            raise ModelTypeError(
                explain(
                    "layer-wise mode widens the weights of mixing layers, and lazy module(s) "
                    "have not materialised theirs yet",
                    lazy,
                    "modules whose weights exist (a lazy module's appear at its first call)",
                    "pass example_inputs= (compile runs the model on them), or run the model "
                    "once on a batch before compiling",
                )
            )
        for name in chosen:
            m = modules[name]
            own = opts.twist is None  # twist reads the slots through Phi: SlotGather does
            wide = widen(m, G.order, group=G if own else None, layout=opts.layout)
            _set_submodule(gm, name, wide)
            if isinstance(wide, MixingLayer):  # reads the folded slots itself
                wide.gather_format = opts.memory_format
                for node in calls[name]:
                    rep = node.args[0].meta.get(REP)
                    if isinstance(rep, Folded) and rep.batch_axis:
                        node.kwargs = {**node.kwargs, "batch_axis": rep.batch_axis}
                    node.meta["equivfx.mixing"] = True
                continue
            axis = 1 if not isinstance(m, nn.Linear) else -1
            groups = getattr(m, "groups", 1)
            gather_name = "equivfx_gather_" + name.replace(".", "_")
            gather = SlotGather(G, axis, groups, opts.twist).to(m.weight.device)
            gm.add_submodule(gather_name, gather)
            for node in calls[name]:
                arg = node.args[0]
                rep = arg.meta.get(REP)
                batch_axis = rep.batch_axis if isinstance(rep, Folded) else 0
                with gm.graph.inserting_before(node):
                    kwargs = {"batch_axis": batch_axis} if batch_axis else {}
                    gathered = gm.graph.call_module(gather_name, (arg,), kwargs)
                new_node_origin(gathered, self.name)
                set_rep(gathered, Folded(batch_axis), "mix-gather")
                node.replace_input_with(arg, gathered)
                node.meta["equivfx.mixing"] = True
        self.mixed = tuple(chosen)
        return PassResult(gm, bool(chosen))

    def _choose(self, candidates: dict[str, bool], modules) -> list[str]:
        mix = self.options.mix
        if mix is None:
            return [n for n, first in candidates.items() if not first]
        if callable(mix) and not isinstance(mix, (set, frozenset, list, tuple)):
            return [n for n in candidates if mix(n, modules[n])]
        names = set(mix)
        unknown = sorted(names - set(candidates))
        if unknown:
            known = ", ".join(sorted(candidates)) or "none"
            raise EquivFXError(
                explain(
                    "mix= names modules that are not Conv/Linear layers reading lifted values",
                    unknown,
                    f"names among: {known}",
                    "use qualified names as in model.named_modules()",
                )
            )
        return [n for n in candidates if n in names]


def _base_forward(m: nn.Module):
    for base in MIXABLE:
        if isinstance(m, base):
            return base.forward
    return None


def _input_stage(gm: fx.GraphModule, modules) -> set[fx.Node]:
    """Nodes computed from the lifted input without passing through a Conv/Linear layer."""
    stage: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node.op == "get_attr":
            continue
        if node.op == "call_module" and node.target == "equivfx_lift":
            stage.add(node)
            continue
        lifted_inputs = [a for a in node.all_input_nodes if isinstance(a.meta.get(REP), Folded)]
        if not lifted_inputs:
            continue
        if node.op == "call_module" and isinstance(modules.get(node.target), MIXABLE):
            continue
        if all(a in stage for a in lifted_inputs):
            stage.add(node)
    return stage


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)
