"""Layer-wise mode: mixing layers, function-preserving conversion, the paper's parameter counts."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import equivfx
import equivfx.passes.mixing as mixing
from equivfx.errors import EquivFXError
from equivfx.passes.mixing import (
    MixingLayer,
    SlotGather,
    gather_channels_last,
    gather_rows,
    release_workspace,
    widen,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import ZOO, clean_names  # noqa: E402


class PaperMNIST(nn.Module):
    """The authors' V1 network: three 3x3 convs (80, 80, 32), 4x4 max-pool, dense 1024, dense 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 80, 3, padding=1)
        self.conv2 = nn.Conv2d(80, 80, 3, padding=1)
        self.conv3 = nn.Conv2d(80, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(4, 4)
        self.dense = nn.Linear(32 * 7 * 7, 1024)
        self.logits = nn.Linear(1024, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        x = torch.relu(self.dense(self.pool(x).flatten(1)))
        return self.logits(x)


def counts(model: nn.Module) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in m.parameters())
        for name, m in model.named_children()
        if not name.startswith("equivfx")
    }


def test_paper_parameter_accounting():
    emodel = equivfx.compile(PaperMNIST(), "C4", mode="layerwise", readout="pose")
    assert counts(emodel) == {
        "conv1": 800,
        "conv2": 230_480,
        "conv3": 92_192,
        "pool": 0,
        "dense": 6_423_552,
        "logits": 40_970,
    }
    authors = equivfx.compile(
        PaperMNIST(),
        "C4",
        mode="layerwise",
        readout="pose",
        mix=lambda name, m: name in {"conv2", "conv3", "dense"},
    )
    assert counts(authors)["logits"] == 10_250
    assert emodel(torch.randn(2, 1, 28, 28)).shape == (2, 40)  # R^40 = Map(C4, R^10)


def test_decode_pose():
    G = equivfx.group("C4")
    logits = torch.zeros(3, 40)
    logits[0, 0 * 10 + 3] = 1  # class 3, upright
    logits[1, 1 * 10 + 9] = 1  # class 9, pose r
    logits[2, 3 * 10 + 0] = 1  # class 0, pose r3
    cls, pose = equivfx.decode_pose(logits, G)
    assert cls.tolist() == [3, 9, 0]
    assert [p.name for p in pose] == ["e", "r", "r3"]
    assert equivfx.decode_pose(logits[1], "C4") == (9, G.element("r"))
    with pytest.raises(equivfx.errors.ReadoutError, match="divisible"):
        equivfx.decode_pose(torch.zeros(2, 41), G)


def test_pose_of_a_rotated_digit_is_the_rotation():
    """x = g . x_upright peaks at slot g: a model trained upright reads the pose off the argmax."""
    model = PaperMNIST().eval()
    emodel = equivfx.compile(model, "C4", mode="layerwise", readout="pose")
    G = equivfx.group("C4")
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        base_cls, base_pose = equivfx.decode_pose(emodel(x)[0], G)
        for g in G.elements:
            cls, pose = equivfx.decode_pose(emodel(G.act(g, x))[0], G)
            assert cls == base_cls and pose == G.compose(g, base_pose)


