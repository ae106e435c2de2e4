"""chunk=k and chunk="auto": the same outputs as one pass, the original state dict, full folds in
training mode, and localisation through the flat graph."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import equivfx
from equivfx.errors import NotYetSupportedError
from equivfx.passes.chunks import MAX_PASSES, SlotChunks, _distance, fold_sizes
from equivfx.passes.modules import devices_of, synchronize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import ZOO  # noqa: E402

MODELS = ["resnet", "vgg", "mobilenet", "vit", "seqconv", "deepsets", "flatset", "segnet"]
CASES = [(n, ZOO[n].groups[0]) for n in MODELS]


def _compile(model, spec, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return equivfx.compile(model, spec, example_inputs=x, **kwargs)


@pytest.mark.parametrize("chunk", [1, 2, 3, "auto"])
@pytest.mark.parametrize("name, spec", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_chunks_equal_one_pass(name, spec, chunk):
    model, x, _ = ZOO[name]()
    model.eval()
    kwargs = {"readout": "slots"}
    if "dense_output" in ZOO[name].tags:
        kwargs = {"readout": "equivariant", "output_action": spec}
    whole = _compile(model, spec, x, **kwargs)
    chunked = _compile(model, spec, x, chunk=chunk, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), whole(x), rtol=1e-5, atol=1e-5)
    assert set(chunked.state_dict()) == set(model.state_dict())
    assert equivfx.verify(chunked, x).ok


def test_auto_measures_once_per_input_shape_and_picks_a_divisor():
    model, x, spec = ZOO["resnet"]()
    emodel = _compile(model.eval(), spec, x, chunk="auto")
    with torch.no_grad():
        emodel(x)
        emodel(x)
        emodel(torch.cat([x, x]))
    chosen = emodel.equivfx_chunks.chosen
    assert len(chosen) == 2  # one measurement per input shape
    assert all(equivfx.group(spec).order % k == 0 for k in chosen.values())


def test_auto_varies_the_order_of_the_candidates_and_picks_by_time(monkeypatch):
    model, x, spec = ZOO["resnet"]()
    emodel = _compile(model.eval(), spec, x, chunk="auto")
    runner = emodel.equivfx_chunks
    calls, clock = [], [0.0]
    cost = {1: 3.0, 2: 1.0, 4: 2.0}  # seconds per forward, on a fake clock: k = 2 is fastest

    def fake_run(args, k):
        calls.append(k)
        clock[0] += cost[k]

    monkeypatch.setattr(runner, "_run", fake_run)
    monkeypatch.setattr("equivfx.passes.chunks.time.perf_counter", lambda: clock[0])
    assert runner._measure((x,)) == 2
    sizes = [1, 2, 4]
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 4  # a warm-up round, then three (the fake clock passed 0.3 s)
    assert all(sorted(r) == sizes for r in rounds)
    # a candidate does not always follow the same other one (its freed memory)
    after = {k: {r[r.index(k) - 1] for r in rounds if r.index(k)} for k in sizes}
    assert any(len(before) > 1 for before in after.values())


@pytest.mark.parametrize(
    "n, sizes",
    [
        (1, [1]),
        (4, [1, 2, 4]),
        (6, [1, 2, 3, 6]),
        (24, [1, 2, 3, 4, 6, 8, 12, 24]),  # Perm4: every divisor, 60 passes per round
        (30, [1, 3, 6, 15, 30]),  # the smallest order whose divisors take 72 passes
        (120, [3, 6, 15, 30, 60, 120]),  # Perm5: 120 passes for k = 1 alone
        (720, [20, 45, 90, 180, 360, 720]),  # Perm6: 30 divisors, 2,418 passes per round
    ],
)
def test_auto_measures_every_divisor_of_small_groups_and_one_per_factor_of_two_of_large(n, sizes):
    got = fold_sizes(n)
    assert got == sizes
    assert all(n % k == 0 for k in got) and n in got
    assert all(n // k <= MAX_PASSES for k in got)
    every = [d for d in range(1, n + 1) if n % d == 0]
    assert got == every or sum(n // k for k in got) <= 2 * MAX_PASSES


def test_auto_on_a_large_group_times_only_those_fold_sizes(monkeypatch):
    # Perm5: 16 divisors, 360 passes per round if each were timed; the first call used to take
    # seconds on a small MLP (a review measured Perm6: 2.3 to 5.2 s, against ms after it)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5, 2)).eval()
    x = torch.randn(2, 5, 3)
    runner = _compile(net, "Perm5", x).equivfx_chunks
    calls, clock = [], [0.0]

    def fake_run(args, k):
        calls.append(k)
        clock[0] += 1.0 if k == 30 else 2.0

    monkeypatch.setattr(runner, "_run", fake_run)
    monkeypatch.setattr("equivfx.passes.chunks.time.perf_counter", lambda: clock[0])
    assert runner.order == 120 and runner._measure((x,)) == 30
    assert sorted(set(calls)) == [3, 6, 15, 30, 60, 120] == fold_sizes(120)
    assert len(calls) == 4 * 6  # a warm-up round and three timed ones


def test_auto_times_the_work_a_device_runs_after_the_call_returns(monkeypatch):
    # on CUDA a forward returns once its kernels are queued; they run later. A fake device:
    # each candidate queues its cost, and only waiting for the device moves the clock
    model, x, spec = ZOO["resnet"]()
    runner = _compile(model.eval(), spec, x, chunk="auto").equivfx_chunks
    clock, queued, waited = [0.0], [0.0], []
    cost = {1: 3.0, 2: 1.0, 4: 2.0}

    def fake_run(args, k):
        queued[0] += cost[k]

    def fake_synchronize(devices):
        waited.append(devices)
        clock[0] += queued[0]
        queued[0] = 0.0

    monkeypatch.setattr(runner, "_run", fake_run)
    monkeypatch.setattr("equivfx.passes.chunks.time.perf_counter", lambda: clock[0])
    monkeypatch.setattr("equivfx.passes.chunks.synchronize", fake_synchronize)
    monkeypatch.setattr("equivfx.passes.chunks.devices_of", lambda *v: {torch.device("cuda", 0)})
    assert runner._measure((x,)) == 2  # without waiting: every candidate 0 s, a tie, all slots
    assert len(waited) == 2 * 3 * 4 and all(d == {torch.device("cuda", 0)} for d in waited)


def test_devices_of_finds_tensors_in_containers_and_modules_and_synchronize_waits_on_them(
    monkeypatch,
):
    meta = torch.empty(2, device="meta")
    layer = nn.Linear(2, 2, device="meta")
    assert devices_of(torch.zeros(2), [1, (meta, {"a": torch.zeros(1)})]) == {meta.device}
    assert devices_of(nn.Linear(2, 2)) == set() and devices_of(layer) == {meta.device}
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    cuda = torch.device("cuda", 1)
    synchronize({cuda, meta.device})  # meta has no queue to wait for
    assert waited == [cuda]


def test_auto_measures_a_bounded_number_of_shapes_then_reuses_the_nearest(monkeypatch):
    # dynamic batch sizes would otherwise pay a measurement at every new size
    model, x, spec = ZOO["resnet"]()
    model.eval()
    emodel = _compile(model, spec, x, chunk="auto")
    whole = _compile(model, spec, x, chunk=None)
    runner = emodel.equivfx_chunks
    order = runner.order
    monkeypatch.setattr(runner, "MEASURED_SHAPES", 2)
    measured, used = [], []
    decisions = {1: order, 8: 1}  # by batch size: fold all at B = 1, one slot per pass at B = 8
    monkeypatch.setattr(
        runner, "_measure", lambda args: measured.append(len(args[0])) or decisions[len(args[0])]
    )
    run = runner._run
    monkeypatch.setattr(runner, "_run", lambda args, k: used.append(k) or run(args, k))
    with torch.no_grad():
        for batch in [1, 8, 2, 6, 1, 64]:
            xb = torch.randn(batch, *x.shape[1:])
            torch.testing.assert_close(emodel(xb), whole(xb), rtol=1e-5, atol=1e-5)
    assert measured == [1, 8]  # the first two shapes only
    # 2 is nearer 1 than 8 (log ratios 0.69 and 1.39), 6 nearer 8, 64 nearest 8
    assert used == [order, 1, order, 1, order, 1]
    assert len(runner.chosen) == 2


def test_auto_never_measures_past_the_bound(monkeypatch):
    model, x, spec = ZOO["resnet"]()
    emodel = _compile(model.eval(), spec, x, chunk="auto")
    runner = emodel.equivfx_chunks
    monkeypatch.setattr(runner, "MEASURED_SHAPES", 1)
    measured = []
    monkeypatch.setattr(runner, "_measure", lambda args: measured.append(args[0].dtype) or 1)
    monkeypatch.setattr(runner, "_run", lambda args, k: k)
    assert runner(x) == 1
    assert runner(torch.cat([x, x])) == 1  # reused: same dtype, device and rank
    assert runner(x.double()) == runner.order  # nothing comparable: every slot in one pass
    assert measured == [torch.float32] and len(runner.chosen) == 1


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, t):
        return self.fc(self.conv(x).mean((2, 3)) * t)


def test_auto_ignores_other_arguments_past_the_bound(monkeypatch):
    # a scalar that changes at every call (a diffusion timestep) must not be measured each time
    x = torch.randn(2, 1, 8, 8)
    model = _Scaled().eval()
    emodel = _compile(model, "C4", (x, 0.5), chunk="auto")
    whole = _compile(model, "C4", (x, 0.5), chunk=None)
    runner = emodel.equivfx_chunks
    monkeypatch.setattr(runner, "MEASURED_SHAPES", 2)
    measured = []
    monkeypatch.setattr(runner, "_measure", lambda args: measured.append(args[1]) or 2)
    with torch.no_grad():
        for step in range(6):
            t = 1.0 + step / 10
            torch.testing.assert_close(emodel(x, t), whole(x, t), rtol=1e-5, atol=1e-6)
    assert measured == [1.0, 1.1] and len(runner.chosen) == 2


def test_auto_keys_tensors_by_shape_and_compare_sizes_only():
    key = SlotChunks._key((torch.zeros(2, 3), [1, 2], 0.5))
    assert hash(key) == hash(SlotChunks._key((torch.ones(2, 3), [1, 2], 0.5)))
    # tensors inside containers are keyed by shape, not by value
    pair = SlotChunks._key((torch.zeros(2, 3), [torch.randn(3), torch.randn(3)]))
    assert pair == SlotChunks._key((torch.zeros(2, 3), [torch.randn(3), torch.randn(3)]))
    assert _distance(key, SlotChunks._key((torch.zeros(8, 3), [1, 3], 0.7))) == pytest.approx(
        math.log(4)
    )  # other values are ignored
    assert _distance(key, SlotChunks._key((torch.zeros(2, 3, 1), [1, 2], 0.5))) is None
    assert _distance(key, SlotChunks._key((torch.zeros(2, 3), [1, 2, 3], 0.5))) is None
    assert _distance(key, SlotChunks._key((torch.zeros(2, 3), 1, 0.5))) is None  # list vs int
    int_key = SlotChunks._key((torch.zeros(2, 3, dtype=torch.int64), [1, 2], 0.5))
    assert _distance(key, int_key) is None


def test_training_mode_runs_every_slot_in_one_pass():
    model, x, spec = ZOO["resnet"]()  # batch norm: statistics over all slots
    whole = _compile(model, spec, x)
    chunked = _compile(model, spec, x, chunk=1)
    whole.train()
    chunked.train()
    torch.testing.assert_close(chunked(x), whole(x), rtol=1e-5, atol=1e-5)
    chunked(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_layer_replaced_deep_in_the_model_in_training_mode_sees_every_slot():
    # the runner's list of modules whose training flag it reads was made at compile time; a new
    # batch norm (training by default) set two levels down chunked its batch statistics
    model, x, spec = ZOO["resnet"]()
    chunked = _compile(model.eval(), spec, x, chunk=1)
    name, bn = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)][-1]
    parent, attr = name.rsplit(".", 1)
    assert "." in parent  # two levels below the top one
    new = nn.BatchNorm2d(bn.num_features)  # training mode
    setattr(chunked.get_submodule(parent), attr, new)
    assert chunked.get_submodule(name) is new and chunked.equivfx_flat.get_submodule(name) is new
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), chunked.equivfx_flat(x), rtol=1e-5, atol=1e-5)
        new.eval()
        torch.testing.assert_close(chunked(x), chunked.equivfx_flat(x), rtol=1e-5, atol=1e-5)
    assert equivfx.verify(chunked.eval(), x).ok


class _OwnBatchNorm(nn.Module):
    """Batch statistics written out: ``training=True`` in every mode."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 1, 3, 3))

    def forward(self, x):
        h = torch.nn.functional.conv2d(x, self.w, padding=1)
        return torch.nn.functional.batch_norm(h, None, None, training=True).relu().mean((2, 3))


