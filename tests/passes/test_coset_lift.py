"""defer-lift-to-cosets: ops that commute with a subgroup's action run on one slot per coset, and a
coset lift after them makes every slot (slot r k = k^-1 . slot r).

Oracles: the unoptimised pipeline (``optimize=False``) and the loop over every element.
"""

from __future__ import annotations

import io
import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from slot_checks import READOUTS, flat, loop_oracle, rows_seen
from torch import nn

import equivfx
from equivfx.meta import REP, CosetFolded
from equivfx.passes.modules import CosetLift, Lift

X = torch.randn(3, 3, 16, generator=torch.Generator().manual_seed(0))
X_GRID = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


class FlatHead(nn.Module):
    """Circular convolutions (they commute with the shifts, not the reversal), then a linear
    layer over every position: no op is invariant under the shifts."""

    def __init__(self, length: int = 16, norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv1d(3, 8, 5, padding=2, padding_mode="circular")
        self.b = nn.Conv1d(8, 4, 3, padding=1, padding_mode="circular")
        self.norm = nn.BatchNorm1d(4) if norm else nn.Identity()
        self.fc = nn.Linear(4 * length, 5)

    def forward(self, x):
        return self.fc(self.norm(torch.relu(self.b(torch.relu(self.a(x))))).flatten(1))


class Pooled(FlatHead):
    """An adaptive pool to 4 positions after the convolutions: any length divisible by 4."""

    def __init__(self) -> None:
        super().__init__(length=4)
        self.pool = nn.AdaptiveAvgPool1d(4)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.b(torch.relu(self.a(x))))).flatten(1))


class GridHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(4 * 64, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("kwargs", READOUTS, ids=lambda k: "-".join(k.values()))
@pytest.mark.parametrize("chunk", [None, 1, "auto"])
def test_commuting_ops_run_once_per_coset(kwargs, chunk):
    model = FlatHead().eval()
    G = equivfx.group("ShiftRev4")
    fast = equivfx.compile(model, G, example_inputs=X, chunk=chunk, check=True, **kwargs)
    slow = equivfx.compile(model, G, example_inputs=X, chunk=chunk, optimize=False, **kwargs)
    f = flat(fast)
    assert type(f.equivfx_lift_cosets) is Lift and f.equivfx_lift_cosets.slots == (0, 4)
    assert isinstance(f.equivfx_lift, CosetLift)
    reps = {n.target: n.meta.get(REP) for n in f.graph.nodes if n.op == "call_module"}
    assert reps["a"] == reps["b"] == CosetFolded((0, 4)) and reps["fc"] != CosetFolded((0, 4))
    with torch.no_grad():
        fast(X)  # chunk="auto" measures at the first call
        torch.testing.assert_close(fast(X), slow(X), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            fast(X), loop_oracle(model, G, X, **kwargs), rtol=1e-5, atol=1e-5
        )
    assert rows_seen(model.b, lambda: fast(X)) == 3 * 2  # of 3 * 8
    hoisted = kwargs == dict(readout="invariant")  # the mean pools before the linear head
    assert rows_seen(model.fc, lambda: fast(X)) == (3 if hoisted else 3 * 8)  # every slot
    assert equivfx.verify(fast, X).ok


def test_one_factor_of_a_product():
    model = GridHead().eval()
    G = equivfx.group("Rev@-1xShift4@-2")  # the conv commutes with the row shifts (elements 0..3)
    fast = equivfx.compile(model, G, example_inputs=X_GRID, chunk=None)
    assert fast.equivfx_lift_cosets.slots == (0, 4)
    assert rows_seen(model.conv, lambda: fast(X_GRID)) == 2 * 2
    torch.testing.assert_close(fast(X_GRID).detach(), loop_oracle(model, G, X_GRID))


def test_other_lengths_and_a_saved_model():
    model = Pooled().eval()
    G = equivfx.group("ShiftRev4")
    fast = equivfx.compile(model, G, example_inputs=X)
    assert flat(fast).equivfx_lift_cosets.slots == (0, 4)
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for length in (8, 40):
        x = torch.randn(2, 3, length, generator=torch.Generator().manual_seed(length))
        want = loop_oracle(model, G, x)
        torch.testing.assert_close(fast(x).detach(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded(x).detach(), want, rtol=1e-5, atol=1e-6)


def test_batch_statistics_after_the_coset_lift_see_every_slot():
    # in training, the chain stops before the batch norm, which then normalises over |G| B rows
    model = FlatHead(norm=True).train()
    G = equivfx.group("ShiftRev4")
    fast = equivfx.compile(model, G, example_inputs=X, chunk=None)
    slow = equivfx.compile(model, G, example_inputs=X, chunk=None, optimize=False)
    assert fast.equivfx_lift_cosets.slots == (0, 4)
    assert rows_seen(model.norm, lambda: fast(X)) == 3 * 8
    torch.testing.assert_close(fast(X), slow(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "factory, spec, x",
    [
        (FlatHead, "Shift4", X),  # defer-lift moves the convolutions: one slot
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten()), "D4", X_GRID),
        (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.Flatten()), "ShiftRev4", X),
        (
            lambda: nn.Sequential(
                nn.Dropout(), nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular")
            ),
            "ShiftRev4",
            X,
        ),
    ],
    ids=["whole-group", "zero-padded-3x3-under-D4", "zero-padding", "dropout-first"],
)
def test_the_lift_stays_where_nothing_commutes_with_a_subgroup_alone(factory, spec, x):
    fast = equivfx.compile(factory().eval(), spec, example_inputs=x, chunk=None)
    assert not hasattr(fast, "equivfx_lift_cosets")
    assert type(fast.equivfx_lift) is Lift


