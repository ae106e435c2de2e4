"""Whole compiled models through ``torch.save``/``torch.load`` and ``copy.deepcopy``: the same
outputs, the same state, what users attached to them, and verification afterwards."""

from __future__ import annotations

import copy
import io
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import equivfx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import ZOO  # noqa: E402  (its module uses `from __future__ import annotations`)


def _compile(model, spec, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return equivfx.compile(model, spec, example_inputs=x, **kwargs)


def _round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


class WithExtras(nn.Module):
    """A root-level parameter, a submodule the forward never calls (kept for the state dict)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(4, 8, 8))
        self.unused = nn.Linear(2, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head((self.conv(x) + self.pos).relu().mean((2, 3)))


class Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so it takes the opaque path."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x)
        if h.sum() > 0:
            h = h.relu()
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("chunk", [None, 2, "auto"])
@pytest.mark.parametrize(
    "name, readout", [("resnet", "invariant"), ("vit", "slots"), ("deepsets", "slots")]
)
def test_zoo_models_round_trip_and_verify(name, readout, chunk):
    """Zoo models (their module uses postponed annotations) load with equal outputs, and verify
    passes on the loaded model and on a deep copy of it (the graph's annotations do not survive
    pickling; the output's action is kept in ``equivfx_info``)."""
    model, x, _ = ZOO[name]()
    spec = ZOO[name].groups[0]
    emodel = _compile(model.eval(), spec, x, chunk=chunk, readout=readout)
    with torch.no_grad():
        expected = emodel(x)
    loaded = _round_trip(_round_trip(emodel))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert list(loaded.state_dict()) == list(emodel.state_dict())
    assert equivfx.verify(loaded, x).ok
    assert equivfx.verify(copy.deepcopy(loaded), x).ok


@pytest.mark.parametrize("copied", ["pickled", "deep-copied"])
@pytest.mark.parametrize("chunk", [None, 2, "auto"])
def test_loading_keeps_flags_hooks_meta_attributes_and_unused_state(chunk, copied):
    # deep copies: fx's rebuilt the module keeping state-dict hooks only (a review)
    emodel, x = _decorated(chunk)
    emodel.head.train()  # a per-submodule flag
    with torch.no_grad():
        expected = emodel(x)
    loaded = _round_trip(emodel) if copied == "pickled" else copy.deepcopy(emodel)
    assert loaded.class_names is not emodel.class_names or copied == "pickled"
    assert not loaded.training and loaded.head.training
    assert loaded.class_names == ["a", "b", "c"]
    assert loaded.equivfx_info.group == emodel.equivfx_info.group
    assert list(loaded.state_dict()) == list(emodel.state_dict())
    assert set(loaded.state_dict()) == set(WithExtras().state_dict())  # "unused.*" too
    loaded.load_state_dict(emodel.state_dict())  # strict: the original keys
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)  # the hook ran: doubled
        torch.testing.assert_close(loaded(x), 2 * emodel.equivfx_flat(x) if chunk else expected)
    if copied == "deep-copied":
        loaded.class_names.append("d")  # its own copy
        assert emodel.class_names == ["a", "b", "c"]


@pytest.mark.parametrize("chunk", [None, "auto"])
def test_copies_of_copies_keep_hooks_and_attributes(chunk):
    # a review: fx gives each copy a class of its own, which lacked the reductions set on the
    # original's: a copy of a copy (or a pickle of a copy) lost hooks and attributes again
    emodel, x = _decorated(chunk)
    with torch.no_grad():
        expected = emodel(x)
    chains = {
        "copy of a copy": lambda m: copy.deepcopy(copy.deepcopy(m)),
        "copy of a pickle": lambda m: copy.deepcopy(_round_trip(m)),
        "pickle of a copy": lambda m: _round_trip(copy.deepcopy(m)),
        "pickle of a pickle": lambda m: _round_trip(_round_trip(m)),
    }
    for name, chain in chains.items():
        copied = chain(emodel)
        assert copied.class_names == ["a", "b", "c"], name
        assert copied.equivfx_info.group == emodel.equivfx_info.group, name
        assert list(copied.state_dict()) == list(emodel.state_dict()), name
        with torch.no_grad():
            torch.testing.assert_close(copied(x), expected, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("chunk", [None, 2, "auto"])
def test_a_shallow_copy_is_the_same_module_under_a_new_object(chunk):
    # a review: fx's copy.copy rebuilds a graph module from its graph: unread parameters, hooks,
    # attributes and equivfx_info were lost, and a chunked model's copy had no state-dict keys
    emodel, x = _decorated(chunk)
    copied = copy.copy(emodel)
    assert copied is not emodel and copied.class_names is emodel.class_names
    assert list(copied.state_dict()) == list(emodel.state_dict())
    assert all(a is b for a, b in zip(copied.parameters(), emodel.parameters(), strict=True))
    assert copied.equivfx_info is emodel.equivfx_info
    with torch.no_grad():
        torch.testing.assert_close(copied(x), emodel(x), rtol=0, atol=0)  # the hook: doubled


def _decorated(chunk):
    """A compiled model in eval mode with an attribute and a forward hook set on it (the hook
    doubles its output), and an input."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    emodel = _compile(WithExtras(), "C4", x, chunk=chunk).eval()
    emodel.class_names = ["a", "b", "c"]
    emodel.register_forward_hook(_double_output, with_kwargs=True)
    return emodel, x


def _double_output(module, args, kwargs, output):  # module level: hooks pickle by reference
    return 2 * output


@pytest.mark.parametrize("chunk", [None, 2])
def test_opaque_models_round_trip_with_their_original_keys(chunk):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    emodel = _compile(Branchy().eval(), "C4", x, chunk=chunk)
    assert emodel.equivfx_info.trace_path == "opaque"
    loaded = _round_trip(emodel)
    assert list(loaded.state_dict()) == list(Branchy().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), emodel(x), rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [2, "auto"])
def test_a_top_level_submodule_replaced_on_a_chunked_model_is_used_and_saved(chunk):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    emodel = _compile(WithExtras().eval(), "C4", x, chunk=chunk)
    head = nn.Linear(4, 3)
    nn.init.zeros_(head.weight)
    nn.init.constant_(head.bias, 3.0)
    emodel.head = head
    with torch.no_grad():
        torch.testing.assert_close(emodel(x), torch.full((2, 3), 3.0))
        torch.testing.assert_close(_round_trip(emodel)(x), torch.full((2, 3), 3.0))
    emodel.add_module("head", nn.Identity())  # add_module too: now the pooled 4 features
    with torch.no_grad():
        assert emodel(x).shape == (2, 4)
    emodel.head = norm = nn.BatchNorm1d(4)
    norm.train()  # a replaced module in training mode: every slot in one pass (batch statistics)
    runner = emodel.equivfx_chunks
    assert runner._decided((x,)) == runner.order


def test_a_deep_copy_keeps_its_root_tensors_shared():
    """After ``copy.deepcopy`` of a chunked model, ``load_state_dict(assign=True)`` on the copy
    reaches its chunk runner."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    twin = copy.deepcopy(_compile(WithExtras().eval(), "C4", x, chunk=2))
    state = {k: v + 0.5 for k, v in twin.state_dict().items()}
    twin.load_state_dict(state, assign=True)
    fresh = WithExtras().eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), _compile(fresh, "C4", x, chunk=None)(x))


class NonPersistent(nn.Module):
    """Non-persistent buffers at the root and in a submodule, both read by the forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv.register_buffer("gain", torch.tensor(1.5), persistent=False)
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head((self.conv(x) * self.conv.gain * self.scale).relu().mean((2, 3)))


@pytest.mark.parametrize("chunk", [None, 2])
def test_non_persistent_buffers_stay_out_of_the_state_dict(chunk):
    """A compiled model's state dict has the original keys and no others: a strict load of the
    original model's state dict works, also after pickling and deep copies."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = NonPersistent().eval()
    emodel = _compile(model, "C4", x, chunk=chunk)
    assert set(emodel.state_dict()) == set(model.state_dict())
    emodel.load_state_dict(model.state_dict())
    twice = _round_trip(_round_trip(emodel))
    assert len(twice._deepcopy_hooks) == len(emodel._deepcopy_hooks)  # not one more per load
    for copied in (_round_trip(emodel), copy.deepcopy(emodel), copy.deepcopy(twice)):
        assert set(copied.state_dict()) == set(model.state_dict())
        copied.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(copied(x), emodel(x), rtol=0, atol=0)
