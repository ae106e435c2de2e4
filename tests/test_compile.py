"""equivfx.compile: the API contract, bad input, state dicts, modes, dtypes, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import equivfx
from equivfx.errors import (
    BatchMixingError,
    EquivFXError,
    FixedArgumentError,
    GroupSpecError,
    InputShapeError,
    ModelTypeError,
    NotYetSupportedError,
    ReadoutError,
)
from equivfx.meta import REP, Folded, InputRep, OutputRep, check_meta


def small_cnn(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, classes),
    )


X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def oracle_slots(model, G, x):
    return torch.stack([model(G.act(G.inverse(g), x)) for g in G.elements], 1)


def _same(got, want):
    """The folded slots against the model run on each transformed input alone: bitwise on
    this project's CI machine, but a CPU backend may pick another kernel for another batch size
    (seen on the GPU machine's host, one thread: 1e-8 apart), so to float rounding."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["C1", "C2", "C4", "D1", "D2", "D4"])
def test_slots_equal_the_explicit_loop(spec):
    model = small_cnn().eval()
    G = equivfx.group(spec)
    emodel = equivfx.compile(model, spec, readout="slots", check=True)
    with torch.no_grad():
        got, want = emodel(X), oracle_slots(model, G, X)
    assert got.shape == (3, G.order, 5)
    _same(got, want)


def test_slot_i_is_the_model_on_g_inverse_x():
    """Pins the convention: slot i holds F(g_i^-1 . x); for C4, slot 1 is F(rot90(x, -1))."""
    model = small_cnn().eval()
    emodel = equivfx.compile(model, "C4", readout="slots")
    with torch.no_grad():
        _same(emodel(X)[:, 1], model(torch.rot90(X, -1, (-2, -1))))
        _same(emodel(X)[:, 0], model(X))


@pytest.mark.parametrize("pool", ["mean", "max", "logsumexp"])
def test_invariant_readout_pools_the_slots(pool):
    model = small_cnn().eval()
    G = equivfx.group("D4")
    emodel = equivfx.compile(model, G, readout="invariant", pool=pool)
    with torch.no_grad():
        slots = oracle_slots(model, G, X)
        want = {
            "mean": slots.mean(1),
            "max": slots.amax(1),
            "logsumexp": torch.logsumexp(slots, 1) - torch.log(torch.tensor(8.0)),
        }[pool]
        torch.testing.assert_close(emodel(X), want)
        for g in G.elements:
            torch.testing.assert_close(emodel(G.act(g, X)), emodel(X), rtol=1e-6, atol=1e-6)


def test_pose_readout_is_slot_major():
    model = small_cnn().eval()
    G = equivfx.group("C4")
    emodel = equivfx.compile(model, G, readout="pose")
    with torch.no_grad():
        pose = emodel(X)
        slots = oracle_slots(model, G, X)
    assert pose.shape == (3, 20)
    assert torch.equal(pose[:, 2 * 5 + 3], slots[:, 2, 3])  # index i*K + k


def test_state_dict_keys_and_values_are_the_originals():
    model = small_cnn()
    emodel = equivfx.compile(model, "C4")
    sd, esd = model.state_dict(), emodel.state_dict()
    assert list(sd.keys()) == list(esd.keys())
    for k in sd:
        assert torch.equal(sd[k], esd[k])
    other = small_cnn(5)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    emodel.load_state_dict(other.state_dict())  # an original checkpoint loads as it is
    assert torch.equal(emodel.state_dict()["0.weight"], other.state_dict()["0.weight"])


def test_unused_parameters_are_kept_in_the_state_dict():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 2)
            self.unused = nn.Linear(3, 3)
            self.register_buffer("scale", torch.ones(1))

        def forward(self, x):
            return self.used(x)

    m = M()
    em = equivfx.compile(m, "Perm4@-2")
    assert set(em.state_dict()) == set(m.state_dict())


class LazyNet(nn.Module):
    """Lazy layers, one of which forward never calls (it stays uninitialised)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.LazyConv2d(4, 3)
        self.head = nn.LazyLinear(5)
        self.spare = nn.LazyLinear(2)

    def forward(self, x):
        return self.head(self.conv(x).relu().flatten(1))


@pytest.mark.parametrize("examples", [False, True])
def test_lazy_modules_compile_run_save_and_load(examples):
    # an uninitialised lazy module the graph does not read crashed compile (its parameters
    # copied into a plain module, whose state dict cannot save them)
    model = LazyNet().eval()
    kwargs = {"example_inputs": X} if examples else {}
    emodel = equivfx.compile(model, "C4", readout="slots", **kwargs)
    assert set(emodel.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        _same(emodel(X), oracle_slots(model, equivfx.group("C4"), X))
    assert set(emodel.state_dict()) == set(model.state_dict())
    fresh = equivfx.compile(LazyNet().eval(), "C4", readout="slots")
    fresh.load_state_dict(emodel.state_dict())  # materialises its lazy layers from the tensors
    with torch.no_grad():
        assert torch.equal(fresh(X), emodel(X))


class LazyAffine(nn.modules.lazy.LazyModuleMixin, nn.Module):
    """A lazy module of one's own: its child is called directly, its scale never."""

    def __init__(self):
        super().__init__()
        self.scale = nn.UninitializedParameter()
        self.conv = nn.Conv2d(1, 2, 3)

    def initialize_parameters(self, x):
        self.scale.materialize((2, 1, 1))

    def forward(self, x):
        return self.conv(x) * self.scale