@pytest.mark.parametrize("readout", ["slots", "pose"])
def test_one_sample_is_lifted_by_one_cached_gather(readout):
    model = FlatHead().eval()
    G = equivfx.group("ShiftRev4")
    x = X[:1]
    fast = equivfx.compile(model, G, example_inputs=x, chunk=None, readout=readout)
    coset_lift = fast.equivfx_lift
    with torch.no_grad():
        got = fast(x)
    assert len(coset_lift._indices) == 1  # the gather ran, for this shape
    torch.testing.assert_close(got, loop_oracle(model, G, x, readout), rtol=1e-5, atol=1e-6)
    # the gather and the per-slot actions agree exactly on the same block values
    y = torch.randn(2, 4, 16)
    by_gather = coset_lift.lift_slots(y, range(8))
    blocks = torch.unflatten(y, 0, (2, -1))
    for g, (j, i) in enumerate(coset_lift.where):
        assert torch.equal(by_gather[g : g + 1], coset_lift.action._apply(i, blocks[j]))
    assert "_indices" not in coset_lift.__getstate__()  # a cache, not pickled


def test_the_coset_gather_index_is_bounded_off_the_cpu():
    # off the CPU every size is gathered (Lift.GATHER_LIMIT is the CPU's); the index, as large as
    # the lifted value, stays within Lift.INDEX_LIMIT (meta tensors stand in for a device)
    fast = equivfx.compile(FlatHead().eval(), "ShiftRev4", example_inputs=X[:1], chunk=None)
    coset_lift = fast.equivfx_lift
    coset_lift.__dict__.pop("_indices", None)  # the compile's test run gathered for X[:1]
    big = torch.empty(2, 64, 8192, device="meta")  # one sample's 2 blocks: 8 x 512K > the limit
    assert coset_lift.lift_slots(big, range(8)).shape == (8, 64, 8192)
    assert coset_lift.__dict__.get("_indices", {}) == {}
    small = torch.empty(2, 4, 16, device="meta")
    coset_lift.lift_slots(small, range(8))
    assert list(coset_lift._indices) == [((2, 4, 16), small.device, tuple(range(8)))]


class MaskedHead(FlatHead):
    def forward(self, x, mask):
        return self.fc((torch.relu(self.b(torch.relu(self.a(x)))) * mask).flatten(1))


