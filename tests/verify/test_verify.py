"""equivfx.verify: reports, tolerances, element selection, compiled vs plain models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import equivfx
from equivfx.errors import GroupSpecError, InputShapeError, ModelTypeError
from equivfx.verify import ALL_ELEMENTS_UP_TO, TOLERANCES, elements_to_check, tolerance
from equivfx.verify.tolerance import abs_error, within

X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))


class Pool(nn.Module):
    """Invariant to every permutation of the spatial entries."""

    def forward(self, x):
        return x.mean((2, 3))


def test_report_fields_and_json():
    report = equivfx.verify(Pool(), X, group="D4")
    assert report.ok
    assert report.max_error == max(report.per_element.values())
    assert list(report.checked[:2]) == ["r", "f"]  # generators first
    assert set(report.per_element) == {"r", "f", "r2", "r3", "rf", "r2f", "r3f"}
    data = json.loads(report.to_json())
    assert data["ok"] is True and data["group"] == "D4" and data["dtype"] == "float32"
    assert (data["rtol"], data["atol"]) == TOLERANCES[torch.float32]
    assert "equivariant under D4" in str(report)


def test_output_action_for_a_plain_equivariant_model():
    conv = nn.Conv2d(3, 3, 1)  # a 1x1 convolution commutes with rotations and flips
    assert equivfx.verify(conv, X, group="D4", output_action="D4").ok
    assert not equivfx.verify(conv, X, group="D4").ok  # the default output action is trivial


def test_large_groups_check_generators_and_a_seeded_sample():
    G = equivfx.group("Perm6")  # 720 elements
    chosen = elements_to_check(G, samples=10, seed=1)
    assert chosen[: len(G.generators)] == list(G.generators)
    assert len(chosen) == len(G.generators) + 10
    assert chosen == elements_to_check(G, samples=10, seed=1)
    small = equivfx.group("D4")
    assert len(elements_to_check(small)) == small.order - 1 <= ALL_ELEMENTS_UP_TO


def test_set_model_under_a_large_permutation_group():
    class DeepSet(nn.Module):
        def __init__(self):
            super().__init__()
            self.phi = nn.Linear(3, 8)
            self.rho = nn.Linear(8, 2)

        def forward(self, x):
            return self.rho(torch.relu(self.phi(x)).sum(1))

    x = torch.randn(4, 6, 3)
    report = equivfx.verify(DeepSet(), x, group="Perm6", samples=16)
    assert report.ok and len(report.checked) == 2 + 16


def test_tolerance_table_and_overrides():
    assert tolerance(torch.float64) == TOLERANCES[torch.float64]
    assert tolerance(torch.float32, atol=0.5) == (TOLERANCES[torch.float32][0], 0.5)
    assert tolerance(torch.int64) == (0.0, 0.0)


def test_scaled_comparison():
    a = torch.tensor([1000.0, 0.0], dtype=torch.float64)
    b = torch.tensor([1000.001, 0.0], dtype=torch.float64)
    assert within(a, b, rtol=1e-5, atol=0.0)  # 1e-3 <= 1e-5 * 1000
    assert not within(a, b, rtol=1e-7, atol=0.0)
    assert abs_error(a, b) == pytest.approx(1e-3, rel=1e-3)
    assert abs_error(torch.zeros(2), torch.zeros(3)) == float("inf")


def test_infinities_pass_only_against_themselves():
    inf = float("inf")
    a = torch.tensor([inf, -inf, 1.0])
    assert within(a, a.clone(), rtol=1e-5, atol=1e-6) and abs_error(a, a.clone()) == 0.0
    # the scaled bound is infinite where either value is: it passed -inf against 3.0 before
    for b in ([inf, -inf, inf], [inf, 3.0, 1.0], [-inf, -inf, 1.0]):
        assert not within(a, torch.tensor(b), rtol=1e-5, atol=1e-6), b
        assert abs_error(a, torch.tensor(b)) == inf, b
    assert not within(torch.tensor([-inf, 1.0]), torch.tensor([3.0, 1.0]), rtol=1e-5, atol=1e-6)
    nan = float("nan")
    assert within(torch.tensor([nan, inf]), torch.tensor([nan, inf]), rtol=0.0, atol=0.0)
    assert not within(torch.tensor([nan]), torch.tensor([inf]), rtol=1.0, atol=1.0)


def test_modes_are_restored():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Dropout(0.5)).train()
    equivfx.verify(model, X, group="C4", output_action="C4")
    assert model.training and model[1].training


def test_bad_inputs():
    with pytest.raises(GroupSpecError, match="group="):
        equivfx.verify(Pool(), X)
    with pytest.raises(ModelTypeError):
        equivfx.verify(lambda x: x, X, group="C4")
    with pytest.raises(ModelTypeError):
        equivfx.verify(Pool(), "not a tensor", group="C4")
    with pytest.raises(InputShapeError):
        equivfx.verify(Pool(), torch.randn(2, 3, 6, 5), group="C4")


def test_sequence_groups():
    conv = nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular", bias=False)
    x = torch.randn(3, 2, 8)
    assert equivfx.verify(conv, x, group="Shift8", output_action="Shift8").ok
    emodel = equivfx.compile(
        nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(24, 3)), "ShiftRev8"
    )
    assert equivfx.verify(emodel, x).ok


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1e-3", True])
def test_tolerances_must_be_finite_non_negative_numbers(bad):
    from equivfx.errors import VerifyArgumentError

    net = equivfx.compile(nn.Conv2d(1, 2, 3), "C4")
    x = torch.randn(2, 1, 6, 6)
    for name in ("rtol", "atol"):
        with pytest.raises(VerifyArgumentError, match=f"{name} must be a finite number >= 0"):
            equivfx.verify(net, x, **{name: bad})
    assert equivfx.verify(net, x, rtol=0, atol=1e-6).ok  # zero is a bound


def test_nan_outputs_fail_with_a_note_and_the_json_stays_strict():
    class AllNan(nn.Module):
        def forward(self, x):
            return x.mean((-1, -2)) * float("nan")

    x = torch.randn(2, 1, 6, 6)
    report = equivfx.verify(AllNan(), x, group="C4")
    assert not report.ok and report.max_error == 0.0  # NaN agrees with NaN: not checked
    assert any("contain NaN (2 of 2 values)" in n for n in report.notes)

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))

    assert strict(report.to_json())["ok"] is False

    class CornerLog(nn.Module):  # NaN where a rotation brings a negative corner to (0, 0)
        def forward(self, x):
            return torch.log(x[:, :, 0, 0])

    corners = -torch.ones(1, 1, 6, 6)
    corners[..., 0, 0] = 2.0
    shown = equivfx.verify(CornerLog(), corners, group="C4")
    assert not shown.ok and shown.max_error == float("inf")
    assert not any("contain NaN" in n for n in shown.notes)  # the model's own output is finite
    parsed = strict(shown.to_json())
    assert parsed["max_error"] == "inf" and "inf" in parsed["per_element"].values()


def test_a_zero_dim_tensor_is_a_tolerance_and_reports_hold_floats():
    net = equivfx.compile(nn.Conv2d(1, 2, 3), "C4")
    report = equivfx.verify(net, torch.randn(2, 1, 6, 6), atol=torch.tensor(1e-4), rtol=0)
    assert report.ok and report.atol == pytest.approx(1e-4) and type(report.atol) is float
    json.loads(report.to_json())


def test_a_nan_output_says_why_in_the_summary():
    class NanColumn(nn.Module):  # invariant, but one output is NaN in every slot
        def forward(self, x):
            y = x.mean((1, 2, 3))
            return torch.stack([y, torch.full_like(y, float("nan"))], 1)

    report = equivfx.verify(NanColumn(), torch.randn(2, 1, 6, 6), group="C4")
    assert not report.ok and report.nan_outputs == 2
    assert "note: the model's outputs on the example contain NaN (2 of 4 values)" in (
        report.summary()
    )


def test_the_summary_says_an_interpolated_action_once():
    report = equivfx.verify(equivfx.compile(nn.Conv2d(1, 2, 3), "C8"), torch.randn(2, 1, 9, 9))
    assert not report.exact and any("interpolated" in n for n in report.notes)
    summary = report.summary()
    assert summary.count("interpolated") == 1 and "note: the input action" not in summary