class LazyNorms(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.aff = LazyAffine()
        self.norm = nn.LazyBatchNorm2d()  # buffers of its own, uninitialised
        self.spare = nn.LazyBatchNorm2d()

    def forward(self, x):
        return self.norm(self.aff.conv(x)).mean((2, 3))


@pytest.mark.parametrize("examples", [False, True])
def test_lazy_buffers_and_lazy_modules_of_ones_own(examples):
    # a review: compile with example inputs (and verify) cloned uninitialised buffers; a lazy
    # module whose child the graph calls stood in a container fx made, which cannot save it
    model = LazyNorms().eval()
    kwargs = {"example_inputs": X} if examples else {}
    emodel = equivfx.compile(model, "C4", readout="slots", **kwargs)
    assert set(emodel.state_dict()) == set(model.state_dict())
    assert equivfx.verify(emodel, X).ok
    with torch.no_grad():
        _same(emodel(X), oracle_slots(model, equivfx.group("C4"), X))


def test_layerwise_mode_asks_for_lazy_weights_to_exist():
    with pytest.raises(ModelTypeError, match=r"lazy module\(s\).*got \['head'\].*example_inputs="):
        equivfx.compile(LazyNet().eval(), "C4", mode="layerwise")
    model = LazyNet().eval()
    emodel = equivfx.compile(model, "C4", mode="layerwise", example_inputs=X)  # materialised
    assert emodel.equivfx_info.mixed == ("head",)  # conv is the input stage
    with torch.no_grad():
        want = oracle_slots(model, equivfx.group("C4"), X).mean(1)
        torch.testing.assert_close(emodel(X), want, rtol=1e-5, atol=1e-6)


def test_train_mode_and_gradients():
    model = small_cnn().train()
    emodel = equivfx.compile(model, "C4")
    emodel.train()
    out = emodel(X)
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # batch norm in training mode normalises over the folded batch: still exactly invariant
    y0 = emodel(X)
    y1 = emodel(torch.rot90(X, 1, (-2, -1)))
    torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_follows_the_model(dtype):
    model = small_cnn().eval().to(dtype)
    emodel = equivfx.compile(model, "D4")
    y = emodel(X.to(dtype))
    assert y.dtype == dtype
    assert equivfx.verify(emodel, X.to(dtype)).ok


def test_compile_does_not_change_the_model():
    model = small_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    equivfx.compile(model, "C4", example_inputs=X)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # shape propagation ran in eval mode


def test_info_records_the_compilation():
    emodel = equivfx.compile(small_cnn(), "D4", readout="slots")
    info = emodel.equivfx_info
    assert info.group == equivfx.group("D4") and info.mode == "global"
    assert info.readout == "slots" and info.trace_path == "symbolic_trace"
    assert info.passes == (
        "annotate-reps",
        "insert-lift",
        "to-map",
        "defer-lift",
        "fuse-projection",
        "hoist-projection",
        "eliminate-dead-slots",
        "defer-lift-to-cosets",
    )
    plain = equivfx.compile(small_cnn(), "D4", readout="slots", optimize=False).equivfx_info
    assert plain.passes == ("annotate-reps", "insert-lift", "to-map", "fuse-projection")


def test_every_node_is_annotated_and_created_nodes_record_their_origin():
    emodel = equivfx.compile(small_cnn(), "C4", readout="slots", check=True, chunk=None)
    check_meta(emodel)
    emodel.graph.lint()
    nodes = {n.name: n for n in emodel.graph.nodes}
    assert isinstance(nodes["input_1"].meta[REP], InputRep)
    assert nodes["equivfx_lift"].meta[REP] == Folded(0)
    assert nodes["equivfx_lift"].meta["equivfx.origin"] == "insert-lift"
    assert isinstance(nodes["equivfx_readout"].meta[REP], OutputRep)
    assert nodes["equivfx_readout"].meta["equivfx.origin"] == "fuse-projection"


def test_batch_size_literal_is_rewritten_with_example_inputs():
    class Baked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 6 * 6, 3)

        def forward(self, x):
            return self.fc(self.conv(x).view(3, -1))

    model = Baked().eval()
    emodel = equivfx.compile(model, "C4", readout="slots", example_inputs=X)
    assert "size" in emodel.equivfx_flat.code
    with torch.no_grad():
        torch.testing.assert_close(emodel(X), oracle_slots(model, equivfx.group("C4"), X))
    with pytest.raises(EquivFXError, match="literal 3"):
        equivfx.compile(model, "C4")  # without examples equivfx cannot tell it is the batch size


