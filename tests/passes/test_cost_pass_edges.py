"""Edge cases of the cost passes and the chunk runner found by review: each once gave a wrong
result, a crash or a mutated input. Oracle: the plain construction (``optimize=False``,
``chunk=None``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import equivfx
from equivfx.errors import InputShapeError


def plain(model, spec, **kwargs):
    return equivfx.compile(model, spec, optimize=False, chunk=None, **kwargs)


class WindowPool(nn.Module):
    """MaxPool2d(4) gives 1x1 on a 4x4 example but 2x2 on 8x8: not a global pool."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pool = nn.MaxPool2d(4)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        return self.fc(self.pool(x)[:, :, 0, 0])


def test_a_window_pool_that_is_1x1_on_the_example_is_not_a_global_pool():
    model = WindowPool().eval()
    emodel = equivfx.compile(model, "C4", example_inputs=torch.randn(2, 3, 4, 4), chunk=None)
    assert type(emodel.equivfx_lift.action).__name__ != "TrivialAction"
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(InputShapeError, match=r"got \(3, 2, 2\)"):  # refused, never wrong
        emodel(x)
    assert plain(model, "C4")(x).shape == (2, 5)


def test_a_kernel_is_probed_again_on_a_new_shape():
    model = nn.Sequential(nn.Conv2d(3, 4, (1, 3), padding=(0, 1)), nn.ReLU()).eval()
    emodel = equivfx.compile(model, "D2", readout="slots", example_inputs=torch.randn(2, 3, 1, 8))
    assert len(emodel.equivfx_flat.equivfx_lift.slots) == 2  # the row flip fixes a 1 x W input
    x = torch.randn(2, 3, 1, 10)  # another width, the same kernel: accepted
    with torch.no_grad():
        torch.testing.assert_close(emodel(x), plain(model, "D2", readout="slots")(x))


class SetsWithStatistics(nn.Module):
    """DeepSets whose rho uses batch statistics and dropout: in training, slots differ."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.phi = nn.Linear(4, 3)
        self.layer = layer
        self.rho = nn.Linear(3, 2)

    def forward(self, x):
        return self.rho(self.layer(self.phi(x).sum(1)))


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(3), nn.Dropout(0.5)], ids=["bn", "dropout"])
def test_no_slot_is_eliminated_past_batch_statistics_or_dropout(layer):
    model = SetsWithStatistics(layer)
    emodel = equivfx.compile(model, "Perm4", example_inputs=torch.randn(3, 4, 4), chunk=None)
    assert len(emodel.equivfx_lift.slots) == 24
    model.train()
    emodel.train()
    x = torch.randn(1, 4, 4)
    emodel(x)  # B = 1 in training: BatchNorm1d still sees |G| samples


def test_chunks_follow_to_double_and_assigned_state():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.randn(4, 2))
            self.b = nn.Parameter(torch.zeros(2))

        def forward(self, h):
            return h @ self.w + self.b

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = Head()

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    emodel = equivfx.compile(Net().eval(), "C4", example_inputs=x, chunk=2)
    assert emodel.double()(x.double()).dtype == torch.float64
    emodel.float()
    state = {k: v + 1.0 for k, v in emodel.state_dict().items()}
    emodel.load_state_dict(state, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(emodel(x), emodel.equivfx_flat(x))


@pytest.mark.parametrize("pool", ["mean", "max", "logsumexp"])
def test_accumulated_pools_differentiate_in_eval_mode(pool):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    chunked = equivfx.compile(model, "C4", pool=pool, chunk=2)
    chunked(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    plain(model, "C4", pool=pool)(x).sum().backward()
    torch.testing.assert_close(grad, x.grad)


class InPlace(nn.Module):
    """A positional embedding added in place to the input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Parameter(torch.randn(1, 3, 8, 8))
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 36, 2)

    def forward(self, x):
        x.add_(self.pos)
        return self.fc(self.conv(x).flatten(1))


@pytest.mark.parametrize("chunk", [None, 1, "auto"])
def test_in_place_ops_after_the_lift_leave_the_input_alone_and_are_pooled(chunk):
    model = InPlace().eval()
    x = torch.randn(2, 3, 8, 8)
    emodel = equivfx.compile(model, "C4", example_inputs=x.clone(), chunk=chunk)
    mine = x.clone()
    with torch.no_grad():
        got = emodel(mine)
        want = plain(model, "C4")(x.clone())
    assert torch.equal(mine, x)
    torch.testing.assert_close(got, want)


def test_the_chunk_wrapper_keeps_the_model_s_default_arguments():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x, scale: float = 2.0):
            return self.conv(x).mean((2, 3)) * scale

    x = torch.randn(2, 3, 8, 8)
    emodel = equivfx.compile(Scaled().eval(), "C4", chunk=2)
    with torch.no_grad():
        torch.testing.assert_close(emodel(x), plain(Scaled().eval(), "C4")(x))
        torch.testing.assert_close(emodel(x, 3.0), emodel(x) * 1.5)


@pytest.mark.parametrize("chunk", [None, 2])
def test_a_deep_copy_keeps_what_the_compiled_model_knows(chunk):
    import copy

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    emodel = equivfx.compile(model, "C4", chunk=chunk)
    twin = copy.deepcopy(emodel)
    assert twin.equivfx_info.group == emodel.equivfx_info.group
    assert twin.state_dict().keys() == emodel.state_dict().keys()
    assert equivfx.verify(twin, x).ok  # knows its group without group=
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
        assert not torch.allclose(twin(x), emodel(x))  # the copy's own weights
        if chunk is not None:
            torch.testing.assert_close(twin.equivfx_flat(x), twin(x))


def test_jit_trace_records_one_pass_over_every_slot():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    emodel = equivfx.compile(model, "D4")  # chunk="auto": would measure, then trace one choice
    with torch.no_grad():
        traced = torch.jit.trace(emodel, (x,), check_trace=False)
        assert not emodel.equivfx_chunks.chosen  # no measurement while tracing
        torch.testing.assert_close(traced(x), emodel(x))
        torch.testing.assert_close(traced(x[:1]), emodel(x[:1]))
