"""The strategies of equivfx.verify.strategies draw valid, reproducible, readable structure."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import Phase, find, given, note, settings
from hypothesis import strategies as st

from equivfx.verify import strategies as eqst
from equivfx.verify.strategies import (
    Act,
    ArchSpec,
    BatchNorm,
    Concat,
    Conv,
    Dropout,
    LayerNorm,
    Linear,
    Pool,
    Residual,
)

ALL_ARCHS = st.one_of(
    eqst.architectures(kind="cnn"),
    eqst.architectures(kind="cnn", shapes=eqst.image_shapes(square=False)),
    eqst.architectures(kind="seq"),
    eqst.architectures(kind="mlp"),
    eqst.architectures(kind="mlp", shapes=eqst.set_shapes()),
)

# find() settings independent of the active profile: no example database, reproducible, and no
# explain phase (it only annotates failures, and costs seconds per call).
FIND = settings(
    database=None, max_examples=1000, derandomize=True, phases=(Phase.generate, Phase.shrink)
)


def _roundtrip(spec: ArchSpec) -> ArchSpec:
    return eval(repr(spec), vars(eqst))  # noqa: S307 - the repr is ours; this is the point


# --------------------------------------------------------------------------------------------------
# Architectures build and run
# --------------------------------------------------------------------------------------------------


@given(arch=ALL_ARCHS)
@settings(deadline=None)
def test_architecture_builds_and_runs_forward_and_backward(arch: ArchSpec) -> None:
    note(arch.describe())
    model = arch.build()
    x = arch.example_input().requires_grad_(True)
    for train in (True, False):
        model.train(train)
        model.zero_grad()
        x.grad = None
        y = model(x)
        assert y.shape == arch.output_shape
        assert y.dtype == torch.float32
        assert torch.isfinite(y).all()
        y.square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        for name, p in model.named_parameters():
            assert p.grad is not None, f"no gradient reaches {name}"
            assert torch.isfinite(p.grad).all(), name


@given(arch=ALL_ARCHS)
def test_architecture_matches_drawn_input(arch: ArchSpec) -> None:
    if arch.kind == "cnn":
        assert len(arch.input_shape) == 4
    elif arch.kind == "seq":
        assert len(arch.input_shape) == 3
    else:
        assert len(arch.input_shape) in (2, 3)
    assert arch.in_channels == (arch.input_shape[-1] if arch.kind == "mlp" else arch.input_shape[1])
    assert 2 <= arch.num_classes <= 5
    assert len(arch.layers) <= 4


@given(arch=eqst.architectures(kind="cnn", shapes=eqst.image_shapes(size=(1, 6), batch=1)))
@settings(deadline=None)
def test_architecture_never_shrinks_space_below_one(arch: ArchSpec) -> None:
    """Strides and pooling are only kept while the spatial size allows; BN only where it trains."""
    note(arch.describe())
    model = arch.build().train()
    h = arch.example_input()
    for layer in model:
        h = layer(h)
        assert h.numel() > 0, f"{layer} produced an empty tensor"


# --------------------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------------------


@given(arch=ALL_ARCHS)
@settings(deadline=None)
def test_archspec_is_reproducible(arch: ArchSpec) -> None:
    rng_before = torch.random.get_rng_state()
    a, b = arch.build().eval(), arch.build().eval()
    assert torch.equal(torch.random.get_rng_state(), rng_before), "build() touched the global RNG"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = arch.example_input()
    assert torch.equal(x, arch.example_input())
    assert torch.equal(a(x), b(x))
    # An equal spec (e.g. re-created from its repr) builds the same model.
    c = _roundtrip(arch).build().eval()
    assert torch.equal(a(x), c(x))


@given(arch=ALL_ARCHS)
@settings(deadline=None)
def test_seed_changes_parameters(arch: ArchSpec) -> None:
    other = ArchSpec(
        arch.kind, arch.input_shape, arch.layers, arch.head, arch.num_classes, arch.seed + 1
    )
    pa = torch.cat([p.flatten() for p in arch.build().parameters()])
    pb = torch.cat([p.flatten() for p in other.build().parameters()])
    assert not torch.equal(pa, pb)


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=eqst.seeds())
def test_inputs_are_deterministic_and_leave_global_rng_alone(shape: list[int], seed: int) -> None:
    rng_before = torch.random.get_rng_state()
    x = eqst.inputs(shape, seed)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert x.shape == tuple(shape) and x.dtype == torch.float32
    assert torch.equal(x, eqst.inputs(tuple(shape), seed))
    assert eqst.inputs(shape, seed, dtype=torch.float64).dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# Shrinking-friendly: readable reprs, simple minimal examples
# --------------------------------------------------------------------------------------------------


@given(arch=ALL_ARCHS)
def test_archspec_repr_is_readable_and_round_trips(arch: ArchSpec) -> None:
    text = repr(arch)
    assert _roundtrip(arch) == arch
    assert hash(_roundtrip(arch)) == hash(arch)
    assert "tensor" not in text.lower() and "\n" not in text
    assert len(text) < 120 + 80 * len(arch.layers), text
    assert "\n" not in arch.describe()


def test_minimal_architecture_is_trivial() -> None:
    arch = find(eqst.architectures(), lambda a: True, settings=FIND)
    assert arch == ArchSpec("cnn", (1, 1, 4, 4), (Act("relu"),), "avg", 2, 0)
    arch = find(eqst.architectures(min_layers=0), lambda a: True, settings=FIND)
    assert arch == ArchSpec("cnn", (1, 1, 4, 4), (), "avg", 2, 0)


@pytest.mark.parametrize(
    ("kind", "layer_type"),
    [
        ("cnn", Conv),
        ("cnn", Pool),
        ("cnn", BatchNorm),
        ("cnn", Residual),
        ("cnn", Concat),
        ("cnn", Dropout),
        ("seq", Conv),
        ("seq", Pool),
        ("mlp", Linear),
        ("mlp", LayerNorm),
        ("mlp", Residual),
        ("mlp", Concat),
    ],
)
def test_every_layer_is_reachable_and_shrinks_to_one_layer(kind: str, layer_type: type) -> None:
    arch = find(
        eqst.architectures(kind=kind),
        lambda a: any(isinstance(layer, layer_type) for layer in a.layers),
        settings=FIND,
    )
    assert len(arch.layers) == 1 and isinstance(arch.layers[0], layer_type), arch
    assert arch.seed == 0


@pytest.mark.parametrize("name", sorted(eqst.ACTIVATIONS))
def test_every_activation_is_reachable(name: str) -> None:
    arch = find(eqst.architectures(), lambda a: Act(name) in a.layers, settings=FIND)
    assert arch.layers == (Act(name),)


def test_depthwise_and_strided_convs_are_reachable() -> None:
    arch = find(
        eqst.architectures(),
        lambda a: any(isinstance(c, Conv) and c.depthwise and c.stride == 2 for c in a.layers),
        settings=FIND,
    )
    (conv,) = arch.layers
    assert conv.out_channels % arch.in_channels == 0


@pytest.mark.parametrize("head", ["avg", "max", "flatten"])
def test_every_head_is_reachable(head: str) -> None:
    arch = find(eqst.architectures(), lambda a: a.head == head, settings=FIND)
    assert arch.layers == (Act("relu"),)


def test_set_mlp_layers_act_per_member() -> None:
    spec = ArchSpec("mlp", (2, 3, 4), (Linear(5), Act("gelu"), LayerNorm()), "avg", 3, 0)
    model = spec.build().eval()
    x = spec.example_input()
    perm = torch.tensor([2, 0, 1])
    # avg head over the set axis: the model is permutation invariant by construction.
    torch.testing.assert_close(model(x[:, perm]), model(x))


# --------------------------------------------------------------------------------------------------
# Bad arguments fail loudly
# --------------------------------------------------------------------------------------------------


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="kind"):
        eqst.architectures(kind="transformer")
    with pytest.raises(ValueError, match="min_layers"):
        eqst.architectures(min_layers=3, max_layers=2)
    with pytest.raises(ValueError, match="kinds"):
        eqst.group_specs(kinds=("sphere",))
    with pytest.raises(ValueError, match="size"):
        eqst.image_shapes(size=(0, 3))
    with pytest.raises(ValueError, match="input_shape"):
        ArchSpec("cnn", (1, 3, 8), ())
    with pytest.raises(ValueError, match="head"):
        ArchSpec("cnn", (1, 3, 8, 8), (), head="sum")


# --------------------------------------------------------------------------------------------------
# Shapes and group specs
# --------------------------------------------------------------------------------------------------


@given(shape=eqst.image_shapes())
def test_image_shapes_are_square_and_in_bounds(shape: tuple[int, int, int, int]) -> None:
    b, c, h, w = shape
    assert 1 <= b <= 3 and 1 <= c <= 4 and 4 <= h <= 12 and h == w


@given(shape=eqst.image_shapes(square=False, batch=2, channels=3, size=(5, 6)))
def test_image_shapes_accept_fixed_values(shape: tuple[int, int, int, int]) -> None:
    assert shape[:2] == (2, 3) and all(5 <= s <= 6 for s in shape[2:])


def test_non_square_shapes_are_reachable() -> None:
    shape = find(eqst.image_shapes(square=False), lambda s: s[2] != s[3], settings=FIND)
    assert shape == (1, 1, 4, 5)


SPEC = re.compile(r"^(C[12348]|D[1248]|Shift\d+|Rev|ShiftRev\d+|Perm\d+)(@-?\d+)?$")


@given(spec=eqst.group_specs(exact_only=False, kinds=("image", "sequence", "set")))
def test_group_specs_are_in_the_vocabulary(spec: str) -> None:
    assert SPEC.match(spec), spec


@given(spec=eqst.group_specs())
def test_exact_image_specs_only_by_default(spec: str) -> None:
    assert spec in eqst.IMAGE_EXACT_SPECS


@given(spec=eqst.group_specs(kinds=("sequence",), length=6, axis=-1))
def test_sequence_specs_use_the_given_length_and_axis(spec: str) -> None:
    assert spec in {"Shift6@-1", "Rev@-1", "ShiftRev6@-1"}


@given(spec=eqst.group_specs(kinds=("set",)))
def test_set_specs_are_small(spec: str) -> None:
    n = int(spec.removeprefix("Perm"))
    assert 2 <= n <= 4 and math.factorial(n) <= 24


def test_group_specs_shrink_to_the_trivial_group() -> None:
    assert find(eqst.group_specs(), lambda s: True, settings=FIND) == "C1"


# --------------------------------------------------------------------------------------------------
# Groups and elements (need equivfx.groups)
# --------------------------------------------------------------------------------------------------


def _groups_module():
    groups = pytest.importorskip("equivfx.groups")
    if not hasattr(groups, "group"):
        pytest.skip("equivfx.groups.group has not landed yet")
    return groups


@given(data=st.data())
def test_groups_parse_and_round_trip(data: st.DataObject) -> None:
    groups = _groups_module()
    G = data.draw(eqst.groups(exact_only=False, kinds=("image", "sequence", "set")), label="G")
    assert repr(G) == G.spec
    assert groups.group(repr(G)) == G
    g = data.draw(eqst.elements(G), label="g")
    assert g in G.elements
    assert G.compose(g, G.inverse(g)) == G.identity


@given(data=st.data())
def test_elements_can_exclude_the_identity(data: st.DataObject) -> None:
    _groups_module()
    G = data.draw(eqst.groups().filter(lambda G: G.order > 1), label="G")
    g = data.draw(eqst.elements(G, include_identity=False), label="g")
    assert g != G.identity


def test_elements_shrink_to_the_identity() -> None:
    groups = _groups_module()
    G = groups.group("D4")
    assert find(eqst.elements(G), lambda g: True, settings=FIND) == G.identity


def test_elements_of_the_trivial_group_without_identity_raise() -> None:
    groups = _groups_module()
    with pytest.raises(ValueError, match="trivial"):
        eqst.elements(groups.group("C1"), include_identity=False)
