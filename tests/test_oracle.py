"""Oracle tests: compiled outputs against explicit loops written straight from the definitions.

The lift of F is F^(x)(g_i) = F(g_i^-1 . x) (DESIGN.md section 1). The oracle computes it one slot
at a time with the unchanged model, so it shares no code with the compiler's batch folding.
Readouts: ``pose`` is the slots flattened slot-major, ``invariant`` pools over the slot axis,
``equivariant`` is (1/|G|) sum_g rho_out(g) F(g^-1 . x).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import equivfx

try:
    from tests.zoo import ZOO
except ModuleNotFoundError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from zoo import ZOO

# the compiled model runs the slots as one batch of B*|G|; the oracle runs |G| batches of B. Rows
# of a matmul may round differently at another batch size (a few 1e-8 here): compare at 1e-6.
TOL = dict(rtol=1e-5, atol=1e-6)

pytestmark = [
    pytest.mark.filterwarnings("ignore:equivfx fallback"),
    pytest.mark.filterwarnings("ignore:equivfx. leaf module"),
]  # the leafy model's leaf warning


def oracle_slots(model, G, x):
    with torch.no_grad():
        return torch.stack([model(G.act(G.inverse(g), x)) for g in G.elements], 1)


SLOT_CASES = [
    ("resnet", "C4"),
    ("resnet", "D4"),
    ("vgg", "D4"),
    ("mobilenet", "C4"),
    ("vit", "C4"),
    ("vit", "D4"),
    ("seqconv", "Shift16"),
    ("seqconv", "ShiftRev16"),
    ("flatset", "Perm5"),
    ("leafy", "D4"),
    ("segnet", "D4"),
    # direct products: the factors act on different axes, so they commute
    ("resnet", "C2xShift3@-3"),  # rotate by 180 degrees x cyclically shift the 3 colour channels
    ("seqconv", "Shift4@-2xRev"),  # roll the 4 input channels x reverse time
]


@pytest.mark.parametrize("name,spec", SLOT_CASES, ids=[f"{n}-{g}" for n, g in SLOT_CASES])
def test_slots_equal_oracle_loop(name, spec):
    model, x, _ = ZOO[name]()
    G = equivfx.group(spec)
    emodel = equivfx.compile(model, spec, readout="slots").eval()
    with torch.no_grad():
        y = emodel(x)
    expected = oracle_slots(model, G, x)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, **TOL)


def test_product_group_order():
    assert equivfx.group("C2xShift3@-3").order == 6
    assert equivfx.group("Shift4@-2xRev").order == 8
    assert equivfx.group("D4").order == 8
    assert equivfx.group("ShiftRev16").order == 32
    assert equivfx.group("Perm5").order == 120


def _power(G, g, k):
    out = G.identity
    for _ in range(k):
        out = G.compose(out, g)
    return out


def test_c4_slot_convention_pinned_by_rot90():
    """Without G.act on composite elements: slot of r^k holds F(rot90(x, -k)), r = rot90(., 1)."""
    model, x, _ = ZOO["vit"]()
    G = equivfx.group("C4")
    (r,) = G.generators
    assert torch.equal(G.act(r, x), torch.rot90(x, 1, (-2, -1)))
    emodel = equivfx.compile(model, G, readout="slots").eval()
    with torch.no_grad():
        y = emodel(x)
        seen = set()
        for k in range(4):
            g = _power(G, r, k)
            seen.add(g.index)
            torch.testing.assert_close(y[:, g.index], model(torch.rot90(x, -k, (-2, -1))), **TOL)
    assert seen == {0, 1, 2, 3}


def test_d1_is_left_right_flip():
    model, x, _ = ZOO["resnet"]()
    G = equivfx.group("D1")
    assert G.order == 2
    flip = G.elements[1]
    assert torch.equal(G.act(flip, x), torch.flip(x, (-1,)))
    emodel = equivfx.compile(model, G, readout="slots").eval()
    with torch.no_grad():
        y = emodel(x)
        torch.testing.assert_close(y[:, 0], model(x), **TOL)
        torch.testing.assert_close(y[:, 1], model(torch.flip(x, (-1,))), **TOL)


@pytest.mark.parametrize(
    "name,spec", [("resnet", "D4"), ("seqconv", "ShiftRev16"), ("flatset", "Perm5")]
)
def test_slots_transform_by_regular_permutation(name, spec):
    """emodel(h.x)[:, j] = emodel(x)[:, index(h^-1 g_j)]: G acts on Map(G, Z) by permuting slots."""
    model, x, _ = ZOO[name]()
    G = equivfx.group(spec)
    emodel = equivfx.compile(model, spec, readout="slots").eval()
    with torch.no_grad():
        y = emodel(x)
        for h in G.elements:
            perm = G.regular_permutation(h)
            expected_perm = tuple(G.compose(G.inverse(h), g).index for g in G.elements)
            assert tuple(perm) == expected_perm
            assert sorted(perm) == list(range(G.order))
            torch.testing.assert_close(emodel(G.act(h, x)), y[:, list(perm)], **TOL)


POSE_CASES = [("resnet", "C4"), ("vgg", "D4"), ("flatset", "Perm5")]


@pytest.mark.parametrize("name,spec", POSE_CASES, ids=[f"{n}-{g}" for n, g in POSE_CASES])
def test_pose_is_slots_flattened_slot_major(name, spec):
    model, x, _ = ZOO[name]()
    G = equivfx.group(spec)
    slots = equivfx.compile(model, spec, readout="slots").eval()
    pose = equivfx.compile(model, spec, readout="pose").eval()
    with torch.no_grad():
        s, p = slots(x), pose(x)
    B, n, K = s.shape
    assert n == G.order
    assert p.shape == (B, G.order * K)
    torch.testing.assert_close(p, s.reshape(B, -1), rtol=0, atol=0)
    # index i*K + k is class k in slot i
    i, k = G.order - 1, K - 1
    assert torch.equal(p[:, i * K + k], s[:, i, k])
    torch.testing.assert_close(p, oracle_slots(model, G, x).reshape(B, -1), **TOL)


# logsumexp is normalised by log|G| (a soft mean: a constant slot value comes out unchanged), as
# documented by equivfx.passes.modules.Readout
POOLS = {
    "mean": lambda s: s.mean(1),
    "max": lambda s: s.amax(1),
    "logsumexp": lambda s: torch.logsumexp(s, 1) - math.log(s.shape[1]),
}
POOL_CASES = [
    ("resnet", "D4"),
    ("vit", "C4"),
    ("seqconv", "Rev"),
    ("flatset", "Perm5"),
    ("segnet", "C4"),
]


@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("name,spec", POOL_CASES, ids=[f"{n}-{g}" for n, g in POOL_CASES])
def test_invariant_readout_pools_oracle(name, spec, pool):
    model, x, _ = ZOO[name]()
    G = equivfx.group(spec)
    emodel = equivfx.compile(model, spec, readout="invariant", pool=pool).eval()
    with torch.no_grad():
        y = emodel(x)
        expected = POOLS[pool](oracle_slots(model, G, x))
        torch.testing.assert_close(y, expected, **TOL)
        for g in G.elements:
            torch.testing.assert_close(emodel(G.act(g, x)), y, **TOL)
    # the pools genuinely differ by more than the tolerance (so a wrong pool would be caught)
    for other in POOLS:
        if other != pool:
            o = POOLS[other](oracle_slots(model, G, x))
            margin = 3 * (TOL["atol"] + TOL["rtol"] * o.abs().max().item())
            assert (y - o).abs().max().item() > margin, (pool, other)


def test_default_readout_is_invariant_mean():
    model, x, spec = ZOO["mobilenet"]()
    G = equivfx.group(spec)
    emodel = equivfx.compile(model, spec).eval()
    with torch.no_grad():
        torch.testing.assert_close(emodel(x), oracle_slots(model, G, x).mean(1), **TOL)


def oracle_equivariant(model, G, x):
    with torch.no_grad():
        return torch.stack([G.act(g, model(G.act(G.inverse(g), x))) for g in G.elements], 0).mean(0)


@pytest.mark.parametrize("spec", ["C4", "D4"])
def test_equivariant_readout_segmentation(spec):
    model, x, _ = ZOO["segnet"]()
    G = equivfx.group(spec)
    emodel = equivfx.compile(model, spec, readout="equivariant", output_action=spec).eval()
    with torch.no_grad():
        y = emodel(x)
        assert y.shape == model(x).shape == (2, 3, 16, 16)
        torch.testing.assert_close(y, oracle_equivariant(model, G, x), **TOL)
        for g in G.elements:
            torch.testing.assert_close(emodel(G.act(g, x)), G.act(g, y), **TOL)
        # the plain net is not equivariant (it adds a learned position-dependent bias)
        g1 = G.generators[0]
        assert not torch.allclose(model(G.act(g1, x)), G.act(g1, model(x)), atol=1e-3)

    report = equivfx.verify(emodel, x)
    assert report.ok, report.to_json()
    plain = equivfx.verify(model, x, group=G, output_action=spec)
    assert not plain.ok


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_gradients_equal_oracle_gradients(name):
    """Backward through the compiled model equals backward through the explicit slot loop."""
    model, x, spec = ZOO[name]()
    G = equivfx.group(spec)
    emodel = equivfx.compile(model, spec, readout="slots").eval()
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(x.shape[0], G.order, *model(x).shape[1:], generator=gen)

    emodel.zero_grad(set_to_none=True)
    (emodel(x) * w).sum().backward()
    eparams = {
        k: v
        for k, v in emodel.state_dict(keep_vars=True).items()
        if isinstance(v, torch.nn.Parameter)
    }
    got = {k: p.grad.clone() for k, p in eparams.items()}

    model.zero_grad(set_to_none=True)
    emodel.zero_grad(set_to_none=True)  # parameters may be shared with the original
    slots = torch.stack([model(G.act(G.inverse(g), x)) for g in G.elements], 1)
    (slots * w).sum().backward()
    want = {k: p.grad for k, p in model.named_parameters()}

    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(
            got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}"
        )


_SEQ = {}


def _seq_compiled():
    if not _SEQ:
        model, _, _ = ZOO["seqconv"]()
        G = equivfx.group("ShiftRev16")
        _SEQ.update(model=model, G=G, emodel=equivfx.compile(model, G, readout="slots").eval())
    return _SEQ["model"], _SEQ["G"], _SEQ["emodel"]


@settings(deadline=None)  # examples and derandomisation come from the conftest profile
@given(
    seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), scale=st.sampled_from([1e-3, 1.0, 1e3])
)
def test_slots_oracle_on_random_inputs(seed, batch, scale):
    """Any batch size (the compiled model is not tied to the example batch), any input scale."""
    model, G, emodel = _seq_compiled()
    x = scale * torch.randn(batch, 4, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = emodel(x)
    expected = oracle_slots(model, G, x)
    # inside the net activations scale with the input (before tanh saturates): so does rounding
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=4e-6 * scale if scale > 1 else 1e-6)