def test_second_input_is_repeated_per_slot():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x, bias):
            return self.conv(x).mean((2, 3)) + bias

    model = TwoInputs().eval()
    bias = torch.randn(3, 2)
    emodel = equivfx.compile(model, "C4", readout="slots")
    G = equivfx.group("C4")
    with torch.no_grad():
        want = torch.stack([model(G.act(G.inverse(g), X), bias) for g in G.elements], 1)
        torch.testing.assert_close(emodel(X, bias), want)


@pytest.mark.parametrize(
    "kwargs, error, needle",
    [
        (dict(group="Q8"), GroupSpecError, "Q8"),
        (dict(group="C4", readout="maybe"), ReadoutError, "readout"),
        (dict(group="C4", pool="median"), ReadoutError, "pool"),
        (dict(group="C4", readout="equivariant"), ReadoutError, "output_action"),
        (dict(group="C4", mix={"0"}), EquivFXError, "layerwise"),
        (dict(group="C4", mode="layerwise", mix={"nope"}), EquivFXError, "nope"),
        (dict(group="C4", mode="sideways"), EquivFXError, "mode"),
        (dict(group="C4", chunk=0), NotYetSupportedError, "chunk"),
        (dict(group="C4", output_action="C4"), ReadoutError, "equivariant"),
    ],
)
def test_bad_arguments_raise_equivfx_errors_with_a_fix(kwargs, error, needle):
    with pytest.raises(error, match=needle) as info:
        equivfx.compile(small_cnn(), **kwargs)
    assert "Fix" in str(info.value) or "fix" in str(info.value)


@pytest.mark.parametrize("thing", ["not a module", small_cnn().state_dict(), nn.Conv2d])
def test_something_that_is_not_a_module(thing):
    with pytest.raises(ModelTypeError, match="nn.Module"):
        equivfx.compile(thing, "C4")


@pytest.mark.parametrize(
    "wrap, inner",
    [(torch.compile, "model._orig_mod"), (nn.DataParallel, "model.module")],
    ids=["torch.compile", "DataParallel"],
)
def test_a_wrapped_model_is_refused_naming_the_module_inside(wrap, inner):
    # was a TraceError about the wrapper's forward(*args, **kwargs), with no way out named
    wrapped = wrap(small_cnn())
    with pytest.raises(ModelTypeError, match="wrapped by") as info:
        equivfx.compile(wrapped, "C4")
    assert inner in str(info.value) and "wrap the compiled model instead" in str(info.value)
    inside = (wrapped._orig_mod if inner == "model._orig_mod" else wrapped.module).cpu()
    # (DataParallel moves its module to the first GPU where there is one)
    x = torch.randn(2, 1, 8, 8)
    emodel = equivfx.compile(inside, "C4")  # what the message says to do
    torch.testing.assert_close(emodel(x), emodel(torch.rot90(x, 1, (-2, -1))))


class _TakesADict(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, batch):
        return self.conv(batch["image"]).mean((2, 3)) * batch["scale"]


class _Builds(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, scale):
        return self.model({"image": x, "scale": scale})


def test_a_model_taking_a_dict_is_refused_with_the_wrapper_that_works():
    # was "indexing 'image' on the batch axis selects samples", a BatchMixingError
    x, scale = torch.randn(2, 1, 8, 8), torch.rand(2, 1)
    model = _TakesADict().eval()
    with pytest.raises(ModelTypeError, match="input 'batch' is indexed with a key") as info:
        equivfx.compile(model, "C4")
    assert "def forward(self, x, **rest): return self.model({'image': x, **rest})" in str(
        info.value
    )
    with pytest.raises(ModelTypeError, match="first example input must be a tensor.*Fix: pass"):
        equivfx.compile(model, "C4", example_inputs=({"image": x, "scale": scale},))
    emodel = equivfx.compile(_Builds(model), "C4", example_inputs=(x, scale))
    G = equivfx.group("C4")
    with torch.no_grad():
        loop = [model({"image": G.act(G.inverse(g), x), "scale": scale}) for g in G.elements]
        torch.testing.assert_close(emodel(x, scale), torch.stack(loop).mean(0))


class _KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x, *, scale=None):
        h = self.conv(x).mean((2, 3))
        return h if scale is None else h * scale


