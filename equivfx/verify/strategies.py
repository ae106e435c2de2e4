"""Hypothesis strategies for testing equivariance: groups, elements, shapes and whole models.

Users reuse these in their own test suites. They generate *structure* -- a group spec, an element,
input sizes, a list of layer choices, a seed -- never large float tensors, so a failing example
shrinks to a readable counterexample such as
``ArchSpec(kind='cnn', input_shape=(1, 1, 4, 4), layers=(Pool(kind='max'),), ...)``. Float tensors
are then made deterministically from a seed with :func:`inputs`.

This module imports :mod:`hypothesis` at import time. hypothesis is an optional dependency of
equivfx (``pip install equivfx[test]``); nothing else in equivfx imports this module.

Example:
    >>> from hypothesis import given, settings
    >>> from equivfx.verify import strategies as eqst
    >>> @settings(max_examples=5, database=None)
    ... @given(arch=eqst.architectures(kind="cnn"))
    ... def test_model_runs(arch):
    ...     model = arch.build().eval()
    ...     assert model(arch.example_input()).shape == arch.output_shape
    >>> test_model_runs()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from hypothesis import strategies as st
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - typing only; equivfx.groups may not be importable yet
    from equivfx.groups import FiniteGroup

__all__ = [
    # groups
    "IMAGE_EXACT_SPECS",
    "IMAGE_APPROX_SPECS",
    "group_specs",
    "groups",
    "elements",
    "seeds",
    # shapes and tensors
    "image_shapes",
    "sequence_shapes",
    "feature_shapes",
    "set_shapes",
    "inputs",
    # architectures
    "ArchSpec",
    "LayerSpec",
    "Act",
    "BatchNorm",
    "Concat",
    "Conv",
    "Dropout",
    "LayerNorm",
    "Linear",
    "Pool",
    "Residual",
    "architectures",
    "ACTIVATIONS",
]

# --------------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------------

#: Image groups whose action on square grids is exact (90-degree rotations and flips).
IMAGE_EXACT_SPECS: tuple[str, ...] = ("C1", "C2", "C4", "D1", "D2", "D4")
#: Image groups whose action needs interpolation (approximate equivariance only).
IMAGE_APPROX_SPECS: tuple[str, ...] = ("C3", "C8", "D8")

_KINDS = ("image", "sequence", "set")


def _axis_suffix(axis: int | None) -> str:
    return "" if axis is None else f"@{axis}"


def group_specs(
    exact_only: bool = True,
    kinds: Sequence[str] = ("image",),
    *,
    length: int | None = None,
    set_size: int | None = None,
    axis: int | None = None,
) -> st.SearchStrategy[str]:
    """Draw group spec strings that :func:`equivfx.group` parses.

    Specs shrink towards the trivial group (``C1``) and then towards small groups.

    Args:
        exact_only: only groups whose action is exact. ``False`` adds the interpolated image groups
            ``C3``, ``C8``, ``D8``.
        kinds: any of ``"image"`` (``C1 C2 C4 D1 D2 D4``, acting on the last two axes of square
            inputs), ``"sequence"`` (``Shift{n}``, ``Rev``, ``ShiftRev{n}``: rolls and reversal of a
            sequence axis) and ``"set"`` (``Perm{n}``, permutations of a set axis of length ``n``).
        length: ``n`` of ``Shift{n}``/``ShiftRev{n}`` (shifts by multiples of 1/n of the axis
            length, so ``n`` must divide it); drawn from 2..8 when ``None``.
        set_size: ``n`` for ``Perm{n}``; drawn from 2..4 when ``None`` (``Perm4`` has 24 elements).
        axis: if given, appended as ``@axis`` to sequence and set specs (the axis the group acts
            on; defaults of the catalogue: -1 for sequences, -2 for sets).

    Returns:
        A strategy of spec strings.

    Raises:
        ValueError: an unknown kind, or no kind at all.

    Example:
        >>> from hypothesis import find
        >>> find(group_specs(), lambda s: True)
        'C1'
        >>> find(group_specs(kinds=("sequence",), length=8), lambda s: "Shift" in s)
        'Shift8'
    """
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in _KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"group_specs: got kinds={kinds!r}; expected a non-empty subset of {_KINDS!r}"
        )
    options: list[st.SearchStrategy[str]] = []
    if "image" in kinds:
        specs = IMAGE_EXACT_SPECS if exact_only else IMAGE_EXACT_SPECS + IMAGE_APPROX_SPECS
        options.append(st.sampled_from(specs))
    if "sequence" in kinds:
        suffix = _axis_suffix(axis)
        lengths = st.just(length) if length is not None else st.integers(2, 8)
        options.append(
            st.one_of(
                lengths.map(lambda n: f"Shift{n}{suffix}"),
                st.just(f"Rev{suffix}"),
                lengths.map(lambda n: f"ShiftRev{n}{suffix}"),
            )
        )
    if "set" in kinds:
        suffix = _axis_suffix(axis)
        sizes = st.just(set_size) if set_size is not None else st.integers(2, 4)
        options.append(sizes.map(lambda n: f"Perm{n}{suffix}"))
    return st.one_of(options)


def _parse_group(spec: str) -> FiniteGroup:
    from equivfx.groups import group  # lazy: keeps this module importable on its own

    return group(spec)


def groups(
    exact_only: bool = True,
    kinds: Sequence[str] = ("image",),
    *,
    length: int | None = None,
    set_size: int | None = None,
    axis: int | None = None,
) -> st.SearchStrategy[FiniteGroup]:
    """Draw :class:`equivfx.groups.FiniteGroup` objects; arguments as for :func:`group_specs`.

    Each drawn spec is parsed with :func:`equivfx.groups.group`, so ``repr(G)`` (the spec) is what a
    failing example shows.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=3, database=None)
        ... @given(G=groups(kinds=("image",)))
        ... def test_identity_first(G):
        ...     assert G.elements[0] == G.identity
        >>> test_identity_first()
    """
    return group_specs(exact_only, kinds, length=length, set_size=set_size, axis=axis).map(
        _parse_group
    )


def elements(group: FiniteGroup, *, include_identity: bool = True) -> st.SearchStrategy[Any]:
    """Draw an element of ``group``; shrinks towards slot order (the identity first).

    Args:
        group: a finite group (anything with ``.elements`` in slot order, identity first).
        include_identity: if ``False``, never draw the identity (needs a non-trivial group).

    Raises:
        ValueError: ``include_identity=False`` on the trivial group.

    Example:
        >>> import equivfx
        >>> from hypothesis import given, settings
        >>> G = equivfx.group("C4")
        >>> @settings(max_examples=4, database=None)
        ... @given(g=elements(G))
        ... def test_inverse(g):
        ...     assert G.compose(g, G.inverse(g)) == G.identity
        >>> test_inverse()
    """
    elems = tuple(group.elements)
    if not include_identity:
        elems = elems[1:]
        if not elems:
            raise ValueError(
                f"elements: got the trivial group {group!r} with include_identity=False; "
                "expected a group with a non-identity element. Fix: draw from a larger group"
            )
    return st.sampled_from(elems)


def seeds() -> st.SearchStrategy[int]:
    """Draw a seed for :func:`torch.manual_seed` / :class:`torch.Generator`; shrinks to 0."""
    return st.integers(min_value=0, max_value=2**31 - 1)


# --------------------------------------------------------------------------------------------------
# Shapes and tensors
# --------------------------------------------------------------------------------------------------

Range = tuple[int, int]


def _ints(bounds: Range | int, name: str) -> st.SearchStrategy[int]:
    if isinstance(bounds, int):
        bounds = (bounds, bounds)
    lo, hi = bounds
    if not 1 <= lo <= hi:
        raise ValueError(
            f"{name}: got {bounds!r}; expected (lo, hi) with 1 <= lo <= hi, or an int >= 1"
        )
    return st.integers(lo, hi)


def image_shapes(
    square: bool = True,
    batch: Range | int = (1, 3),
    channels: Range | int = (1, 4),
    size: Range | int = (4, 12),
) -> st.SearchStrategy[tuple[int, int, int, int]]:
    """Draw image batch shapes ``(B, C, H, W)``; bounds are inclusive ``(lo, hi)`` or one int.

    Args:
        square: ``H == W`` (what rotations need); otherwise ``H`` and ``W`` are drawn independently.
        batch: bounds of ``B``.
        channels: bounds of ``C``.
        size: bounds of ``H`` and ``W``.

    Example:
        >>> from hypothesis import find
        >>> find(image_shapes(), lambda s: True)
        (1, 1, 4, 4)
    """
    b, c, s = _ints(batch, "batch"), _ints(channels, "channels"), _ints(size, "size")
    if square:
        return st.tuples(b, c, s).map(lambda t: (t[0], t[1], t[2], t[2]))
    return st.tuples(b, c, s, s)


def sequence_shapes(
    batch: Range | int = (1, 3),
    channels: Range | int = (1, 4),
    length: Range | int = (4, 12),
) -> st.SearchStrategy[tuple[int, int, int]]:
    """Draw sequence batch shapes ``(B, C, L)`` for Conv1d models (``kind="seq"``)."""
    return st.tuples(_ints(batch, "batch"), _ints(channels, "channels"), _ints(length, "length"))


def feature_shapes(
    batch: Range | int = (1, 3),
    features: Range | int = (2, 8),
) -> st.SearchStrategy[tuple[int, int]]:
    """Draw feature-vector batch shapes ``(B, F)`` for MLPs (``kind="mlp"``)."""
    return st.tuples(_ints(batch, "batch"), _ints(features, "features"))


def set_shapes(
    batch: Range | int = (1, 3),
    set_size: Range | int = (2, 4),
    features: Range | int = (1, 4),
) -> st.SearchStrategy[tuple[int, int, int]]:
    """Draw set batch shapes ``(B, N, F)``: ``N`` members of ``F`` features (``kind="mlp"``)."""
    return st.tuples(
        _ints(batch, "batch"), _ints(set_size, "set_size"), _ints(features, "features")
    )


def inputs(
    shape: Sequence[int], seed: int = 0, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A standard-normal tensor made deterministically from ``seed``, without touching global RNG.

    Tensors are thus reproducible from structure: a counterexample is (shape, seed), not floats.

    Example:
        >>> torch.equal(inputs((2, 3), seed=7), inputs((2, 3), seed=7))
        True
    """
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------------
# Architectures: layer specs
# --------------------------------------------------------------------------------------------------
# Each layer spec is a small frozen dataclass whose repr evaluates back to an equal value, so a
# counterexample is readable and can be pasted into a regression test.

