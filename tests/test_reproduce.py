"""tools/reproduce_paper.py --quick: the paper's qualitative claims on real digits, with margins.

Trained on upright digits only, the exactly equivariant models (C4 global and layer-wise, D4, the
C4 pose readout) score the same on digits rotated by 90/180/270 degrees as on upright ones (within 2
points), while the plain CNN collapses on rotated digits. One quick run (about a minute on one core)
is shared by every test in this module.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "reproduce_paper.py"

pytest.importorskip("sklearn")


def _load():
    spec = importlib.util.spec_from_file_location("reproduce_paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rp():
    return _load()


@pytest.fixture(scope="module")
def quick(rp, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "quick.json"
    assert rp.main(["--quick", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _acc(result, model, key, fraction=1.0):
    vals = [
        r["acc"][key]
        for r in result["runs"]
        if r["model"] == model and r["train_fraction"] == fraction
    ]
    assert vals, (model, fraction)
    return sum(vals) / len(vals)


def test_schema(quick, rp):
    assert isinstance(quick["dataset"], str) and "load_digits" in quick["dataset"]
    assert quick["runs"]
    models = {r["model"] for r in quick["runs"]}
    assert {"plain", "augmented", *rp.EXACT_MODELS} <= models
    assert models <= set(rp.MODELS)
    for r in quick["runs"]:
        assert {"model", "train_fraction", "seed", "acc", "train_seconds"} <= set(r)
        assert isinstance(r["seed"], int) and 0 < r["train_fraction"] <= 1
        assert r["train_seconds"] > 0
        keys = {"upright", "rot90", "rot180", "rot270", "rotated", "flip_lr", "flip_ud", "flipped"}
        assert keys <= set(r["acc"])
        assert all(0.0 <= v <= 1.0 for v in r["acc"].values())
        rot = [r["acc"][f"rot{a}"] for a in (90, 180, 270)]
        assert r["acc"]["rotated"] == pytest.approx(sum(rot) / 3)
        if r["train_fraction"] == 1.0:  # the angle grid, scored at the largest fraction
            assert "angle_0" in r["acc"] and "angles_mean" in r["acc"]
            # grid points at multiples of 90 reuse the exact rotations (class-only for pose)
            assert r["class_acc"]["angle_90"] == r["class_acc"]["rot90"]
    assert len({r["train_fraction"] for r in quick["runs"]}) >= 2


@pytest.mark.parametrize(
    "model", ["equivfx-global-C4", "equivfx-layerwise-C4", "equivfx-global-D4", "equivfx-pose-C4"]
)
@pytest.mark.parametrize("fraction", [1.0, 0.1])
def test_exact_models_keep_accuracy_on_rotated_digits(quick, model, fraction):
    upright = _acc(quick, model, "upright", fraction)
    assert upright > 0.5, (model, upright)  # it learned something
    for key in ("rot90", "rot180", "rot270", "rotated"):
        assert abs(_acc(quick, model, key, fraction) - upright) <= 0.02, (model, key)


def test_d4_keeps_accuracy_on_flipped_digits(quick):
    upright = _acc(quick, "equivfx-global-D4", "upright")
    assert abs(_acc(quick, "equivfx-global-D4", "flipped") - upright) <= 0.02


def test_plain_cnn_collapses_on_rotated_digits(quick):
    upright = _acc(quick, "plain", "upright")
    rotated = _acc(quick, "plain", "rotated")
    assert upright > 0.85
    assert rotated < upright - 0.4, (upright, rotated)
    assert rotated < 0.5
    for model in ("equivfx-global-C4", "equivfx-pose-C4"):
        assert _acc(quick, model, "rotated") > rotated + 0.3


def test_render_tables(quick, rp):
    md = rp.render(quick)
    assert "| plain |" in md and "rotated" in md and "| equivfx-global-C4 |" in md
