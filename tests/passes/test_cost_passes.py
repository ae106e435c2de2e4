"""The cost passes (defer-lift, hoist-projection): outputs unchanged, and they fire where they
should.

Oracle: the unoptimised pipeline (``optimize=False``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import equivfx
from equivfx.meta import REP, InputRep

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import ZOO, clean_names  # noqa: E402

CASES = [(n, spec) for n in clean_names() for spec in ZOO[n].groups]


class Stem(nn.Module):
    """Input normalisation, batch norm and a 1x1 stem (commute with rotations), then a 3x3 conv,
    global pooling and an affine head (commutes with the mean over slots)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn = nn.BatchNorm2d(3)
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = (x - 0.5) * 2
        x = torch.relu(self.stem(self.bn(x)))
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc2(self.fc1(x.view(x.size(0), -1)))


X = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def nodes_before_lift(gm) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.target == "equivfx_lift":
            return out
        if n.op != "placeholder":
            out.append(str(n.target))
    raise AssertionError("no lift")


@pytest.mark.parametrize("readout", ["invariant", "slots", "pose"])
@pytest.mark.parametrize("name, spec", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_outputs_unchanged_on_the_zoo(name, spec, readout):
    model, x, _ = ZOO[name]()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = equivfx.compile(model, spec, readout=readout, example_inputs=x, check=True)
        slow = equivfx.compile(model, spec, readout=readout, example_inputs=x, optimize=False)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5)


def test_defer_lift_fires_on_commuting_ops_and_keeps_the_input_check():
    model = Stem().eval()
    emodel = equivfx.compile(model, "D4", example_inputs=X, check=True, chunk=None)
    before = nodes_before_lift(emodel)
    assert before[0] == "equivfx_check_input"
    assert {"bn", "stem"} <= set(before) and "conv" not in before
    plain = equivfx.compile(model, "D4", example_inputs=X, optimize=False, chunk=None)
    assert nodes_before_lift(plain) == []
    moved = [n for n in emodel.graph.nodes if n.target in ("bn", "stem")]
    assert all(isinstance(n.meta[REP], InputRep) for n in moved)
    with torch.no_grad():
        slow = equivfx.compile(model, "D4", example_inputs=X, optimize=False)
        torch.testing.assert_close(emodel(X), slow(X), rtol=1e-5, atol=1e-6)
    with pytest.raises(equivfx.errors.InputShapeError, match=r"\(3, 3, 8, 9\)"):
        emodel(torch.randn(3, 3, 8, 9))  # the message quotes the user's input, not the stem's


class CircularSeq(nn.Module):
    """Circular convolutions (translation equivariant on the torus), then a zero-padded one."""

    def __init__(self, tail_padding_mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv1d(3, 8, 5, padding=2, padding_mode="circular")
        self.c2 = nn.Conv1d(8, 8, 3, padding=2, dilation=2, padding_mode="circular")
        self.c3 = nn.Conv1d(8, 8, 3, padding=1, padding_mode=tail_padding_mode)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.relu(self.c3(x)).mean(-1))


@pytest.mark.parametrize("readout", ["invariant", "slots"])
@pytest.mark.parametrize(
    "spec, tail, deferred",
    [
        ("Shift4", "zeros", {"c1", "c2"}),  # the zero-padded c3 gets the lift
        ("Shift4", "circular", {"c1", "c2", "c3", "fc"}),  # invariant throughout: one pass
        ("ShiftRev4", "circular", set()),  # a reversal does not commute with a convolution
    ],
)
def test_defer_lift_moves_past_circular_convolutions_under_shifts(spec, tail, deferred, readout):
    model = CircularSeq(tail).eval()
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(2))
    fast = equivfx.compile(model, spec, readout=readout, example_inputs=x, chunk=None)
    before = set(nodes_before_lift(fast)) & {"c1", "c2", "c3", "fc"}
    assert before == deferred
    slow = equivfx.compile(model, spec, readout=readout, example_inputs=x, optimize=False)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-6)
    assert equivfx.verify(fast, x).ok


def test_defer_lift_is_exact_for_batch_norm_in_training_mode():
    model = Stem().train()
    fast = equivfx.compile(model, "C4", example_inputs=X)
    slow = equivfx.compile(model, "C4", example_inputs=X, optimize=False)
    fast.train()
    slow.train()
    torch.testing.assert_close(fast(X), slow(X), rtol=1e-4, atol=1e-5)