#: Activation names the architectures draw from, mapped to their modules.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


@dataclass(frozen=True)
class Act:
    """An elementwise activation (one of :data:`ACTIVATIONS`)."""

    name: str = "relu"


@dataclass(frozen=True)
class Conv:
    """A convolution (``kind`` cnn/seq) with padding ``kernel // 2`` ("same" at stride 1).

    ``depthwise=True`` uses ``groups=in_channels``; ``out_channels`` is then a multiple of it.
    """

    out_channels: int
    kernel: int = 3
    stride: int = 1
    depthwise: bool = False


@dataclass(frozen=True)
class Linear:
    """A linear layer on the last axis (``kind`` mlp)."""

    out_features: int


@dataclass(frozen=True)
class BatchNorm:
    """Batch norm over the channel axis (cnn/seq) or features of ``(B, F)`` inputs (mlp)."""


@dataclass(frozen=True)
class LayerNorm:
    """Layer norm over the last axis (``kind`` mlp)."""


@dataclass(frozen=True)
class Pool:
    """Max or average pooling, kernel 2, stride 2 (cnn/seq)."""

    kind: Literal["max", "avg"] = "max"


@dataclass(frozen=True)
class Dropout:
    """Dropout with probability ``p`` (identity in eval mode)."""

    p: float = 0.5