def _reinit(model: nn.Module, seed: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


CASES = [(n, spec) for n in clean_names() for spec in ZOO[n].groups]


def _reinit_and_check_slots_permute(emodel, x, spec):
    """Random weights everywhere, then out(h . x) is out(x) with its slots permuted by the
    regular action, for every h: out(h.x)[:, j] = out(x)[:, idx(h^-1 g_j)]."""
    _reinit(emodel)
    G = equivfx.group(spec)
    with torch.no_grad():
        y = emodel(x)
        for h in G.elements:
            want = y[:, list(G.regular_permutation(h))]
            torch.testing.assert_close(emodel(G.act(h, x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, spec", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_conversion_equals_global_mode_and_reinit_stays_equivariant(name, spec):
    model, x, _ = ZOO[name]()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emodel = equivfx.compile(model, spec, mode="layerwise", readout="slots", check=True)
        # every slot in one pass, as the layer-wise model computes: chunk="auto" may pick fewer
        # slots per pass on a busy machine, and other batch sizes round differently
        gmodel = equivfx.compile(model, spec, readout="slots", chunk=None)
    assert emodel.equivfx_info.mixed, "every zoo model has layers after the input stage"
    with torch.no_grad():
        assert torch.equal(emodel(x), gmodel(x))
    _reinit_and_check_slots_permute(emodel, x, spec)
    assert equivfx.verify(emodel, x).ok


def test_state_dict_keys_are_the_originals_with_wider_mixing_weights():
    model = PaperMNIST()
    emodel = equivfx.compile(model, "C4", mode="layerwise")
    assert list(emodel.state_dict()) == list(model.state_dict())
    assert emodel.state_dict()["conv2.weight"].shape == (80, 320, 3, 3)
    assert model.conv2.weight.shape == (80, 80, 3, 3)  # the original is untouched


def test_mix_by_names_and_errors():
    emodel = equivfx.compile(PaperMNIST(), "C4", mode="layerwise", mix={"conv2"})
    assert emodel.equivfx_info.mixed == ("conv2",)
    with pytest.raises(EquivFXError, match="pool"):
        equivfx.compile(PaperMNIST(), "C4", mode="layerwise", mix={"pool"})
    with pytest.raises(EquivFXError, match="layerwise"):
        equivfx.compile(PaperMNIST(), "C4", mix={"conv2"})


def test_a_module_called_on_both_stages_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    with pytest.raises(EquivFXError, match="both"):
        equivfx.compile(Shared(), "C4", mode="layerwise")


def test_training_changes_the_function_and_keeps_equivariance():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 3),
    )
    emodel = equivfx.compile(model, "D4", mode="layerwise", readout="invariant")
    x, target = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    before = emodel(x).detach()
    opt = torch.optim.SGD(emodel.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(emodel(x), target).backward()
        opt.step()
    wide = emodel.get_submodule("2").weight
    assert wide[:, 4:].abs().sum() > 0  # the zero-initialised blocks learned
    assert not torch.allclose(emodel(x), before)
    assert equivfx.verify(emodel, x).ok


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gather_matches_the_explicit_concatenation(groups):
    G = equivfx.group("D4")
    s = torch.randn(G.order * 3, 4, 5, 5)  # folded slots, B = 3
    out = SlotGather(G, 1, groups)(s)
    slots = s.unflatten(0, (G.order, 3))
    for g in range(G.order):
        blocks = [slots[G.table[g][u]] for u in range(G.order)]  # s(g u), u in slot order
        if groups == 1:
            want = torch.cat(blocks, 1)
        else:  # each conv group sees its own channels from every slot
            per = [b.unflatten(1, (groups, -1)) for b in blocks]
            want = torch.cat(per, 2).flatten(1, 2)
        assert torch.equal(out.unflatten(0, (G.order, 3))[g], want)


def test_gather_on_linear_features():
    G = equivfx.group("C4")
    s = torch.randn(G.order * 2, 5, 3)  # (|G| B, tokens, features)
    out = SlotGather(G, -1)(s).unflatten(0, (4, 2))
    slots = s.unflatten(0, (4, 2))
    for g in range(4):
        want = torch.cat([slots[G.table[g][u]] for u in range(4)], -1)
        assert torch.equal(out[g], want)


@pytest.mark.parametrize(
    "layer", [nn.Linear(3, 2), nn.Conv1d(2, 3, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Conv3d(2, 1, 1)]
)
def test_widen_preserves_the_function_on_the_identity_block(layer):
    wide = widen(layer, 4)
    shape = (
        (2, 3)
        if isinstance(layer, nn.Linear)
        else (2, layer.in_channels) + (5,) * (layer.weight.dim() - 2)
    )
    x = torch.randn(shape)
    if isinstance(layer, nn.Linear):
        xw = torch.cat([x] + [torch.randn_like(x) for _ in range(3)], -1)
    else:
        gr = layer.groups
        parts = [x] + [torch.randn_like(x) for _ in range(3)]
        xw = torch.cat([p.unflatten(1, (gr, -1)) for p in parts], 2).flatten(1, 2)
    torch.testing.assert_close(wide(xw), layer(x))


def test_norms_dropout_and_pooling_work_slot_wise():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.GELU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.InstanceNorm2d(4, affine=True),
        nn.Dropout(0.2),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.LayerNorm(4 * 9),
        nn.Linear(4 * 9, 3),
    ).eval()
    x = torch.randn(3, 2, 6, 6)
    emodel = equivfx.compile(model, "D4", mode="layerwise", readout="slots")
    assert emodel.equivfx_info.mixed == ("3", "9")
    with torch.no_grad():  # the wider layers sum zeros in another order: equal to rounding
        want = equivfx.compile(model, "D4", readout="slots")(x)
        torch.testing.assert_close(emodel(x), want, rtol=1e-6, atol=1e-6)
    _reinit(emodel)
    assert equivfx.verify(emodel, x).ok


def test_localisation_names_a_broken_mixing_layer():
    emodel = equivfx.compile(
        PaperMNIST().eval(), "C4", mode="layerwise", readout="slots", mix_layout="fused"
    )
    _reinit(emodel)
    layer = emodel.get_submodule("conv3")
    assert isinstance(layer, MixingLayer)
    # slots 0 and 1 swap their block weights: slot g no longer computes sum_v W_(g^-1 v) s(v)
    layer.slot_index = layer.slot_index[[1, 0, 2, 3]]
    report = equivfx.verify(emodel, torch.randn(2, 1, 28, 28), rtol=1e-3, atol=1e-4)
    assert not report.ok
    assert report.first_bad_node == "conv3"


def test_localisation_names_a_broken_mixing_gather():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2)).eval()
    emodel = equivfx.compile(model, "C4", mode="layerwise", readout="slots")
    _reinit(emodel)
    gather = emodel.get_submodule("equivfx_gather_2")  # groups > 1: the gather path
    # slots 0 and 1 read each other's inputs. (Permuting the columns, the order of the blocks u,
    # would only re-index the weights W_u: still a lift, still equivariant.)
    gather.table = gather.table[[1, 0, 2, 3]]
    report = equivfx.verify(emodel, torch.randn(2, 1, 10, 10))
    assert not report.ok
    assert report.first_bad_node == "equivfx_gather_2"


@pytest.mark.parametrize("spec", ["C4", "D4"])
@pytest.mark.parametrize(
    "layer, shape, batch_axis",
    [
        (nn.Conv1d(3, 5, 3, padding=1), (3, 7), 0),
        (nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular"), (3, 6, 6), 0),
        (nn.Conv3d(3, 2, 1), (3, 2, 3, 4), 0),
        (nn.Linear(3, 5), (3,), 0),
        (nn.Linear(3, 5), (4, 3), 0),
        (nn.Linear(3, 5), (4, 3), 1),  # sequence-first: the folded batch on axis 1
    ],
)
def test_fused_mixing_layer_equals_gather_then_wide_layer(spec, layer, shape, batch_axis):
    G = equivfx.group(spec)
    torch.manual_seed(0)
    fused = widen(layer, G.order, group=G)
    plain = widen(layer, G.order)
    assert isinstance(fused, type(layer)) and isinstance(fused, MixingLayer)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        for m in (fused, plain):
            m.weight.copy_(torch.randn_like(m.weight))  # every block non-zero, equal in both
        plain.weight.copy_(fused.weight)
        if layer.bias is not None:
            plain.bias.copy_(fused.bias)
    s = torch.randn(G.order * 2, *shape, dtype=torch.float64)  # folded slots, B = 2
    fused, plain = fused.double(), plain.double()
    if batch_axis:
        s = s.movedim(0, batch_axis)
    gather = SlotGather(G, 1 if not isinstance(layer, nn.Linear) else -1)
    want = plain(gather(s, batch_axis))
    torch.testing.assert_close(fused(s, batch_axis), want, rtol=1e-10, atol=1e-10)


def test_fused_mixing_layer_trains_its_one_weight_set():
    G = equivfx.group("C4")
    fused = widen(nn.Conv2d(2, 3, 3), G.order, group=G)
    with torch.no_grad():
        fused.weight.normal_()
    fused(torch.randn(8, 2, 5, 5)).square().sum().backward()
    assert fused.weight.grad.shape == fused.weight.shape and fused.weight.grad.abs().sum() > 0
    assert "slot_index" not in fused.state_dict()


@pytest.mark.parametrize("spec", ["D1", "D2"])
def test_flip_groups_after_reinit(spec):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 7, 3),
    ).eval()
    x = torch.randn(3, 2, 5, 7)  # flips accept rectangles
    emodel = equivfx.compile(model, spec, mode="layerwise", readout="slots")
    _reinit_and_check_slots_permute(emodel, x, spec)