@pytest.mark.parametrize("kind", ["no running statistics", "training=True written out"])
@pytest.mark.parametrize("chunk", [1, 2, "auto"])
def test_batch_statistics_in_eval_mode_see_every_slot(kind, chunk):
    # a review: in eval mode a batch norm without running statistics (or F.batch_norm with
    # training=True) normalised over k slots with chunk=k: not equivariant, and with "auto" the
    # output followed the timings; like training, every slot in one pass
    torch.manual_seed(0)
    if kind == "no running statistics":
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4, track_running_stats=False),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ).eval()
    else:
        model = _OwnBatchNorm().eval()
    x = torch.randn(2, 1, 8, 8)
    whole = _compile(model, "C4", x, chunk=None)
    chunked = _compile(model, "C4", x, chunk=chunk)
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), whole(x), rtol=1e-5, atol=1e-6)
    assert chunked.equivfx_chunks._decided((x,)) == 4
    assert equivfx.verify(chunked, x).ok


def test_running_statistics_dropped_after_compiling_fold_every_slot():
    # a review: the runner read batch norms' running statistics at its scans only, which only
    # module registrations started; setting them to None is seen at the next call
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()
    x = torch.randn(2, 1, 8, 8)
    chunked = _compile(model, "C4", x, chunk=2)
    with torch.no_grad():
        chunked(x)
        assert chunked.equivfx_chunks._decided((x,)) == 2
        model[1].running_mean = model[1].running_var = None  # batch statistics from now on
        assert chunked.equivfx_chunks._decided((x,)) == 4
        torch.testing.assert_close(chunked(x), chunked.equivfx_flat(x), rtol=1e-5, atol=1e-6)