class PooledGrid(nn.Module):
    """Under D4 x Shift8@-3 a 1x1 convolution commutes with the rotations and flips only (the
    shift moves the channels), and so does a 2x2 pool, on grids it tiles."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(8, 8, 1)
        self.p = nn.MaxPool2d(2)
        self.ap = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 2)

    def forward(self, x):
        return self.fc(self.ap(self.p(torch.relu(self.c(x)))).flatten(1))


def test_claims_seen_on_the_example_only_end_the_chain():
    G = equivfx.group("ShiftRev4")
    model = MaskedHead().eval()
    fast = equivfx.compile(model, G, example_inputs=(X, torch.ones(1, 1, 1)), chunk=None)
    mask = torch.linspace(0, 1, 16).view(1, 1, 16)  # per position at run time
    with torch.no_grad():
        want = torch.stack([model(G.act(G.inverse(g), X), mask) for g in G.elements]).mean(0)
        torch.testing.assert_close(fast(X, mask), want, rtol=1e-5, atol=1e-6)
    G = equivfx.group("D4xShift8@-3")
    model = PooledGrid().eval()
    fast = equivfx.compile(model, G, example_inputs=torch.randn(2, 8, 8, 8), chunk=None)
    chain = [n.target for n in fast.graph.nodes if n.op == "call_module"]
    assert chain.index("equivfx_lift") < chain.index("p")  # the pool runs after the coset lift
    x = torch.randn(2, 8, 7, 7)  # the unoptimised model takes it: so does this one
    torch.testing.assert_close(fast(x).detach(), loop_oracle(model, G, x), rtol=1e-5, atol=1e-6)


class ResidualHead(nn.Module):
    """A residual block of circular convolutions (they commute with the shifts, not the
    reversal), then a linear layer over every position. ``leak``: the block's inner value is
    also read outside it (by a linear layer over positions), so only the ops before it run once
    per coset."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.leak = leak
        self.a = nn.Conv1d(3, 8, 5, padding=2, padding_mode="circular")
        self.b = nn.Conv1d(8, 8, 3, padding=1, padding_mode="circular")
        self.c = nn.Conv1d(8, 8, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(8 * 16, 5)
        self.side = nn.Linear(8 * 16, 5)

    def forward(self, x):
        h = torch.relu(self.a(x))
        inner = torch.relu(self.b(h))
        y = torch.relu(h + self.c(inner))
        out = self.fc(y.flatten(1))
        return out + self.side(inner.flatten(1)) if self.leak else out


@pytest.mark.parametrize("readout", ["invariant", "slots"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_a_residual_block_runs_once_per_coset(readout, chunk):
    model = ResidualHead().eval()
    G = equivfx.group("ShiftRev4")
    fast = equivfx.compile(model, G, example_inputs=X, chunk=chunk, readout=readout, check=True)
    slow = equivfx.compile(model, G, example_inputs=X, chunk=chunk, readout=readout, optimize=False)
    f = flat(fast)
    assert f.equivfx_lift_cosets.slots == (0, 4) and isinstance(f.equivfx_lift, CosetLift)
    (coset_lift,) = [n for n in f.graph.nodes if n.target == "equivfx_lift"]
    assert coset_lift.args[0].target is torch.relu  # after the residual sum's relu
    assert coset_lift.args[0].args[0].target is operator.add
    for conv in (model.a, model.b, model.c):
        assert rows_seen(conv, lambda: fast(X)) == 3 * 2  # of 3 * 8
    assert rows_seen(model.fc, lambda: fast(X)) == 3 * (1 if readout == "invariant" else 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(X), slow(X), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(X), loop_oracle(model, G, X, readout), rtol=1e-5, atol=1e-5)
    assert equivfx.verify(fast, X).ok


class ReadsShapes(FlatHead):
    """Reads sizes between the convolutions: of other axes (the same on one slot per coset as
    on every slot), or the batch size, which the coset lift changes; or scales a tensor by a
    size (a tensor is no number)."""

    def __init__(self, mode: str = "other-axes") -> None:
        super().__init__()
        self.mode = mode
        self.pe = nn.Parameter(torch.randn(1, 8, 16))

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.mode == "other-axes":  # an item, a size, a rank; an item of a slice
            h = h * (1.0 / h.shape[-1]) + h.size(1) * 0.0 - h.dim() + h.size()[1:][-1]
        elif self.mode == "unpacked":  # the batch size unpacked, never read
            B, C, L = h.shape
            h = h * (1.0 / L) + C * 0.0
        elif self.mode == "unpacked-and-read":
            B, C, L = h.shape
            h = h.reshape(B, C, L)
        elif self.mode == "batch-size":
            h = h.reshape(h.shape[0], h.size(1), -1)
        elif self.mode == "scaled-tensor":  # a positional embedding scaled by a size
            h = h + self.pe * h.shape[1] ** -0.5
        elif self.mode == "ramp":  # a ramp over the positions
            h = h + torch.arange(16) / h.shape[-1]
        g = torch.relu(self.b(h))
        if self.mode == "read-last":  # a read of h after the last op: only g's value leaves
            return self.fc(g.flatten(1)) * (1.0 / h.shape[-1])
        return self.fc(g.flatten(1))


@pytest.mark.parametrize(
    "mode",
    [
        "other-axes",
        "unpacked",
        "unpacked-and-read",
        "read-last",
        "batch-size",
        "scaled-tensor",
        "ramp",
    ],
)
def test_sizes_of_other_axes_do_not_end_the_region(mode):
    model = ReadsShapes(mode).eval()
    G = equivfx.group("ShiftRev4")
    fast = equivfx.compile(model, G, example_inputs=X, chunk=None)
    slow = equivfx.compile(model, G, example_inputs=X, chunk=None, optimize=False)
    f = flat(fast)
    (coset_lift,) = [n for n in f.graph.nodes if n.target == "equivfx_lift"]
    # reading other axes' sizes, both convolutions run once per coset (the region ended at the
    # first read before); a read of the batch size, or a tensor operand, ends it there
    free = mode in ("other-axes", "unpacked", "read-last")
    assert (coset_lift.args[0].args[0].target == "b") == free
    assert rows_seen(model.b, lambda: fast(X)) == 3 * (2 if free else 8)
    x = torch.randn(5, 3, 16)  # another batch size
    with torch.no_grad():
        for v in (X, x):
            torch.testing.assert_close(fast(v), slow(v), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast(x), loop_oracle(model, G, x), rtol=1e-5, atol=1e-6)


def test_a_value_read_outside_the_block_ends_the_region_before_the_block():
    model = ResidualHead(leak=True).eval()
    G = equivfx.group("ShiftRev4")
    fast = equivfx.compile(model, G, example_inputs=X, chunk=None)
    (coset_lift,) = [n for n in fast.graph.nodes if n.target == "equivfx_lift"]
    assert coset_lift.args[0].target is torch.relu and coset_lift.args[0].args[0].target == "a"
    assert rows_seen(model.a, lambda: fast(X)) == 3 * 2
    assert rows_seen(model.b, lambda: fast(X)) == rows_seen(model.c, lambda: fast(X)) == 3 * 8
    with torch.no_grad():
        torch.testing.assert_close(fast(X), loop_oracle(model, G, X), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- drawn networks
class Drawn(nn.Module):
    """A network drawn as a program over values: v0 = a circular stem on x; each step makes one
    value from earlier ones (a circular convolution, which commutes with the shifts; a
    zero-padded one, which does not; a relu; a residual sum; a concatenation along channels and a
    1x1 convolution; a value scaled by its own length, a shape read); the head reads the last
    value over every position, and another one if ``leak`` is set."""

    def __init__(self, steps, leak) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.steps, self.leak = steps, leak
        self.stem = nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular")
        self.convs = nn.ModuleList()
        for op, *_ in steps:
            if op in ("circular", "zeros"):
                self.convs.append(nn.Conv1d(4, 4, 3, padding=1, padding_mode=op))
            elif op == "cat":
                self.convs.append(nn.Conv1d(8, 4, 1))
            else:
                self.convs.append(nn.Identity())
        self.fc = nn.Linear(4 * 16, 5)
        self.side = nn.Linear(4 * 16, 5)

    def forward(self, x):
        values = [self.stem(x)]
        for (op, a, b), conv in zip(self.steps, self.convs, strict=True):
            va, vb = values[a % len(values)], values[b % len(values)]
            if op in ("circular", "zeros"):
                values.append(conv(va))
            elif op == "relu":
                values.append(torch.relu(va))
            elif op == "add":
                values.append(va + vb)
            elif op == "cat":
                values.append(conv(torch.cat([va, vb], 1)))
            else:  # "length": a shape read of a value computed from the lift
                values.append(va * (va.size(-1) / 16))
        out = self.fc(values[-1].flatten(1))
        if self.leak is not None:
            out = out + self.side(values[self.leak % len(values)].flatten(1))
        return out


STEPS = st.lists(
    st.tuples(
        st.sampled_from(["circular", "circular", "relu", "add", "cat", "zeros", "length"]),
        st.integers(0, 7),
        st.integers(0, 7),
    ),
    min_size=1,
    max_size=7,
)


@given(
    steps=STEPS,
    leak=st.none() | st.integers(0, 7),
    readout=st.sampled_from(["invariant", "slots"]),
    chunk=st.sampled_from([None, 2]),
    spec=st.sampled_from(["ShiftRev4", "Shift4"]),  # Shift4: regions commuting with all of G
)
@settings(deadline=None)
def test_drawn_networks_compute_what_the_plain_construction_computes(
    steps, leak, readout, chunk, spec
):
    model = Drawn(steps, leak).eval()
    G = equivfx.group(spec)
    fast = equivfx.compile(model, G, example_inputs=X, readout=readout, chunk=chunk)
    slow = equivfx.compile(model, G, example_inputs=X, readout=readout, chunk=chunk, optimize=False)
    with torch.no_grad():
        torch.testing.assert_close(fast(X), slow(X), rtol=1e-4, atol=1e-5)
        x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(len(steps)))
        torch.testing.assert_close(fast(x), loop_oracle(model, G, x, readout), rtol=1e-4, atol=1e-5)


class PointwiseResidual(nn.Module):
    """1x1 convolutions in a residual block commute with all of D4; a linear head over every
    pixel does not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 64, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.fc(torch.relu(h + self.b(h)).flatten(1))


@pytest.mark.parametrize(
    "factory, spec, x",
    [(PointwiseResidual, "D4", X_GRID), (ResidualHead, "Shift4", X)],
    ids=["1x1-residual-D4", "circular-residual-Shift4"],
)
def test_a_residual_block_commuting_with_the_whole_group_runs_once(factory, spec, x):
    # defer-lift moves chains of ops before the lift; a residual block of such ops runs once
    # before a coset lift of the whole group (one coset)
    model = factory().eval()
    G = equivfx.group(spec)
    fast = equivfx.compile(model, G, example_inputs=x, chunk=None, check=True)
    slow = equivfx.compile(model, G, example_inputs=x, chunk=None, optimize=False)
    assert fast.equivfx_lift_cosets.slots == (0,)
    block = model.b if factory is PointwiseResidual else model.c
    assert rows_seen(block, lambda: fast(x)) == x.shape[0]  # of |G| B
    with torch.no_grad():
        torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x), loop_oracle(model, G, x), rtol=1e-5, atol=1e-5)
    assert equivfx.verify(fast, x).ok


class ShortBlockThenCircular(nn.Module):
    """A residual block of 1x1 convolutions (commutes with all of ShiftRev4), then circular
    convolutions (commute with its shifts only), then a linear head over every position."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv1d(3, 8, 1), nn.Conv1d(8, 8, 1)
        self.c = nn.Conv1d(8, 8, 5, padding=2, padding_mode="circular")
        self.d = nn.Conv1d(8, 8, 5, padding=2, padding_mode="circular")
        self.fc = nn.Linear(8 * 16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(h + self.b(h))
        return self.fc(torch.relu(self.d(torch.relu(self.c(h)))).flatten(1))


def test_the_subgroup_saving_the_most_work_wins():
    # the whole group's region (the 1x1 block) is shorter than the shifts' (the block and the
    # circular convolutions): 3 ops on 1 slot of 8 save less than 7 ops on 2 slots of 8
    model = ShortBlockThenCircular().eval()
    G = equivfx.group("ShiftRev4")
    fast = equivfx.compile(model, G, example_inputs=X, chunk=None)
    assert fast.equivfx_lift_cosets.slots == (0, 4)
    assert rows_seen(model.c, lambda: fast(X)) == 3 * 2
    with torch.no_grad():
        torch.testing.assert_close(fast(X), loop_oracle(model, G, X), rtol=1e-5, atol=1e-5)
