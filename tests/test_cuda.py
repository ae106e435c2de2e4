"""On a CUDA device: a compiled model computes there what it computes on the CPU.

CI has no GPU, so every test here is skipped there; on a machine with one, run
``python -m pytest tests/test_cuda.py``. The CPU run of the same compiled model is the oracle
(float32 with TF32 off, so the two differ by the rounding of reordered sums only), and the group's
own action on the CUDA tensors checks invariance there.

What is covered: the zoo in global mode (folded and ``chunk="auto"``, which times its chunk sizes
on the device and so must wait for the device's kernels), compiling a model that already lives on
the device (with its example inputs there, a shape-propagating test run and ``check=True``), the
verifier, the layer-wise construction (gather layout, its memory format measured on the device,
and fused; forward and gradients), the cached lift gather following the model from device to
device, the slot-choosing passes (dead slots, coset lift) and bfloat16.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import equivfx
import equivfx.passes.mixing as mixing

try:
    from tests.zoo import ZOO, clean_names
except ModuleNotFoundError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from zoo import ZOO, clean_names

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:equivfx fallback"),
    pytest.mark.filterwarnings("ignore:equivfx. leaf module"),
]

CUDA = torch.device("cuda")
CASES = [(name, spec) for name in clean_names() for spec in ZOO[name].groups]


@pytest.fixture(autouse=True)
def _full_float32():
    """TF32 rounds matrix products and convolutions to 10 mantissa bits; compare in float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _close(got: torch.Tensor, want: torch.Tensor, rtol=1e-4, atol=1e-5) -> None:
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk", [None, "auto", 1])
@pytest.mark.parametrize("name,spec", CASES, ids=[f"{n}-{g}" for n, g in CASES])
def test_zoo_matches_the_cpu_and_is_invariant_on_the_device(name, spec, chunk):
    model, x, _ = ZOO[name]()
    G = equivfx.group(spec)
    slots = equivfx.compile(model, spec, readout="slots", chunk=chunk).eval()
    pooled = equivfx.compile(model, spec, chunk=chunk).eval()
    with torch.no_grad():
        want_slots, want = slots(x), pooled(x)
        model.to(CUDA)  # the compiled models share its parameters and buffers
        slots.to(CUDA)
        pooled.to(CUDA)
        xc = x.to(CUDA)
        _close(slots(xc), want_slots)
        y = pooled(xc)
        _close(y, want)
        for g in G.elements:
            _close(pooled(G.act(g, xc)), y.cpu())


def test_chunk_auto_times_the_device_work(monkeypatch):
    """The chunk sizes are timed after the device has run their kernels, not after queueing."""
    model, x, spec = ZOO["resnet"]()
    emodel = equivfx.compile(model.to(CUDA), spec).eval()
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(d) or real(d))
    with torch.no_grad():
        y = emodel(x.to(CUDA))
    assert calls and all(torch.device(d).type == "cuda" for d in calls)
    (k,) = emodel.equivfx_chunks.chosen.values()
    assert equivfx.group(spec).order % k == 0
    ref = equivfx.compile(model, spec, chunk=None).eval()
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x.to(CUDA)), rtol=1e-4, atol=1e-5)


MODES = [{}, dict(mode="layerwise"), dict(mode="layerwise", mix_layout="fused")]


@pytest.mark.parametrize("kwargs", MODES, ids=["global", "layerwise", "layerwise-fused"])
@pytest.mark.parametrize("name", ["resnet", "vit", "seqconv", "flatset"])
def test_compile_on_the_device_with_example_inputs(name, kwargs):
    # the passes' new modules and buffers (mixing tables, gathers) land where the model lives
    model, x, spec = ZOO[name]()
    want = equivfx.compile(model, spec, **kwargs).eval()
    with torch.no_grad():
        want = want(x)
    model.to(CUDA)
    xc = x.to(CUDA)
    emodel = equivfx.compile(model, spec, example_inputs=xc, check=True, **kwargs).eval()
    assert {t.device for t in [*emodel.parameters(), *emodel.buffers()]} == {xc.device}
    with torch.no_grad():
        _close(emodel(xc), want)
    report = equivfx.verify(emodel, xc)
    assert report.ok, report


@pytest.mark.parametrize("spec", ["C4", "D4"])
def test_gcnn_mode_compiled_on_the_device(spec):
    # twist=True: the slot gather reads the slots through the group's action on feature maps
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1))
    x = torch.randn(2, 2, 7, 7)
    cpu = equivfx.compile(net.eval(), spec, mode="layerwise", readout="slots", twist=True)
    with torch.no_grad():
        for p in cpu.parameters():  # every block, not the function-preserving start
            p.copy_(torch.randn_like(p))
        want = cpu(x)
    net.to(CUDA)
    emodel = equivfx.compile(
        net, spec, mode="layerwise", readout="slots", twist=True, example_inputs=x.to(CUDA)
    )
    emodel.load_state_dict(cpu.state_dict())
    with torch.no_grad():
        _close(emodel(x.to(CUDA)), want)
    assert equivfx.verify(emodel, x.to(CUDA)).ok


