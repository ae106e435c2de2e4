"""eliminate-dead-slots (and the defer-lift moves that feed it): one slot per coset of the elements
that act trivially where the lift sits; outputs unchanged, and the rest is not computed.

Oracle: the unoptimised pipeline (``optimize=False``), which computes every slot.
"""

from __future__ import annotations

import pytest
import torch
from slot_checks import READOUTS, flat, loop_oracle, rows_seen
from torch import nn

import equivfx
from equivfx.errors import InputShapeError
from equivfx.passes.dead_slots import coset_representatives, generated_subgroup
from equivfx.passes.modules import slot_positions


class DeepSets(nn.Module):
    """phi per element, a sum over the set, rho: already permutation invariant."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.phi = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16))
        self.rho = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.rho(self.phi(x).sum(1))


class PooledStem(nn.Module):
    """A 1x1 stem and a global pool (both commute with D4), then a head on a 1x1 grid."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.stem(x))), 1))


class Strip(nn.Module):
    """Convolutions over a 1 x L strip: a reversal of the length-1 axis fixes every input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, (1, 3), padding=(0, 1))
        self.b = nn.Conv2d(4, 2, (1, 3), padding=(0, 1))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class ScaledStrip(Strip):
    """Strip with a second batched input (G acts on it trivially: repeated per slot)."""

    def forward(self, x, scale):
        return self.b(torch.relu(self.a(x)) * scale[:, :, None, None])


STRIP_GROUP = "Rev@-1xRev@-2"  # (e,e), (e,v2), (v1,e), (v1,v2): (e, v2) fixes a 1 x L input
X_SET = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
X_IMG = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(2))
X_STRIP = torch.randn(3, 3, 1, 6, generator=torch.Generator().manual_seed(3))


def both(model, spec, x, **kwargs):
    fast = equivfx.compile(model, spec, example_inputs=x, check=True, **kwargs)
    slow = equivfx.compile(model, spec, example_inputs=x, optimize=False, **kwargs)
    return fast, slow


@pytest.mark.parametrize("kwargs", READOUTS, ids=lambda k: "-".join(k.values()))
def test_an_invariant_set_model_runs_once_instead_of_n_factorial_times(kwargs):
    model = DeepSets().eval()
    fast, slow = both(model, "Perm5", X_SET, **kwargs)
    assert flat(fast).equivfx_lift.slots == (0,)
    with torch.no_grad():
        torch.testing.assert_close(fast(X_SET), slow(X_SET), rtol=1e-5, atol=1e-5)
    assert rows_seen(model.rho[0], lambda: fast(X_SET)) == 3
    assert rows_seen(model.rho[0], lambda: slow(X_SET)) == 3 * 120
    assert equivfx.verify(fast, X_SET).ok


def test_defer_lift_moves_past_a_symmetric_reduction_and_everything_after_it():
    fast = equivfx.compile(DeepSets().eval(), "Perm5", example_inputs=X_SET, chunk=None)
    order = [str(n.target) for n in fast.graph.nodes if n.op != "placeholder"]
    lift = order.index("equivfx_lift")
    assert {"phi.0", "phi.2", "sum", "rho.0", "rho.2"} <= set(order[:lift])
    assert type(fast.equivfx_lift.action).__name__ == "TrivialAction"


@pytest.mark.parametrize("kwargs", READOUTS, ids=lambda k: "-".join(k.values()))
def test_a_head_past_a_global_pool_runs_once(kwargs):
    model = PooledStem().eval()
    fast, slow = both(model, "D4", X_IMG, **kwargs)
    assert flat(fast).equivfx_lift.slots == (0,)
    with torch.no_grad():
        torch.testing.assert_close(fast(X_IMG), slow(X_IMG), rtol=1e-5, atol=1e-6)
    assert rows_seen(model.fc, lambda: fast(X_IMG)) == 3
    assert rows_seen(model.stem, lambda: fast(X_IMG)) == 3  # deferred: the stem runs once too
    assert equivfx.verify(fast, X_IMG).ok


@pytest.mark.parametrize(
    "kwargs", READOUTS + [dict(readout="equivariant")], ids=lambda k: "-".join(k.values())
)
@pytest.mark.parametrize("chunk", [None, 1, "auto"])
def test_a_partial_kernel_computes_one_slot_per_coset(kwargs, chunk):
    if kwargs["readout"] == "equivariant":
        kwargs = dict(kwargs, output_action=equivfx.group(STRIP_GROUP).action)
    model = Strip().eval()
    fast, slow = both(model, STRIP_GROUP, X_STRIP, chunk=chunk, **kwargs)
    lift = flat(fast).equivfx_lift
    assert (lift.slots, lift.kernel) == ((0, 2), (0, 1))
    with torch.no_grad():
        fast(X_STRIP)  # chunk="auto" measures at the first call
    assert rows_seen(model.a, lambda: fast(X_STRIP)) == 3 * 2  # of 3 * 4
    with torch.no_grad():
        torch.testing.assert_close(fast(X_STRIP), slow(X_STRIP), rtol=1e-5, atol=1e-6)
    assert equivfx.verify(fast, X_STRIP).ok


def test_inputs_repeated_per_slot_are_repeated_per_computed_slot():
    model = ScaledStrip().eval()
    scale = torch.rand(3, 4, generator=torch.Generator().manual_seed(4))
    fast, slow = both(model, STRIP_GROUP, (X_STRIP, scale), readout="slots", chunk=None)
    with torch.no_grad():
        torch.testing.assert_close(fast(X_STRIP, scale), slow(X_STRIP, scale))
    repeats = [m for n, m in fast.named_modules() if n.startswith("equivfx_repeat_")]
    assert repeats and all(m.order == 2 for m in repeats)


def test_a_kernel_found_on_the_example_shape_is_checked_at_run_time():
    fast = equivfx.compile(Strip().eval(), STRIP_GROUP, example_inputs=X_STRIP)
    with pytest.raises(InputShapeError, match=r"got \(3, 2, 6\); expected \(3, 1, 6\)"):
        fast(torch.randn(3, 3, 2, 6))
    plain = equivfx.compile(Strip().eval(), STRIP_GROUP, example_inputs=X_STRIP, optimize=False)
    assert plain(torch.randn(3, 3, 2, 6)).shape == (3, 2, 2, 6)


def test_a_trivial_action_needs_no_shape_check():
    fast = equivfx.compile(PooledStem().eval(), "D4", example_inputs=X_IMG)
    assert fast(torch.randn(2, 3, 10, 10)).shape == (2, 5)  # any square size


def test_nothing_is_eliminated_where_every_slot_differs():
    fast = equivfx.compile(Strip().eval(), "Rev", example_inputs=X_STRIP, chunk=None)
    assert fast.equivfx_lift.slots == (0, 1)
    layerwise = equivfx.compile(
        Strip().eval(), STRIP_GROUP, mode="layerwise", example_inputs=X_STRIP
    )
    assert flat(layerwise).equivfx_lift.slots == (0, 1, 2, 3)  # mixing layers read every slot


def test_localisation_reads_the_computed_slots():
    fast = equivfx.compile(Strip().eval(), STRIP_GROUP, readout="slots", example_inputs=X_STRIP)
    assert equivfx.verify(fast, X_STRIP).ok
    flat(fast).equivfx_readout.slot_map = (0, 0, 0, 0)  # copies the wrong slot back
    report = equivfx.verify(fast, X_STRIP)
    assert not report.ok and report.first_bad_node == "equivfx_readout"


@pytest.mark.parametrize("spec", ["D4", "Perm4", "C4xRev@1", "ShiftRev6"])
def test_cosets_of_every_normal_subgroup_found_by_a_kernel(spec):
    G = equivfx.group(spec)
    for kernel in _normal_subgroups(G):
        reps = coset_representatives(G, kernel)
        assert reps[0] == 0 and len(reps) * len(kernel) == G.order
        where = slot_positions(G, reps, kernel)
        for g in range(G.order):  # g and its representative differ by an element of the kernel
            r = reps[where[g]]
            assert G.table[G.inverse_table[r]][g] in kernel


def _normal_subgroups(G):
    """The trivial group, G, and the kernels of the default action on a few small shapes."""
    out = {(0,), tuple(range(G.order))}
    for shape in [(1, 2, 1, 1), (1, 1, 1, 3), (1, 2, 1, 4), (1, 1, 4, 1)]:
        try:
            out.add(G.action.kernel(shape))
        except Exception:  # noqa: BLE001 - a shape the action does not fit
            continue
    return sorted(out)


# ------------------------------------------------------------------ a subgroup the ops are blind to
class CircularSeq(nn.Module):
    """Circular convolutions and a mean over the sequence: invariant under every cyclic shift of
    it, not under its reversal (the kernels are not symmetric)."""

    def __init__(self, padding_mode: str = "circular") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv1d(3, 8, 5, padding=2, padding_mode=padding_mode)
        self.b = nn.Conv1d(8, 8, 3, padding=1, padding_mode=padding_mode)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean(-1))


class CircularGrid(nn.Module):
    """A circular 2D convolution and a global mean: blind to shifts of either axis."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean((-2, -1)))


