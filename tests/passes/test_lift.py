"""The lift module: one gather, its index cached per per-sample shape, for small inputs under
actions that only move entries, bitwise equal to lifting op by op (the oracle: cat of g^-1 . x
over the slots); a per-sample shape checked once is not checked again."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import equivfx
from equivfx.errors import InputShapeError
from equivfx.groups.actions import PermuteAction, RollAction
from equivfx.groups.finite import FiniteGroup
from equivfx.passes.modules import Lift

CASES = [
    ("C4", (2, 3, 6, 6)),
    ("D4", (1, 2, 5, 5)),
    ("Shift4", (3, 2, 8)),
    ("ShiftRev4", (1, 4, 12)),
    ("Perm5@-2", (2, 5, 3)),
    ("Rev@-1xRev@-2", (2, 3, 4, 7)),
    ("D4xShift4@-3", (1, 8, 4, 4)),
]


def oracle(G, x, slots=None):
    slots = range(G.order) if slots is None else slots
    return torch.cat([G.act(G.inverse(G.elements[i]), x) for i in slots], 0)


@pytest.mark.parametrize("spec, shape", CASES, ids=[c[0] for c in CASES])
def test_the_cached_gather_is_the_lift_bitwise(spec, shape):
    G = equivfx.group(spec)
    lift = Lift(G, G.action)
    x = torch.randn(shape)
    for _ in range(2):  # builds the index, then reads it from the cache
        assert torch.equal(lift(x), oracle(G, x))
    assert len(lift._gathers) == 1 and None not in lift._gathers.values()
    slots = [G.order - 1, 0]  # a chunk of slots, in its own order
    assert torch.equal(lift.lift_slots(x, slots), oracle(G, x, slots))
    assert len(lift._gathers) == 2
    for batch in (1, 5):  # every batch size reads the per-sample index
        other = torch.randn(batch, *shape[1:])
        assert torch.equal(lift(other), oracle(G, other))
    assert len(lift._gathers) == 2
    y = lift(x)
    y.add_(1.0)  # the lift is a new tensor: ops after it may work in place
    assert torch.equal(lift(x), oracle(G, x))


def test_large_inputs_and_other_actions_lift_op_by_op():
    G = equivfx.group("D4")
    lift = Lift(G, G.action)
    x = torch.randn(Lift.GATHER_LIMIT // (3 * 4 * 4) + 1, 3, 4, 4)  # just over the limit
    assert torch.equal(lift(x), oracle(G, x)) and lift._gathers == {}
    C8 = equivfx.group("C8")  # interpolated rotations: not a permutation of entries
    lift8 = Lift(C8, C8.action)
    small = torch.randn(1, 1, 5, 5)
    assert torch.equal(lift8(small), oracle(C8, small)) and lift8._gathers == {}


def test_inputs_off_the_cpu_are_one_gather_at_any_size():
    # a GPU call is bound by its launches (one per slot and the cat op by op): the limit is the
    # CPU's; meta tensors stand in for a device here (tests/test_cuda.py checks CUDA's values)
    G = equivfx.group("D4")
    lift = Lift(G, G.action)
    x = torch.empty(Lift.GATHER_LIMIT // (3 * 4 * 4) + 1, 3, 4, 4, device="meta")
    y = lift(x)
    assert y.shape == (G.order * x.shape[0], 3, 4, 4) and y.device == x.device
    assert list(lift._gathers) == [((3, 4, 4), x.device, tuple(range(G.order)))]


def test_the_cache_follows_the_action_and_the_inverses():
    G = equivfx.group("C4")
    lift = Lift(G, G.action)
    x = torch.randn(1, 1, 4, 4)
    lift(x)
    lift.inverses = tuple(range(G.order))  # slot g now holds g . x: a different lift
    want = torch.cat([G.act(G.elements[i], x) for i in range(G.order)], 0)
    assert torch.equal(lift(x), want)


def test_gradients_through_the_gather():
    G = equivfx.group("D4")
    lift = Lift(G, G.action)
    x = torch.randn(2, 1, 3, 3, requires_grad=True)
    w = torch.randn(8 * 2, 1, 3, 3)
    (lift(x) * w).sum().backward()
    fast = x.grad.clone()
    x.grad = None
    (oracle(G, x) * w).sum().backward()
    torch.testing.assert_close(fast, x.grad)  # eight terms per entry, summed in another order


def test_the_cache_is_not_pickled_or_shared_by_copies():
    G = equivfx.group("Perm5@-2")
    lift = Lift(G, G.action)
    x = torch.randn(1, 5, 2)
    lift(x)
    assert lift._gathers
    again = pickle.loads(pickle.dumps(lift))
    assert again._gathers == {} and torch.equal(again(x), oracle(G, x))
    buffer = io.BytesIO()
    torch.save(lift, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded._gathers == {} and torch.equal(loaded(x), oracle(G, x))
    twin = copy.deepcopy(lift)
    twin(torch.randn(2, 5, 3))
    assert len(twin._gathers) == 1 and len(lift._gathers) == 1  # the copy's cache is its own
    assert twin._gathers.keys() != lift._gathers.keys()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks become constants
def test_traced_and_vmapped_calls_lift_op_by_op():
    G = equivfx.group("C4")
    lift = Lift(G, G.action)
    xs = torch.randn(3, 2, 1, 4, 4)
    got = torch.func.vmap(lift)(xs)
    assert torch.equal(got, torch.stack([oracle(G, x) for x in xs])) and lift._gathers == {}
    traced = torch.jit.trace(lift, (xs[0],), check_trace=False)
    assert lift._gathers == {} and "index_select" not in traced.code
    assert "gather" not in traced.code
    assert torch.equal(traced(xs[1]), oracle(G, xs[1]))


def test_torch_compile_traces_the_compiled_model_without_graph_breaks():
    import warnings

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
    ).eval()
    x = torch.randn(1, 1, 6, 6)  # small: the eager lift takes the cached gather
    emodel = equivfx.compile(model, "D4", example_inputs=x)
    compiled = torch.compile(emodel)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.testing.assert_close(compiled(x), emodel(x))
    assert not [w for w in caught if "Dynamo" in str(w.message)], [str(w.message) for w in caught]


def test_chunks_are_cached_per_slots_and_large_inputs_go_op_by_op():
    G = equivfx.group("D4")
    lift = Lift(G, G.action)
    per_sample = 3 * 4 * 4
    small = torch.randn(Lift.GATHER_LIMIT // per_sample, 3, 4, 4)  # the largest batch gathered
    for _ in range(3):
        for g in range(G.order):  # chunk=1: one lift per slot
            assert torch.equal(lift.lift_slots(small, [g]), oracle(G, small, [g]))
    first = dict(lift._gathers)
    assert len(first) == G.order
    for g in range(G.order):
        lift.lift_slots(small[:3], [g])
    assert all(lift._gathers[k] is v for k, v in first.items())  # cached once, not rebuilt
    big = torch.randn(small.shape[0] + 1, 3, 4, 4)
    for g in range(G.order):
        assert torch.equal(lift.lift_slots(big, [g]), oracle(G, big, [g]))
    assert len(lift._gathers) == G.order  # nothing added for the big input


def test_a_per_sample_shape_is_checked_once_and_a_new_one_again(monkeypatch):
    G = equivfx.group("C4")
    lift = Lift(G, G.action)
    calls = []
    check = type(G.action).check
    monkeypatch.setattr(
        type(G.action), "check", lambda self, x: calls.append(x.shape) or check(self, x)
    )
    for batch in (1, 2, 1):
        lift(torch.randn(batch, 2, 4, 4))
    assert calls == [torch.Size([1, 2, 4, 4])]  # the per-sample shape's first call only
    with pytest.raises(InputShapeError, match="square"):
        lift(torch.randn(1, 2, 4, 5))  # a new per-sample shape is checked
    big = torch.randn(Lift.GATHER_LIMIT // 16 + 1, 1, 4, 4)  # lifted op by op: checked each call
    lift(big), lift(big)
    assert len(calls) == 4


class _SwapSamples(RollAction):
    """Moves entries, but across samples: no per-sample gather can reproduce it."""

    def _apply(self, index, x):
        return torch.roll(x, index, 0)


def test_a_permutation_that_mixes_samples_is_lifted_op_by_op():
    G = equivfx.group("C2")
    action = _SwapSamples(axis=-1, n=2).bind(G)
    lift = Lift(G, action)
    x = torch.randn(3, 4)
    want = torch.cat([action._apply(G.inverse_table[i], x) for i in range(2)], 0)
    assert torch.equal(lift(x), want) and torch.equal(lift(x), want)
    assert list(lift._gathers.values()) == [None]  # refused once, remembered


@pytest.mark.parametrize(
    "spec, shape",
    [
        ("Shift4@0", (4, 3)),
        ("Perm3@0", (3, 2, 2)),
        ("D4xShift4@-3", (4, 4, 4)),
        ("Perm5@-2", (5, 3)),
    ],
)
def test_actions_on_the_batch_axis_lift_op_by_op_and_are_checked_each_call(spec, shape):
    G = equivfx.group(spec)
    lift = Lift(G, G.action)
    x = torch.randn(shape)  # the action's axis is the batch axis here
    for _ in range(2):
        assert torch.equal(lift(x), oracle(G, x))
    assert lift._gathers == {}
    bad = torch.randn(shape[0] - 1, *shape[1:])  # the acted (batch) axis no longer fits
    with pytest.raises(InputShapeError):
        lift(bad)


def test_an_index_built_under_inference_mode_serves_autograd_later():
    G = equivfx.group("D4")
    lift = Lift(G, G.action)
    with torch.inference_mode():
        lift(torch.randn(2, 2, 5, 5))
    x = torch.randn(1, 2, 5, 5, requires_grad=True)  # another batch size: the cached index
    lift(x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, G.order))


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")  # deprecated, still supported
def test_quantized_inputs_lift_op_by_op():
    G = equivfx.group("C4")
    lift = Lift(G, G.action)
    x = torch.quantize_per_tensor(torch.randn(3, 2, 4, 4), 0.1, 0, torch.quint8)
    assert torch.equal(lift(x).int_repr(), oracle(G, x).int_repr()) and lift._gathers == {}


def test_the_cache_is_bounded_in_entries_and_in_shapes():
    G = equivfx.group("D4xShift4@-3")  # 32 slots
    lift = Lift(G, G.action)
    for length in range(1, 40):  # indices of 32 x 4 x 4 x 4 x length entries
        x = torch.randn(1, 4 * length, 4, 4)
        if x.numel() <= Lift.GATHER_LIMIT:
            assert torch.equal(lift(x), oracle(G, x))
        entries = sum(g.index.numel() for g in lift._gathers.values() if g is not None)
        assert entries <= 4 * Lift.INDEX_LIMIT
    P = equivfx.group("Perm5@-2")  # 120 slots: large per-sample shapes are refused
    plift = Lift(P, P.action)
    for features in range(Lift.INDEX_LIMIT // 600 + 1, Lift.INDEX_LIMIT // 600 + 100):
        plift(torch.randn(1, 5, features))
        assert len(plift._gathers) <= Lift.CACHED_SHAPES
    assert set(plift._gathers.values()) == {None}


def test_threads_building_the_cache_at_once_all_get_the_lift():
    import sys
    from concurrent.futures import ThreadPoolExecutor

    G = equivfx.group("Rev")
    lift = Lift(G, G.action)

    def differing(offset):  # a race in the cache raises here ("dictionary changed size ...")
        bad = []
        for k in range(1, 400):
            x = torch.randn(1, 4 * k + offset)
            if not torch.equal(lift(x), oracle(G, x)):
                bad.append(k)
        return bad

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(differing, range(4))) == [[]] * 4
    finally:
        sys.setswitchinterval(interval)


def _spy_on_the_full_path(monkeypatch, lift):
    """Counts the calls that take the full path (``lift_slots``) rather than the last gather."""
    calls = []
    full = Lift.lift_slots
    monkeypatch.setattr(
        lift, "lift_slots", lambda x, slots: calls.append(x.shape) or full(lift, x, slots)
    )
    return calls


def test_an_input_like_the_last_takes_its_gather_without_the_full_path(monkeypatch):
    G = equivfx.group("D4")
    lift = Lift(G, G.action)
    calls = _spy_on_the_full_path(monkeypatch, lift)
    x = torch.randn(2, 3, 4, 4)
    for _ in range(3):
        assert torch.equal(lift(x), oracle(G, x))
    assert len(calls) == 1
    other = torch.randn(2, 3, 4, 4)  # new values, same shape, dtype and device
    assert torch.equal(lift(other), oracle(G, other)) and len(calls) == 1
    strided = torch.randn(2, 4, 4, 3).permute(0, 3, 1, 2)  # same shape, other strides
    assert torch.equal(lift(strided), oracle(G, strided)) and len(calls) == 1
    y = lift(x)
    y.add_(1.0)  # still a new tensor at each call
    assert torch.equal(lift(x), oracle(G, x))
    leaf = x.clone().requires_grad_()
    lift(leaf).sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(x, G.order)) and len(calls) == 1


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_an_input_unlike_the_last_takes_the_full_path(monkeypatch):
    G = equivfx.group("C4")
    lift = Lift(G, G.action)
    calls = _spy_on_the_full_path(monkeypatch, lift)
    x = torch.randn(2, 1, 4, 4)
    lift(x)
    others = [
        torch.randn(3, 1, 4, 4),  # batch size
        x.double(),  # dtype
        x.to(torch.int64),
        torch.quantize_per_tensor(x, 0.1, 0, torch.quint8),  # no gather kernel
        torch.nn.Parameter(x.clone()),  # a subclass
    ]
    for n, other in enumerate(others, start=2):
        got, want = lift(other), oracle(G, other)
        if other.is_quantized:
            got, want = got.int_repr(), want.int_repr()
        assert torch.equal(got, want) and len(calls) == n
    lift(x)
    before = len(calls)
    got = torch.func.vmap(lift)(torch.stack([x, 2 * x]))  # wrapped tensors of x's shape
    assert torch.equal(got, torch.stack([oracle(G, x), oracle(G, 2 * x)]))
    traced = torch.jit.trace(lift, (x,), check_trace=False)
    assert "gather" not in traced.code and "index_select" not in traced.code
    assert len(calls) == before + 2


def test_changes_to_the_module_or_the_limit_retire_the_last_gather(monkeypatch):
    G = equivfx.group("C4")
    lift = Lift(G, G.action)
    x = torch.randn(1, 1, 4, 4)
    lift(x)
    lift.slots = (2, 0)  # as eliminate-dead-slots would set them
    assert torch.equal(lift(x), oracle(G, x, [2, 0]))
    lift.inverses = tuple(range(G.order))  # slot g holds g . x
    want = torch.cat([G.act(G.elements[i], x) for i in (2, 0)], 0)
    assert torch.equal(lift(x), want)
    monkeypatch.setattr(Lift, "GATHER_LIMIT", 8)  # x is over it now: op by op
    calls = _spy_on_the_full_path(monkeypatch, lift)
    assert torch.equal(lift(x), want) and torch.equal(lift(x), want)
    assert len(calls) == 2


def test_an_equal_action_that_acts_otherwise_does_not_take_the_last_gather():
    # the same spec and table, realised by other permutations: the actions compare equal
    G1 = FiniteGroup.from_permutations("Z2set", {"a": (1, 0, 2, 3)})
    G2 = FiniteGroup.from_permutations("Z2set", {"a": (0, 1, 3, 2)})
    a1 = PermuteAction(n=4, axis=-1).bind(G1)
    a2 = PermuteAction(n=4, axis=-1).bind(G2)
    assert a1 == a2 and a1 is not a2
    lift = Lift(G1, a1)
    x = torch.arange(8.0).view(2, 4)
    lift(x)
    lift.group, lift.action = G2, a2
    want = torch.cat([a2._apply(lift.inverses[i], x) for i in lift.slots], 0)
    assert torch.equal(lift(x), want)