def test_hoist_projection_runs_the_head_once_per_sample():
    model = Stem().eval()
    rows = []
    handle = model.fc1.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            equivfx.compile(model, "D4", example_inputs=X)(X)
            fast_rows = rows[-1]
            equivfx.compile(model, "D4", example_inputs=X, optimize=False)(X)
            slow_rows = rows[-1]
    finally:
        handle.remove()
    assert (fast_rows, slow_rows) == (3, 3 * 8)


@pytest.mark.parametrize(
    "kwargs", [dict(pool="max"), dict(readout="slots"), dict(pool="logsumexp")]
)
def test_hoist_needs_the_mean_readout(kwargs):
    emodel = equivfx.compile(Stem().eval(), "C4", example_inputs=X, **kwargs)
    assert not hasattr(emodel, "equivfx_pool")


def test_hoist_stops_at_dropout_and_mixing_layers():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * 36, 3)
    ).eval()
    emodel = equivfx.compile(model, "C4", example_inputs=X, chunk=None)
    pool = next(n for n in emodel.graph.nodes if n.target == "equivfx_pool")
    assert pool.args[0].target == "3"  # pooled after the dropout, before the linear head only
    layerwise = equivfx.compile(Stem().eval(), "C4", mode="layerwise", example_inputs=X)
    pool_users = [n for n in layerwise.graph.nodes if n.target == "equivfx_pool"]
    for n in pool_users:  # the pool never moves in front of a mixing layer
        assert not any(u.meta.get("equivfx.mixing") for u in n.users)
    assert equivfx.verify(layerwise, X).ok


def test_optimized_models_verify_and_localise():
    emodel = equivfx.compile(Stem().eval(), "D4", readout="slots", example_inputs=X)
    report = equivfx.verify(emodel, X)
    assert report.ok
    emodel.equivfx_lift.inverses = tuple(range(8))  # g instead of g^-1: the report names the lift
    report = equivfx.verify(emodel, X)
    assert not report.ok and report.first_bad_node == "equivfx_lift"


class ViewHead(nn.Module):
    """The common head ``h.view(x.size(0), -1)``: the batch size is read off the *input*."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 5)

    def forward(self, x):
        batch = x.size(0)
        h = torch.relu(self.conv(x)).reshape(batch, 4, 64)
        return self.fc(h.reshape(batch, -1).view(x.size(0), -1))


@pytest.mark.parametrize("examples", [False, True])
def test_hoist_reads_batch_sizes_off_the_pooled_value(examples):
    model = ViewHead().eval()
    ex = X if examples else None
    fast = equivfx.compile(model, "C4", example_inputs=ex, check=True)
    slow = equivfx.compile(model, "C4", optimize=False)
    assert hasattr(fast, "equivfx_pool")
    with torch.no_grad():
        torch.testing.assert_close(fast(X), slow(X), rtol=1e-5, atol=1e-5)
        assert fast(X[:2]).shape == (2, 5)


class TokenHead(nn.Module):
    """A transformer-style head: a mean over tokens, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, T, 8)
        return self.fc(tokens.mean(1))


def test_hoist_pools_after_a_reduction_not_before_it():
    emodel = equivfx.compile(TokenHead().eval(), "C4", example_inputs=X, chunk=None)
    pool = next(n for n in emodel.graph.nodes if n.target == "equivfx_pool")
    assert pool.args[0].target == "mean" and [u.target for u in pool.users] == ["fc"]
    slow = equivfx.compile(TokenHead().eval(), "C4", example_inputs=X, optimize=False)
    with torch.no_grad():
        torch.testing.assert_close(emodel(X), slow(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ["mean", "max", "logsumexp"])
def test_accumulating_pools_leave_the_input_alone(pool):
    x = X.clone()
    emodel = equivfx.compile(nn.Identity(), "D4", pool=pool, chunk=1)
    whole = equivfx.compile(nn.Identity(), "D4", pool=pool, chunk=None)
    with torch.no_grad():
        torch.testing.assert_close(emodel(x), whole(x))
    assert torch.equal(x, X)  # slot e is x itself: it is copied before anything adds into it


def test_hoist_stops_at_functional_dropout_too():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 36, 3)

        def forward(self, x):
            h = nn.functional.dropout(self.conv(x).flatten(1), 0.5, self.training)
            return self.fc(h)

    emodel = equivfx.compile(Head().eval(), "C4", example_inputs=X, chunk=None)
    pool = next(n for n in emodel.graph.nodes if n.target == "equivfx_pool")
    assert pool.args[0].target is nn.functional.dropout  # each slot draws its own mask


