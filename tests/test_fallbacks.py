"""Fallbacks and refusals: what the compiler does with models it cannot handle the normal way.

- data-dependent control flow in ``forward``: the whole model becomes one opaque node, with a
  warning, and the global lift still holds;
- a batch size baked into a reshape: rewritten so it runs correctly, or refused with
  BatchMixingError;
- an op that mixes the batch axis: refused with BatchMixingError naming the op;
- bad inputs and options: InputShapeError, ModelTypeError, ReadoutError, GroupSpecError.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import equivfx
from equivfx.errors import (
    BatchMixingError,
    EquivFXError,
    GroupSpecError,
    InputShapeError,
    ModelTypeError,
    ReadoutError,
)

try:
    from tests.zoo import ZOO
except ModuleNotFoundError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from zoo import ZOO

TOL = dict(rtol=1e-5, atol=1e-6)


def oracle_slots(model, G, x):
    with torch.no_grad():
        return torch.stack([model(G.act(G.inverse(g), x)) for g in G.elements], 1)


def _is_fallback_warning(w: warnings.WarningMessage) -> bool:
    try:
        from equivfx.trace import FallbackWarning
    except ImportError:
        FallbackWarning = None
    if FallbackWarning is not None and issubclass(w.category, FallbackWarning):
        return True
    return issubclass(w.category, UserWarning) and "fallback" in str(w.message).lower()


# --------------------------------------------------------------------------------------------------
# control flow -> opaque fallback
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("readout", ["slots", "invariant"])
def test_control_flow_model_falls_back_to_opaque(readout):
    model, x, spec = ZOO["control_flow"]()
    G = equivfx.group(spec)
    with pytest.raises(torch.fx.proxy.TraceError):  # precondition: plain fx really cannot trace it
        torch.fx.symbolic_trace(model)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emodel = equivfx.compile(model, spec, readout=readout)
    assert any(_is_fallback_warning(w) for w in caught), [str(w.message) for w in caught]
    assert emodel.equivfx_info.trace_path == "opaque"
    emodel.eval()

    # both branches of the data-dependent `if` are exercised: mean(x) > 0 and mean(-x) < 0
    for inp in (x, -x):
        with torch.no_grad():
            y = emodel(inp)
            slots = oracle_slots(model, G, inp)
            expected = slots if readout == "slots" else slots.mean(1)
            torch.testing.assert_close(y, expected, **TOL)
            if readout == "invariant":
                for g in G.elements:
                    torch.testing.assert_close(emodel(G.act(g, inp)), y, **TOL)
    # the two branches really differ (so the check above covers two different graphs)
    with torch.no_grad():
        assert not torch.allclose(model.pos(x), 2.0 * model.neg(x), atol=1e-3)

    report = equivfx.verify(emodel, x)
    assert report.ok, report.to_json()


def test_control_flow_model_keeps_state_dict():
    model, x, spec = ZOO["control_flow"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emodel = equivfx.compile(model, spec)
    sd, esd = model.state_dict(), emodel.state_dict()
    assert set(sd) == set(esd)
    assert all(torch.equal(sd[k], esd[k]) for k in sd)


def test_untraceable_submodule_becomes_a_leaf():
    model, x, spec = ZOO["leafy"]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emodel = equivfx.compile(model, spec, readout="slots")
    fallback = [w for w in caught if _is_fallback_warning(w)]
    assert fallback and "clamp" in str(fallback[0].message)
    info = emodel.equivfx_info
    assert info.trace_path == "symbolic_trace+leaves"
    assert "clamp" in info.leaves
    # the leaf really runs: an outlier input gets clamped inside, exactly as in the original
    G = equivfx.group(spec)
    x_big = x.clone()
    x_big[0, 0, 0, 0] = 1e6
    emodel.eval()
    with torch.no_grad():
        torch.testing.assert_close(emodel(x_big), oracle_slots(model, G, x_big), **TOL)


# --------------------------------------------------------------------------------------------------
# opaque leaves that treat a batch's samples together: one slot per pass
# --------------------------------------------------------------------------------------------------


class _PerBatch(torch.nn.Module):
    """Untraceable (``len``) and not per-sample: divides by the batch size, or centres on the
    batch mean. Folding the |G| slots into the batch changes what it computes."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, h):
        if self.how == "len":
            return h / len(h)
        return h - h.mean(0, keepdim=True) * (len(h) > 0)


