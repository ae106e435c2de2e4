"""Hypothesis: group algebra and tensor actions agree, bitwise, for exact catalogue groups."""

from __future__ import annotations

import torch
from hypothesis import given, note
from hypothesis import strategies as st

from equivfx.groups import FiniteGroup, group

EXACT_SPECS = [
    "C1", "C2", "C4", "D1", "D2", "D4", "Shift2", "Shift4", "Shift8", "Rev", "ShiftRev3",
    "ShiftRev4", "Perm3", "Perm4", "D4xShift4@-3", "C2xRev@-3", "Shift4@-3xPerm3@0",
]  # fmt: skip


def _probe(G: FiniteGroup, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    spec = G.spec
    if spec.endswith("Perm3@0"):
        shape: tuple[int, ...] = (3, 4, 2, 2)
    elif spec.startswith("Perm"):
        shape = (2, int(spec[4:]), 3)
    else:
        shape = (4, 24, 24)
    return torch.randn(shape, generator=gen)


@st.composite
def group_and_elements(draw: st.DrawFn) -> tuple[FiniteGroup, int, int, int]:
    G = group(draw(st.sampled_from(EXACT_SPECS)))
    a = draw(st.integers(0, G.order - 1))
    b = draw(st.integers(0, G.order - 1))
    seed = draw(st.integers(0, 2**16))
    return G, a, b, seed


@given(group_and_elements())
def test_compose_inverse_match_action(case: tuple[FiniteGroup, int, int, int]) -> None:
    G, ai, bi, seed = case
    a, b = G[ai], G[bi]
    note(f"group={G!r} a={a!r} b={b!r} ab={G.compose(a, b)!r}")
    x = _probe(G, seed)
    assert torch.equal(G.act(G.compose(a, b), x), G.act(a, G.act(b, x)))
    assert torch.equal(G.act(G.inverse(a), G.act(a, x)), x)
    assert G.compose(a, G.inverse(a)) == G.identity
    assert G.compose(G.compose(a, b), G.inverse(b)) == a


@given(group_and_elements())
def test_regular_permutation_is_the_left_regular_action(
    case: tuple[FiniteGroup, int, int, int],
) -> None:
    G, hi, gi, _ = case
    h, g = G[hi], G[gi]
    perm = G.regular_permutation(h)
    note(f"group={G!r} h={h!r} g={g!r}")
    # (h.s)(g) = s(h^-1 g) with s the identity labelling: perm[g] = h^-1 g.
    assert perm[g.index] == G.compose(G.inverse(h), g).index
    assert sorted(perm) == list(range(G.order))