class _Head(nn.Module):
    """Features pooled two ways over the pixels (``a`` mean, ``b`` max), then a head that
    ``case`` picks: the models of the hoist's edge cases below."""

    def __init__(self, case: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.case = case
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.fc2 = nn.Linear(4, 5)

    def features(self, x):
        h = torch.relu(self.conv(x))
        return h, h.mean((-2, -1)), h.amax((-2, -1))


def _like_unoptimised(model, group, examples, chunk, atol=1e-5):
    """Compile ``model`` with the cost passes and ``chunk``, check every output against
    ``optimize=False`` on X, and return the compiled model."""
    slow = equivfx.compile(model, group, example_inputs=examples, optimize=False)
    fast = equivfx.compile(model, group, example_inputs=examples, chunk=chunk)
    with torch.no_grad():
        want, got = slow(X), fast(X)
    if not isinstance(want, tuple):
        want, got = (want,), (got,)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=atol)
    return fast


class _Pooled(_Head):
    """Heads the hoist must leave alone (from a review)."""

    def forward(self, x):
        h, a, b = self.features(x)
        if self.case == "add_ in the head":
            return self.fc(a.add_(1.0)), a.sum(1)
        if self.case == "mul_ after the head":
            t = self.fc(a)
            a.mul_(3.0)
            return t, a.sum(1)
        if self.case == "bool source":
            return self.fc((b > 0.3).float())
        # token rows: reshape(-1, C) folds |G| B T rows; the batch size is read off the input
        batch = x.size(0)
        tokens = torch.tanh(h.flatten(2).transpose(1, 2).reshape(-1, 4))
        return self.fc(tokens).view(batch, -1)


@pytest.mark.parametrize(
    "variant", ["add_ in the head", "mul_ after the head", "bool source", "token rows"]
)
@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize("examples", [True, False])
def test_hoist_leaves_in_place_writes_non_float_sources_and_token_rows_alone(
    variant, chunk, examples
):
    if variant == "token rows" and not examples:
        pytest.skip("without example shapes the rows of a folded value are not known")
    ex = X if examples else None
    fast = _like_unoptimised(_Pooled(variant).eval(), "C4", ex, chunk, atol=1e-6)
    assert not hasattr(fast, "equivfx_pool")


class TwoBranchHead(_Head):
    """Heads with two folded inputs: the features pooled two ways and joined (``case``: cat, sum,
    shared, product), then affine layers."""

    def __init__(self, case: str) -> None:
        super().__init__(case)
        self.fc_a = nn.Linear(4, 6)
        self.fc_b = nn.Linear(4, 6)
        self.fc = nn.Linear(8 if case == "cat" else 6, 5)

    def forward(self, x):
        _, a, b = self.features(x)
        if self.case == "cat":
            return self.fc(torch.cat([a, b], 1))
        if self.case == "sum":
            return self.fc(self.fc_a(a) + self.fc_b(b) - self.fc_a(b))
        if self.case == "shared":  # one folded value read by two branches
            return self.fc(self.fc_a(a) + self.fc_b(a))
        return self.fc(self.fc_a(a) * self.fc_b(b))  # a product: not linear in a and b together


def _rows_seen(model, x, **kwargs) -> int:
    rows = []
    handle = model.fc.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            equivfx.compile(model, "D4", example_inputs=x, **kwargs)(x)
    finally:
        handle.remove()
    return rows[-1]


