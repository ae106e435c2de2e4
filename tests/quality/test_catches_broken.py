"""The quality tier: the verifier must catch deliberately broken models and name the breaking
node."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import equivfx
from equivfx.errors import ActionLawError, EquivarianceError
from equivfx.meta import Folded, set_rep
from equivfx.passes.annotate import BatchMixingWarning
from equivfx.testing import assert_equivariant

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 64, 5),
    ).eval()


def insert_after(gm: fx.GraphModule, target: str, fn, *extra) -> str:
    """Insert ``fn(node_value, *extra)`` after the node calling ``target``, annotated as
    slot-wise."""
    node = next(n for n in gm.graph.nodes if n.target == target)
    users = list(node.users)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(fn, (node, *extra))
    set_rep(new, Folded(0))
    for u in users:
        u.replace_input_with(node, new)
    gm.recompile()
    return new.name


@pytest.mark.parametrize("readout", ["slots", "invariant", "pose"])
def test_the_correct_model_passes(readout):
    assert equivfx.verify(equivfx.compile(cnn(), "D4", readout=readout), X).ok


def test_a_slot_mixing_node_is_named():
    emodel = equivfx.compile(cnn(), "C4", readout="slots", chunk=None)  # edits the flat graph
    # reverses the folded batch: sample b of slot i trades places with another slot's sample
    name = insert_after(emodel, "2", torch.flip, [0])
    report = equivfx.verify(emodel, X)
    assert not report.ok
    assert report.first_bad_node == name
    assert name in report.first_bad_node_detail


def test_a_wrong_lift_is_named():
    emodel = equivfx.compile(cnn(), "C4", readout="slots")
    emodel.equivfx_lift.inverses = tuple(range(4))  # uses g instead of g^-1: wrong slot order
    report = equivfx.verify(emodel, X)
    assert not report.ok
    assert report.first_bad_node == "equivfx_lift"


def test_dropout_in_training_mode_is_caught_and_named():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 3))
    emodel = equivfx.compile(model, "C4", readout="slots")
    emodel.train()
    torch.manual_seed(0)
    report = equivfx.verify(emodel, X, eval_mode=False)
    assert not report.ok
    assert report.first_bad_node == "_1"  # the dropout module's node
    assert equivfx.verify(emodel, X).ok  # eval mode (the default) is exact


def test_a_plain_cnn_is_not_invariant():
    report = equivfx.verify(cnn(), X, group="C4")
    assert not report.ok
    assert report.max_error > 1e-3
    assert report.first_bad_node is None  # no annotated graph to localise in
    with pytest.raises(EquivarianceError, match="NOT equivariant under C4"):
        assert_equivariant(cnn(), X, group="C4")


def test_a_wrong_output_action_is_caught():
    seg = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1))
    emodel = equivfx.compile(seg.eval(), "C4", readout="equivariant", output_action="C4")
    assert equivfx.verify(emodel, X).ok
    flip = lambda g, y: torch.flip(y, (-1,)) if g.index else y  # noqa: E731 - not C4's action
    report = equivfx.verify(emodel, X, output_action=flip)
    assert not report.ok


def test_a_user_input_action_that_breaks_the_law_is_refused():
    # every non-identity element rotates by 90 degrees: r.(r.x) != r2.x
    once = lambda g, x: torch.rot90(x, 1, (-2, -1)) if g.index else x  # noqa: E731
    with pytest.raises(ActionLawError, match="generator 'r'"):
        equivfx.compile(cnn(), "C4", input_action=once, example_inputs=X)


def test_broken_batch_independence_in_an_opaque_leaf_is_caught():
    class Leaky(nn.Module):
        """Reverses the batch: not batch independent (a batch mean would be: it is symmetric)."""

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent control flow stops symbolic tracing here
                return torch.flip(x, (0,))
            return x

    model = nn.Sequential(nn.Conv2d(1, 2, 3), Leaky(), nn.Flatten(), nn.Linear(72, 3)).eval()
    # every slot in one pass, unchecked (no example inputs): verify catches it and names the leaf
    with pytest.warns(UserWarning):
        emodel = equivfx.compile(model, "C4", readout="slots", chunk=None)
    report = equivfx.verify(emodel, X)
    assert not report.ok
    assert report.first_bad_node == "_1"
    # on example inputs compile catches it, names the leaf and runs one slot per pass: the lift
    # of what the model computes on a batch (the loop over g), equivariant by construction
    with pytest.warns(BatchMixingWarning, match="'1'"):
        emodel = equivfx.compile(model, "C4", readout="slots", example_inputs=X)
    G = equivfx.group("C4")
    with torch.no_grad():
        loop = torch.stack([model(G.act(G.inverse(g), X)) for g in G.elements], 1)
        assert torch.equal(emodel(X), loop)
    assert equivfx.verify(emodel, X).ok
