"""A zoo of small, realistic models for equivfx's end-to-end tests.

Every entry of :data:`ZOO` is a :class:`ZooEntry`: call it to get a fresh ``(model, example_input,
group_spec)`` triple (deterministic: the factory seeds torch itself), read ``.groups`` for every
group the model is tested under (``groups[0]`` is the spec the factory returns) and ``.tags`` for
what is special about it:

- ``"dropout"``: has dropout, so compare in eval mode only;
- ``"batchnorm"``: has BatchNorm, which stays equivariant in train mode;
- ``"invariant"``: the plain model is already invariant under its groups (DeepSets);
- ``"dense_output"``: returns a per-pixel map (B, K, H, W) carrying the input's own action;
- ``"untraceable_submodule"``: a submodule fx cannot trace (it must become a leaf);
- ``"pathological"``: not meant to compile cleanly (see the other tags);
- ``"control_flow"``: data-dependent Python control flow in ``forward`` (untraceable);
- ``"bakes_batch"``: reshapes with the example batch size written in as a constant;
- ``"mixes_batch"``: reduces over the batch axis, so slots cannot be folded into it.

Models are deliberately tiny: each forward takes a few milliseconds at batch 2 on one CPU core, so
a group of order 120 (``Perm5``) still runs quickly when its slots are folded into the batch. The
models are plain ``torch.nn`` code; nothing here imports equivfx.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ZooEntry", "ZOO", "clean_names", "names_with"]

BATCH = 2


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# 1. ResNet-style
# --------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a residual (1x1 strided conv + bn when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomise_bn(model: nn.Module) -> None:
    """Give BatchNorm layers non-trivial affine parameters and running statistics.

    Fresh BN layers have mean 0 / var 1 / weight 1 / bias 0, which would make eval mode a near
    identity and hide mistakes in how a compiled model handles buffers.
    """
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(n, generator=g))


def make_resnet(seed: int = 0) -> tuple[nn.Module, Tensor, str]:
    _seed(seed)
    model = TinyResNet()
    _randomise_bn(model)
    x = torch.randn(BATCH, 3, 16, 16)
    return model.eval(), x, "C4"


# --------------------------------------------------------------------------------------------------
# 2. VGG-style
# --------------------------------------------------------------------------------------------------


class TinyVGG(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(self.dropout(x))


def make_vgg(seed: int = 0) -> tuple[nn.Module, Tensor, str]:
    _seed(seed)
    model = TinyVGG()
    x = torch.randn(BATCH, 1, 16, 16)
    return model.eval(), x, "D4"


# --------------------------------------------------------------------------------------------------
# 3. MobileNet-style
# --------------------------------------------------------------------------------------------------


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = nn.ReLU6(inplace=True)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.dw(x)))
        return F.hardswish(self.bn2(self.pw(x)))


class TinyMobileNet(nn.Module):
    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()
        )
        self.branch_a = DepthwiseSeparable(8, 8, stride=2)
        self.branch_b = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(8, 8, 1), nn.Hardswish())
        self.block = DepthwiseSeparable(16, 24, stride=2)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.block(x)
        x = x.mean(dim=(2, 3))
        return self.head(x)


def make_mobilenet(seed: int = 0) -> tuple[nn.Module, Tensor, str]:
    _seed(seed)
    model = TinyMobileNet()
    _randomise_bn(model)
    x = torch.randn(BATCH, 3, 16, 16)
    return model.eval(), x, "C4"


# --------------------------------------------------------------------------------------------------
# 4. Small ViT (not equivariant by itself: the learned positional embedding pins the orientation)
# --------------------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(
        self,
        image: int = 16,
        patch: int = 4,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        num_classes: int = 7,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def make_vit(seed: int = 0) -> tuple[nn.Module, Tensor, str]:
    _seed(seed)
    model = TinyViT()
    x = torch.randn(BATCH, 3, 16, 16)
    return model.eval(), x, "C4"


# --------------------------------------------------------------------------------------------------
# 5. 1D conv net for sequences (circular padding: equivariant to shifts before the head's bias ...
#    but not to reversal, and the strided conv breaks exact shift equivariance)
# --------------------------------------------------------------------------------------------------


class SeqConvNet(nn.Module):
    def __init__(self, cin: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(cin, 8, 5, padding=2, padding_mode="circular"),
            nn.ReLU(),
            nn.Conv1d(8, 16, 3, padding=1, padding_mode="circular", stride=2),
            nn.ReLU(),
            nn.Conv1d(16, 16, 3, padding=1, padding_mode="circular"),
            nn.Tanh(),
        )
        self.pool = nn.AdaptiveMaxPool1d(1)
        self.head = nn.Linear(16 + 16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.net(x)
        # max over time and the position-dependent first step: deliberately not invariant
        feat = torch.cat([self.pool(h).squeeze(-1), h[..., 0]], dim=1)
        return self.head(feat)


def make_seqconv(seed: int = 0) -> tuple[nn.Module, Tensor, str]:
    _seed(seed)
    model = SeqConvNet()
    x = torch.randn(BATCH, 4, 16)
    return model.eval(), x, "Shift16"


# --------------------------------------------------------------------------------------------------
# 6. Set models: DeepSets (already invariant) and a flatten-then-Linear model (not invariant)
# --------------------------------------------------------------------------------------------------


class DeepSets(nn.Module):
    def __init__(self, fin: int = 3, hidden: int = 16, out: int = 4) -> None:
        super().__init__()
        self.phi = nn.Sequential(
            nn.Linear(fin, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.rho = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, x: Tensor) -> Tensor:  # x: (B, N, F)
        return self.rho(self.phi(x).sum(dim=1))


class FlatSetModel(nn.Module):
    """Reads the set in its given order: NOT permutation invariant."""

    def __init__(self, n: int = 5, fin: int = 3, hidden: int = 16, out: int = 4) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Flatten(1), nn.Linear(n * fin, hidden), nn.ReLU(), nn.Linear(hidden, out)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


def make_deepsets(seed: int = 0) -> tuple[nn.Module, Tensor, str]:
    _seed(seed)
    model = DeepSets()
    x = torch.randn(BATCH, 5, 3)
    return model.eval(), x, "Perm5"


def make_flatset(seed: int = 0) -> tuple[nn.Module, Tensor, str]:
    _seed(seed)
    model = FlatSetModel()
    x = torch.randn(BATCH, 5, 3)
    return model.eval(), x, "Perm5"


# --------------------------------------------------------------------------------------------------
# Segmentation-like: a fully convolutional net returning per-pixel logits (B, K, H, W)
# --------------------------------------------------------------------------------------------------


class TinySegNet(nn.Module):
    def __init__(self, cin: int = 3, k: int = 3) -> None:
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(cin, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2),
            nn.ReLU(),
        )
        # a position-dependent bias map: the plain net is not rotation equivariant
        self.pos_bias = nn.Parameter(0.5 * torch.randn(1, k, 16, 16))
        self.out = nn.Conv2d(8, k, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.enc(x)) + self.pos_bias


def make_segnet(seed: int = 0) -> tuple[nn.Module, Tensor, str]:
    _seed(seed)
    model = TinySegNet()
    x = torch.randn(BATCH, 3, 16, 16)
    return model.eval(), x, "C4"


# --------------------------------------------------------------------------------------------------
# An untraceable *submodule* inside a traceable model (the front end must make it a leaf)
# --------------------------------------------------------------------------------------------------


class SafeClamp(nn.Module):
    """Clamps only when the input has outliers: data-dependent control flow, fx cannot trace it."""

    def forward(self, x: Tensor) -> Tensor:
        if x.abs().max() > 1e3:
            x = x.clamp(-1e3, 1e3)
        return x


class LeafyNet(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.clamp = SafeClamp()
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.clamp(F.silu(self.conv1(x)))
        h = F.silu(self.conv2(h))
        return self.fc(h.flatten(1))


def make_leafy(seed: int = 0) -> tuple[nn.Module, Tensor, str]:
    _seed(seed)
    model = LeafyNet()
    x = torch.randn(BATCH, 2, 8, 8)
    return model.eval(), x, "D4"


# --------------------------------------------------------------------------------------------------
# 7-9. Pathological models
# --------------------------------------------------------------------------------------------------


class ControlFlowNet(nn.Module):
    """``forward`` branches on a tensor value: torch.fx.symbolic_trace cannot trace it.

    The condition (the sign of the mean of the input) is the same for every transformed copy of the
    input under the image groups and does not change when copies are stacked along the batch, so the
    global lift stays well defined however an opaque node is batched.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(1), nn.Linear(6 * 8 * 8, 4)
        )
        self.neg = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Flatten(1), nn.Linear(6 * 8 * 8, 4)
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.mean() > 0:
            return self.pos(x)
        return 2.0 * self.neg(x)