X_SEQ = torch.randn(3, 3, 16, generator=torch.Generator().manual_seed(5))
X_GRID = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("kwargs", READOUTS, ids=lambda k: "-".join(k.values()))
@pytest.mark.parametrize("chunk", [None, 1, "auto"])
def test_ops_blind_to_the_shifts_compute_one_slot_per_reversal(kwargs, chunk):
    model = CircularSeq().eval()
    fast, slow = both(model, "ShiftRev4", X_SEQ, chunk=chunk, **kwargs)
    lift = flat(fast).equivfx_lift
    assert (lift.slots, lift.kernel, lift.shape_kernel) == ((0, 4), (0, 1, 2, 3), (0,))
    with torch.no_grad():
        fast(X_SEQ)  # chunk="auto" measures at the first call
        torch.testing.assert_close(fast(X_SEQ), slow(X_SEQ), rtol=1e-5, atol=1e-6)
    assert rows_seen(model.a, lambda: fast(X_SEQ)) == 3 * 2  # of 3 * 8
    assert rows_seen(model.a, lambda: slow(X_SEQ)) == 3 * 8
    assert equivfx.verify(fast, X_SEQ).ok


@pytest.mark.parametrize("readout", ["invariant", "slots"])
def test_blind_slots_match_the_loop_over_every_element(readout):
    model = CircularSeq().eval()
    G = equivfx.group("ShiftRev4")
    fast = equivfx.compile(model, G, example_inputs=X_SEQ, readout=readout, chunk=None)
    with torch.no_grad():
        got = fast(X_SEQ)
    want = loop_oracle(model, G, X_SEQ, readout)
    if readout == "slots":  # every shift's slot holds its coset's value: slot s^k v^m = slot v^m
        assert got.shape == (3, 8, 4)
        torch.testing.assert_close(got[:, :4], got[:, :1].expand(3, 4, 4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_blind_slots_hold_on_other_lengths():
    model = CircularSeq().eval()
    fast = equivfx.compile(model, "ShiftRev4", example_inputs=X_SEQ)
    G = equivfx.group("ShiftRev4")
    for length in (8, 40):
        x = torch.randn(2, 3, length, generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            torch.testing.assert_close(fast(x), loop_oracle(model, G, x), rtol=1e-5, atol=1e-6)


def test_one_factor_of_a_product_the_ops_are_blind_to():
    # Rev@-1 x Shift4@-2: slot index 4 d_rev + d_shift; the shifts of the rows are elements 0..3
    model = CircularGrid().eval()
    fast, slow = both(model, "Rev@-1xShift4@-2", X_GRID, chunk=None)
    assert (fast.equivfx_lift.slots, fast.equivfx_lift.kernel) == ((0, 4), (0, 1, 2, 3))
    assert rows_seen(model.conv, lambda: fast(X_GRID)) == 2 * 2
    with torch.no_grad():
        torch.testing.assert_close(fast(X_GRID), slow(X_GRID), rtol=1e-5, atol=1e-6)
    G = equivfx.group("Rev@-1xShift4@-2")
    torch.testing.assert_close(fast(X_GRID).detach(), loop_oracle(model, G, X_GRID))


@pytest.mark.parametrize(
    "model, why",
    [
        (CircularSeq(padding_mode="zeros"), "zero padding: a shift changes the edges"),
        (nn.Sequential(nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular")), "no invariant op"),
        (
            nn.Sequential(nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"), nn.Dropout()),
            "dropout",
        ),
    ],
    ids=["zeros", "no-reduction", "dropout"],
)
def test_nothing_is_eliminated_where_the_ops_can_tell_shifts_apart(model, why):
    fast = equivfx.compile(model.eval(), "ShiftRev4", example_inputs=X_SEQ, chunk=None)
    assert fast.equivfx_lift.slots == tuple(range(8)), why


class Residual(CircularSeq):
    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.fc((h + self.b(h)).mean(-1))


class Gated(CircularSeq):
    """A squeeze-and-excitation gate: an invariant per-channel scale times the equivariant map."""

    def forward(self, x):
        h = torch.relu(self.a(x))
        gate = torch.sigmoid(h.mean(-1, keepdim=True))  # (B, 8, 1): invariant, constant in L
        return self.fc((self.b(h) * gate).amax(-1))


class Concat(CircularSeq):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.fc = nn.Linear(16 if dim == 1 else 8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.fc(torch.cat([h, self.b(h)], self.dim).mean(-1))


class SizeRead(CircularSeq):
    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.fc(h.sum(-1) / h.size(-1))


@pytest.mark.parametrize(
    "model", [Residual(), Gated(), Concat(dim=1), SizeRead()], ids=lambda m: type(m).__name__
)
@pytest.mark.parametrize("chunk", [None, "auto"])
def test_branches_after_the_lift_are_followed(model, chunk):
    model.eval()
    G = equivfx.group("ShiftRev4")
    fast, slow = both(model, G, X_SEQ, chunk=chunk)
    assert flat(fast).equivfx_lift.slots == (0, 4)
    with torch.no_grad():
        fast(X_SEQ)
        torch.testing.assert_close(fast(X_SEQ), slow(X_SEQ), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast(X_SEQ), loop_oracle(model, G, X_SEQ), rtol=1e-5, atol=1e-6)
    assert rows_seen(model.a, lambda: fast(X_SEQ)) == 3 * 2  # of 3 * 8


class AdaptiveHead(CircularSeq):
    """CircularSeq with an adaptive pool to length 1, a flatten and the linear head instead of a
    mean over the sequence: the pool is as blind to the shifts as the mean. (Without the pool's
    invariance claim, defer-lift-to-cosets still runs the convolutions on 2 slots, but the pool
    and the head on all 8.)"""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool1d(1)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(torch.flatten(self.pool(h), 1))


@pytest.mark.parametrize("kwargs", READOUTS, ids=lambda k: "-".join(k.values()))
@pytest.mark.parametrize("chunk", [None, "auto"])
def test_an_adaptive_pool_to_one_is_blind_to_the_shifts(kwargs, chunk):
    model = AdaptiveHead().eval()
    G = equivfx.group("ShiftRev4")
    fast, slow = both(model, G, X_SEQ, chunk=chunk, **kwargs)
    lift = flat(fast).equivfx_lift
    assert lift.slots == (0, 4)
    assert (lift.kernel, lift.shape_kernel) == ((0, 1, 2, 3), (0,))
    with torch.no_grad():
        fast(X_SEQ)  # chunk="auto" measures at the first call
        torch.testing.assert_close(fast(X_SEQ), slow(X_SEQ), rtol=1e-5, atol=1e-6)
        want = loop_oracle(model, G, X_SEQ, kwargs["readout"], kwargs.get("pool", "mean"))
        torch.testing.assert_close(fast(X_SEQ), want, rtol=1e-5, atol=1e-6)
    assert rows_seen(model.a, lambda: fast(X_SEQ)) == 3 * 2  # of 3 * 8
    assert rows_seen(model.pool, lambda: fast(X_SEQ)) == 3 * 2
    assert rows_seen(model.pool, lambda: slow(X_SEQ)) == 3 * 8
    assert equivfx.verify(fast, X_SEQ).ok


class Positional(CircularSeq):
    """A learned per-position offset: shifts move the input but not the offset."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        return self.fc(torch.relu(self.a(x) + self.pos).mean(-1))


class UngatedGate(CircularSeq):
    """The gate keeps the sequence axis: a per-position scale computed from an invariant."""

    def forward(self, x):
        h = torch.relu(self.a(x))
        gate = h.mean(-1, keepdim=True).expand(-1, -1, 16) * torch.linspace(0, 1, 16)
        return self.fc((self.b(h) * gate).mean(-1))


class LeakyOutput(CircularSeq):
    """A second output that keeps the sequence: not invariant."""

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.fc(h.mean(-1)), h


@pytest.mark.parametrize(
    "model",
    [Concat(dim=-1), Positional(), UngatedGate(), LeakyOutput()],
    ids=["cat-along-the-sequence", "positional", "per-position-gate", "equivariant-output"],
)
def test_branches_that_can_tell_shifts_apart_keep_every_slot(model):
    model.eval()
    G = equivfx.group("ShiftRev4")
    kwargs = dict(readout="slots") if isinstance(model, LeakyOutput) else {}
    fast, slow = both(model, G, X_SEQ, chunk=None, **kwargs)
    assert fast.equivfx_lift.slots == tuple(range(8))
    with torch.no_grad():
        torch.testing.assert_close(fast(X_SEQ), slow(X_SEQ), rtol=1e-5, atol=1e-6)


def test_the_search_leaves_training_mode_dropout_and_batch_norm_alone():
    model = nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"), nn.BatchNorm1d(4), nn.ReLU()
    )

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return self.body(x).mean(-1)

    fast = equivfx.compile(Head().train(), "ShiftRev4", example_inputs=X_SEQ, chunk=None)
    assert fast.equivfx_lift.slots == tuple(range(8))  # batch statistics see every slot


@pytest.mark.parametrize(
    "spec, elements, want",
    [
        ("D4", [1], (0, 1, 2, 3)),
        ("D4", [2, 4], (0, 2, 4, 6)),
        ("D4", [1, 4], tuple(range(8))),
        ("D4", [], (0,)),
        ("ShiftRev4", [5], (0, 5)),
    ],
)
def test_generated_subgroup(spec, elements, want):
    assert generated_subgroup(equivfx.group(spec), elements) == want


@pytest.mark.parametrize("spec", ["D4", "D3", "ShiftRev4", "Rev@-1xShift4@-2", "D4xShift8@-3"])
def test_restrictions_are_subgroups_acting_as_the_whole_group_does(spec):
    G = equivfx.group(spec)
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(7))
    restrictions = G.action.restrictions()
    assert restrictions
    for r in restrictions:
        H = r.action.group
        assert r.elements[0] == 0 and len(set(r.elements)) == H.order < G.order
        for i, a in enumerate(r.elements):  # an injective homomorphism H -> G ...
            for j, b in enumerate(r.elements):
                assert r.elements[H.table[i][j]] == G.table[a][b]
            # ... under which the restricted action is the whole group's
            torch.testing.assert_close(r.action.apply(i, x), G.action.apply(a, x), rtol=0, atol=0)
    assert equivfx.group("C4").action.restrictions() == ()


# ------------------------------------------------------------- what the example's shape decides
class ResidualPool(nn.Module):
    """1x1 convolutions in a residual block (defer-lift stops at the branch), a 2x2 max pool,
    and a global mean: blind to the rotations where the pool's windows tile the grid."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.fc(self.pool(h + torch.relu(self.b(h))).mean((-2, -1)))


class PoolFirst(nn.Module):
    """A pool defer-lift moves before the lift (it commutes with D4 on tiled grids)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.pool(x)).mean((-2, -1))


def test_a_pool_defer_lift_moves_is_checked_on_other_shapes():
    model = PoolFirst().eval()
    G = equivfx.group("D4")
    fast = equivfx.compile(model, G, example_inputs=torch.randn(2, 3, 6, 6))
    checks = [m for n, m in flat(fast).named_modules() if n.startswith("equivfx_tiles_")]
    assert [c.window for c in checks] == [2]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fast(x).detach(), loop_oracle(model, G, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputShapeError, match=r"2x2 windows tile a square input.*, 7, 7\)"):
        fast(torch.randn(2, 3, 7, 7))  # the pool drops a row and a column: not a rotation's


def test_the_subgroup_search_does_not_rely_on_a_pool_tiling_the_example():
    # blind to the rotations on 6x6 and 8x8, not on 7x7: the search keeps every slot rather
    # than raise on grids that the unoptimised model accepts
    model = ResidualPool().eval()
    G = equivfx.group("D4")
    fast = equivfx.compile(model, G, example_inputs=torch.randn(2, 3, 6, 6))
    assert flat(fast).equivfx_lift.slots == tuple(range(8))
    for size in (6, 7):
        x = torch.randn(2, 3, size, size)
        want = loop_oracle(model, G, x)
        torch.testing.assert_close(fast(x).detach(), want, rtol=1e-5, atol=1e-6)


class Masked(CircularSeq):
    """A second, unbatched input multiplies the features: constant along the sequence in the
    example (1, 1, 1), a per-position mask at run time (1, 1, L)."""

    def forward(self, x, mask):
        return self.fc((torch.relu(self.b(torch.relu(self.a(x)))) * mask).mean(-1))


def test_an_operand_from_another_input_is_not_relied_on():
    model = Masked().eval()
    G = equivfx.group("ShiftRev4")
    fast = equivfx.compile(model, G, example_inputs=(X_SEQ, torch.ones(1, 1, 1)))
    mask = torch.linspace(0, 1, 16).view(1, 1, 16)
    with torch.no_grad():
        want = torch.stack([model(G.act(G.inverse(g), X_SEQ), mask) for g in G.elements]).mean(0)
        torch.testing.assert_close(fast(X_SEQ, mask), want, rtol=1e-5, atol=1e-6)


class ShiftBlind(nn.Module):
    """A mean over the shifted axis (-2), then positions along the reversed one (-1) mixed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.relu(x).mean(-2).transpose(1, 2)).sum(1)


def test_an_invariant_subgroup_needs_no_particular_shape():
    # found on width 5 (the reversal acts there); on width 1 it acts trivially too: no error
    G = equivfx.group("Rev@-1xShift4@-2")
    model = ShiftBlind().eval()
    fast = equivfx.compile(model, G, example_inputs=torch.randn(2, 3, 8, 5), chunk=None)
    assert (fast.equivfx_lift.slots, fast.equivfx_lift.kernel_shape) == ((0, 4), None)
    for shape in [(2, 3, 8, 1), (2, 3, 4, 6)]:
        x = torch.randn(shape)
        torch.testing.assert_close(fast(x).detach(), loop_oracle(model, G, x), rtol=1e-5, atol=1e-6)


class Sampler(CircularSeq):
    """A VAE-style draw after a shift-invariant encoder: one independent draw per slot."""

    def forward(self, x):
        mu = self.fc(torch.relu(self.a(x)).mean(-1))
        return mu + 0.1 * torch.randn(mu.shape)


def test_slots_that_draw_random_numbers_are_not_copies():
    fast = equivfx.compile(Sampler().eval(), "ShiftRev4", example_inputs=X_SEQ, chunk=None)
    assert fast.equivfx_lift.slots == tuple(range(8))
    torch.manual_seed(0)
    draws = torch.stack([fast(X_SEQ).detach() for _ in range(400)])
    # the mean of 8 independent draws of sd 0.1: sd 0.1 / sqrt(8) = 0.035 (2 draws: 0.071)
    assert 0.030 < float(draws.std(0).mean()) < 0.041
