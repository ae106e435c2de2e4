"""The console script, run as a subprocess: every command, every bad input, exit codes 0/1/2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import equivfx
from equivfx.checkpoints import sha256
from equivfx.demo import make_cnn

SCRIPT = Path(sys.executable).with_name("equivfx")
CMD = [str(SCRIPT)] if SCRIPT.exists() else [shutil.which("equivfx") or "equivfx"]
FACTORY = "equivfx.demo:make_cnn"
SHAPE = "2,1,8,8"


def run(*args, cwd=None, check_code=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [*CMD, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )
    if check_code is not None:
        assert proc.returncode == check_code, (proc.stdout, proc.stderr)
    return proc


def compile_c4(out, *extra, **kwargs) -> subprocess.CompletedProcess:
    """``equivfx compile`` of the demo CNN under C4 on 2x1x8x8 inputs, to ``out``."""
    return run(
        "compile", FACTORY, "--group", "C4", "--input-shape", SHAPE, "-o", out, *extra, **kwargs
    )


def one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("equivfx: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A trained-looking checkpoint of the demo CNN (seed 3, perturbed)."""
    path = tmp_path_factory.mktemp("ckpt") / "cnn.pt"
    model = make_cnn(seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.01)
    torch.save(model.state_dict(), path)
    return path


def reference(weights: Path, **kwargs):
    model = make_cnn()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return equivfx.compile(model.eval(), "C4", **kwargs).eval()


def test_help_lists_the_commands():
    proc = run("--help", check_code=0)
    for cmd in ("compile", "verify", "inspect", "demo"):
        assert cmd in proc.stdout