class _Tanh(nn.Module):
    """Per sample, but opaque (a branch tracing cannot take)."""

    def forward(self, h):
        if h.dim() != 4:
            raise ValueError(h.dim())
        return torch.tanh(h)


def test_batch_statistics_do_not_make_an_opaque_leaf_look_like_it_mixes_samples():
    # a review: the first call's leaf check (one slot per pass against all in one) saw the batch
    # norm's statistics differ, blamed the per-sample leaf and pinned the model to chunk=1
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False),
        _Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()
    x = torch.randn(3, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", equivfx.passes.annotate.OpaqueLeafWarning)
        emodel = equivfx.compile(model, "C4")  # no example inputs: checked at the first call
        flat = equivfx.compile(model, "C4", chunk=None)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", equivfx.passes.annotate.BatchMixingWarning)
        torch.testing.assert_close(emodel(x), flat(x), rtol=1e-5, atol=1e-6)
    assert emodel.equivfx_chunks.mixing_leaves == ()


def test_hooks_on_the_chunk_runner_and_the_flat_graph_run():
    # the chunked model calls its runner's and its flat graph's code without module calls,
    # unless they are hooked (tools that hook every module reach the runner)
    model, x, spec = ZOO["vgg"]()
    emodel = _compile(model.eval(), spec, x, chunk=equivfx.group(spec).order)  # one pass
    seen = []
    for module in (emodel.equivfx_chunks, emodel.equivfx_flat):
        module.register_forward_pre_hook(lambda m, args: seen.append(type(m).__name__))
    with torch.no_grad():
        emodel(x)
    assert seen == ["SlotChunks", type(emodel.equivfx_flat).__name__]
    seen.clear()
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(m) if m is emodel.equivfx_chunks else None
    )
    try:
        with torch.no_grad():
            emodel(x)
    finally:
        handle.remove()
    assert seen.count(emodel.equivfx_chunks) == 1