@dataclass(frozen=True)
class Residual:
    """``x + body(x)``: conv-bn-relu-conv-bn (cnn/seq) or linear-relu-linear (mlp, kernel None)."""

    kernel: int | None = 3


@dataclass(frozen=True)
class Concat:
    """Two branches (convs with the given kernels, or linears) concatenated on channels/features."""

    out_channels: int
    kernels: tuple[int, int] | None = (1, 3)


#: Any one layer of an :class:`ArchSpec` body.
LayerSpec = Act | Conv | Linear | BatchNorm | LayerNorm | Pool | Dropout | Residual | Concat

_HEADS = ("avg", "max", "flatten")
_ARCH_KINDS = ("cnn", "seq", "mlp")


class ResidualBlock(nn.Module):
    """``x + body(x)`` (shape-preserving body)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConcatBranch(nn.Module):
    """``cat([left(x), right(x)], dim)``."""

    def __init__(self, left: nn.Module, right: nn.Module, dim: int) -> None:
        super().__init__()
        self.left, self.right, self.dim = left, right, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.left(x), self.right(x)], dim=self.dim)


class SetPool(nn.Module):
    """Mean or max over the set axis 1 of ``(B, N, F)``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1) if self.kind == "avg" else x.amax(dim=1)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


# --------------------------------------------------------------------------------------------------
# Architectures: the spec and its builder
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """A small model described by structure only; :meth:`build` makes it deterministically.

    Attributes:
        kind: ``"cnn"`` (Conv2d on ``(B, C, H, W)``), ``"seq"`` (Conv1d on ``(B, C, L)``) or
            ``"mlp"`` (Linear on ``(B, F)``, or per set member on ``(B, N, F)``).
        input_shape: the input shape the model was drawn for (it runs on it).
        layers: the body, in order.
        head: ``"avg"``/``"max"`` global pooling (over space, or over the set axis) or
            ``"flatten"``, followed by a linear layer to ``num_classes``.
        num_classes: output width.
        seed: parameters (and BatchNorm running statistics) come from ``torch.manual_seed(seed)``.

    ``repr(spec)`` evaluates back to an equal spec given this module's names.

    Example:
        >>> layers = (Conv(4, kernel=3, stride=2), Act("relu"))
        >>> spec = ArchSpec("cnn", (2, 3, 8, 8), layers, "avg", 5, 0)
        >>> spec.build().eval()(spec.example_input()).shape
        torch.Size([2, 5])
        >>> spec.describe()
        'cnn (2, 3, 8, 8): conv(4,k3,s2) > relu > head avg -> 5 [seed 0]'
    """

    kind: Literal["cnn", "seq", "mlp"]
    input_shape: tuple[int, ...]
    layers: tuple[LayerSpec, ...]
    head: Literal["avg", "max", "flatten"] = "avg"
    num_classes: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _ARCH_KINDS:
            raise ValueError(f"ArchSpec: got kind={self.kind!r}; expected one of {_ARCH_KINDS!r}")
        if self.head not in _HEADS:
            raise ValueError(f"ArchSpec: got head={self.head!r}; expected one of {_HEADS!r}")
        ndim = {"cnn": 4, "seq": 3}.get(self.kind)
        if (ndim and len(self.input_shape) != ndim) or (
            self.kind == "mlp" and len(self.input_shape) not in (2, 3)
        ):
            raise ValueError(
                f"ArchSpec: got input_shape={self.input_shape!r} for kind={self.kind!r}; expected "
                "(B, C, H, W) for cnn, (B, C, L) for seq, (B, F) or (B, N, F) for mlp"
            )

    @property
    def in_channels(self) -> int:
        """Channels (cnn/seq) or features (mlp) of the input."""
        return self.input_shape[-1] if self.kind == "mlp" else self.input_shape[1]

    @property
    def output_shape(self) -> tuple[int, int]:
        """``(B, num_classes)``."""
        return (self.input_shape[0], self.num_classes)

    def example_input(self, seed: int | None = None) -> torch.Tensor:
        """A float32 input of :attr:`input_shape` made by :func:`inputs` (seed: ``self.seed``)."""
        return inputs(self.input_shape, self.seed if seed is None else seed)

    def describe(self) -> str:
        """A one-line summary for ``hypothesis.note`` and error messages."""
        return (
            f"{self.kind} {self.input_shape}: "
            + " > ".join([_describe_layer(layer) for layer in self.layers] + [f"head {self.head}"])
            + f" -> {self.num_classes} [seed {self.seed}]"
        )

    def build(self) -> nn.Sequential:
        """Make the model: an ``nn.Sequential`` in training mode, deterministic in ``seed``.

        The global RNG state is left unchanged. BatchNorm affine parameters and running statistics
        are randomised (from the same seed) so that eval-mode BatchNorm is not the identity.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = _Builder(self).build()
            for mod in model.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    with torch.no_grad():
                        mod.weight.uniform_(0.5, 1.5)
                        mod.bias.normal_(0.0, 0.1)
                        mod.running_mean.normal_(0.0, 0.1)
                        mod.running_var.uniform_(0.5, 1.5)
        return model


def _describe_layer(layer: LayerSpec) -> str:
    if isinstance(layer, Act):
        return layer.name
    if isinstance(layer, Conv):
        dw = ",dw" if layer.depthwise else ""
        return f"conv({layer.out_channels},k{layer.kernel},s{layer.stride}{dw})"
    if isinstance(layer, Linear):
        return f"linear({layer.out_features})"
    if isinstance(layer, BatchNorm):
        return "bn"
    if isinstance(layer, LayerNorm):
        return "ln"
    if isinstance(layer, Pool):
        return f"{layer.kind}pool"
    if isinstance(layer, Dropout):
        return f"dropout({layer.p})"
    if isinstance(layer, Residual):
        return "res" if layer.kernel is None else f"res(k{layer.kernel})"
    if isinstance(layer, Concat):
        ks = "" if layer.kernels is None else f",k{layer.kernels[0]}|k{layer.kernels[1]}"
        return f"cat(2x{layer.out_channels}{ks})"
    return repr(layer)


class _Builder:
    """Walks the layer specs, tracking channels and spatial size, and makes the modules."""

    def __init__(self, spec: ArchSpec) -> None:
        self.spec = spec
        self.dim = {"cnn": 2, "seq": 1, "mlp": 0}[spec.kind]
        if spec.kind == "mlp":
            self.width = spec.input_shape[-1]
            self.spatial: tuple[int, ...] = tuple(spec.input_shape[1:-1])  # set axis, if any
        else:
            self.width = spec.input_shape[1]
            self.spatial = tuple(spec.input_shape[2:])

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Module:
        cls = nn.Conv2d if self.dim == 2 else nn.Conv1d
        return cls(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups)

    def bn(self, c: int) -> nn.Module:
        return nn.BatchNorm2d(c) if self.dim == 2 else nn.BatchNorm1d(c)

    def layer(self, layer: LayerSpec) -> nn.Module:
        c = self.width
        if isinstance(layer, Act):
            return ACTIVATIONS[layer.name]()
        if isinstance(layer, Dropout):
            return nn.Dropout(layer.p)
        if self.dim == 0:
            return self.mlp_layer(layer)
        if isinstance(layer, Conv):
            groups = c if layer.depthwise else 1
            self.width = layer.out_channels
            self.spatial = tuple((s - 1) // layer.stride + 1 for s in self.spatial)
            return self.conv(c, layer.out_channels, layer.kernel, layer.stride, groups)
        if isinstance(layer, BatchNorm):
            return self.bn(c)
        if isinstance(layer, Pool):
            self.spatial = tuple(s // 2 for s in self.spatial)
            if layer.kind == "max":
                return nn.MaxPool2d(2) if self.dim == 2 else nn.MaxPool1d(2)
            return nn.AvgPool2d(2) if self.dim == 2 else nn.AvgPool1d(2)
        if isinstance(layer, Residual):
            k = layer.kernel or 3
            body = nn.Sequential(
                self.conv(c, c, k), self.bn(c), nn.ReLU(), self.conv(c, c, k), self.bn(c)
            )
            return ResidualBlock(body)
        if isinstance(layer, Concat):
            k1, k2 = layer.kernels or (1, 3)
            self.width = 2 * layer.out_channels
            return ConcatBranch(
                self.conv(c, layer.out_channels, k1), self.conv(c, layer.out_channels, k2), dim=1
            )
        raise ValueError(f"ArchSpec: got layer {layer!r}; not valid for kind={self.spec.kind!r}")

    def mlp_layer(self, layer: LayerSpec) -> nn.Module:
        f = self.width
        if isinstance(layer, Linear):
            self.width = layer.out_features
            return nn.Linear(f, layer.out_features)
        if isinstance(layer, BatchNorm) and not self.spatial:
            return nn.BatchNorm1d(f)
        if isinstance(layer, LayerNorm):
            return nn.LayerNorm(f)
        if isinstance(layer, Residual):
            return ResidualBlock(nn.Sequential(nn.Linear(f, f), nn.ReLU(), nn.Linear(f, f)))
        if isinstance(layer, Concat):
            self.width = 2 * layer.out_channels
            return ConcatBranch(
                nn.Linear(f, layer.out_channels), nn.Linear(f, layer.out_channels), dim=-1
            )
        raise ValueError(f"ArchSpec: got layer {layer!r}; not valid for kind='mlp'")

    def head(self) -> list[nn.Module]:
        head = self.spec.head
        if head == "flatten":
            n = self.width * math.prod(self.spatial)
            return [nn.Flatten(), nn.Linear(n, self.spec.num_classes)]
        if self.dim == 0:
            pool: list[nn.Module] = [SetPool(head)] if self.spatial else []
        elif self.dim == 2:
            pool = [
                nn.AdaptiveAvgPool2d(1) if head == "avg" else nn.AdaptiveMaxPool2d(1),
                nn.Flatten(),
            ]
        else:
            pool = [
                nn.AdaptiveAvgPool1d(1) if head == "avg" else nn.AdaptiveMaxPool1d(1),
                nn.Flatten(),
            ]
        return [*pool, nn.Linear(self.width, self.spec.num_classes)]

    def build(self) -> nn.Sequential:
        body = [self.layer(layer) for layer in self.spec.layers]
        return nn.Sequential(*body, *self.head())


# --------------------------------------------------------------------------------------------------
# Architectures: the strategy
# --------------------------------------------------------------------------------------------------

_KERNELS = (1, 3, 5)


def _default_shapes(kind: str) -> st.SearchStrategy[tuple[int, ...]]:
    if kind == "cnn":
        return image_shapes()
    if kind == "seq":
        return sequence_shapes()
    return feature_shapes()


def _layer_tokens(kind: str, max_width: int) -> st.SearchStrategy[LayerSpec]:
    """Layer choices drawn without looking at the model's state (legalised later by _legalise).

    Drawing layers as a plain list of state-free tokens is what makes examples shrink well: the
    shrinker deletes list elements and simplifies each one on its own (drawing each layer from the
    current state instead left it stuck in local minima). Options are listed in order of simplicity,
    since ``one_of`` shrinks towards the first.
    """
    widths = st.integers(1, max_width)
    kernels = st.sampled_from(_KERNELS)
    common_first = [st.sampled_from(list(ACTIVATIONS)).map(Act)]
    dropout = st.sampled_from([0.5, 0.1]).map(Dropout)
    if kind == "mlp":
        options = [
            *common_first,
            st.builds(Linear, widths),
            st.just(LayerNorm()),
            st.just(BatchNorm()),
            dropout,
            st.just(Residual(None)),
            st.builds(Concat, widths, st.none()),
        ]
    else:
        options = [
            *common_first,
            st.builds(Conv, widths, kernels, st.sampled_from([1, 2]), st.booleans()),
            st.just(BatchNorm()),
            st.sampled_from(["max", "avg"]).map(Pool),
            dropout,
            kernels.map(Residual),
            st.builds(Concat, widths, st.tuples(kernels, kernels)),
        ]
    return st.one_of(options)


def _legalise(
    kind: str, shape: tuple[int, ...], tokens: Sequence[LayerSpec], max_width: int
) -> tuple[tuple[LayerSpec, ...], tuple[int, ...]]:
    """Make drawn layer tokens valid for ``shape``; return the layers and the final spatial size.

    A layer that cannot run where it stands is dropped (pooling below size 2, BatchNorm with one
    value per channel, which fails in training mode) or adjusted (stride 2 below size 2 becomes 1; a
    depthwise conv outputs 1x or 2x its input channels). The state is tracked exactly as ``build()``
    does.
    """
    batch = shape[0]
    if kind == "mlp":
        width, spatial = shape[-1], tuple(shape[1:-1])
    else:
        width, spatial = shape[1], tuple(shape[2:])
    layers: list[LayerSpec] = []
    for layer in tokens:
        bn_ok = batch * math.prod(spatial) > 1 if kind != "mlp" else batch > 1 and not spatial
        can_down = kind != "mlp" and min(spatial) >= 2
        if isinstance(layer, BatchNorm) and not bn_ok:
            continue
        if isinstance(layer, Residual) and kind != "mlp" and not bn_ok:  # its body has BatchNorm
            continue
        if isinstance(layer, Pool):
            if not can_down:
                continue
            spatial = tuple(s // 2 for s in spatial)
        if isinstance(layer, Conv):
            out = layer.out_channels
            if layer.depthwise:
                out = 2 * width if out > width and 2 * width <= max_width else width
            stride = layer.stride if can_down else 1
            layer = Conv(out, layer.kernel, stride, layer.depthwise)
            width = out
            spatial = tuple((s - 1) // stride + 1 for s in spatial)
        elif isinstance(layer, Linear):
            width = layer.out_features
        elif isinstance(layer, Concat):
            width = 2 * layer.out_channels
        layers.append(layer)
    return tuple(layers), spatial


@st.composite
def _draw_arch(
    draw: st.DrawFn,
    kind: str,
    shapes: st.SearchStrategy[tuple[int, ...]],
    tokens: st.SearchStrategy[list[LayerSpec]],
    max_width: int,
    num_classes: Range,
) -> ArchSpec:
    shape = tuple(draw(shapes, label="input_shape"))
    layers, spatial = _legalise(kind, shape, draw(tokens, label="layers"), max_width)
    heads = ["avg", "max", "flatten"] if (kind != "mlp" or spatial) else ["flatten"]
    head = draw(st.sampled_from(heads), label="head")
    classes = draw(st.integers(*num_classes), label="num_classes")
    seed = draw(seeds(), label="seed")
    return ArchSpec(kind, shape, layers, head, classes, seed)  # type: ignore[arg-type]


def architectures(
    kind: Literal["cnn", "seq", "mlp"] = "cnn",
    *,
    shapes: st.SearchStrategy[tuple[int, ...]] | None = None,
    min_layers: int = 1,
    max_layers: int = 4,
    max_width: int = 8,
    num_classes: Range = (2, 5),
) -> st.SearchStrategy[ArchSpec]:
    """Draw small models as :class:`ArchSpec` values that build and run on their drawn input shape.

    The vocabulary: convolutions (kernel 1/3/5, "same" padding, stride 1 or 2, dense or depthwise),
    batch norm, activations (relu, gelu, silu, tanh, leaky_relu), max/avg pooling, a residual block
    (conv-bn-relu-conv-bn + identity), a concatenation branch (two convs concatenated on channels),
    dropout; then global avg/max pooling or flatten, and a linear head. For ``kind="mlp"`` linear
    layers and layer norm replace convolutions and pooling. Strides and pooling are only kept while
    the spatial size allows (it never drops below 1), and batch norm only where it has more than one
    value per channel, so every model also runs in training mode. Examples shrink towards fewer,
    simpler layers.

    Args:
        kind: ``"cnn"`` (``(B, C, H, W)``), ``"seq"`` (Conv1d on ``(B, C, L)``), ``"mlp"``
            (``(B, F)``, or ``(B, N, F)`` set inputs when given ``shapes=set_shapes()``: layers then
            act per member).
        shapes: strategy for the input shape; defaults to :func:`image_shapes`,
            :func:`sequence_shapes` or :func:`feature_shapes`.
        min_layers: fewest body layers drawn. A drawn layer that cannot run where it stands (e.g.
            BatchNorm on a single value per channel) is dropped, so a body can still be shorter.
        max_layers: most body layers.
        max_width: most channels/features a drawn layer outputs.
        num_classes: inclusive bounds of the head width.

    Raises:
        ValueError: an unknown kind, or bounds that are empty.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5, database=None)
        ... @given(arch=architectures(kind="seq"))
        ... def test_runs(arch):
        ...     model = arch.build().eval()
        ...     assert model(arch.example_input()).shape == arch.output_shape
        >>> test_runs()
    """
    if kind not in _ARCH_KINDS:
        raise ValueError(f"architectures: got kind={kind!r}; expected one of {_ARCH_KINDS!r}")
    if not 0 <= min_layers <= max_layers or max_width < 1:
        raise ValueError(
            f"architectures: got min_layers={min_layers!r}, max_layers={max_layers!r}, "
            f"max_width={max_width!r}; expected 0 <= min_layers <= max_layers and max_width >= 1"
        )
    _ints(num_classes, "num_classes")
    shapes = _default_shapes(kind) if shapes is None else shapes
    tokens = st.lists(_layer_tokens(kind, max_width), min_size=min_layers, max_size=max_layers)
    return _draw_arch(kind, shapes, tokens, max_width, tuple(num_classes))