def make_control_flow(seed: int = 0) -> tuple[nn.Module, Tensor, str]:
    _seed(seed)
    model = ControlFlowNet()
    x = torch.randn(BATCH, 3, 8, 8) + 0.5  # mean clearly positive; the tests also use -x
    return model.eval(), x, "C4"


class BakedBatchNet(nn.Module):
    """Flattens with ``x.view(2, -1)``: 2 is the example batch size, written in as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(F.relu(self.conv(x)))
        h = h.view(2, -1)
        return self.fc(h)


def make_baked_batch(seed: int = 0) -> tuple[nn.Module, Tensor, str]:
    _seed(seed)
    model = BakedBatchNet()
    x = torch.randn(BATCH, 3, 8, 8)
    return model.eval(), x, "C4"


class BatchMixingNet(nn.Module):
    """Centres features over the batch axis: sample i's output depends on sample j's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        h = h - h.mean(0, keepdim=True)  # FX node name: "mean"
        return self.fc(h.mean(dim=(2, 3)))


def make_batch_mixing(seed: int = 0) -> tuple[nn.Module, Tensor, str]:
    _seed(seed)
    model = BatchMixingNet()
    x = torch.randn(BATCH, 3, 8, 8)
    return model.eval(), x, "C4"


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: calling it returns a fresh, seeded ``(model, x, groups[0])``."""

    name: str
    factory: Callable[..., tuple[nn.Module, Tensor, str]]
    groups: tuple[str, ...]
    tags: frozenset[str] = field(default_factory=frozenset)

    def __call__(self, seed: int = 0) -> tuple[nn.Module, Tensor, str]:
        model, x, spec = self.factory(seed)
        assert spec == self.groups[0], (self.name, spec, self.groups)
        return model, x, spec


def _entry(name: str, factory, groups, tags=()) -> ZooEntry:
    return ZooEntry(name, factory, tuple(groups), frozenset(tags))


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        _entry("resnet", make_resnet, ["C4", "D4"], ["batchnorm"]),
        _entry("vgg", make_vgg, ["D4"], ["dropout"]),
        _entry("mobilenet", make_mobilenet, ["C4"], ["batchnorm"]),
        _entry("vit", make_vit, ["C4"]),
        _entry("seqconv", make_seqconv, ["Shift16", "Rev", "ShiftRev16"]),
        _entry("deepsets", make_deepsets, ["Perm5"], ["invariant"]),
        _entry("flatset", make_flatset, ["Perm5"]),
        _entry("segnet", make_segnet, ["C4"], ["dense_output"]),
        _entry("leafy", make_leafy, ["D4"], ["untraceable_submodule"]),
        _entry("control_flow", make_control_flow, ["C4"], ["pathological", "control_flow"]),
        _entry("baked_batch", make_baked_batch, ["C4"], ["pathological", "bakes_batch"]),
        _entry("batch_mixing", make_batch_mixing, ["C4"], ["pathological", "mixes_batch"]),
    ]
}


def clean_names() -> list[str]:
    """Names of the models that must compile cleanly under every group they list."""
    return [n for n, e in ZOO.items() if "pathological" not in e.tags]


def names_with(tag: str) -> list[str]:
    return [n for n, e in ZOO.items() if tag in e.tags]