@pytest.mark.parametrize("join, pools", [("cat", 2), ("sum", 2), ("shared", 1)])
def test_hoist_pools_each_input_of_a_sum_or_concatenation(join, pools):
    model = TwoBranchHead(join).eval()
    emodel = equivfx.compile(model, "D4", example_inputs=X, chunk=None)
    pooled = [n for n in emodel.graph.nodes if n.target == "equivfx_pool"]
    assert len(pooled) == pools
    assert all(n.target != "equivfx_readout" for n in emodel.graph.nodes)
    assert sorted(str(n.args[0].target) for n in pooled) == sorted(
        {"cat": ["amax", "mean"], "sum": ["amax", "mean"], "shared": ["mean"]}[join]
    )
    assert (_rows_seen(model, X), _rows_seen(model, X, optimize=False)) == (3, 3 * 8)
    slow = equivfx.compile(model, "D4", example_inputs=X, optimize=False)
    chunked = equivfx.compile(model, "D4", example_inputs=X, chunk=1)
    with torch.no_grad():
        torch.testing.assert_close(emodel(X), slow(X), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunked(X), slow(X), rtol=1e-5, atol=1e-6)
    assert equivfx.verify(emodel, X).ok


def test_hoist_stops_at_a_product_of_two_folded_values():
    import operator

    model = TwoBranchHead("product").eval()
    emodel = equivfx.compile(model, "D4", example_inputs=X, chunk=None)
    (pool,) = [n for n in emodel.graph.nodes if n.target == "equivfx_pool"]
    assert pool.args[0].target is operator.mul  # the product runs per slot, then the pool
    slow = equivfx.compile(model, "D4", example_inputs=X, optimize=False)
    with torch.no_grad():
        torch.testing.assert_close(emodel(X), slow(X), rtol=1e-5, atol=1e-6)


class _TreeCase(_Head):
    """Heads with two folded inputs that must not change the outputs (from a review): a shape
    read off one branch used before the other branch's pool, in-place writes in and after the
    head, bool and integer sources, and a source with |G| B T rows. (A constant of the batch
    size, torch.arange(x.size(0)), is refused at compile: tests/passes/test_rules.py.)"""

    def forward(self, x):
        h, a, b = self.features(x)
        case = self.case
        if case == "shape read early":
            return torch.cat([a, self.fc(b).view(a.size(0), -1)], 1)
        if case == "input batch size":
            return torch.cat([a, self.fc(b).view(x.size(0), -1)], 1)
        if case == "add_ joins":
            return self.fc(a.add_(b)), a.sum(1)
        if case == "written between reads":
            t1 = self.fc(a)
            a.mul_(3.0)
            return t1 + self.fc2(a)
        if case == "written after the head":
            t = self.fc(a)
            a.mul_(3.0)
            return t + self.fc2(b)
        if case == "bool source":
            return self.fc(a + (b > 0.3))
        if case == "integer source":
            return a + b.argmax(1, keepdim=True)
        # token rows defined before b: |G| B T rows, and the batch size read off the input
        tokens = torch.tanh(h.flatten(2).transpose(1, 2).reshape(-1, 4))
        b = h.amax((-2, -1))
        return torch.cat([self.fc2(b), self.fc(tokens).view(x.size(0), -1)], 1)


TREE_CASES = [
    "shape read early",
    "input batch size",
    "add_ joins",
    "written between reads",
    "written after the head",
    "bool source",
    "integer source",
    "token rows",
]


@pytest.mark.parametrize("case", TREE_CASES)
@pytest.mark.parametrize("chunk", [None, 1, "auto"])
def test_hoisting_a_tree_keeps_every_output(case, chunk):
    _like_unoptimised(_TreeCase(case).eval(), "C4", X, chunk)


class _Opaque(nn.Module):
    """A leaf the tracer cannot enter (a data-dependent branch) that writes its input."""

    def forward(self, t):
        if t.sum() > -1e9:
            t.mul_(3.0)
        return t.sum(1, keepdim=True)


class _SecondReview(_Head):
    """Heads from a second review: sources of unknown dtype or rows (no example inputs), a cast
    to int inside the head, an untraced leaf writing a source, and a tuple-valued source."""

    def __init__(self, case: str) -> None:
        super().__init__(case)
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.opaque = _Opaque()
        with torch.no_grad():  # values far from 0, so a cast to int changes them
            self.fc.weight.mul_(20)

    def forward(self, x):
        h, a, b = self.features(x)
        if self.case == "bool source":
            return self.fc(a + (b > 0.3))
        if self.case == "token rows":
            tokens = torch.tanh(h.flatten(2).transpose(1, 2).reshape(-1, 4))
            b = h.amax((-2, -1))
            return torch.cat([self.fc2(b), self.fc(tokens).view(x.size(0), -1)], 1)
        if self.case == "cast to int":
            return self.fc(a).to(torch.int64).to(torch.float32)
        if self.case == "opaque write":
            t = self.fc(a)
            u = self.opaque(a)
            return t + self.fc2(b), u
        out, _ = self.lstm(h.flatten(2).transpose(1, 2))  # "tuple source"
        return self.fc(out[:, -1])