@pytest.mark.parametrize("spec", ["C4", "D4"])
def test_fused_layout_computes_the_gather_layout_up_to_rounding(spec):
    model = PaperMNIST().eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fused = equivfx.compile(model, spec, mode="layerwise", readout="pose", mix_layout="fused")
    gather = equivfx.compile(model, spec, mode="layerwise", readout="pose")
    assert fused.get_submodule("conv3").layout == "fused"
    assert gather.get_submodule("conv3").layout == "gather"
    assert not isinstance(gather.get_submodule("logits"), MixingLayer)  # linear: SlotGather
    assert fused.state_dict().keys() == gather.state_dict().keys()
    _reinit(fused)
    gather.load_state_dict(fused.state_dict())
    with torch.no_grad():  # float32 sums of |G| 32 9 terms of large random weights, reordered
        torch.testing.assert_close(fused(x), gather(x), rtol=1e-3, atol=1e-4)
    assert equivfx.verify(fused, x, rtol=1e-3, atol=1e-4).ok
    assert equivfx.verify(gather, x).ok  # the gather layout is exact at the default tolerance


@pytest.mark.parametrize("layout", ["gather", "fused"])
def test_layouts_export_with_a_dynamic_batch(layout):
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 16, 5)
    ).eval()
    x = torch.randn(3, 1, 8, 8)
    emodel = equivfx.compile(model, "C4", mode="layerwise", mix_layout=layout)
    assert emodel.get_submodule("2").layout == layout
    batch = torch.export.Dim("batch", max=1024)
    ep = torch.export.export(emodel, (x,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        for n in (1, 5):
            xs = torch.randn(n, 1, 8, 8)
            torch.testing.assert_close(ep.module()(xs), emodel(xs))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="layerwise", mix_layout="blocks"), "unknown mix_layout"),
        (dict(mix_layout="fused"), "mode='layerwise' only"),
    ],
)
def test_mix_layout_is_checked(kwargs, match):
    with pytest.raises(equivfx.errors.EquivFXError, match=match):
        equivfx.compile(nn.Sequential(nn.Conv2d(1, 2, 3)), "C4", **kwargs)


def _gather_conv(spec="D4", cin=3, cout=5, **kw):
    G = equivfx.group(spec)
    torch.manual_seed(0)
    layer = widen(nn.Conv2d(cin, cout, 3, padding=1, **kw), G.order, group=G, layout="gather")
    plain = widen(nn.Conv2d(cin, cout, 3, padding=1, **kw), G.order)
    with torch.no_grad():
        layer.weight.normal_()
        plain.weight.copy_(layer.weight)
        plain.bias.copy_(layer.bias)
    return G, layer, plain


def test_gather_layout_is_the_gather_then_the_wide_conv_bitwise():
    G, layer, plain = _gather_conv()
    gather = SlotGather(G, 1)
    assert isinstance(layer, nn.Conv2d) and layer.layout == "gather"
    assert layer.state_dict().keys() == plain.state_dict().keys()
    s = torch.randn(G.order * 3, 3, 6, 6)
    want = plain(gather(s))
    assert torch.equal(layer(s), want)  # autograd on: a fresh gathered tensor
    with torch.no_grad():
        assert torch.equal(layer(s), want)  # the reused workspace
    release_workspace()
    with torch.inference_mode():
        assert torch.equal(layer(s), want)
    with torch.no_grad():  # the workspace made in inference mode is writable outside it
        assert torch.equal(layer(s), want)


def test_gather_workspace_is_reused_grown_and_released():
    G, layer, plain = _gather_conv()
    gather = SlotGather(G, 1)
    release_workspace()
    small, large = torch.randn(G.order, 3, 6, 6), torch.randn(G.order * 4, 3, 6, 6)
    with torch.no_grad():
        out_small = layer(small)
        assert release_workspace() == G.order * G.order * 3 * 36 * 4  # |G| B x |G| C x H x W
        assert release_workspace() == 0
        first = layer(small)
        second = layer(large)  # grows the buffer: the earlier output is its own tensor
        third = layer(small)  # reads a prefix of the larger buffer
        assert release_workspace() == 4 * G.order * G.order * 3 * 36 * 4
        for got, s in ((out_small, small), (first, small), (second, large), (third, small)):
            assert torch.equal(got, plain(gather(s)))


