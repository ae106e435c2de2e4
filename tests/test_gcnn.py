"""G-CNNs as a special case: equivfx's layer-wise network, read through Phi(s)(h) = h . s(h),
equals an
independent reference of the Cohen-Welling lifting convolution and group convolution (C4 and D4).

The reference below is written from the G-CNN formulas alone (its own rotations, flips and group
multiplication), not from equivfx's group code:

    lifting:     f1(g)  = x * (g . psi1)                     (* = cross-correlation, 'same' padding)
    group conv:  f2(g)  = sum_v f1(v) * (g . psi2(g^-1 v))

Weight correspondence (documented in docs/gcnn.md): psi1 is the first layer's weight; psi2(u) is the
block u of the mixing layer's widened weight, W'[:, u*C:(u+1)*C].
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import equivfx


# ----------------------------------------------------------------------------- the reference
def ref_elements(spec: str) -> list[tuple[int, int]]:
    """Elements r^k f^m as (k, m), in equivfx's slot order: index k + 4 m."""
    return [(k, m) for m in range(2 if spec == "D4" else 1) for k in range(4)]


def ref_compose(a, b):
    (k1, m1), (k2, m2) = a, b  # f r f = r^-1
    return ((k1 + (-1) ** m1 * k2) % 4, m1 ^ m2)


def ref_inverse(a):
    k, m = a
    return ((-k) % 4, 0) if m == 0 else a


def ref_act(a, t):
    """r^k f^m acts on the last two axes: flip the last axis m times, then rotate k times."""
    k, m = a
    if m:
        t = torch.flip(t, (-1,))
    return torch.rot90(t, k, (-2, -1))


def lifting_conv(x, psi, bias, elements):
    return torch.stack(
        [F.conv2d(x, ref_act(g, psi), bias, padding=psi.shape[-1] // 2) for g in elements], 1
    )


def group_conv(f, psi, bias, elements):
    """f: (B, |G|, C, H, W); psi: (|G|, Cout, C, k, k), psi[v] the filter for relative element v."""
    idx = {g: i for i, g in enumerate(elements)}
    out = []
    for g in elements:
        acc = bias.view(1, -1, 1, 1)
        for v in elements:
            rel = idx[ref_compose(ref_inverse(g), v)]
            acc = acc + F.conv2d(f[:, idx[v]], ref_act(g, psi[rel]), padding=psi.shape[-1] // 2)
        out.append(acc)
    return torch.stack(out, 1)


# ----------------------------------------------------------------------------- the test
@pytest.mark.parametrize("spec", ["C4", "D4"])
def test_reference_multiplication_is_equivfx_slot_order(spec):
    G = equivfx.group(spec)
    els = ref_elements(spec)
    for i, a in enumerate(els):
        for j, b in enumerate(els):
            assert G.table[i][j] == els.index(ref_compose(a, b))


@pytest.mark.parametrize("spec", ["C4", "D4"])
def test_layerwise_with_phi_is_a_gcnn(spec):
    torch.manual_seed(0)
    c0, c1, c2 = 2, 3, 4
    net = nn.Sequential(nn.Conv2d(c0, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c2, 3, padding=1))
    net = net.double().eval()
    emodel = equivfx.compile(net, spec, mode="layerwise", readout="slots", twist=True)
    assert emodel.equivfx_info.mixed == ("2",)
    with torch.no_grad():  # random weights in every block, not the function-preserving init
        for p in emodel.parameters():
            p.copy_(torch.randn_like(p))
    G = equivfx.group(spec)
    els = ref_elements(spec)
    x = torch.randn(2, c0, 7, 7, dtype=torch.float64)

    with torch.no_grad():
        slots = emodel(x)  # (B, |G|, c2, H, W), slot representation
        phi = torch.stack(
            [G.act(g, slots[:, g.index]) for g in G.elements], 1
        )  # Phi(s)(g) = g.s(g)

        w1, b1 = emodel.get_submodule("0").weight, emodel.get_submodule("0").bias
        wide, b2 = emodel.get_submodule("2").weight, emodel.get_submodule("2").bias
        psi2 = wide.unflatten(1, (G.order, c1)).transpose(0, 1)  # (|G|, c2, c1, k, k): block u
        f1 = torch.relu(lifting_conv(x, w1, b1, els))
        f2 = group_conv(f1, psi2, b2, els)
    torch.testing.assert_close(phi, f2, rtol=1e-10, atol=1e-10)


def test_first_layer_read_through_phi_is_the_lifting_convolution():
    torch.manual_seed(1)
    conv = nn.Conv2d(1, 2, 3, padding=1).double()
    emodel = equivfx.compile(conv, "D4", readout="slots")
    G = equivfx.group("D4")
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        s = emodel(x)
        phi = torch.stack([G.act(g, s[:, g.index]) for g in G.elements], 1)
        ref = lifting_conv(x, conv.weight, conv.bias, ref_elements("D4"))
    torch.testing.assert_close(phi, ref, rtol=1e-12, atol=1e-12)


def test_twist_needs_an_exact_permutation_action():
    with pytest.raises(equivfx.errors.EquivFXError, match="twist"):
        equivfx.compile(nn.Conv2d(1, 1, 3), "C8", mode="layerwise", twist=True)


def test_twist_on_non_square_feature_maps_is_a_clear_error():
    net = nn.Sequential(
        nn.Conv2d(1, 4, (1, 3)),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    with pytest.raises(equivfx.errors.EquivFXError, match="twist=False"):
        equivfx.compile(
            net, "C4", mode="layerwise", twist=True, example_inputs=torch.randn(2, 1, 8, 8)
        )