@pytest.mark.parametrize(
    "case, examples",
    [
        ("bool source", False),
        ("token rows", False),
        ("cast to int", True),
        ("opaque write", True),
        ("tuple source", True),
        ("tuple source", False),
    ],
)
@pytest.mark.parametrize("chunk", [None, 1])
def test_hoisting_keeps_outputs_where_dtypes_rows_or_writes_are_unknown(case, examples, chunk):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the opaque leaf's fallback warning
        _like_unoptimised(_SecondReview(case).eval(), "C4", X if examples else None, chunk)


class _ThirdReview(_Head):
    """Heads from a third review: integer and bool sources promoted to float by a scalar (no cast
    to see without example dtypes), a batch size read off a twin of a token tensor, and a tree
    whose second source comes after the first branch's head (its chain above the join moves)."""

    def __init__(self, case: str) -> None:
        super().__init__(case)
        self.fc3 = nn.Linear(5, 5)

    def forward(self, x):
        h, a, b = self.features(x)
        if self.case == "int plus a float":
            return self.fc(b.argmax(1, keepdim=True).expand(-1, 4) + 0.5)
        if self.case == "bool plus a float":
            return self.fc((b > 0.3) + 0.5)
        if self.case == "size off a token twin":
            z = self.fc(h.flatten(2).transpose(1, 2).reshape(-1, 4))
            n = h.flatten(2).transpose(1, 2).reshape(-1, 4).size(0)
            return z.reshape(n // 64, -1)
        t = self.fc(a)  # "later source"
        late = torch.tanh(h).amax((-2, -1))
        return self.fc3(t + self.fc2(late))


@pytest.mark.parametrize(
    "case", ["int plus a float", "bool plus a float", "size off a token twin", "later source"]
)
@pytest.mark.parametrize("examples", [True, False])
@pytest.mark.parametrize("chunk", [None, 1])
def test_hoisting_third_review_cases(case, examples, chunk):
    fast = _like_unoptimised(_ThirdReview(case).eval(), "D4", X if examples else None, chunk)
    if case == "later source" and chunk is None:  # the tree is refused, the chain above moves
        (pool,) = [n for n in fast.graph.nodes if n.target == "equivfx_pool"]
        assert [u.target for u in pool.users] == ["fc3"]


def test_the_mean_readout_of_integer_outputs_is_a_float_mean():
    class Argmax(nn.Module):
        def forward(self, x):
            return x.flatten(1).argmax(1)

    emodel = equivfx.compile(Argmax(), "C4", chunk=None)
    chunked = equivfx.compile(Argmax(), "C4", chunk=1)
    x = torch.randn(3, 1, 4, 4)
    want = (
        torch.stack(
            [emodel.equivfx_lift(x)[i * 3 : (i + 1) * 3].flatten(1).argmax(1) for i in range(4)]
        )
        .double()
        .mean(0)
    )
    torch.testing.assert_close(emodel(x).double(), want)
    torch.testing.assert_close(chunked(x).double(), want)
    assert emodel(x).dtype == torch.get_default_dtype()


@pytest.mark.parametrize("bias", [True, False])
def test_interpolated_rotations_move_only_linear_maps_before_the_lift(bias):
    # C8 rotates by interpolation with zeros outside the image: a biased 1x1 convolution (and the
    # relu after it) moved before the lift changed the outputs by 2e-3 (review)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1, bias=bias), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 2)
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    fast = equivfx.compile(model, "C8", example_inputs=x, chunk=None)
    slow = equivfx.compile(model, "C8", example_inputs=x, chunk=None, optimize=False)
    calls = [n.target for n in fast.graph.nodes if n.op == "call_module"]
    before = [t for t in calls[: calls.index("equivfx_lift")] if not t.startswith("equivfx")]
    assert before == ([] if bias else ["0"])  # the unbiased conv runs once
    with torch.no_grad():
        torch.testing.assert_close(fast(x), slow(x), rtol=1e-6, atol=1e-6)