def test_gather_layout_trains_through_the_gathered_input():
    G, layer, plain = _gather_conv("C4")
    s = torch.randn(G.order * 2, 3, 5, 5, requires_grad=True)
    layer(s).square().sum().backward()
    grad_s, grad_w = s.grad.clone(), layer.weight.grad.clone()
    s.grad = None
    plain(SlotGather(G, 1)(s)).square().sum().backward()
    assert torch.equal(grad_s, s.grad) and torch.equal(grad_w, plain.weight.grad)


def test_gather_layout_under_vmap():
    G, layer, plain = _gather_conv("C4")
    s = torch.randn(3, G.order * 2, 3, 5, 5)  # three independent folded inputs
    with torch.no_grad():
        got = torch.func.vmap(layer)(s)
        want = torch.stack([plain(SlotGather(G, 1)(t)) for t in s])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gather_workspace_is_per_thread():
    import threading

    G, layer, plain = _gather_conv("D4", cin=4, cout=4)
    inputs = [torch.randn(G.order * (1 + i % 3), 4, 8, 8) for i in range(6)]
    with torch.no_grad():
        wants = [plain(SlotGather(G, 1)(s)) for s in inputs]
    failures = []

    def work(offset):
        with torch.no_grad():
            for k in range(30):
                i = (k + offset) % len(inputs)
                if not torch.equal(layer(inputs[i]), wants[i]):
                    failures.append((offset, k))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_localisation_and_stored_values_with_the_gather_workspace():
    model = PaperMNIST().eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    emodel = equivfx.compile(model, "D4", mode="layerwise", readout="pose")
    _reinit(emodel)
    with torch.no_grad():
        y1 = emodel(x)
        y2 = emodel(x.flip(-1))
        assert torch.equal(emodel(x), y1)  # earlier outputs are not views of the workspace
        assert not torch.equal(y1, y2)
    assert equivfx.verify(emodel, x).ok
    layer = emodel.get_submodule("conv2")  # slots 0 and 1 swap their rows of the Cayley table
    layer.table = layer.table[[1, 0, 2, 3, 4, 5, 6, 7]]
    report = equivfx.verify(emodel, x)
    assert not report.ok and report.first_bad_node == "conv2"