def test_strict_export_keeps_a_dynamic_batch_after_an_eager_call():
    # a review: the lift's cached gather compared the traced shape before asking whether it was
    # being traced, so an eager call first made strict export specialise the batch size
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    emodel = _compile(model, "C4", x, chunk=None)
    with torch.no_grad():
        emodel(torch.randn(5, 1, 8, 8))  # the lift caches its gather for this shape
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(emodel, (x,), dynamic_shapes={"input": {0: batch}}, strict=True)
    x7 = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x7), emodel(x7), rtol=1e-5, atol=1e-6)


def test_torch_compile_does_not_recompile_when_modules_are_made_elsewhere():
    # the runner reads a process-wide count of module registrations: read while compiling, dynamo
    # guarded on it and compiled again whenever any module was built (review)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)).eval()
    x = torch.randn(2, 1, 6, 6)
    emodel = _compile(model, "C4", x, chunk=2)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(emodel, backend=backend)
    with torch.no_grad():
        for _ in range(3):
            nn.Linear(2, 2)  # a registration somewhere else in the process
            torch.testing.assert_close(compiled(x), emodel(x))
    assert len(graphs) == 1


def test_state_dict_round_trip_and_dtype():
    model, x, spec = ZOO["vgg"]()
    chunked = _compile(model.eval(), spec, x, chunk=2)
    chunked.load_state_dict(model.state_dict())
    chunked.to(torch.float64)
    y = chunked(x.double())
    assert y.dtype == torch.float64


