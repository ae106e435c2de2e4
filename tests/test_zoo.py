"""End-to-end: every clean zoo model compiles under each of its groups and comes out equivariant.

The zoo (tests/zoo.py) holds small but realistic models (ResNet, VGG, MobileNet, ViT, a 1D conv
net, set models, a segmentation net). For each (model, group) pair:

- ``readout="slots"``: ``equivfx.verify`` reports ok with an error of a few float32 ulps, slot 0
  is the original model (the projection p o F^ = F), and the plain model is *not* invariant (so
  the checks can fail);
- ``readout="invariant"``: ``emodel(g.x) == emodel(x)`` for every group element g;

and, on the primary group, the global-mode contract: same state_dict keys and values, an original
checkpoint loads, gradients reach every parameter, BatchNorm in train mode stays equivariant,
float64 works.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import equivfx

try:
    from tests.zoo import ZOO, clean_names
except ModuleNotFoundError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from zoo import ZOO, clean_names

EPS32 = torch.finfo(torch.float32).eps
# a few ulps of the output scale: the folded batch only permutes rows, so the only error left is the
# rounding of reductions whose order changes (batch-size dependent matmul blocking, slot means)
ULPS = 16

CLEAN = clean_names()
CASES = [(name, spec) for name in CLEAN for spec in ZOO[name].groups]
PRIMARY = [(name, ZOO[name].groups[0]) for name in CLEAN]


def _ids(cases):
    return [f"{n}-{g}" for n, g in cases]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _ulp_bound(y: torch.Tensor) -> float:
    return ULPS * EPS32 * max(1.0, y.abs().max().item())


# the leafy model warns that a submodule runs as a leaf; test_fallbacks checks that warning
pytestmark = [
    pytest.mark.filterwarnings("ignore:equivfx fallback"),
    pytest.mark.filterwarnings("ignore:equivfx. leaf module"),
]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.mark.parametrize("name,spec", CASES, ids=_ids(CASES))
def test_slots_verify_ok(name, spec):
    model, x, _ = ZOO[name]()
    G = equivfx.group(spec)
    emodel = equivfx.compile(model, spec, readout="slots").eval()
    assert isinstance(emodel, torch.fx.GraphModule)

    with torch.no_grad():
        y = emodel(x)
        ref = model(x)
    assert y.shape == (x.shape[0], G.order, *ref.shape[1:])
    # slot 0 is the identity slot: the projection of the lift is the original model
    assert G.elements[0] == G.identity
    _close(y[:, 0], ref)

    report = equivfx.verify(emodel, x)
    assert report.ok, report.to_json()
    assert report.max_error <= _ulp_bound(y), report.max_error
    assert report.first_bad_node is None
    _check_per_element_keys(report, G)
    assert max(report.per_element.values()) == pytest.approx(report.max_error, abs=1e-12)
    assert all(math.isfinite(v) and v >= 0 for v in report.per_element.values())


def _check_per_element_keys(report, G) -> None:
    """verify skips the identity; it checks every other element of a small group, and the
    generators plus a sample of the rest for a large one (|G| > 64: Perm5)."""
    keys = set(report.per_element)
    others = {g.name for g in G.elements if g != G.identity}
    assert {g.name for g in G.generators} <= keys <= others | {G.identity.name}
    if G.order <= 64:
        assert others <= keys


@pytest.mark.parametrize("name,spec", CASES, ids=_ids(CASES))
def test_invariant_readout(name, spec):
    model, x, _ = ZOO[name]()
    G = equivfx.group(spec)
    emodel = equivfx.compile(model, spec, readout="invariant").eval()
    with torch.no_grad():
        y = emodel(x)
        assert y.shape == model(x).shape
        tol = dict(rtol=1e-5, atol=_ulp_bound(y))
        for g in G.elements:
            torch.testing.assert_close(
                emodel(G.act(g, x)), y, **tol, msg=lambda m, g=g: f"{g.name}: {m}"
            )

        # the check has teeth: the plain model is not invariant (DeepSets is, by construction)
        plain_err = max((model(G.act(g, x)) - model(x)).abs().max().item() for g in G.elements)
    if "invariant" in ZOO[name].tags:
        assert plain_err <= _ulp_bound(y)
    else:
        assert plain_err > 1e-4, f"{name} is already {spec}-invariant: the test proves nothing"

    report = equivfx.verify(emodel, x)
    assert report.ok, report.to_json()
    assert report.max_error <= _ulp_bound(y)


@pytest.mark.parametrize("name,spec", PRIMARY, ids=_ids(PRIMARY))
def test_plain_model_verify_reports_violation(name, spec):
    """verify on a plain model with group=G is an invariance check; its error is the real one."""
    model, x, _ = ZOO[name]()
    G = equivfx.group(spec)
    with torch.no_grad():
        y = model(x)
        errs = {g.name: (model(G.act(g, x)) - y).abs().max().item() for g in G.elements}
    report = equivfx.verify(model, x, group=G)
    _check_per_element_keys(report, G)
    # the reported per-element errors are the true ones, max |model(g.x) - model(x)|
    for gname, err in report.per_element.items():
        assert err == pytest.approx(errs[gname], rel=1e-3, abs=_ulp_bound(y)), gname
    if "invariant" in ZOO[name].tags:
        assert report.ok
        assert report.max_error <= _ulp_bound(y)
    else:
        assert not report.ok
        assert report.max_error > 1e-4


def test_trace_paths_of_clean_models():
    for name in CLEAN:
        model, x, spec = ZOO[name]()
        emodel = equivfx.compile(model, spec)
        expected = (
            "symbolic_trace+leaves"
            if "untraceable_submodule" in ZOO[name].tags
            else "symbolic_trace"
        )
        assert emodel.equivfx_info.trace_path == expected, name


@pytest.mark.parametrize("name,spec", PRIMARY, ids=_ids(PRIMARY))
def test_state_dict_identical_and_checkpoint_loads(name, spec):
    model, x, _ = ZOO[name]()
    emodel = equivfx.compile(model, spec, readout="slots").eval()

    sd, esd = model.state_dict(), emodel.state_dict()
    assert set(esd) == set(sd)
    for k in sd:
        assert esd[k].dtype == sd[k].dtype, k
        assert torch.equal(esd[k], sd[k]), k

    # a checkpoint of the original architecture (other weights) loads strictly into the compiled
    # model, which then computes the lift of *those* weights
    other, _, _ = ZOO[name](seed=1)
    with torch.no_grad():
        before = emodel(x)
    emodel.load_state_dict(other.state_dict())
    with torch.no_grad():
        after = emodel(x)
        _close(after[:, 0], other(x))
    assert not torch.allclose(before, after)
    for k, v in other.state_dict().items():
        assert torch.equal(emodel.state_dict()[k], v), k


@pytest.mark.parametrize("name,spec", PRIMARY, ids=_ids(PRIMARY))
def test_gradients_reach_every_parameter(name, spec):
    model, x, _ = ZOO[name]()
    emodel = equivfx.compile(model, spec, readout="invariant")
    # dropout models run in eval mode here only to keep the loss deterministic; grads flow anyway
    emodel.train("dropout" not in ZOO[name].tags)
    emodel.zero_grad(set_to_none=True)
    loss = emodel(x).pow(2).mean()
    loss.backward()
    # parameters under their checkpoint names (the compiled module may nest them differently)
    params = {
        k: v
        for k, v in emodel.state_dict(keep_vars=True).items()
        if isinstance(v, torch.nn.Parameter)
    }
    assert set(params) == {k for k, _ in model.named_parameters()}
    for k, p in params.items():
        assert p.grad is not None, k
        assert torch.isfinite(p.grad).all(), k
        assert p.grad.abs().sum() > 0, k


@pytest.mark.parametrize("spec", ["C4", "D4"])
def test_resnet_train_mode_batchnorm_stays_equivariant(spec):
    model, x, _ = ZOO["resnet"]()
    G = equivfx.group(spec)
    emodel = equivfx.compile(model, spec, readout="invariant").train()
    x = torch.cat([x, x.flip(0) * 0.5 + 0.1])  # batch 4, so batch statistics are non-trivial
    y = emodel(x)
    for g in G.elements:
        torch.testing.assert_close(emodel(G.act(g, x)), y, rtol=1e-5, atol=1e-5)
    # train-mode batch statistics really are in use: the output differs from eval mode
    emodel.eval()
    with torch.no_grad():
        assert not torch.allclose(emodel(x), y.detach(), atol=1e-3)


@pytest.mark.parametrize("name", ["resnet", "seqconv", "flatset"])
def test_float64(name):
    model, x, spec = ZOO[name]()
    model, x = model.double(), x.double()
    G = equivfx.group(spec)
    emodel = equivfx.compile(model, spec, readout="invariant").eval()
    with torch.no_grad():
        y = emodel(x)
        assert y.dtype == torch.float64
        for g in G.elements:
            torch.testing.assert_close(emodel(G.act(g, x)), y, rtol=1e-12, atol=1e-12)
    for k, v in emodel.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float64, k
    report = equivfx.verify(emodel, x)
    assert report.ok
    assert report.max_error <= 1e-12


def test_report_to_json_round_trips():
    model, x, spec = ZOO["vit"]()
    report = equivfx.verify(equivfx.compile(model, spec, readout="slots"), x)
    data = report.to_json()
    data = json.loads(data) if isinstance(data, str) else data
    assert data["ok"] is True
    assert data["max_error"] == pytest.approx(report.max_error, abs=1e-15)
    assert set(data["per_element"]) == set(report.per_element)