def test_gathers_over_the_workspace_limit_go_a_few_slots_at_a_time(monkeypatch):
    G, layer, plain = _gather_conv("D4")
    s = torch.randn(G.order * 2, 3, 5, 5)
    per_slot = s.numel() * 4  # slot g's gathered rows, (B, |G| C, H, W), in bytes
    want = plain(SlotGather(G, 1)(s))
    calls = []
    layer.register_forward_pre_hook(lambda m, args: calls.clear())
    conv = layer._conv_forward
    monkeypatch.setattr(
        layer, "_conv_forward", lambda x, w, b: calls.append(len(x)) or conv(x, w, b)
    )
    release_workspace()
    for limit, slots, kept in [
        (per_slot - 1, 8, 0),  # not one slot fits: one fresh gather, nothing kept
        (per_slot, 1, per_slot),  # one slot at a time, in the buffer
        (3 * per_slot, 2, 2 * per_slot),  # 3 do not divide 8: two at a time
        (8 * per_slot - 1, 4, 4 * per_slot),
        (8 * per_slot, 8, 8 * per_slot),  # everything in one gather
    ]:
        monkeypatch.setattr(mixing, "WORKSPACE_LIMIT", limit)
        with torch.no_grad():
            got = layer(s)
        assert calls == [slots * 2] * (G.order // slots)  # equal parts: every slot alike
        assert torch.equal(got, want)
        assert release_workspace() == kept
    with torch.no_grad():  # parts are equivariant bitwise: the regular action permutes slots
        monkeypatch.setattr(mixing, "WORKSPACE_LIMIT", 2 * per_slot)
        out = layer(s).unflatten(0, (G.order, -1))
        for h in G.elements:
            perm = torch.tensor(G.regular_permutation(h))
            moved = layer(s.unflatten(0, (G.order, -1))[perm].flatten(0, 1))
            assert torch.equal(moved.unflatten(0, (G.order, -1)), out[perm])


def test_forward_mode_ad_under_no_grad_takes_the_fresh_gather():
    import torch.autograd.forward_ad as fwAD

    G, layer, plain = _gather_conv("C4")
    s, t = torch.randn(G.order * 2, 3, 5, 5), torch.randn(G.order * 2, 3, 5, 5)
    with torch.no_grad(), fwAD.dual_level():
        got = fwAD.unpack_dual(layer(fwAD.make_dual(s, t))).tangent
        want = fwAD.unpack_dual(plain(SlotGather(G, 1)(fwAD.make_dual(s, t)))).tangent
    assert torch.equal(got, want)


def test_a_parametrization_running_another_mixing_layer_does_not_clobber_the_gather():
    from torch.nn.utils import parametrize

    G, layer, _ = _gather_conv("C4")
    _, inner, _ = _gather_conv("C4", cin=3, cout=3)
    probe = torch.randn(G.order, 3, 5, 5)  # a smaller gather: it reuses the buffer's prefix

    class Scale(nn.Module):  # a weight computed by running another mixing layer
        def forward(self, w):
            return w * (1 + inner(probe).mean().tanh())

    parametrize.register_parametrization(layer, "weight", Scale())
    s = torch.randn(G.order * 2, 3, 5, 5)
    want = layer(s).detach()  # autograd on: fresh tensors everywhere
    with torch.no_grad():
        assert torch.equal(layer(s), want)


def test_make_fx_records_a_fresh_gather():
    from torch.fx.experimental.proxy_tensor import make_fx

    G, layer, _ = _gather_conv("C4")
    s = torch.randn(G.order * 2, 3, 5, 5)
    with torch.no_grad():
        gm = make_fx(layer)(s)
        assert "index_select.out" not in gm.code
        assert torch.equal(gm(s), layer(s))


def test_an_empty_batch_and_an_unknown_layout():
    G, layer, plain = _gather_conv("C4")
    empty = torch.randn(0, 3, 5, 5)
    with torch.no_grad():
        assert layer(empty).shape == plain(SlotGather(G, 1)(empty)).shape == (0, 5, 5, 5)
    with pytest.raises(EquivFXError, match="unknown mixing layout"):
        widen(nn.Conv2d(3, 5, 3), G.order, group=G, layout="Gather")


def test_release_workspace_frees_every_threads_buffers():
    import threading

    G, layer, plain = _gather_conv("C4")
    s = torch.randn(G.order * 2, 3, 5, 5)
    want = plain(SlotGather(G, 1)(s)).detach()
    release_workspace(every_thread=True)
    ready, go, results = threading.Barrier(3), threading.Event(), []

    def worker():
        with torch.no_grad():
            results.append(torch.equal(layer(s), want))  # allocates this thread's buffer
            ready.wait()
            go.wait()  # the main thread releases every buffer meanwhile
            results.append(torch.equal(layer(s), want))  # a new buffer, same result

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    ready.wait()
    assert release_workspace() == 0  # the main thread has none
    assert release_workspace(every_thread=True) == 2 * G.order * 2 * G.order * 3 * 25 * 4
    go.set()
    for t in threads:
        t.join()
    assert results == [True] * 4


# ------------------------------------------------------------------ channels-last gathers


def _slot_moves(layer, s, G):
    """layer(h . s) against h . layer(s) for every h, h permuting the slots (bitwise)."""
    out = layer(s).unflatten(0, (G.order, -1))
    for h in G.elements:
        perm = torch.tensor(G.regular_permutation(h))
        moved = layer(s.unflatten(0, (G.order, -1))[perm].flatten(0, 1))
        assert torch.equal(moved.unflatten(0, (G.order, -1)), out[perm])


@pytest.mark.parametrize("batch", [0, 1, 3])
def test_channels_last_gather_holds_the_same_values(batch):
    G = equivfx.group("D4")
    table = torch.tensor(G.table)
    s = torch.randn(G.order * batch, 3, 5, 4)
    for slots in (None, slice(2, 6)):
        want = gather_rows(s, table, slots=slots)
        got = gather_channels_last(
            s.contiguous(memory_format=torch.channels_last), table, slots=slots
        )
        assert got.shape == want.shape and torch.equal(got, want)
        assert got.is_contiguous(memory_format=torch.channels_last)
        got = gather_channels_last(s, table, slots=slots)  # a channels-first input works too
        assert torch.equal(got, want)


def test_channels_last_layer_agrees_is_bitwise_equivariant_and_returns_channels_first(
    monkeypatch,
):
    G, layer, plain = _gather_conv("D4", cin=4, cout=6)
    s = torch.randn(G.order * 3, 4, 7, 7)
    monkeypatch.setattr(mixing, "GATHER_FORMAT", "nhwc")
    with torch.no_grad():
        want = plain(SlotGather(G, 1)(s))
        got = layer(s)  # weights of unit scale: outputs of about 20, rounding about 1e-5
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert got.is_contiguous()
        _slot_moves(layer, s, G)
        per_slot = s.numel() * 4  # past the buffer's limit: two slots at a time, channels-last
        monkeypatch.setattr(mixing, "WORKSPACE_LIMIT", 2 * per_slot)
        release_workspace()  # the buffer keeps the largest size it was asked for
        torch.testing.assert_close(layer(s), want, rtol=1e-4, atol=1e-4)
        _slot_moves(layer, s, G)
    assert release_workspace() == 2 * per_slot
    # with autograd on, the layer keeps the channels-first gather: training is unchanged
    assert torch.equal(layer(s), want)
    assert layer.formats == {}  # nothing measured: the format was fixed


def test_auto_format_times_the_work_a_device_runs_after_the_call_returns(monkeypatch):
    # on CUDA the layer returns once its kernels are queued: only waiting moves the fake clock
    G, layer, plain = _gather_conv("C4", cin=2, cout=2)
    monkeypatch.setattr(mixing, "GATHER_FORMAT", "auto")
    clock, queued, waited = [0.0], [0.0], []
    real = layer._gather_conv

    def fake(x, weight, bias, channels_last):
        queued[0] += 0.004 if channels_last else 0.005
        return real(x, weight, bias, channels_last)

    def fake_synchronize(devices):
        waited.append(devices)
        clock[0] += queued[0]
        queued[0] = 0.0

    monkeypatch.setattr(layer, "_gather_conv", fake)
    monkeypatch.setattr(mixing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(mixing, "synchronize", fake_synchronize)
    monkeypatch.setattr(mixing, "devices_of", lambda *v: {torch.device("cuda", 0)})
    with torch.no_grad():
        layer(torch.randn(4, 2, 5, 5))
    assert layer.formats == {((4, 2, 5, 5), torch.float32): "nhwc"}  # a tie would keep nchw
    assert len(waited) == 2 * 2 * 6


def test_auto_format_measures_once_per_shape_and_keeps_the_clearly_faster(monkeypatch):
    G, layer, plain = _gather_conv("C4", cin=2, cout=2)
    monkeypatch.setattr(mixing, "GATHER_FORMAT", "auto")
    clock, runs = [0.0], []
    cost = {}  # seconds per call of each format, on a fake clock
    real = layer._gather_conv

    def fake(x, weight, bias, channels_last):
        runs.append(channels_last)
        clock[0] += cost[x.shape[0], channels_last]
        return real(x, weight, bias, channels_last)

    monkeypatch.setattr(layer, "_gather_conv", fake)
    monkeypatch.setattr(mixing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    cost.update({(4, False): 0.005, (4, True): 0.004, (8, False): 0.05, (8, True): 0.049})
    small, large = torch.randn(4, 2, 5, 5), torch.randn(8, 2, 5, 5)
    with torch.no_grad():
        layer(small)
        assert layer.formats == {((4, 2, 5, 5), torch.float32): "nhwc"}
        assert repr(layer).endswith("layout='gather', measured=['nhwc'])")  # print(model) tells
        assert runs[:2] == [False, True] and runs[2:4] == [True, False]  # alternating order
        assert len(runs) == 2 * 6 + 1  # warm-up, at most 5 rounds (0.1 s not reached), the call
        runs.clear()
        layer(small)
        assert runs == [True]  # decided: no measurement
        runs.clear()
        layer(large)  # 2 % faster is not enough: channels-first computes the original bitwise
        assert layer.formats[(8, 2, 5, 5), torch.float32] == "nchw"
        assert len(runs) == 2 * 2 + 1  # warm-up and one round: past 0.1 s
        monkeypatch.setattr(mixing, "FORMATS_MEASURED", 2)
        runs.clear()
        cost.update({(12, False): 1.0, (12, True): 1.0, (5 * 4, True): 1.0})
        layer(torch.randn(12, 2, 5, 5))  # nearest measured batch: 8
        layer(torch.randn(4, 2, 6, 6))  # no measured input of this per-sample shape
        assert runs == [False, False] and len(layer.formats) == 2
        conv1d = widen(nn.Conv1d(2, 2, 3), G.order, group=G, layout="gather")
        conv1d(torch.randn(4, 2, 5))
        assert conv1d.formats == {}  # channels-last is for 2D convolutions


@pytest.mark.parametrize("name, spec", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_channels_last_layerwise_models_convert_to_rounding_and_stay_equivariant(
    name, spec, monkeypatch
):
    monkeypatch.setattr(mixing, "GATHER_FORMAT", "nhwc")
    gathers = []
    real = mixing.gather_channels_last
    monkeypatch.setattr(mixing, "gather_channels_last", lambda *a: gathers.append(1) or real(*a))
    model, x, _ = ZOO[name]()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emodel = equivfx.compile(model, spec, mode="layerwise", readout="slots")
        gmodel = equivfx.compile(model, spec, readout="slots")
    with torch.no_grad():  # the conversion keeps the function, to float rounding
        torch.testing.assert_close(emodel(x), gmodel(x), rtol=1e-4, atol=1e-5)
    _reinit_and_check_slots_permute(emodel, x, spec)
    assert equivfx.verify(emodel, x).ok
    has_2d = any(
        isinstance(m, mixing.MixingConv2d) and m.layout == "gather" for m in emodel.modules()
    )
    assert bool(gathers) == has_2d


def test_an_unknown_gather_format_is_refused(monkeypatch):
    G, layer, _ = _gather_conv("C4")
    monkeypatch.setattr(mixing, "GATHER_FORMAT", "channels_last")
    with torch.no_grad(), pytest.raises(EquivFXError, match="'auto', 'nchw' or 'nhwc'"):
        layer(torch.randn(G.order, 3, 5, 5))


def test_the_default_format_choice_converts_to_rounding_and_verifies(monkeypatch):
    # the real GATHER_FORMAT = "auto", timings and all: either choice must give these results
    monkeypatch.setattr(mixing, "GATHER_FORMAT", "auto")
    model, x, _ = ZOO["mobilenet"]()
    model.eval()
    spec = ZOO["mobilenet"].groups[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emodel = equivfx.compile(model, spec, mode="layerwise", readout="slots")
        gmodel = equivfx.compile(model, spec, readout="slots")
    with torch.no_grad():
        torch.testing.assert_close(emodel(x), gmodel(x), rtol=1e-4, atol=1e-5)
    layers = [m for m in emodel.modules() if isinstance(m, mixing.MixingConv2d)]
    assert layers and all(set(m.formats.values()) <= {"nchw", "nhwc"} for m in layers)
    assert any(m.formats for m in layers)  # measured at the first call
    assert equivfx.verify(emodel, x).ok


def test_threads_meeting_a_new_shape_measure_its_format_once(monkeypatch):
    import threading
    import time as real_time
    from concurrent.futures import ThreadPoolExecutor

    G, layer, _ = _gather_conv("C4")
    monkeypatch.setattr(mixing, "GATHER_FORMAT", "auto")
    measured = []

    def slow_measure(x, weight, bias):  # long enough for the other thread to arrive meanwhile
        measured.append(threading.get_ident())
        real_time.sleep(0.2)
        return "nchw"

    monkeypatch.setattr(layer, "_measure_format", slow_measure)
    s = torch.randn(G.order, 3, 5, 5)

    def work(_):
        with torch.no_grad():
            return layer(s)

    with ThreadPoolExecutor(3) as pool:  # three threads meet the same first call
        outs = list(pool.map(work, range(3)))
    assert len(measured) == 1 and len(outs) == 3  # the others waited and took the decision
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_mix_format_fixes_one_models_gather_format(monkeypatch):
    model, x, spec = ZOO["resnet"]()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        last = equivfx.compile(model, spec, mode="layerwise", readout="slots", mix_format="nhwc")
        first = equivfx.compile(model, spec, mode="layerwise", readout="slots", mix_format="nchw")
        gmodel = equivfx.compile(model, spec, readout="slots")
    gathers = []
    real = mixing.gather_channels_last
    monkeypatch.setattr(mixing, "gather_channels_last", lambda *a: gathers.append(1) or real(*a))
    with torch.no_grad():  # the suite's GATHER_FORMAT is "nchw": the model's own choice wins
        torch.testing.assert_close(last(x), gmodel(x), rtol=1e-4, atol=1e-5)
        assert gathers
        gathers.clear()
        monkeypatch.setattr(mixing, "GATHER_FORMAT", "auto")  # measured elsewhere, fixed here
        assert torch.equal(first(x), gmodel(x))  # channels-first: conversion stays bitwise
        assert not gathers
    layers = [m for m in first.modules() if isinstance(m, mixing.MixingConv2d)]
    assert layers and all(m.formats == {} for m in layers)  # nothing measured
    assert "gather_format='nchw'" in repr(layers[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="layerwise", mix_format="NHWC"), "unknown mix_format"),
        (dict(mode="layerwise", mix_layout="fused", mix_format="nhwc"), "gather"),
        (dict(mix_format="nchw"), "layerwise"),
    ],
)
def test_mix_format_is_checked(kwargs, match):
    with pytest.raises(EquivFXError, match=match):
        equivfx.compile(nn.Conv2d(1, 1, 3), "C4", **kwargs)


def _fused_pair(spec="C4", layer=None):
    """A fused mixing layer and a fresh reference computing the same layer without its kept
    block weight (``_block_weight`` at every call)."""
    G = equivfx.group(spec)
    torch.manual_seed(0)
    fused = widen(layer if layer is not None else nn.Conv2d(3, 4, 3, padding=1), G.order, group=G)

    def reference(s):
        weight, bias = fused._block_weight(), fused._block_bias()
        n = G.order
        if isinstance(fused, nn.Linear):
            t = s.unflatten(0, (n, -1)).movedim(0, -2).flatten(-2)
            y = nn.functional.linear(t, weight, bias)
            return torch.cat(y.unflatten(-1, (n, -1)).unbind(-2), 0)
        t = s.unflatten(0, (n, -1)).transpose(0, 1).flatten(1, 2)
        y = fused._conv_forward(t, weight, bias)
        return torch.cat(y.unflatten(1, (n, -1)).unbind(1), 0)

    return G, fused, reference


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3, padding=1), nn.Linear(3, 4)])
def test_fused_block_weight_is_kept_without_autograd_and_rebuilt_when_the_weight_changes(layer):
    G, fused, reference = _fused_pair("D4", layer)
    shape = (3, 5, 5) if isinstance(layer, nn.Conv2d) else (3,)
    s = torch.randn(G.order * 2, *shape)
    with torch.no_grad():
        first = fused(s)
        kept = fused.__dict__["_block"][3]
        assert torch.equal(first, reference(s))
        assert torch.equal(fused(s), first) and fused.__dict__["_block"][3] is kept  # reused
        fused.weight.add_(0.5)  # in place: a new version
        assert torch.equal(fused(s), reference(s)) and not torch.equal(fused(s), first)
        fused.bias.mul_(-1.0)
        assert torch.equal(fused(s), reference(s))
        fused.load_state_dict({k: v + 1.0 for k, v in fused.state_dict().items()})
        assert torch.equal(fused(s), reference(s))
        fused.load_state_dict({k: v * 2.0 for k, v in fused.state_dict().items()}, assign=True)
        assert torch.equal(fused(s), reference(s))
        fused.double()
        y = fused(s.double())
        assert y.dtype == torch.float64 and torch.equal(y, reference(s.double()))