def test_localisation_uses_the_flat_graph():
    model, x, spec = ZOO["resnet"]()
    chunked = _compile(model.eval(), spec, x, chunk=2, readout="slots")
    chunked.equivfx_flat.equivfx_lift.inverses = tuple(range(equivfx.group(spec).order))
    report = equivfx.verify(chunked, x)
    assert not report.ok and report.first_bad_node == "equivfx_lift"


def test_exported_chunked_model_agrees():
    model, x, spec = ZOO["seqconv"]()
    chunked = _compile(model.eval(), spec, x, chunk=4)
    exported = torch.export.export(chunked, (x,)).module()
    torch.testing.assert_close(exported(x), chunked(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, -1, 2.5, True, "fast"])
def test_bad_chunk_values(chunk):
    model, x, spec = ZOO["vgg"]()
    with pytest.raises(NotYetSupportedError, match="chunk"):
        _compile(model, spec, x, chunk=chunk)


def test_chunks_refused_in_layerwise_mode():
    with pytest.raises(NotYetSupportedError, match="global"):
        equivfx.compile(nn.Conv2d(1, 1, 3), "C4", mode="layerwise", chunk=2)


def test_auto_is_the_default_and_falls_back_where_chunking_does_not_apply():
    model, x, spec = ZOO["vgg"]()
    emodel = _compile(model.eval(), spec, x)
    assert emodel.equivfx_chunks.chunk == "auto"
    layerwise = _compile(model, spec, x, mode="layerwise")
    assert not hasattr(layerwise, "equivfx_chunks")  # mixing layers read every slot: one pass


class TwoInputs(nn.Module):
    """A second batched input that G acts on trivially (repeated per slot), used before and
    after the two inputs meet."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.embed = nn.Linear(3, 2)

    def forward(self, x, cond):
        scale = torch.sigmoid(self.embed(cond))
        return (self.conv(x) * scale[:, :, None, None]).amax((2, 3)) + cond[:, :2]


class TwoOutputs(nn.Module):
    """Logits and a feature map: two readouts joined per chunk."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.mean((2, 3))), h


@pytest.mark.parametrize("chunk", [1, 2, "auto"])
@pytest.mark.parametrize("readout", ["invariant", "slots"])
def test_chunks_with_an_input_repeated_per_slot(chunk, readout):
    x = torch.randn(3, 1, 6, 6)
    cond = torch.randn(3, 3)
    whole = equivfx.compile(TwoInputs().eval(), "D4", readout=readout, chunk=None)
    chunked = equivfx.compile(TwoInputs().eval(), "D4", readout=readout, chunk=chunk)
    assert hasattr(chunked, "equivfx_chunks")
    with torch.no_grad():
        torch.testing.assert_close(chunked(x, cond), whole(x, cond))
        torch.testing.assert_close(chunked(x[:2], cond[:2]), whole(x[:2], cond[:2]))