def test_compile_to_pt2_loads_in_plain_torch_and_is_invariant(tmp_path, weights):
    out = tmp_path / "cnn.pt2"
    before = weights.read_bytes()
    proc = compile_c4(
        out,
        "--weights",
        weights,
        check_code=0,
    )
    assert "verified" in proc.stdout
    assert weights.read_bytes() == before  # the input is never touched
    meta = json.loads((tmp_path / "cnn.pt2.json").read_text())
    assert meta["group"] == "C4" and meta["mode"] == "global" and meta["readout"] == "invariant"
    assert meta["input_shape"] == [2, 1, 8, 8] and meta["verified"]["ok"] is True
    assert meta["source_sha256"] == sha256(weights)
    assert meta["equivfx_version"] == equivfx.__version__ and meta["torch_version"]
    assert "rotates" in meta["input_action"]
    x = torch.randn(5, 1, 8, 8)  # another batch size: the batch dimension is dynamic
    torch.save(x, tmp_path / "x.pt")
    script = (  # equivfx made unimportable: the artifact needs plain torch only
        "import sys; sys.modules['equivfx'] = None\n"
        "import torch\n"
        f"m = torch.export.load({str(out)!r}).module()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"torch.save((m(x), m(torch.rot90(x, 1, (-2, -1)))), {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    y, y_rot = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        torch.testing.assert_close(y, reference(weights)(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_rot, rtol=1e-5, atol=1e-5)


def test_compile_to_onnx_runs_under_onnxruntime(tmp_path, weights):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "cnn.onnx"
    compile_c4(
        out,
        "--weights",
        weights,
        "--mode",
        "layerwise",
        check_code=0,
    )
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = torch.randn(3, 1, 8, 8)
    y = session.run(None, {name: x.numpy()})[0]
    y_rot = session.run(None, {name: torch.rot90(x, 1, (-2, -1)).numpy()})[0]
    with torch.no_grad():
        want = reference(weights, mode="layerwise")(x).numpy()
    assert abs(y - want).max() < 1e-4
    assert abs(y - y_rot).max() < 1e-4
    run("verify", out, check_code=0)


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_an_example_batch_of_one_exports_a_dynamic_batch(tmp_path, weights, suffix):
    # torch.export specialises a dimension of size 1: "Constraints violated (batch)" before
    if suffix == ".onnx":
        ort = pytest.importorskip("onnxruntime")
    out = tmp_path / f"cnn{suffix}"
    run(
        "compile", FACTORY, "--group", "C4", "--input-shape", "1,1,8,8", "-o", out,
        "--weights", weights, check_code=0,
    )  # fmt: skip
    assert json.loads(Path(f"{out}.json").read_text())["input_shape"] == [1, 1, 8, 8]
    for batch in (1, 3):
        x = torch.randn(batch, 1, 8, 8)
        if suffix == ".pt2":
            with torch.no_grad():
                y = torch.export.load(str(out)).module()(x)
        else:
            session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            y = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(y, reference(weights)(x), rtol=1e-4, atol=1e-4)
    run("verify", out, check_code=0)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_outputs_load_into_the_compiled_model(tmp_path, weights, suffix):
    out = tmp_path / f"cnn{suffix}"
    compile_c4(
        out,
        "--weights",
        weights,
        "--readout",
        "slots",
        check_code=0,
    )
    if suffix == ".pt":
        sd = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        sd = load_file(str(out))
    emodel = reference(weights, readout="slots")
    assert set(sd) == set(emodel.state_dict())
    emodel.load_state_dict(sd)
    run("verify", out, check_code=0)


def test_verify_exit_codes_and_json(tmp_path):
    bad = run("verify", FACTORY, "--group", "C4", "--input-shape", SHAPE, "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["ok"] is False
    out = tmp_path / "inv.pt2"
    run("compile", FACTORY, "--group", "D4", "--input-shape", SHAPE, "-o", out, check_code=0)
    good = run("verify", out, "--json", check_code=0)
    report = json.loads(good.stdout)
    assert report["ok"] is True and report["group"] == "D4"
    assert run("verify", out, "--atol", "0", "--rtol", "0").returncode in (0, 1)


def test_a_slots_artifact_is_verified_under_its_own_group(tmp_path):
    out = tmp_path / "slots.pt2"
    compile_c4(out, "--readout", "slots", check_code=0)
    line = one_error_line(run("verify", out, "--group", "D4"))
    assert "one slot per element of C4" in line and "not of D4" in line
    assert "drop --group" in line and "--output-action" in line
    run("verify", out, "--group", "C4", check_code=0)  # its own group, named


@pytest.mark.parametrize(
    "change, code, says",
    [
        ({"ok": False, "max_error": 0.5}, 1, "NOT verified: equivariance violated"),
        ({"ok": False, "nan_outputs": 3}, 2, "NOT verified: its outputs contain NaN"),
    ],
)
def test_compile_exits_as_verify_answers_and_keeps_the_artifact(
    tmp_path, monkeypatch, change, code, says
):
    # a violated artifact must not pass a pipeline as a good one; it is written, to inspect
    import dataclasses

    from click.testing import CliRunner

    import equivfx
    from equivfx.cli import main

    real = equivfx.verify
    monkeypatch.setattr(
        equivfx, "verify", lambda *a, **k: dataclasses.replace(real(*a, **k), **change)
    )
    out = tmp_path / "m.pt2"
    args = ["compile", FACTORY, "--group", "C4", "--input-shape", SHAPE, "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert says in result.output
    assert out.exists() and (tmp_path / "m.pt2.json").exists()
    assert json.loads((tmp_path / "m.pt2.json").read_text())["verified"]["ok"] is False


def test_compile_under_an_interpolating_action_is_approximate_not_violated(tmp_path):
    out = tmp_path / "c8.pt2"
    proc = run("compile", FACTORY, "--group", "C8", "--input-shape", SHAPE, "-o", out, check_code=0)
    assert "NOT verified exactly: the action interpolates" in proc.stdout
    assert json.loads(out.with_name("c8.pt2.json").read_text())["verified"]["exact"] is False


def test_inspect_text_and_json():
    text = run(
        "inspect",
        FACTORY,
        "--group",
        "C4",
        "--input-shape",
        SHAPE,
        "--mode",
        "layerwise",
        check_code=0,
    ).stdout
    assert "equivfx_lift" in text and "mixing layer" in text and "18,464" in text
    data = json.loads(
        run(
            "inspect",
            FACTORY,
            "--group",
            "C4",
            "--input-shape",
            SHAPE,
            "--format",
            "json",
            check_code=0,
        ).stdout
    )
    nodes = {n["node"]: n for n in data["nodes"]}
    assert nodes["equivfx_lift"]["rep"].startswith("map(G) folded")
    assert nodes["equivfx_lift"]["slot_axis"] == 0
    assert data["passes"] == [
        "annotate-reps",
        "insert-lift",
        "to-map",
        "defer-lift",
        "fuse-projection",
        "hoist-projection",
        "eliminate-dead-slots",
        "defer-lift-to-cosets",
    ]


def test_demo_quick(tmp_path):
    proc = run("demo", "--quick", "--out", tmp_path / "demo", check_code=0)
    assert "equivfx global C4" in proc.stdout and "rotated" in proc.stdout
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert rows["equivfx global C4"]["invariant"] and rows["equivfx layer-wise C4"]["invariant"]
    assert not rows["plain CNN"]["invariant"]
    for name in ("equivfx-global-C4.pt2", "equivfx-layerwise-C4.pt2", "plain-cnn.pt"):
        assert (tmp_path / "demo" / name).exists()
    run("verify", tmp_path / "demo" / "equivfx-global-C4.pt2", check_code=0)


def test_factory_from_the_current_directory_with_model_args(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def make(width=4):\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(1, width, 3), torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(width * 36, 2))\n"
    )
    run(
        "compile",
        "mymodels:make",
        "--model-arg",
        "width=3",
        "--group",
        "D4",
        "--input-shape",
        SHAPE,
        "-o",
        "m.pt2",
        cwd=tmp_path,
        check_code=0,
    )
    meta = json.loads((tmp_path / "m.pt2.json").read_text())
    assert meta["model_args"] == {"width": 3}


def test_inspect_names_fixed_arguments_and_modules_run_whole(tmp_path):
    (tmp_path / "flagged.py").write_text(
        "import torch\n"
        "class Noise(torch.nn.Module):\n"
        "    def forward(self, h):\n"
        "        return h + 0.5 if self.training else h\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv, self.noise = torch.nn.Conv2d(1, 2, 3), Noise()\n"
        "    def forward(self, x, bias=None):\n"
        "        h = self.noise(self.conv(x)).mean((2, 3))\n"
        "        return h if bias is None else h + bias\n"
        "def make():\n"
        "    return Net().eval()\n"
    )
    args = ("inspect", "flagged:make", "--group", "C4", "--input-shape", SHAPE)
    text = run(*args, cwd=tmp_path, check_code=0).stdout
    assert "arguments traced with a fixed value: {'bias': None}" in text
    assert "run whole to follow their training flag: noise" in text
    data = json.loads(run(*args, "--format", "json", cwd=tmp_path, check_code=0).stdout)
    assert data["fixed_arguments"] == {"bias": None}
    assert data["modes_run_whole"] == ["noise"] and data["mode_dependent"] == {}


# ------------------------------------------------------------------------------ bad input: exit 2
def test_missing_weights(tmp_path):
    line = one_error_line(
        compile_c4(
            tmp_path / "o.pt2",
            "--weights",
            tmp_path / "nope.pt",
        )
    )
    assert "not found" in line and "nope.pt" in line


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    line = one_error_line(
        compile_c4(
            tmp_path / "o.pt2",
            "--weights",
            bad,
        )
    )
    assert "corrupt" in line


def test_wrong_weights_format(tmp_path):
    bad = tmp_path / "weights.txt"
    bad.write_text("hello")
    line = one_error_line(
        compile_c4(
            tmp_path / "o.pt2",
            "--weights",
            bad,
        )
    )
    assert "unknown weights format" in line and "Fix" in line


def test_wrong_output_format(tmp_path):
    line = one_error_line(compile_c4(tmp_path / "o.h5"))
    assert "unknown output format" in line


def test_mismatched_keys_are_named(tmp_path):
    ckpt = tmp_path / "other.pt"
    sd = make_cnn(channels=8).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, ckpt)
    line = one_error_line(
        compile_c4(
            tmp_path / "o.pt2",
            "--weights",
            ckpt,
        )
    )
    assert "extra.weight" in line and "0.weight" in line


def test_group_that_does_not_fit_the_input_shape(tmp_path):
    line = one_error_line(
        run(
            "compile",
            FACTORY,
            "--group",
            "C4",
            "--input-shape",
            "2,1,8,9",
            "-o",
            tmp_path / "o.pt2",
        )
    )
    assert "square" in line and "(2, 1, 8, 9)" in line


def test_unknown_group_spec(tmp_path):
    line = one_error_line(
        run("compile", FACTORY, "--group", "Q8", "--input-shape", SHAPE, "-o", tmp_path / "o.pt2")
    )
    assert "Q8" in line


def test_unwritable_output(tmp_path):
    line = one_error_line(
        compile_c4(
            tmp_path / "missing-folder" / "o.pt2",
        )
    )
    assert "folder does not exist" in line


def test_pickled_module_needs_opt_in(tmp_path):
    ckpt = tmp_path / "full.pt"
    torch.save(make_cnn(), ckpt)
    line = one_error_line(
        compile_c4(
            tmp_path / "o.pt2",
            "--weights",
            ckpt,
        )
    )
    assert "--trust-pickle" in line
    compile_c4(
        tmp_path / "o.pt2",
        "--weights",
        ckpt,
        "--trust-pickle",
        check_code=0,
    )


def test_factory_that_does_not_import(tmp_path):
    line = one_error_line(
        run(
            "compile",
            "no_such_package.models:make",
            "--group",
            "C4",
            "--input-shape",
            SHAPE,
            "-o",
            tmp_path / "o.pt2",
        )
    )
    assert "cannot import" in line and "no_such_package" in line
    line = one_error_line(
        run(
            "compile",
            "equivfx.demo:nope",
            "--group",
            "C4",
            "--input-shape",
            SHAPE,
            "-o",
            tmp_path / "o.pt2",
        )
    )
    assert "no attribute" in line


def test_existing_output_is_refused_unless_forced_and_inputs_never_overwritten(tmp_path, weights):
    out = tmp_path / "o.pt2"
    out.write_bytes(b"precious")
    line = one_error_line(compile_c4(out))
    assert "--force" in line
    assert out.read_bytes() == b"precious"
    compile_c4(
        out,
        "--force",
        check_code=0,
    )
    assert out.read_bytes() != b"precious"
    copy = tmp_path / "w.pt"
    shutil.copy(weights, copy)
    before = copy.read_bytes()
    line = one_error_line(
        compile_c4(
            copy,
            "--weights",
            copy,
            "--force",
        )
    )
    assert "overwrite an input" in line
    assert copy.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp*"))  # no temporary files left behind


def test_verify_needs_group_for_a_factory_and_a_sidecar_for_files(tmp_path):
    line = one_error_line(run("verify", FACTORY))
    assert "--group" in line
    lone = tmp_path / "lone.pt2"
    lone.write_bytes(b"x")
    line = one_error_line(run("verify", lone))
    assert "sidecar" in line


def test_debug_shows_the_traceback(tmp_path):
    proc = run(
        "compile",
        FACTORY,
        "--group",
        "Q8",
        "--input-shape",
        SHAPE,
        "-o",
        tmp_path / "o.pt2",
        "--debug",
    )
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "GroupSpecError" in proc.stderr


def test_usage_errors_exit_2():
    assert run("compile").returncode == 2
    assert run("nonsense-command").returncode == 2


def test_outputs_get_the_usual_file_mode(tmp_path):
    out = tmp_path / "m.pt2"
    compile_c4(out, check_code=0)
    old = os.umask(0o022)
    os.umask(old)
    want = 0o666 & ~old
    assert out.stat().st_mode & 0o777 == want
    assert (tmp_path / "m.pt2.json").stat().st_mode & 0o777 == want


def test_a_failing_sidecar_write_leaves_no_artifact(tmp_path, monkeypatch):
    from equivfx import checkpoints

    def broken_dumps(*args, **kwargs):
        raise OSError("disk full")

    out = tmp_path / "m.pt"
    monkeypatch.setattr(checkpoints.json, "dumps", broken_dumps)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_artifact(make_cnn(), out, torch.randn(2, 1, 8, 8), {"group": "C4"})
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no artifact, no sidecar, no temp
    monkeypatch.undo()
    meta = checkpoints.save_artifact(make_cnn(), out, torch.randn(2, 1, 8, 8), {"group": "C4"})
    assert meta["sha256"] == sha256(out)  # the digest of the renamed file, taken before renaming
    assert json.loads((tmp_path / "m.pt.json").read_text())["sha256"] == sha256(out)


def test_failures_that_are_not_violations_exit_2_never_1(tmp_path):
    # exit 1 is verify's "not equivariant": a model that raises, a bad tolerance or a malformed
    # sidecar must not read as a violation in CI
    (tmp_path / "broken.py").write_text(
        "import torch\n"
        "def raises():\n"
        "    raise KeyError('boom')\n"
        "class Asserting(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        assert x.shape[1] == 3, 'expected RGB input'\n"
        "        return x.mean((1, 2, 3))\n"
    )
    line = one_error_line(
        run("verify", "broken:raises", "--group", "C4", "--input-shape", SHAPE, cwd=tmp_path)
    )
    assert "KeyError" in line and "boom" in line
    line = one_error_line(
        run("verify", "broken:Asserting", "--group", "C4", "--input-shape", SHAPE, cwd=tmp_path)
    )
    assert "AssertionError" in line and "expected RGB input" in line
    for flag, value in (("--atol", "-1"), ("--rtol", "nan"), ("--atol", "inf")):
        line = one_error_line(
            run("verify", FACTORY, "--group", "C4", "--input-shape", SHAPE, flag, value)
        )
        assert "finite number >= 0" in line
    art = tmp_path / "a.pt2"
    run("compile", FACTORY, "--group", "D4", "--input-shape", SHAPE, "-o", art, check_code=0)
    line = one_error_line(run("verify", art, "--weights", tmp_path / "nonexistent.pt"))
    assert "--weights apply to a model factory" in line
    side = tmp_path / "a.pt2.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({"format": meta["format"]}))
    assert "lacks group, input_shape" in one_error_line(run("verify", art))
    side.write_text("[1, 2]")
    assert "not an equivfx sidecar" in one_error_line(run("verify", art))


def test_demo_refuses_epochs_below_one(tmp_path):
    for epochs in ("0", "-1"):
        proc = run("demo", "--quick", "--epochs", epochs, "--out", tmp_path / epochs)
        assert proc.returncode == 2 and "--epochs" in proc.stderr
        assert not (tmp_path / epochs).exists()


def test_a_refusal_shows_the_users_line_on_its_one_line(tmp_path):
    (tmp_path / "centred.py").write_text(
        "import torch\n"
        "class Centred(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x - x.mean(0, keepdim=True)\n"
    )
    proc = run(
        "compile", "centred:Centred", "--group", "C4", "--input-shape", SHAPE, "-o", "o.pt2",
        cwd=tmp_path,
    )  # fmt: skip
    line = one_error_line(proc)
    assert "batch axis" in line and "centred.py:4 in forward: return x - x.mean(0" in line


def test_checkpoint_and_sidecar_edge_cases_get_one_line(tmp_path):
    model = make_cnn(seed=0)
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), scripted)
    for extra in ((), ("--trust-pickle",)):
        line = one_error_line(compile_c4(tmp_path / "o.pt2", "--weights", scripted, *extra))
        assert "TorchScript archive" in line and "state_dict()" in line
    (tmp_path / "typo.py").write_text(
        "import torch\n"
        "def make(width=4):\n"
        "    return torch.nn.Conv2d(1, width, 3, bias='no') + 1\n"  # the factory's own TypeError
    )
    line = one_error_line(
        run("verify", "typo:make", "--group", "C4", "--input-shape", SHAPE, cwd=tmp_path)
    )
    assert "TypeError" in line and "arguments the factory accepts" not in line
    line = one_error_line(
        run("verify", "typo:make", "--model-arg", "depth=2", "--group", "C4",
            "--input-shape", SHAPE, cwd=tmp_path)
    )  # fmt: skip
    assert "arguments the factory accepts" in line
    art = tmp_path / "a.pt2"
    run("compile", FACTORY, "--group", "D4", "--input-shape", SHAPE, "-o", art, check_code=0)
    side = tmp_path / "a.pt2.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "input_shape": [2, "x"]}))
    assert "input_shape is not a list of positive ints" in one_error_line(run("verify", art))
    proc = run("verify", FACTORY, "--group", "C4", "--input-shape", SHAPE, "--seed", "1" * 20)
    assert proc.returncode == 2 and "--seed" in proc.stderr


def test_a_model_torch_export_cannot_trace_gets_one_line_and_a_way_out(tmp_path):
    (tmp_path / "gated.py").write_text(
        "import torch\n"
        "class Gate(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x * 2 if x.mean() > 0 else x\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.c, self.g = torch.nn.Conv2d(1, 2, 3), Gate()\n"
        "    def forward(self, x):\n"
        "        return self.g(self.c(x)).mean((1, 2, 3))\n"
    )
    args = ("compile", "gated:Net", "--group", "C4", "--input-shape", SHAPE, "-o")
    line = one_error_line(run(*args, "g.pt2", cwd=tmp_path))  # stderr: this line only
    assert "cannot export" in line and "write .pt or .safetensors" in line
    assert not (tmp_path / "g.pt2").exists()
    run(*args, "g.pt", cwd=tmp_path, check_code=0)


def test_sigterm_while_writing_leaves_no_temporary_file(tmp_path):
    import signal
    import time

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from equivfx.checkpoints import atomic_write\n"
            "with atomic_write(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'half')\n"
            "    print('writing', flush=True)\n"
            "    time.sleep(60)\n",
            str(tmp_path / "out.pt2"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "writing"
    assert len(list(tmp_path.iterdir())) == 1  # the hidden temporary file
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.1)
    assert list(tmp_path.iterdir()) == []  # removed, and no output


def test_a_sidecar_without_its_sha256_is_refused(tmp_path):
    art = tmp_path / "a.pt2"
    run("compile", FACTORY, "--group", "D4", "--input-shape", SHAPE, "-o", art, check_code=0)
    side = tmp_path / "a.pt2.json"
    meta = json.loads(side.read_text())
    del meta["sha256"]
    side.write_text(json.dumps(meta))
    line = one_error_line(run("verify", art))
    assert "sha256" in line and "no sha256" in line


def test_nan_outputs_exit_2_with_the_reason(tmp_path):
    (tmp_path / "nanmod.py").write_text(
        "import torch\n"
        "class NanOut(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        y = x.mean((1, 2, 3))\n"
        "        return torch.stack([y, torch.full_like(y, float('nan'))], 1)\n"
    )
    proc = run("verify", "nanmod:NanOut", "--group", "C4", "--input-shape", SHAPE, cwd=tmp_path)
    assert proc.returncode == 2 and "contain NaN" in proc.stdout


def test_quiet_logging_restores_the_callers_level_and_handlers_set_meanwhile_stay():
    import logging
    import signal

    from equivfx.checkpoints import _terminate_as_exit
    from equivfx.cli import _quiet_logging

    logging.disable(logging.INFO)
    try:
        with _quiet_logging(True):
            assert logging.root.manager.disable == logging.ERROR
        assert logging.root.manager.disable == logging.INFO
    finally:
        logging.disable(logging.NOTSET)

    def mine(signum, frame):
        pass

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    try:
        with _terminate_as_exit():
            signal.signal(signal.SIGTERM, mine)  # set inside the write: kept
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_inspect_takes_the_pool_as_compile_does():
    data = json.loads(
        run(
            "inspect", FACTORY, "--group", "C4", "--input-shape", SHAPE, "--pool", "max",
            "--format", "json", check_code=0,
        ).stdout
    )  # fmt: skip
    assert data["pool"] == "max"
    assert (
        "--pool" in run("compile", "--help").stdout and "--pool" in run("inspect", "--help").stdout
    )