def test_fused_block_weight_is_built_at_every_call_while_autograd_records():
    G, fused, reference = _fused_pair()
    s = torch.randn(G.order * 2, 3, 5, 5)
    fused(s).square().sum().backward()
    assert "_block" not in fused.__dict__
    grad = fused.weight.grad.clone()
    fused.weight.grad = None
    reference(s).square().sum().backward()
    torch.testing.assert_close(grad, fused.weight.grad, rtol=0, atol=0)
    with torch.no_grad():
        fused(s)
    fused.weight.grad = None
    fused(s).square().sum().backward()  # after a kept block: gradients still reach the weight
    torch.testing.assert_close(grad, fused.weight.grad, rtol=0, atol=0)


def test_fused_block_weight_under_functional_call_vmap_and_forward_ad():
    import copy

    import torch.autograd.forward_ad as fwAD

    G, fused, reference = _fused_pair()
    s = torch.randn(G.order * 2, 3, 5, 5)
    other = {k: torch.randn_like(v) for k, v in fused.named_parameters()}
    with torch.no_grad():
        fused(s)  # keeps the block of its own weight
        got = torch.func.functional_call(fused, other, (s,))
        twin = copy.deepcopy(fused)  # the same layer holding the other weights: built afresh
        twin.load_state_dict(other)
        want = twin(s)
        assert torch.equal(got, want) and not torch.equal(got, fused(s))
        assert torch.equal(fused(s), reference(s))  # its own weight again
        batched = torch.func.vmap(fused)(s.unsqueeze(0).expand(3, *s.shape))
        assert torch.equal(batched[1], fused(s))
        tangent = torch.randn_like(fused.weight)
        with fwAD.dual_level():
            dual = {"weight": fwAD.make_dual(fused.weight.detach(), tangent)}
            out = torch.func.functional_call(fused, dual, (s,))
            jvp = fwAD.unpack_dual(out).tangent
        linear_part = copy.deepcopy(fused)  # the output is linear in (weight, bias)
        linear_part.load_state_dict({"weight": tangent, "bias": torch.zeros_like(fused.bias)})
        torch.testing.assert_close(jvp, linear_part(s))