@pytest.mark.parametrize("chunk", [1, 2, "auto"])
@pytest.mark.parametrize("readout", ["invariant", "slots"])
def test_chunks_with_several_outputs(chunk, readout):
    x = torch.randn(3, 1, 6, 6)
    whole = equivfx.compile(TwoOutputs().eval(), "C4", readout=readout, chunk=None)
    chunked = equivfx.compile(TwoOutputs().eval(), "C4", readout=readout, chunk=chunk)
    assert hasattr(chunked, "equivfx_chunks")
    with torch.no_grad():
        got, want = chunked(x), whole(x)
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    if readout == "slots":
        assert got[0].shape == (3, 4, 4) and got[1].shape == (3, 4, 3, 6, 6)


def test_chunks_refuse_an_output_read_off_the_slots_without_a_readout():
    class Leaky(nn.Module):
        def forward(self, x):
            h = x * 2
            return h.mean((1, 2, 3)), h.size(0)  # the folded batch size escapes to the output

    with pytest.raises(NotYetSupportedError, match="through a readout"):
        equivfx.compile(Leaky(), "C4", chunk=2)


def test_opaque_models_keep_their_state_dict_keys_when_chunked():
    model, x, spec = ZOO["control_flow"]()
    emodel = _compile(model, spec, x, chunk=2)
    assert set(emodel.state_dict()) == set(model.state_dict())
    emodel.load_state_dict(model.state_dict())


@pytest.mark.parametrize("pool", ["mean", "max", "logsumexp"])
@pytest.mark.parametrize("chunk", [1, 2, 4])
@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_invariant_readouts_accumulate_chunk_by_chunk(name, chunk, pool):
    model, x, spec = ZOO[name]()
    model.eval()
    whole = _compile(model, spec, x, pool=pool, chunk=None)
    chunked = _compile(model, spec, x, pool=pool, chunk=chunk)
    runner = chunked.equivfx_chunks
    assert runner._accumulated and not runner._joined  # nothing concatenated
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), whole(x), rtol=1e-5, atol=1e-5)


