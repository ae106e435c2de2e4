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

After::

    m = equivfx_gather_conv2(relu)        (|G| B, 80, H, W) -> (|G| B, |G| 80, H, W)
    h = conv2(m)                          conv2: Conv2d(|G| 80, 80, 3)

The gather is one indexing with the precomputed Cayley table T[g][u] = index(g u): no Python loop
over
slots at run time.

With ``twist=True`` the gather reads the slots through Phi(s)(u) = u . s(u) (the group's action on
the
hidden feature maps): the mixing layers are then exactly G-CNN group convolutions (see
docs/gcnn.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from equivfx.errors import EquivFXError, InputShapeError, explain
from equivfx.meta import REP, Folded, set_rep
from equivfx.passes.infra import Pass, PassResult, new_node_origin

__all__ = [
    "MixLayers",
    "MixOptions",
    "MixingLayer",
    "MixingConv1d",
    "MixingConv2d",
    "MixingConv3d",
    "MixingLinear",
    "SlotGather",
    "widen",
    "MIXABLE",
]

MIXABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Layer types that become mixing layers."""


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
            batch = x.shape[0] // n
            rows = self.table[:, None, :] * batch + torch.arange(batch, device=x.device)[:, None]
            out = x.flatten(1).index_select(0, rows.flatten()).view(n * batch, -1, *x.shape[2:])
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
    """A widened Conv/Linear that reads the folded slots directly (no gathered copy).

    For slot g the mixing layer computes out(g) = sum_u W_u s(g u) = sum_v W_(g^-1 v) s(v). So
    instead of copying |G| permuted slot blocks per slot (|G|^2 B blocks), the slots are moved onto
    the feature axis once, (|G| B, C, ...) -> (B, |G| C, ...), and one layer with the |G| x |G|
    block weight [W_(g^-1 v)]_(g, v) (built from the |G| blocks of ``weight`` at every call, so
    gradients reach the one shared weight set) computes every slot; its output (B, |G| Cout, ...)
    is moved back. Same arithmetic as the gather, |G| times less copying. Parameters and
    state-dict keys are those of the widened layer; ``slot_index[g][v] = index(g^-1 v)`` is a
    non-persistent buffer.

    Subclasses: :class:`MixingConv1d`, :class:`MixingConv2d`, :class:`MixingConv3d`,
    :class:`MixingLinear`. Build them with :func:`widen` and ``fused=True``.
    """

    order: int
    slot_index: torch.Tensor

    def _set_group(self, group) -> None:
        table = torch.tensor(group.table, dtype=torch.long)
        inverse = torch.tensor(group.inverse_table, dtype=torch.long)
        self.order = group.order
        self.register_buffer("slot_index", table[inverse], persistent=False)

    def _block_weight(self) -> torch.Tensor:
        n = self.order
        w = self.weight  # (Cout, n C, *k): block u on dim 1
        blocks = w.unflatten(1, (n, -1)).transpose(0, 1)  # (n_u, Cout, C, *k)
        big = blocks[self.slot_index]  # (n_g, n_v, Cout, C, *k): W_(g^-1 v)
        return big.transpose(1, 2).flatten(2, 3).flatten(0, 1)  # (n Cout, n C, *k)

    def _block_bias(self):
        return None if self.bias is None else self.bias.repeat(self.order)


class _MixingConv(MixingLayer):
    def forward(self, x: torch.Tensor, batch_axis: int = 0) -> torch.Tensor:
        n = self.order
        if batch_axis:
            x = x.movedim(batch_axis, 0)
        t = x.unflatten(0, (n, -1)).transpose(0, 1).flatten(1, 2)  # (B, n C, *spatial)
        y = self._conv_forward(t, self._block_weight(), self._block_bias())
        # (n B, Cout, *spatial): a cat of the slot blocks (a permute-then-flatten makes exporters
        # guard on the batch size being 1)
        out = torch.cat(y.unflatten(1, (n, -1)).unbind(1), 0)
        return out.movedim(0, batch_axis) if batch_axis else out


class MixingConv1d(_MixingConv, nn.Conv1d):
    """A Conv1d mixing layer: see :class:`MixingLayer`."""


class MixingConv2d(_MixingConv, nn.Conv2d):
    """A Conv2d mixing layer: see :class:`MixingLayer`."""


class MixingConv3d(_MixingConv, nn.Conv3d):
    """A Conv3d mixing layer: see :class:`MixingLayer`."""


class MixingLinear(MixingLayer, nn.Linear):
    """A Linear mixing layer on the last axis: see :class:`MixingLayer`."""

    def forward(self, x: torch.Tensor, batch_axis: int = 0) -> torch.Tensor:
        n = self.order
        if batch_axis:
            x = x.movedim(batch_axis, 0)
        t = x.unflatten(0, (n, -1)).movedim(0, -2).flatten(-2)  # (B, ..., n C)
        y = nn.functional.linear(t, self._block_weight(), self._block_bias())
        out = torch.cat(y.unflatten(-1, (n, -1)).unbind(-2), 0)  # (n B, ..., Cout)
        return out.movedim(0, batch_axis) if batch_axis else out


_MIXING = {
    nn.Conv1d: MixingConv1d,
    nn.Conv2d: MixingConv2d,
    nn.Conv3d: MixingConv3d,
    nn.Linear: MixingLinear,
}


def widen(module: nn.Module, order: int, group=None) -> nn.Module:
    """A copy of ``module`` with ``order`` times the input width, computing the same function on the
    identity block: the new input blocks are zero.

    With ``group`` (of that order) the copy is the fused :class:`MixingLayer` of the same kind
    (same parameters and state-dict keys), which reads folded slots; ``groups > 1`` convolutions
    stay plain (their channels interleave per group: they take the :class:`SlotGather` path).

    Example:
        >>> lin = widen(nn.Linear(3, 2), 4)
        >>> lin.weight.shape
        torch.Size([2, 12])
    """
    w = module.weight.detach()
    base = next(b for b in MIXABLE if isinstance(module, b))
    cls = _MIXING[base] if group is not None and getattr(module, "groups", 1) == 1 else base
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
    if isinstance(new, MixingLayer):
        new._set_group(group)
    return new


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
    """

    group: object
    mix: object = None
    twist: object = None
    layout: str = "gather"


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
        for name in chosen:
            m = modules[name]
            fused = opts.layout == "fused" and opts.twist is None
            wide = widen(m, G.order, group=G if fused else None)
            _set_submodule(gm, name, wide)
            if isinstance(wide, MixingLayer):  # reads the folded slots itself
                for node in calls[name]:
                    rep = node.args[0].meta.get(REP)
                    if isinstance(rep, Folded) and rep.batch_axis:
                        node.kwargs = {**node.kwargs, "batch_axis": rep.batch_axis}
                    node.meta["equivfx.mixing"] = True
                continue
            axis = 1 if not isinstance(m, nn.Linear) else -1
            groups = getattr(m, "groups", 1)
            gather_name = "equivfx_gather_" + name.replace(".", "_")
            gm.add_submodule(gather_name, SlotGather(G, axis, groups, opts.twist))
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