def test_a_keyword_only_argument_fixed_by_tracing_says_how_to_pass_it():
    # the message said "pass the scale you run, positionally" in example_inputs, which a
    # keyword-only parameter cannot be
    emodel = equivfx.compile(_KeywordOnly(), "C4")
    x = torch.randn(2, 1, 8, 8)
    assert emodel(x, scale=None).shape == (2, 3)
    with pytest.raises(FixedArgumentError, match="scale is keyword-only") as info:
        emodel(x, scale=2.0)
    assert "make scale a positional parameter of forward" in str(info.value)


def test_non_square_input_under_c4_is_a_clear_error():
    emodel = equivfx.compile(small_cnn(), "C4")
    with pytest.raises(InputShapeError, match=r"\(3, 1, 8, 9\)"):
        emodel(torch.randn(3, 1, 8, 9))


def test_flips_accept_rectangles():
    class Pool(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    emodel = equivfx.compile(Pool(), "D2")
    assert emodel(torch.randn(2, 3, 4, 7)).shape == (2, 3)


def test_interpolated_group_compiles_and_reports_its_error():
    model = small_cnn().eval()
    emodel = equivfx.compile(model, "C8")
    report = equivfx.verify(emodel, X)
    assert not report.exact
    assert report.first_bad_node == "equivfx_lift"  # the only approximate stage is the input
    exact = {"r2", "r4", "r6"}  # multiples of 90 degrees are exact rotations
    assert all(report.per_element[e] < 1e-5 for e in exact)
    assert max(report.per_element.values()) > 1e-4


def test_a_model_failing_on_its_example_names_its_own_error_and_prints_nothing(capfd):
    class Rgb(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    with pytest.raises(
        ModelTypeError,
        match=r"fails on its example inputs: got 'RuntimeError: .*"
        r"to have 3 channels",
    ):
        equivfx.compile(Rgb(), "C4", example_inputs=torch.randn(2, 1, 6, 6))
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "ShapeProp" not in err


def test_a_refusal_names_the_users_source_line():
    class Centred(nn.Module):
        def forward(self, x):
            h = x * 2
            return h - h.mean(0, keepdim=True)  # the line the message must quote

    with pytest.raises(BatchMixingError) as info:
        equivfx.compile(Centred(), "C4")
    lines = str(info.value).splitlines()
    source = [ln for ln in lines if ln.startswith("  source: ")]
    assert len(source) == 1 and lines.index(source[0]) == 2  # right after the node
    assert (
        f"{__file__}:" in source[0]
        and "in forward: return h - h.mean(0, keepdim=True)" in (source[0])
    )


@pytest.mark.parametrize("kwargs", [{}, {"chunk": None}, {"mode": "layerwise"}])
@pytest.mark.parametrize("training", [True, False])
def test_the_compiled_model_starts_in_the_models_mode(kwargs, training):
    # equivfx's own modules (the lift, the readout, the chunk runner, the root) were fresh
    # modules in training mode whatever the model's mode: emodel.training was True for a model
    # compiled in eval mode with chunk="auto"
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train(training)
    emodel = equivfx.compile(model, "C4", example_inputs=torch.randn(2, 1, 6, 6), **kwargs)
    assert {m.training for m in emodel.modules()} == {training}


def test_modes_survive_torch_save_and_load(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    emodel = equivfx.compile(model, "C4", example_inputs=torch.randn(2, 1, 6, 6))
    torch.save(emodel, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert {m.training for m in loaded.modules()} == {False}  # the chunk runner's too


class _Coupling(nn.Module):
    """A flow's coupling layer: (z, log-determinant), the second invariant, one number each."""

    def __init__(self):
        super().__init__()
        self.net = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        x1, x2 = x.chunk(2, 1)
        st = self.net(x1)
        scale = torch.tanh(st[:, :1])
        return torch.cat([x1, x2 * scale.exp() + st[:, 1:]], 1), scale.flatten(1).sum(-1)


def test_an_output_the_output_action_cannot_act_on_is_named_with_the_callable_fix():
    # the error said the *input* lacked the axes, and to unsqueeze it
    x = torch.randn(2, 2, 8, 8)
    emodel = equivfx.compile(_Coupling().eval(), "C4", readout="equivariant", output_action="C4")
    with pytest.raises(InputShapeError, match=r"cannot act on one of shape \(2,\)") as info:
        emodel(x)
    assert "output_action as a callable" in str(info.value)
    G = equivfx.group("C4")
    emodel = equivfx.compile(
        _Coupling().eval(),
        G,
        readout="equivariant",
        output_action=lambda g, y: y if y.dim() < 2 else G.act(g, y),  # the fix it names
    )
    assert equivfx.verify(emodel, x).ok