def test_fused_block_weight_is_not_pickled_and_can_be_released():
    import copy
    import io

    G, fused, reference = _fused_pair()
    s = torch.randn(G.order * 2, 3, 5, 5)
    with torch.no_grad():
        fused(s)
        assert "_block" in fused.__dict__
        assert "_block" not in copy.deepcopy(fused).__dict__
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        assert "_block" not in torch.load(buffer, weights_only=False).__dict__
        fused.weight.detach().numpy()[...] = 0.25  # behind torch's back: no new version
        assert torch.equal(fused(s), reference(s))  # the kept copy's values differ: rebuilt
        fused.release_block()
        assert "_block" not in fused.__dict__
        assert torch.equal(fused(s), reference(s))
        fused(s)
        fused.train()  # training rebuilds at every call: nothing kept
        assert "_block" not in fused.__dict__


def _updates_the_weights_unseen_by_versions(fused, s):
    """Ways of changing a layer's parameters that leave ``_version`` (or the address) as it was."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    yield "fused Adam step"
    optimizer = torch.optim.Adam(fused.parameters(), lr=0.1, fused=True)
    fused(s).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    yield ".data.copy_"
    with torch.no_grad():
        fused.weight.data.copy_(torch.randn_like(fused.weight))
    yield ".data.mul_ on the bias"
    fused.bias.data.mul_(5.0)
    yield "vector_to_parameters from a reused vector"
    theta = parameters_to_vector(fused.parameters()).detach().clone()
    vector_to_parameters(theta, fused.parameters())
    with torch.no_grad():
        fused(s)
        theta.add_(1.0)
    vector_to_parameters(theta, fused.parameters())
    yield ".data reassigned twice (a freed address may be reused)"
    fused.weight.data = torch.randn_like(fused.weight)
    fused.weight.data = torch.randn_like(fused.weight)


def test_fused_block_weight_sees_writes_that_keep_the_version():
    """Found by a review: fused optimizers and ``.data`` writes do not bump ``_version``, and a new
    tensor can land at a freed address; the kept block is checked against a copy's values."""
    G, fused, reference = _fused_pair("C4", nn.Conv2d(3, 4, 3, padding=1))
    s = torch.randn(G.order * 2, 3, 5, 5)
    for how in _updates_the_weights_unseen_by_versions(fused, s):
        with torch.no_grad():
            assert torch.equal(fused(s), reference(s)), how
            fused(s)  # keep the block of these weights before the next change