class _Chan(nn.Module):
    """Two 1x1 convolutions and a linear head: under D4 x Shift8@-3 (64 elements) its slots lie
    within a few hundredths of each other."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c, self.d, self.fc = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(8 * 64, 2)

    def forward(self, x):
        h = torch.relu(self.c(x))
        return self.fc(torch.relu(h + self.d(h) * h).flatten(1))


@pytest.mark.parametrize("chunk", [None, 1, 4, "auto"])
def test_the_logsumexp_readout_keeps_the_digits_of_close_slots(chunk):
    # logsumexp - log|G| is about log 64 + the slots before the subtraction, which cancelled the
    # digits of slots of about 0.02: 1.4e-6 apart under a permutation, and verify() failed
    model = _Chan().eval()
    G = equivfx.group("D4xShift8@-3")
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    emodel = _compile(model, G, x, pool="logsumexp", chunk=chunk)
    with torch.no_grad():
        slots = torch.stack([model(G.act(G.inverse(g), x)) for g in G.elements]).double()
        want = torch.logsumexp(slots, 0) - math.log(G.order)
        # the old formula: 2e-7 to 6e-7; the folded slots' own rounding (another batch size
        # than the loop's) took 1.6e-8 on the GPU machine's CPU, under 1e-8 here
        assert (emodel(x).double() - want).abs().max() < 5e-8
    assert equivfx.verify(emodel, x).ok


@pytest.mark.parametrize("dense", [False, True], ids=["exact", "dense-fused"])
def test_the_running_logsumexp_of_chunks_is_the_one_of_all_slots(monkeypatch, dense):
    import equivfx.passes.modules as modules
    from equivfx.passes.chunks import _MeanExp
    from equivfx.passes.modules import logmeanexp

    if dense:  # outputs over the limit take torch.logsumexp's fused kernel, chunked or not
        monkeypatch.setattr(modules, "PRECISE_POOL_LIMIT", 0)

    inf, nan = float("inf"), float("nan")
    s = torch.tensor([[0.0, -inf, inf, nan, 1.0, 3.0], [0.0, -inf, 1.0, 0.0, 1.0, -2.0]]).repeat(
        4, 1
    )  # 8 slots
    s[:, 4] = torch.linspace(-40, 30, 8)
    s[:, 0] = torch.tensor([-inf] * 4 + [-1000.0, -999.0, -1001.0, -1000.5])  # -inf chunks
    want = torch.logsumexp(s, 0) - math.log(8)
    torch.testing.assert_close(logmeanexp(s), want, equal_nan=True)
    for k in (1, 2, 4):
        acc = _MeanExp.of(s[:k])
        for i in range(k, 8, k):
            acc = acc.join(_MeanExp.of(s[i : i + k]))
        torch.testing.assert_close(acc.value(), want, equal_nan=True)
    ints = torch.tensor([[1, 2], [3, 4]])
    torch.testing.assert_close(logmeanexp(ints), torch.logsumexp(ints, 0) - math.log(2))
    acc = _MeanExp.of(ints[:1].float()).join(_MeanExp.of(ints[1:].float()))
    torch.testing.assert_close(acc.value(), logmeanexp(ints))


@pytest.mark.parametrize("dense", [False, True], ids=["exact", "dense-fused"])
def test_the_running_logsumexp_differentiates_as_torch_logsumexp(monkeypatch, dense):
    import equivfx.passes.modules as modules
    from equivfx.passes.chunks import _MeanExp

    if dense:
        monkeypatch.setattr(modules, "PRECISE_POOL_LIMIT", 0)
    s = torch.randn(8, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s[5, 1] = float("inf")  # a +inf slot in one chunk: the others' finite slots get 0, not nan
    if not dense:  # chunks of -inf slots only: 0 (torch.logsumexp's backward on them: nan)
        s[:, 2] = torch.tensor([-float("inf")] * 4 + [-1000.0, -999.0, -1001.0, 3.0])
    want = torch.autograd.grad((torch.logsumexp(s.requires_grad_(), 0)).sum(), s)[0]
    s = s.detach()
    for k in (1, 2, 4, 8):
        x = s.clone().requires_grad_()
        acc = _MeanExp.of(x[:k])
        for i in range(k, 8, k):
            acc = acc.join(_MeanExp.of(x[i : i + k]))
        (got,) = torch.autograd.grad(acc.value().sum(), x)
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-12, atol=1e-15)


class _Counts(nn.Module):
    def forward(self, x):
        return (x[:, 0, 0] > 0).sum(-1)  # integer outputs: positives in the first row


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_integer_outputs_pool_by_logsumexp_chunked_or_not(chunk):
    G = equivfx.group("C4")
    x = torch.randn(2, 1, 4, 4)
    emodel = _compile(_Counts(), G, x, pool="logsumexp", chunk=chunk)
    slots = torch.stack([_Counts()(G.act(G.inverse(g), x)) for g in G.elements]).float()
    torch.testing.assert_close(emodel(x), torch.logsumexp(slots, 0) - math.log(4))


def test_threads_meeting_a_new_shape_measure_it_once(monkeypatch):
    import threading
    import time as real_time
    from concurrent.futures import ThreadPoolExecutor

    model, x, spec = ZOO["resnet"]()
    emodel = _compile(model.eval(), spec, x, chunk="auto")
    runner = emodel.equivfx_chunks
    measured = []

    def slow_measure(args):  # long enough for the other threads to arrive meanwhile
        measured.append(threading.get_ident())
        real_time.sleep(0.2)
        return 1

    monkeypatch.setattr(runner, "_measure", slow_measure)

    def work(_):
        with torch.no_grad():
            return emodel(x)

    with ThreadPoolExecutor(3) as pool:  # three threads meet the same first call
        outs = list(pool.map(work, range(3)))
    assert len(measured) == 1 and len(outs) == 3
    assert list(runner.chosen.values()) == [1]


class _RootTensors(nn.Module):
    """Parameters and a buffer at the model's root level (as a ViT's position embedding)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(4, 8, 8))
        self.register_buffer("scale", torch.tensor(2.0))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(((self.conv(x) + self.pos) * self.scale).relu().mean((2, 3)))