def test_the_verifier_finds_a_model_that_is_not_invariant_on_the_device():
    model, x, spec = ZOO["resnet"]()
    model.to(CUDA)
    report = equivfx.verify(model, x.to(CUDA), group=spec)
    assert not report.ok
    assert equivfx.verify(equivfx.compile(model, spec), x.to(CUDA)).ok


@pytest.mark.parametrize("layout,fmt", [("gather", "auto"), ("gather", "nhwc"), ("fused", "auto")])
def test_layerwise_forward_and_gradients_match_the_cpu(monkeypatch, layout, fmt):
    monkeypatch.setattr(mixing, "GATHER_FORMAT", fmt)  # "auto": timed on the device
    model, x, spec = ZOO["resnet"]()
    emodel = equivfx.compile(model, spec, mode="layerwise", mix_layout=layout).train()
    for p in emodel.parameters():  # the new input blocks start at zero: make them count
        with torch.no_grad():
            p.add_(0.01 * torch.randn_like(p))

    def step(m, inp):
        m.zero_grad()
        out = m(inp)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters()}

    want, want_grads = step(emodel, x)
    emodel.to(CUDA)
    got, grads = step(emodel, x.to(CUDA))
    _close(got, want)
    assert grads.keys() == want_grads.keys()
    for n in grads:
        _close(grads[n], want_grads[n], rtol=1e-3, atol=1e-4)
    emodel.eval()
    with torch.no_grad():
        y = emodel(x.to(CUDA))
        G = equivfx.group(spec)
        for g in G.elements:
            _close(emodel(G.act(g, x.to(CUDA))), y.cpu())


def test_the_cached_lift_follows_the_model_between_devices():
    model, x, spec = ZOO["resnet"]()
    emodel = equivfx.compile(model, spec, chunk=None).eval()
    with torch.no_grad():
        want = emodel(x)  # caches the lift's gather for the CPU
        _close(emodel.to(CUDA)(x.to(CUDA)), want)
        torch.testing.assert_close(emodel.cpu()(x), want)
        _close(emodel.to(CUDA)(x.to(CUDA)), want)


def test_large_inputs_are_lifted_by_one_gather_on_the_device():
    # on the CPU inputs over Lift.GATHER_LIMIT go op by op; on the device every size is gathered
    from equivfx.passes.modules import Lift

    G = equivfx.group("D4")
    lift = Lift(G, G.action)
    x = torch.randn(64, 3, 32, 32)
    assert x.numel() > Lift.GATHER_LIMIT
    want = torch.cat([G.act(G.inverse(g), x) for g in G.elements])
    y = lift(x.to(CUDA))
    assert len(lift._gathers) == 1
    assert torch.equal(y.cpu(), want)
    assert torch.equal(lift(x.to(CUDA)).cpu(), want)  # the cached gather


class _Seq(nn.Module):
    """Circular convolutions, then a mean over positions (``pool``) or a linear layer over every
    position: the first computes 2 of ShiftRev4's 8 slots, the second lifts to cosets."""

    def __init__(self, pool: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pool = pool
        self.a = nn.Conv1d(3, 8, 5, padding=2, padding_mode="circular")
        self.b = nn.Conv1d(8, 4, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(4 if pool else 4 * 16, 5)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(h.mean(-1) if self.pool else h.flatten(1))


@pytest.mark.parametrize("pool", [True, False], ids=["dead-slots", "coset-lift"])
@pytest.mark.parametrize("readout", ["invariant", "slots"])
def test_slot_choosing_passes_on_the_device(pool, readout):
    model = _Seq(pool).eval()
    x = torch.randn(3, 3, 16, generator=torch.Generator().manual_seed(0))
    fast = equivfx.compile(model, "ShiftRev4", example_inputs=x, readout=readout).eval()
    slow = equivfx.compile(model, "ShiftRev4", readout=readout, optimize=False).eval()
    flat = getattr(fast, "equivfx_flat", fast)
    if pool:
        assert len(flat.equivfx_lift.slots) == 2
    else:
        assert flat.equivfx_lift_cosets.slots == (0, 4)
    with torch.no_grad():
        want = slow(x)
        fast.to(CUDA)
        _close(fast(x.to(CUDA)), want)
        _close(fast(x.to(CUDA)), want)  # the cached gathers, on the device
    assert equivfx.verify(fast, x.to(CUDA)).ok


def test_bfloat16_on_the_device():
    model, x, spec = ZOO["resnet"]()
    G = equivfx.group(spec)
    emodel = equivfx.compile(model, spec).eval()
    with torch.no_grad():
        want = emodel(x)
        emodel.to(CUDA, torch.bfloat16)
        xb = x.to(CUDA, torch.bfloat16)
        y = emodel(xb)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float().cpu(), want, rtol=0.05, atol=0.05)
        for g in G.elements:  # the slots are permuted exactly; only the mean's order changes
            torch.testing.assert_close(emodel(G.act(g, xb)), y, rtol=0.02, atol=0.02)