def test_fused_block_weight_under_fake_tensors_inference_tensors_and_a_vmapped_bias():
    from torch._subclasses.fake_tensor import FakeTensorMode

    G, fused, reference = _fused_pair("C4", nn.Conv2d(3, 4, 3, padding=1))
    s = torch.randn(G.order * 2, 3, 5, 5)
    with torch.no_grad():
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fused(mode.from_tensor(s))  # shape inference: nothing fake is kept
        y = fused(s)
        assert type(y) is torch.Tensor and torch.equal(y, reference(s))
    with torch.inference_mode():  # parameters that are inference tensors (no version counter)
        fused.load_state_dict({k: v.clone() for k, v in fused.state_dict().items()}, assign=True)
        assert torch.equal(fused(s), reference(s)) and torch.equal(fused(s), reference(s))
    with torch.no_grad():
        assert torch.equal(fused(s), reference(s))
        biases = torch.randn(3, fused.bias.shape[0])
        got = torch.func.vmap(lambda b: torch.func.functional_call(fused, {"bias": b}, (s,)))(
            biases
        )
        for i in range(3):
            torch.testing.assert_close(
                got[i], torch.func.functional_call(fused, {"bias": biases[i]}, (s,))
            )


class _GainConv(nn.Module):
    """A model that reads a buffer and a parameter it registered on a layer that gets widened."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2.register_buffer("gain", torch.tensor(1.5))
        self.conv2.register_parameter("shift", nn.Parameter(torch.tensor(0.25)))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = self.conv2(h) * self.conv2.gain + self.conv2.shift
        return self.head(h.mean((-2, -1)))


@pytest.mark.parametrize("layout", ["gather", "fused"])
def test_widened_layers_keep_the_tensors_a_model_registered_on_them(layout):
    """Found by a review: a buffer the model's code reads from a widened layer was lost
    ('references nonexistent attribute gain')."""
    torch.manual_seed(0)
    model = _GainConv().eval()
    x = torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emodel = equivfx.compile(model, "C4", mode="layerwise", mix_layout=layout, readout="slots")
        gmodel = equivfx.compile(model, "C4", readout="slots", chunk=None)
    assert "conv2" in emodel.equivfx_info.mixed
    assert emodel.conv2.gain is model.conv2.gain and emodel.conv2.shift is model.conv2.shift
    assert set(emodel.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(emodel(x), gmodel(x))


def test_layerwise_mode_warns_where_a_mixed_layer_had_tied_weights():
    from equivfx.passes.mixing import TiedWeightsWarning

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight  # tied

        def forward(self, x):
            return self.b(torch.relu(self.a(x.flatten(1)[:, :8])))

    x = torch.randn(2, 1, 4, 4)
    with pytest.warns(TiedWeightsWarning, match=r"b\.weight = a\.weight"):
        emodel = equivfx.compile(Tied(), "C4", mode="layerwise", example_inputs=x)
    assert emodel.equivfx_info.mixed == ("b",)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TiedWeightsWarning)
        equivfx.compile(Tied(), "C4", example_inputs=x)  # global mode keeps the tie
        equivfx.compile(nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2)),
                        "C4", mode="layerwise", example_inputs=x)  # fmt: skip