class _Net(torch.nn.Module):
    def __init__(self, how: str, whole: bool):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.mid = _PerBatch(how)
        self.whole = whole  # the len() in forward makes the whole model one opaque node
        self.fc = torch.nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        h = self.mid(self.conv(x)) if not self.whole else self.conv(x) * (len(x) / len(x))
        if self.whole:
            h = self.mid.forward(h)
        return self.fc(torch.tanh(h).flatten(1))


def _mixing_net(how: str, whole: bool):
    torch.manual_seed(0)
    return _Net(how, whole).eval(), torch.randn(3, 2, 6, 6)


def _compiled(model, spec="C4", **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emodel = equivfx.compile(model, spec, readout="slots", **kw).eval()
    return emodel, caught


def _mixing_warnings(caught) -> list[str]:
    from equivfx.passes.annotate import BatchMixingWarning

    return [str(w.message) for w in caught if issubclass(w.category, BatchMixingWarning)]


@pytest.mark.parametrize("how", ["len", "centre"])
@pytest.mark.parametrize("whole", [False, True], ids=["leaf", "opaque"])
def test_leaf_mixing_samples_runs_one_slot_per_pass(how, whole):
    model, x = _mixing_net(how, whole)
    G = equivfx.group("C4")
    emodel, caught = _compiled(model, example_inputs=x)
    assert emodel.equivfx_info.trace_path == ("opaque" if whole else "symbolic_trace+leaves")
    leaf = "equivfx_opaque" if whole else "mid"
    assert any(repr(leaf) in m for m in _mixing_warnings(caught)), [str(w.message) for w in caught]
    with torch.no_grad():
        # the loop over g runs the model on batches of 3, as one slot per pass does (bitwise
        # on CI; another CPU may round another batch size otherwise)
        torch.testing.assert_close(emodel(x), oracle_slots(model, G, x), **TOL)
        torch.testing.assert_close(
            emodel(x[:1]), oracle_slots(model, G, x[:1]), **TOL
        )  # len 1 vs len 4
        # folding every slot would not (what the compiled model computed before this check)
        folded = emodel.equivfx_flat(x)
        assert (folded - oracle_slots(model, G, x)).abs().max() > 1e-2
    assert emodel.equivfx_chunks.chunk == 1


@pytest.mark.parametrize("whole", [False, True], ids=["leaf", "opaque"])
def test_leaf_mixing_samples_checked_at_first_call_without_examples(whole):
    model, x = _mixing_net("len", whole)
    G = equivfx.group("C4")
    emodel, caught = _compiled(model)
    assert not _mixing_warnings(caught)  # nothing to run it on yet
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        with torch.no_grad():
            y = emodel(x)
    assert _mixing_warnings(first), [str(w.message) for w in first]
    with torch.no_grad():
        torch.testing.assert_close(y, oracle_slots(model, G, x), **TOL)
        # every later input, of any batch size, runs one slot per pass too, without measuring
        with warnings.catch_warnings(record=True) as later:
            warnings.simplefilter("always")
            torch.testing.assert_close(emodel(x[:2]), oracle_slots(model, G, x[:2]), **TOL)
    assert not _mixing_warnings(later)
    runner = emodel.equivfx_chunks
    assert runner.chunk == 1 and list(runner.chosen.values()) == [1]  # x[:2] was not measured


@pytest.mark.parametrize(
    "kw, fix",
    [
        (dict(chunk=None), "chunk=1"),
        (dict(chunk=2), "chunk=1"),
        (dict(mode="layerwise"), "mode='global'"),
    ],
    ids=["fold-all", "chunk-2", "layerwise"],
)
def test_leaf_mixing_samples_refused_where_slots_must_fold(kw, fix):
    model, x = _mixing_net("len", False)
    with pytest.raises(BatchMixingError, match="'mid'") as err:
        _compiled(model, example_inputs=x, **kw)
    assert fix in str(err.value)


def test_leaf_mixing_samples_with_chunk_1_is_not_refused():
    model, x = _mixing_net("centre", False)
    emodel, caught = _compiled(model, example_inputs=x, chunk=1)
    assert not _mixing_warnings(caught)  # what was asked for is exact: nothing to say
    with torch.no_grad():
        torch.testing.assert_close(emodel(x), oracle_slots(model, equivfx.group("C4"), x), **TOL)


class _Leaf(torch.nn.Module):
    """Untraceable leaves (a branch on a shape) of several kinds: returning a tuple, reading
    a list of feature maps (FPN-style), giving infinities, drawing noise; ``centre`` makes
    them centre on the batch mean (not per-sample)."""

    def __init__(self, kind: str, centre: bool):
        super().__init__()
        self.kind, self.centre = kind, centre

    def forward(self, h, feats=None):
        if h.dim() != 4:
            raise ValueError("an untraceable branch")
        if self.centre:
            h = h - h.mean(0, keepdim=True)
        if self.kind == "list":
            h = h + feats[0]
        elif self.kind == "inf":
            h = torch.log(torch.relu(h))  # -inf where h <= 0, in either batch
        elif self.kind == "noise":
            h = h + 0.1 * torch.randn_like(h)  # per-sample, random: cannot be checked
        return (h, -h) if self.kind == "tuple" else h


class _LeafNet(torch.nn.Module):
    def __init__(self, kind: str, centre: bool):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Conv2d(2, 3, 3, padding=1)
        self.mid = _Leaf(kind, centre)
        self.fc = torch.nn.Linear(3 * 6 * 6, 4)
        self.kind = kind

    def forward(self, x):
        if self.kind == "list":
            h = self.mid(self.a(x), [self.b(x)])
        elif self.kind == "tuple":
            h, _ = self.mid(self.a(x))
        else:
            h = self.mid(self.a(x))
        return self.fc(torch.tanh(h.clamp(min=-5.0)).flatten(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", ["tuple", "list", "inf"])
def test_leaf_check_sees_tuples_lists_infinities_and_low_precision(kind, batch, dtype):
    G = equivfx.group("C4")
    for centre in (False, True):
        torch.manual_seed(0)
        model = _LeafNet(kind, centre).eval().to(dtype)
        x = torch.randn(batch, 2, 6, 6, dtype=dtype)
        emodel, caught = _compiled(model, example_inputs=x)
        # mixing leaves are named (bfloat16's tolerance times 100 passed anything), per-sample
        # ones are not (infinities equal in both runs, a list's maps cut per slot)
        assert bool(_mixing_warnings(caught)) == centre, [str(w.message) for w in caught]
        assert emodel.equivfx_chunks.chunk == (1 if centre else "auto")
        with torch.no_grad():
            torch.testing.assert_close(emodel(x), oracle_slots(model, G, x), rtol=0.02, atol=0.02)
    if kind != "tuple":  # per-sample leaves compile with every slot in one pass
        _compiled(_LeafNet(kind, False).eval(), example_inputs=x.float(), chunk=None)


def test_verify_checks_the_leaves_of_a_model_that_folds_every_slot():
    model, x = _mixing_net("len", False)
    emodel, _ = _compiled(model, chunk=None)  # no example inputs: compile could not check
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = equivfx.verify(emodel, x)
    # equivariant (every slot divided alike), but not the lift of the model: said, not hidden
    assert report.ok and any("'mid'" in n and "not the lift" in n for n in report.notes)
    assert _mixing_warnings(caught) and all(w.filename == __file__ for w in caught)
    for kw in (dict(chunk=1), dict(example_inputs=x)):  # one slot per pass: exact, nothing to say
        exact, _ = _compiled(model, **kw)
        assert not equivfx.verify(exact, x).notes
    per_sample, _ = _compiled(_LeafNet("list", False).eval(), chunk=None)
    assert not equivfx.verify(per_sample, torch.randn(3, 2, 6, 6)).notes


def test_verify_checks_only_what_compile_left_unchecked(monkeypatch):
    import io

    import equivfx.compiler as compiler

    model, x = _mixing_net("len", False)
    runs = []
    test_run = compiler._test_run
    monkeypatch.setattr(compiler, "_test_run", lambda *a: runs.append(1) or test_run(*a))
    checked, _ = _compiled(_LeafNet("list", False).eval(), chunk=None, example_inputs=x)
    assert checked.equivfx_info.unchecked_leaves == ()
    runs.clear()
    equivfx.verify(checked, x)
    assert not runs  # compile checked it on its example inputs
    # layer-wise: the advice is one that can be followed
    layerwise, _ = _compiled(model, mode="layerwise")
    notes = equivfx.verify(layerwise, x).notes
    assert any("mode='global'" in n and "chunk=1" not in n for n in notes), notes
    # reloaded, the graph lost the annotations the check reads: said, not skipped
    folded, _ = _compiled(model, chunk=None)
    buf = io.BytesIO()
    torch.save(folded, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert any("could not be checked" in n for n in equivfx.verify(loaded, x).notes)


def test_pending_checks_leave_dynamo_full_graphs_alone():
    model, x = _mixing_net("len", False)
    emodel, _ = _compiled(model)  # the check waits for the first eager call
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(emodel, backend="eager", fullgraph=True)(x)  # was Unsupported: warn


def test_tracing_before_the_check_says_so():
    from equivfx.passes.annotate import OpaqueLeafWarning

    model, x = _mixing_net("len", False)
    emodel, _ = _compiled(model)  # no example inputs, no eager call yet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(emodel, (x,), check_trace=False)
    said = [w for w in caught if issubclass(w.category, OpaqueLeafWarning)]
    assert (
        len(said) == 1
        and "traced before" in str(said[0].message)
        and "'mid'" in str(said[0].message)
    )
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        torch.jit.trace(emodel, (x,), check_trace=False)  # once per model
    assert not [w for w in again if issubclass(w.category, OpaqueLeafWarning)]


_PER_SAMPLE = {
    "relu": torch.relu,
    "softmax over channels": lambda h: torch.softmax(h, 1),
    "log of relu (infinities)": lambda h: torch.log(torch.relu(h)).clamp(min=-30.0),
    "spatial mean": lambda h: h - h.mean((2, 3), keepdim=True),
}
_MIXING = {
    "centre on the batch": lambda h: h - h.mean(0, keepdim=True),
    "divide by len": lambda h: h / len(h),
    "reverse the batch": lambda h: h.flip(0),
    "cumulative sum over the batch": lambda h: h.cumsum(0),
}


class _Drawn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        if h.dim() != 4:
            raise ValueError("an untraceable branch")
        return self.fn(h)


class _DrawnNet(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv, self.mid = torch.nn.Conv2d(2, 3, 3, padding=1), _Drawn(fn)
        self.fc = torch.nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.mid(self.conv(x))).flatten(1))


@given(
    kind=st.sampled_from(sorted(_PER_SAMPLE) + sorted(_MIXING)),
    spec=st.sampled_from(["C4", "D4", "Shift3@-1"]),
    batch=st.integers(1, 3),
    examples=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_drawn_leaves_compile_to_the_loop_and_only_mixing_ones_are_named(
    kind, spec, batch, examples, dtype, seed
):
    mixing = kind in _MIXING
    torch.manual_seed(seed)
    model = _DrawnNet({**_PER_SAMPLE, **_MIXING}[kind]).eval().to(dtype)
    x = torch.randn(batch, 2, 6, 6, dtype=dtype)
    G = equivfx.group(spec)
    emodel, caught = _compiled(model, spec, example_inputs=x if examples else None)
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        with torch.no_grad():
            y = emodel(x)
    said = _mixing_warnings(caught + first)
    note(f"{said}")
    # every slot's leaf sees the batch the loop gives it: the compiled model is the loop
    torch.testing.assert_close(y, oracle_slots(model, G, x), rtol=1e-4, atol=1e-5)
    assert bool(said) == mixing
    assert emodel.equivfx_chunks.chunk == (1 if mixing else "auto")


def test_outputs_differ_bounds_each_tensor_by_its_own_scale():
    from equivfx.passes.leaf_check import outputs_differ

    big = torch.tensor([33.0, 0.0, -40.0])
    # kernels that round a batch of 8 B rows otherwise move an output near 0 as much as one
    # near 33 (2.7e-4 in float32 on the CPU): within 100 x float32's rtol of the tensor's scale
    assert outputs_differ(big, big + torch.tensor([2.7e-4, 2.7e-4, 0.0])) == 0.0
    assert outputs_differ(big, big + torch.tensor([0.0, 0.1, 0.0])) == pytest.approx(0.1)
    inf = float("inf")
    assert outputs_differ(torch.tensor([inf, 1.0]), torch.tensor([inf, 1.0])) == 0.0
    assert outputs_differ(torch.tensor([inf, 1.0]), torch.tensor([2.0, 1.0])) == inf
    assert outputs_differ((big,), (big[:2],)) == inf  # a shape that follows the batch
    assert outputs_differ(torch.arange(3), torch.arange(3).flip(0)) == 2.0  # integers: exact


class _Crop(torch.nn.Module):
    """Crops the columns that are zero in every sample of the batch: its output's width
    follows the batch (untraceable: a size read off a tensor)."""

    def forward(self, h):
        cols = (h.abs().sum((0, 1, 2)) > 0).nonzero().flatten()
        return h[..., int(cols.min()) : int(cols.max()) + 1]


class _CropNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.crop, self.fc = _Crop(), torch.nn.Linear(2, 4)

    def forward(self, x):
        return self.fc(self.crop(x).mean((2, 3)))


class _CountNet(torch.nn.Module):
    """A leaf handed the batch size as a number: per slot, which count would it get?"""

    def __init__(self):
        super().__init__()
        self.conv, self.mid = torch.nn.Conv2d(2, 3, 3, padding=1), _Divide()
        self.fc = torch.nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.mid(self.conv(x), x.shape[0])).flatten(1))


class _Divide(torch.nn.Module):
    def forward(self, h, n):
        if h.dim() != 4:
            raise ValueError("an untraceable branch")
        return h / n


def test_leaves_whose_shape_or_count_follows_the_batch():
    G = equivfx.group("C4")
    torch.manual_seed(0)
    x = torch.zeros(2, 2, 8, 8)
    x[..., 2:6, 1:3] = torch.randn(2, 2, 4, 2)  # the slots' nonzero columns differ
    crop = _CropNet().eval()
    emodel, caught = _compiled(crop, example_inputs=x)  # was a crash joining the slots' crops
    assert any("'crop'" in m for m in _mixing_warnings(caught))
    with torch.no_grad():
        torch.testing.assert_close(emodel(x), oracle_slots(crop, G, x), **TOL)
    # a count holding the batch size cannot be cut per slot: the first call checks the model
    count, x = _CountNet().eval(), torch.randn(3, 2, 6, 6)
    emodel, caught = _compiled(count, example_inputs=x)
    assert not _mixing_warnings(caught) and emodel.equivfx_chunks.unchecked_leaves == ("mid",)
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        with torch.no_grad():
            torch.testing.assert_close(emodel(x), oracle_slots(count, G, x), **TOL)  # 0.14 off
    assert _mixing_warnings(first)


def test_a_first_call_in_training_checks_the_leaves_in_eval_mode():
    model, x = _mixing_net("len", False)
    emodel, _ = _compiled(model)  # no example inputs: the first call checks
    emodel.train()
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        with torch.no_grad():
            y = emodel(x)
    assert _mixing_warnings(first) and emodel.training and emodel.mid.training  # modes kept
    model.train()
    torch.testing.assert_close(y, oracle_slots(model, equivfx.group("C4"), x), **TOL)
    # another thread that waited on the measurement takes the finding, not a fold size
    runner = emodel.equivfx_chunks
    assert runner._measured((x[:1],)) == 1 and len(runner.chosen) == 0


def test_a_leaf_returning_a_tuple_needs_example_inputs():
    model, x = _LeafNet("tuple", False).eval(), torch.randn(3, 2, 6, 6)
    # without example inputs a leaf's output is taken for one tensor: h, _ = leaf(...) reads as
    # indexing its batch axis; the refusal says what to do
    with pytest.raises(BatchMixingError, match="if leaf module 'mid' returns a tuple"):
        _compiled(model)
    emodel, _ = _compiled(model, example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(emodel(x), oracle_slots(model, equivfx.group("C4"), x), **TOL)


def test_a_leaf_drawing_noise_is_not_taken_for_one_that_mixes_samples():
    model, x = _LeafNet("noise", False).eval(), torch.randn(3, 2, 6, 6)
    emodel, caught = _compiled(model, example_inputs=x, chunk=None)  # compiled: not refused
    emodel, caught = _compiled(model)
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        with torch.no_grad():
            emodel(x)
    assert not _mixing_warnings(caught + first)
    assert emodel.equivfx_chunks.chunk == "auto"


def test_one_slot_per_pass_holds_in_training_traced_and_reloaded():
    import io

    model, x = _mixing_net("len", False)
    G = equivfx.group("C4")
    loop = oracle_slots(model, G, x)
    emodel, _ = _compiled(model, example_inputs=x)
    with torch.no_grad():
        emodel.train()  # no batch statistics to share: the loop's per-slot batches still
        assert torch.equal(emodel(x), loop)
        emodel.eval()
        traced = torch.jit.trace(emodel, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), loop, **TOL)
    # unchecked (no example inputs) and saved before its first call: the check travels
    emodel, _ = _compiled(model)
    buf = io.BytesIO()
    torch.save(emodel, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), loop, **TOL)
    messages = [w for w in first if "treat the samples" in str(w.message)]
    assert messages and messages[0].filename == __file__  # the user's line, not the library's
    assert loaded.equivfx_chunks.mixing_leaves == ("mid",)


@pytest.mark.parametrize("with_examples", [True, False])
def test_per_sample_opaque_leaves_keep_chunk_auto(with_examples):
    # no false alarm: the zoo's control-flow model and leafy model treat samples on their own
    for name in ("control_flow", "leafy"):
        model, x, spec = ZOO[name]()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            emodel = equivfx.compile(
                model, spec, readout="slots", example_inputs=x if with_examples else None
            ).eval()
            with torch.no_grad():
                y = emodel(x)
        assert not _mixing_warnings(caught), name
        assert emodel.equivfx_chunks.chunk == "auto", name
        torch.testing.assert_close(y, oracle_slots(model, equivfx.group(spec), x), **TOL)


def test_fallback_warnings_name_the_users_line():
    for name in ("control_flow", "leafy"):
        model, x, spec = ZOO[name]()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            equivfx.compile(model, spec, example_inputs=x)
        assert caught and all(w.filename == __file__ for w in caught), [
            (w.category.__name__, w.filename) for w in caught
        ]


# --------------------------------------------------------------------------------------------------
# baked batch size
# --------------------------------------------------------------------------------------------------


def test_baked_batch_is_rewritten_or_refused():
    model, x, spec = ZOO["baked_batch"]()
    G = equivfx.group(spec)
    try:
        emodel = equivfx.compile(model, spec, readout="slots", example_inputs=x).eval()
        with torch.no_grad():
            y = emodel(x)
    except BatchMixingError as err:
        msg = str(err)
        assert "view" in msg, msg  # the FX node name
        assert "batch" in msg.lower(), msg
        return
    # rewritten: it must then compute the real lift
    torch.testing.assert_close(y, oracle_slots(model, G, x), **TOL)
    assert equivfx.verify(emodel, x).ok
    # ... and the batch size is no longer baked in: batch 3 works too. Oracle for one sample: the
    # original model only runs at batch 2, so run it on [x_i, x_i] and keep row 0.
    x3 = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y3 = emodel(x3)
        expected3 = torch.stack(
            [
                torch.stack(
                    [model(torch.cat([G.act(G.inverse(g), xi[None])] * 2))[0] for g in G.elements]
                )
                for xi in x3
            ]
        )
    torch.testing.assert_close(y3, expected3, **TOL)


def test_baked_batch_without_example_inputs_is_refused():
    """Without example inputs the literal 2 cannot be told apart from a feature size: refuse, naming
    the node and saying how to fix it."""
    model, x, spec = ZOO["baked_batch"]()
    with pytest.raises(BatchMixingError) as info:
        emodel = equivfx.compile(model, spec)
        emodel(x)
    msg = str(info.value)
    assert "view" in msg and "batch" in msg.lower(), msg
    assert "example_inputs" in msg, msg


# --------------------------------------------------------------------------------------------------
# batch-mixing op
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_example", [False, True])
def test_batch_mixing_model_is_refused(with_example):
    model, x, spec = ZOO["batch_mixing"]()
    kwargs = {"example_inputs": x} if with_example else {}
    with pytest.raises(BatchMixingError) as info:
        emodel = equivfx.compile(model, spec, **kwargs)
        emodel(x)  # a refusal at compile time is expected; never a silent wrong answer
    msg = str(info.value)
    assert "mean" in msg, msg  # names the offending node/op
    assert isinstance(info.value, EquivFXError) and isinstance(info.value, ValueError)


def test_batch_mixing_refusal_is_specific():
    """Without the batch-axis reduction the model compiles: the refusal is about that op."""
    model, x, spec = ZOO["batch_mixing"]()

    class NoMix(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.conv, self.fc = inner.conv, inner.fc

        def forward(self, x):
            h = torch.relu(self.conv(x))
            h = h - h.mean(1, keepdim=True)  # over channels: per-sample, fine
            return self.fc(h.mean(dim=(2, 3)))

    emodel = equivfx.compile(NoMix(model), spec).eval()
    assert equivfx.verify(emodel, x).ok


# --------------------------------------------------------------------------------------------------
# bad inputs and options
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["C4", "D4"])
def test_non_square_input_raises_input_shape_error(spec):
    model, x, _ = ZOO["resnet"]()
    emodel = equivfx.compile(model, spec).eval()
    x_rect = torch.randn(2, 3, 16, 12)
    model(x_rect)  # the plain model itself accepts it (adaptive pooling): the error is the action's
    with pytest.raises(InputShapeError) as info:
        emodel(x_rect)
    assert "16" in str(info.value) and "12" in str(info.value), str(info.value)


def test_non_square_input_is_fine_for_c2_and_d2():
    model, _, _ = ZOO["resnet"]()
    x_rect = torch.randn(2, 3, 16, 12)
    for spec in ("C2", "D2"):
        G = equivfx.group(spec)
        emodel = equivfx.compile(model, spec).eval()
        with torch.no_grad():
            y = emodel(x_rect)
            for g in G.elements:
                torch.testing.assert_close(emodel(G.act(g, x_rect)), y, **TOL)


def test_compile_rejects_non_module():
    with pytest.raises(ModelTypeError):
        equivfx.compile("not a module", "C4")
    with pytest.raises(TypeError):  # ModelTypeError is also a TypeError
        equivfx.compile(lambda x: x, "C4")


def test_equivariant_readout_without_output_action():
    model, x, spec = ZOO["segnet"]()
    with pytest.raises(EquivFXError) as info:
        equivfx.compile(model, spec, readout="equivariant")
    assert isinstance(info.value, ReadoutError)
    assert "output_action" in str(info.value)


def test_unknown_readout_and_pool():
    model, _, spec = ZOO["resnet"]()
    with pytest.raises(ReadoutError):
        equivfx.compile(model, spec, readout="bogus")
    with pytest.raises(EquivFXError):
        equivfx.compile(model, spec, readout="invariant", pool="median")


def test_bad_group_spec():
    model, _, _ = ZOO["resnet"]()
    with pytest.raises(GroupSpecError):
        equivfx.compile(model, "Q8")


def test_shift_that_does_not_divide_the_axis():
    model, x, _ = ZOO["seqconv"]()  # time axis of length 16
    with pytest.raises(EquivFXError):
        emodel = equivfx.compile(model, "Shift3", example_inputs=x)
        emodel(x)


def test_assert_equivariant():
    from equivfx.testing import assert_equivariant

    model, x, spec = ZOO["vit"]()
    emodel = equivfx.compile(model, spec)
    emodel.eval()
    assert_equivariant(emodel, x)
    with pytest.raises(AssertionError):
        assert_equivariant(model, x, group=equivfx.group(spec))


def test_copy_tensors_copies_every_tensor_and_keeps_the_rest():
    from equivfx.passes.leaf_check import copy_tensors

    a, b = torch.ones(2), torch.zeros(3)
    for tree in [
        a,
        (a, 2, None, "s"),
        ((a,), {"k": b}),
        [a, b],
        {},
        {"k": a},
        (torch.nn.Parameter(a),),
    ]:
        copied = copy_tensors(tree)
        assert type(copied) is type(tree)
        flat, spec = torch.utils._pytree.tree_flatten(tree)
        got, got_spec = torch.utils._pytree.tree_flatten(copied)
        assert spec == got_spec
        for x, y in zip(flat, got, strict=True):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y) and x.data_ptr() != y.data_ptr()
            else:
                assert x == y
