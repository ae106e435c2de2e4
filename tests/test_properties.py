"""Property tests: compiled models are equivariant, for drawn architectures, groups and readouts.

Each property draws structure (an :class:`~equivfx.verify.strategies.ArchSpec`, a group, an element,
a readout), compiles the drawn model and checks, for that element ``g``:

- ``equivfx.verify(emodel, x).ok``;
- the explicit law: ``emodel(g . x) == emodel(x)`` for ``readout="invariant"`` and
  ``emodel(g . x) == emodel(x)[:, perm(g)]`` for ``readout="slots"``, with ``perm`` the regular
  action (computed here from ``compose``/``inverse`` and compared with ``G.regular_permutation``);
- the oracle: slot ``i`` of ``emodel(x)`` is the plain model on ``g_i^-1 . x``.

Shapes are small so the file runs in well under a minute with the ``ci`` profile.
"""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

import equivfx
from equivfx.verify import strategies as eqst
from equivfx.verify.tolerance import abs_error, tolerance, within

RTOL, ATOL = tolerance(torch.float32)

# Compiling takes longer than hypothesis' default 200 ms deadline on a cold start.
PROPERTY = settings(deadline=None)

IMAGE_ARCHS = eqst.architectures(
    kind="cnn", shapes=eqst.image_shapes(batch=(1, 2), channels=(1, 3), size=(4, 8)), max_layers=3
)
SEQ_ARCHS = eqst.architectures(
    kind="seq",
    shapes=eqst.sequence_shapes(batch=(1, 2), channels=(1, 3), length=(4, 8)),
    max_layers=3,
)
SET_ARCHS = eqst.architectures(
    kind="mlp", shapes=eqst.set_shapes(batch=(1, 2), set_size=(2, 4), features=(1, 3)), max_layers=3
)
READOUTS = st.sampled_from(["slots", "invariant"])
POOLS = st.sampled_from(["mean", "max", "logsumexp"])


def regular_permutation(G, h) -> list[int]:
    """perm[j] = index(h^-1 g_j), so (h.s)[:, j] = s[:, perm[j]]: the design's regular action."""
    hinv = G.inverse(h)
    return [G.compose(hinv, gj).index for gj in G.elements]


def check_compiled(arch: eqst.ArchSpec, G, g, readout: str, pool: str = "mean") -> None:
    """Compile ``arch`` under ``G`` and check verify(), the law at ``g`` and the slot oracle."""
    note(f"arch: {arch.describe()}")
    note(f"group {G!r}, element g = {g!r}, readout={readout!r}, pool={pool!r}")
    model = arch.build().eval()
    x = arch.example_input()
    emodel = equivfx.compile(model, G, readout=readout, pool=pool)

    report = equivfx.verify(emodel, x)
    note(
        f"verify: ok={report.ok} max_error={report.max_error:.3g} per_element={report.per_element}"
    )
    assert report.ok, report.summary()

    with torch.no_grad():
        y = emodel(x)
        y_g = emodel(G.act(g, x))
        slots = torch.stack([model(G.act(G.inverse(h), x)) for h in G.elements], dim=1)
    if readout == "invariant":
        expected = y
    else:
        perm = regular_permutation(G, g)
        assert list(G.regular_permutation(g)) == perm
        expected = y[:, perm]
    note(f"law at g={g!r}: max |emodel(g.x) - expected| = {abs_error(y_g, expected):.3g}")
    assert within(y_g, expected, RTOL, ATOL)

    # Oracle: the explicit loop over g. slots: F^(x)(g_i) = F(g_i^-1 . x); invariant: pooled slots.
    if readout == "slots":
        oracle = slots
    elif pool == "mean":
        oracle = slots.mean(dim=1)
    elif pool == "max":
        oracle = slots.amax(dim=1)
    else:  # documented: minus log|G|, so that equal slots pool to their common value
        oracle = slots.logsumexp(dim=1) - math.log(G.order)
    note(f"oracle: max |emodel(x) - loop over g| = {abs_error(y, oracle):.3g}")
    assert within(y, oracle, RTOL, ATOL)


@given(
    arch=IMAGE_ARCHS,
    spec=st.sampled_from(["C4", "D4", "D1", "D2"]),
    readout=READOUTS,
    pool=POOLS,
    data=st.data(),
)
@PROPERTY
def test_compiled_cnn_is_equivariant(arch, spec, readout, pool, data) -> None:
    G = equivfx.group(spec)
    g = data.draw(eqst.elements(G), label="g")
    check_compiled(arch, G, g, readout, pool if readout == "invariant" else "mean")


@given(arch=SEQ_ARCHS, readout=READOUTS, data=st.data())
@PROPERTY
def test_compiled_seq_model_is_equivariant_to_shifts_and_reversal(arch, readout, data) -> None:
    length = arch.input_shape[-1]
    n = data.draw(st.sampled_from([d for d in range(2, length + 1) if length % d == 0]), label="n")
    G = equivfx.group(data.draw(eqst.group_specs(kinds=("sequence",), length=n), label="spec"))
    g = data.draw(eqst.elements(G), label="g")
    check_compiled(arch, G, g, readout)


@given(arch=SET_ARCHS, readout=READOUTS, data=st.data())
@PROPERTY
def test_compiled_set_mlp_is_equivariant_to_permutations(arch, readout, data) -> None:
    n = arch.input_shape[1]  # (B, N, F): Perm{n} acts on the set axis -2
    G = equivfx.group(f"Perm{n}")
    g = data.draw(eqst.elements(G), label="g")
    check_compiled(arch, G, g, readout)


@given(arch=IMAGE_ARCHS, spec=st.sampled_from(["C4", "D4"]), data=st.data())
@PROPERTY
def test_compiled_cnn_is_equivariant_in_training_mode_without_dropout(arch, spec, data) -> None:
    """BatchNorm in training mode stays equivariant: its batch statistics (over B*|G| folded slots)
    are over a set the action only permutes. Dropout would not (masks differ per slot)."""
    assume(not any(isinstance(layer, eqst.Dropout) for layer in arch.layers))
    G = equivfx.group(spec)
    g = data.draw(eqst.elements(G), label="g")
    note(f"arch: {arch.describe()}; group {G!r}, g = {g!r}")
    emodel = equivfx.compile(arch.build().eval(), G, readout="slots").train()
    x = arch.example_input()
    with torch.no_grad():
        y, y_g = emodel(x), emodel(G.act(g, x))
    expected = y[:, regular_permutation(G, g)]
    note(f"max |emodel(g.x) - expected| = {abs_error(y_g, expected):.3g}")
    assert within(y_g, expected, RTOL, ATOL)
