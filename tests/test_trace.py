"""The front-end cascade: full trace, discovered leaves, opaque fallback; never silent."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from equivfx.errors import ModelTypeError
from equivfx.trace import LEAF_MODULES, FallbackWarning, register_leaf, trace


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return -x


class WithBranchyChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.child = Branchy()

    def forward(self, x):
        return self.child(self.lin(x))


class BranchyTop(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("offset", torch.zeros(3))

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x) + self.offset
        return x


def test_plain_models_trace_fully_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    assert r.path == "symbolic_trace" and r.leaves == {}


def test_untraceable_submodule_becomes_a_leaf_with_its_reason():
    with pytest.warns(FallbackWarning, match="child"):
        r = trace(WithBranchyChild())
    assert r.path == "symbolic_trace+leaves"
    assert "control flow" in r.leaves["child"]
    assert any(n.op == "call_module" and n.target == "child" for n in r.gm.graph.nodes)
    x = torch.randn(2, 3)
    m = WithBranchyChild()
    r = trace(m)
    assert torch.equal(r.gm(x), m(x))


def test_untraceable_forward_becomes_one_opaque_node():
    m = BranchyTop()
    with pytest.warns(FallbackWarning, match="opaque"):
        r = trace(m)
    assert r.path == "opaque" and r.error
    assert list(r.gm.state_dict()) == list(m.state_dict())
    r.gm.load_state_dict(m.state_dict())
    x = torch.randn(2, 3).abs()
    assert torch.equal(r.gm(x), m(x))


def test_registry_leaves_and_user_registration():
    assert nn.MultiheadAttention in LEAF_MODULES

    class Custom(nn.Module):
        def forward(self, x):
            return x + 1

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = Custom()

        def forward(self, x):
            return self.c(x)

    register_leaf(Custom, "kept whole for the test")
    try:
        r = trace(Outer())
        assert r.leaves == {"c": "kept whole for the test"}
    finally:
        del LEAF_MODULES[Custom]
    with pytest.raises(ModelTypeError):
        register_leaf(Custom(), "an instance is not a class")


def test_not_a_module():
    with pytest.raises(ModelTypeError, match="nn.Module"):
        trace(lambda x: x)