def _fresh(state, x, **kwargs):
    """An oracle: the model loaded with ``state``, compiled anew, every slot in one pass."""
    model = _RootTensors().eval()
    model.load_state_dict(state)
    return _compile(model, "C4", x, chunk=None, **kwargs)


@pytest.mark.parametrize("chunk", [1, 2, "auto"])
def test_root_tensors_replaced_after_compiling_reach_every_part(chunk):
    """``load_state_dict(assign=True)`` and ``.double()`` with parameters overwritten on conversion
    replace the root-level tensors of the compiled model: its chunk runner computes with the new
    ones (the parts share the compiled model's parameter and buffer dicts)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    chunked = _compile(_RootTensors().eval(), "C4", x, chunk=chunk)
    state = {k: v + 0.5 for k, v in chunked.state_dict().items()}
    chunked.load_state_dict(state, assign=True)
    assert chunked.pos is chunked.equivfx_flat.pos
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), _fresh(state, x)(x))
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        chunked.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    with torch.no_grad():
        y = chunked(x.double())
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, _fresh(state, x).double()(x.double()))


@pytest.mark.parametrize("chunk", [None, 1, 2, "auto"])
def test_whole_compiled_models_pickle(chunk, tmp_path):
    """``torch.save`` of the whole compiled model and ``torch.load``: the same outputs, the
    state dict's keys, ``chunk="auto"``'s decisions, and root-level tensors still shared."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    emodel = _compile(_RootTensors().eval(), "C4", x, chunk=chunk)
    with torch.no_grad():
        expected = emodel(x)
    torch.save(emodel, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert list(loaded.state_dict()) == list(emodel.state_dict())
    runner = loaded._modules.get("equivfx_chunks")
    if chunk is not None:
        assert runner.chosen == emodel.equivfx_chunks.chosen
        state = {k: v - 0.25 for k, v in loaded.state_dict().items()}
        loaded.load_state_dict(state, assign=True)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), _fresh(state, x)(x))


def test_the_logsumexp_readout_without_float64_still_avoids_the_cancellation(monkeypatch):
    # where the device has no float64 (MPS) the sums run in float32: the formula alone keeps
    # more digits of close slots than logsumexp - log n
    import equivfx.passes.chunks as chunks
    import equivfx.passes.modules as modules

    monkeypatch.setattr(modules, "pool_dtype", lambda s: torch.float32)  # chunked or not
    g = torch.Generator().manual_seed(0)
    slots = torch.randn(64, 1000, generator=g, dtype=torch.float64) * 0.05 + 0.02
    want = torch.logsumexp(slots, 0) - math.log(64)
    s = slots.float()
    old = ((torch.logsumexp(s, 0) - math.log(64)).double() - want).abs().max()
    new = (modules.logmeanexp(s).double() - want).abs().max()
    acc = chunks._MeanExp.of(s[:8])
    for i in range(8, 64, 8):
        acc = acc.join(chunks._MeanExp.of(s[i : i + 8]))
    chunked = (acc.value().double() - want).abs().max()
    assert old > 4e-7 and new < old / 2 and chunked < old / 2, (old, new, chunked)


class _CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, h):
        self.calls += 1
        return h


@pytest.mark.parametrize("examples", [False, True])
def test_the_first_calls_timing_passes_leave_a_run_whole_modules_state_alone(examples):
    # a review: chunk="auto" timed 13 to 64 whole forwards at the first call (and the leaf check
    # three more), each counting once more in a module run whole at each call
    from equivfx.trace import LEAF_MODULES, register_leaf

    register_leaf(_CountsCalls, "counts its calls")
    try:
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _CountsCalls(), nn.Flatten(1))
        x = torch.randn(2, 1, 8, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            emodel = equivfx.compile(model.eval(), "C4", example_inputs=x if examples else None)
        assert model[1].calls.item() == 0
        for n in (1, 2):
            emodel(x)
            assert model[1].calls.item() == n
    finally:
        del LEAF_MODULES[_CountsCalls]
