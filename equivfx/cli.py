"""The ``equivfx`` command line: transform checkpoints, export, verify in CI, inspect, and the demo.

::

    equivfx compile MODEL --group SPEC --input-shape 2,1,28,28 -o OUT [--weights CKPT] ...
    equivfx verify  MODEL_OR_ARTIFACT [--group SPEC] [--input-shape ...] [--json] ...
    equivfx inspect MODEL --group SPEC --input-shape ... [--mode ...] [--format text|json]
    equivfx demo    [--out DIR] [--quick]

Exit codes: 0 success (for ``verify``: equivariance holds), 1 equivariance violated (``verify``,
and ``compile``, which writes the artifact anyway; not for an interpolating action, whose
equivariance is approximate by construction), 2 bad input, usage, or any other failure (a model
that raises, a malformed sidecar), 130 interrupted. Every bad input is one line on stderr with a
hint; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import traceback
import warnings
from pathlib import Path

import click

__all__ = ["main"]

EXIT_OK, EXIT_VIOLATED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

GROUP_HELP = "group spec: C4, D4, C8, Shift16, Perm5, D4xShift8@-3 ... (see the README)"


def _fail(message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    lines = message.splitlines()
    source = next((ln[len("  source: ") :] for ln in lines if ln.startswith("  source: ")), "")
    if source:  # a refusal's line of the user's code
        first += f" [at {source}]"
    hint = "" if "Fix:" in first else " (run with --debug for the traceback)"
    click.echo(f"equivfx: error: {first}{hint}", err=True)
    sys.exit(EXIT_BAD_INPUT)


@contextlib.contextmanager
def _quiet_logging(quiet: bool):
    """No log records below CRITICAL while a command runs (torch.export logs whole graphs and
    guard failures before raising; the command's error is its one line), unless ``--debug``."""
    if not quiet:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.ERROR))
    try:
        yield
    finally:
        logging.disable(previous)


def _command(fn):
    """Shared handling: --debug, equivfx errors as one line on stderr with exit code 2."""

    @click.option("--debug", is_flag=True, help="show the traceback on errors")
    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        from equivfx.errors import EquivFXError

        try:
            with warnings.catch_warnings(), _quiet_logging(not debug):
                if not debug:
                    warnings.simplefilter("ignore")
                code = fn(*args, **kwargs)
        except EquivFXError as err:
            _fail(str(err), debug)
        except KeyboardInterrupt:
            click.echo("equivfx: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as err:  # noqa: BLE001 - any other failure (the user's model raising
            # KeyError or AssertionError, a guard of an exported program) is not a violation:
            # exit 1 is verify's answer "not equivariant", which CI must be able to trust
            _fail(f"{type(err).__name__}: {err}", debug)
        sys.exit(code or EXIT_OK)

    return wrapper


def _model_options(fn):
    fn = click.option(
        "--model-arg",
        "model_args",
        multiple=True,
        metavar="KEY=VALUE",
        help="argument for the model factory (repeatable)",
    )(fn)
    fn = click.option(
        "--weights",
        type=click.Path(dir_okay=False),
        default=None,
        help="state_dict checkpoint: .pt/.pth (weights_only), .safetensors or .pt2",
    )(fn)
    fn = click.option(
        "--trust-pickle",
        is_flag=True,
        help="allow a fully pickled module as --weights (unpickling runs code)",
    )(fn)
    return fn


def _construction_options(fn):
    fn = click.option(
        "--pool",
        type=click.Choice(["mean", "max", "logsumexp"]),
        default="mean",
        help="how the invariant readout pools the slots",
    )(fn)
    fn = click.option(
        "--readout",
        type=click.Choice(["invariant", "slots", "pose", "equivariant"]),
        default="invariant",
    )(fn)
    return click.option("--mode", type=click.Choice(["global", "layerwise"]), default="global")(fn)


def _build_model(model_spec: str, model_args, weights, trust_pickle):
    from equivfx.checkpoints import apply_weights, load_factory, load_weights, parse_model_args

    model = load_factory(model_spec, parse_model_args(model_args))
    if weights:
        apply_weights(model, load_weights(weights, trust_pickle=trust_pickle))
    return model.eval()


def _example(shape, seed: int = 0):
    import torch

    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _output_action(readout: str, output_action):
    from equivfx.groups import TrivialAction

    if readout == "invariant":
        return TrivialAction()
    if readout == "equivariant":
        return output_action
    return None  # slots / pose: set by the caller from the group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="equivfx")
def main() -> None:
    """equivfx: make any PyTorch model equivariant or invariant to a finite group."""


# ------------------------------------------------------------------------------------ compile
@main.command("compile")
@click.argument("model")
@click.option("--group", "group_spec", required=True, help=GROUP_HELP)
@click.option("--input-shape", required=True, help="example input shape, batch first: 2,1,28,28")
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="output: .pt2 (torch.export), .onnx, .pt or .safetensors (state_dict)",
)
@_model_options
@_construction_options
@click.option(
    "--output-action",
    default=None,
    help="group spec acting on the output (readout=equivariant), e.g. C4 for segmentation maps",
)
@click.option("--force", is_flag=True, help="replace an existing OUT")
@_command
def compile_cmd(
    model,
    group_spec,
    input_shape,
    out,
    model_args,
    weights,
    trust_pickle,
    mode,
    readout,
    pool,
    output_action,
    force,
):
    """Compile MODEL (package.module:factory) into an equivariant artifact OUT, verified.

    Example: equivfx compile equivfx.demo:make_cnn --group C4 --input-shape 2,1,8,8 -o cnn.pt2
    """
    import torch

    import equivfx
    from equivfx.checkpoints import parse_shape, save_artifact, sha256

    shape = parse_shape(input_shape)
    net = _build_model(model, model_args, weights, trust_pickle)
    x = _example(shape)
    G = equivfx.group(group_spec)
    emodel = equivfx.compile(
        net, G, mode=mode, readout=readout, pool=pool, output_action=output_action, example_inputs=x
    )
    report = equivfx.verify(emodel, x)
    meta = {
        "group": G.spec,
        "mode": mode,
        "readout": readout,
        "pool": pool,
        "input_action": emodel.equivfx_info.input_action.describe(),
        "output_action": output_action,
        "input_shape": list(shape),
        "model": model,
        "model_args": dict(_parsed(model_args)),
        "weights": weights,
        "source_sha256": sha256(weights) if weights else None,
        "mixed": list(emodel.equivfx_info.mixed),
        "trace_path": emodel.equivfx_info.trace_path,
        "equivfx_version": equivfx.__version__,
        "torch_version": torch.__version__,
        "verified": {
            "ok": report.ok,
            "exact": report.exact,
            "max_error": report.max_error,
            "rtol": report.rtol,
            "atol": report.atol,
        },
    }
    save_artifact(emodel, out, x, meta, force=force, inputs=(weights,))
    if report.ok:
        status = "verified"
    elif report.nan_outputs:
        status = "NOT verified: its outputs contain NaN"
    elif report.exact:
        status = "NOT verified: equivariance violated (see equivfx verify)"
    else:  # an interpolated action: equivariant up to interpolation, not exactly
        status = "NOT verified exactly: the action interpolates, so equivariance is approximate"
    click.echo(
        f"wrote {out} and {Path(out).name}.json: {G.spec} {mode} {readout}, {status}, "
        f"max error {report.max_error:.3g}"
    )
    # as verify answers: the artifact is written either way (to inspect), but a pipeline that
    # compiles must not take a violated artifact for a good one
    if report.nan_outputs:
        return EXIT_BAD_INPUT
    return EXIT_VIOLATED if report.exact and not report.ok else EXIT_OK


def _parsed(model_args):
    from equivfx.checkpoints import parse_model_args

    return parse_model_args(model_args)


# ------------------------------------------------------------------------------------ verify
@main.command("verify")
@click.argument("model_or_artifact")
@click.option("--group", "group_spec", default=None, help=GROUP_HELP + " (default: the artifact's)")
@click.option("--input-shape", default=None, help="example input shape (default: the artifact's)")
@_model_options
@click.option(
    "--output-action",
    default=None,
    help="group spec acting on the output "
    "(default: trivial, i.e. an invariance check, or the artifact's readout)",
)
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--atol", type=float, default=None, help="absolute tolerance")
@click.option("--rtol", type=float, default=None, help="relative tolerance")
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    default=0,
    help="seed of the random example input",
)
@_command
def verify_cmd(
    model_or_artifact,
    group_spec,
    input_shape,
    model_args,
    weights,
    trust_pickle,
    output_action,
    as_json,
    atol,
    rtol,
    seed,
):
    """Check equivariance of a model or artifact: exit 0 if it holds, 1 if violated, 2 on bad input.

    Example: equivfx verify cnn.pt2 --json
    """
    import equivfx
    from equivfx.checkpoints import CheckpointError, load_artifact, parse_shape
    from equivfx.errors import explain
    from equivfx.passes.projection import readout_action

    path = Path(model_or_artifact)
    if path.exists():
        ignored = [o for o, v in (("--weights", weights), ("--model-arg", model_args)) if v]
        if ignored or trust_pickle:
            raise CheckpointError(
                explain(
                    f"{', '.join(ignored + ['--trust-pickle'] * trust_pickle)} apply to a model "
                    "factory, not to an artifact",
                    model_or_artifact,
                    "an artifact alone (its weights are inside it)",
                    "drop those options, or verify package.module:factory --weights ...",
                )
            )
        module, meta = load_artifact(path, rebuild=_rebuild)
        G = equivfx.group(group_spec or meta["group"])
        readout = meta.get("readout", "invariant")
        if readout in ("slots", "pose") and not output_action and G.spec != meta["group"]:
            raise CheckpointError(
                explain(
                    f"the artifact's {readout} readout has one slot per element of "
                    f"{meta['group']}, the group it was compiled for, not of {G.spec}",
                    group_spec,
                    f"its own group ({meta['group']})",
                    "drop --group, or give --output-action (how the group acts on the output)",
                )
            )
        shape = parse_shape(input_shape) if input_shape else tuple(meta["input_shape"])
        out_action = output_action or readout_action(G, readout, meta.get("output_action"))
    else:
        if ":" not in model_or_artifact:
            raise CheckpointError(
                explain(
                    "MODEL_OR_ARTIFACT is neither a file nor a factory",
                    model_or_artifact,
                    "a path to an artifact, or package.module:factory",
                    "check the path",
                )
            )
        if not group_spec or not input_shape:
            raise CheckpointError(
                explain(
                    "verifying a model factory needs --group and --input-shape",
                    model_or_artifact,
                    "both options",
                    "e.g. --group C4 --input-shape 2,3,32,32",
                )
            )
        module = _build_model(model_or_artifact, model_args, weights, trust_pickle)
        G = equivfx.group(group_spec)
        shape = parse_shape(input_shape)
        out_action = output_action
    x = _example(shape, seed)
    report = equivfx.verify(module, x, group=G, output_action=out_action, rtol=rtol, atol=atol)
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(report.summary())
    if report.nan_outputs:  # not checked, not shown violated: the model's output is broken
        return EXIT_BAD_INPUT
    return EXIT_OK if report.ok else EXIT_VIOLATED


def _rebuild(meta: dict):
    """Recompile the model a state_dict artifact was made from (for .pt / .safetensors)."""
    import equivfx
    from equivfx.checkpoints import load_factory

    net = load_factory(meta["model"], meta.get("model_args") or {}).eval()
    x = _example(tuple(meta["input_shape"]))
    return equivfx.compile(
        net,
        meta["group"],
        mode=meta["mode"],
        readout=meta["readout"],
        pool=meta.get("pool", "mean"),
        output_action=meta.get("output_action"),
        example_inputs=x,
    )


# ------------------------------------------------------------------------------------ inspect
@main.command("inspect")
@click.argument("model")
@click.option("--group", "group_spec", required=True, help=GROUP_HELP)
@click.option("--input-shape", required=True, help="example input shape, batch first")
@_model_options
@_construction_options
@click.option("--output-action", default=None, help="for readout=equivariant")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@_command
def inspect_cmd(
    model,
    group_spec,
    input_shape,
    model_args,
    weights,
    trust_pickle,
    mode,
    readout,
    output_action,
    pool,
    fmt,
):
    """Show each graph node with its representation, slot axis, rule and parameter count."""
    import equivfx
    from equivfx.checkpoints import parse_shape
    from equivfx.graphview import describe_graph

    net = _build_model(model, model_args, weights, trust_pickle)
    x = _example(parse_shape(input_shape))
    emodel = equivfx.compile(
        net,
        group_spec,
        mode=mode,
        readout=readout,
        pool=pool,
        output_action=output_action,
        example_inputs=x,
    )
    rows = describe_graph(emodel)
    info = emodel.equivfx_info
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "group": info.group.spec,
                    "mode": info.mode,
                    "readout": info.readout,
                    "pool": info.pool,
                    "trace_path": info.trace_path,
                    "passes": list(info.passes),
                    "mixed": list(info.mixed),
                    "leaves": info.leaves,
                    "fixed_arguments": info.fixed,
                    "required_arguments": list(info.required),
                    "modes_run_whole": list(info.modes_run_whole),
                    "modes_read": list(info.modes_read),
                    "mode_dependent": info.mode_dependent,
                    "nodes": rows,
                },
                indent=2,
            )
        )
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{type(net).__name__} under {info.group.spec}, {info.mode} mode, "
        f"{info.readout} readout (trace: {info.trace_path})"
    )
    for col in ("node", "op", "target", "representation", "slot axis", "rule", "params"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["node"],
            r["op"],
            r["target"],
            r["rep"],
            "" if r["slot_axis"] is None else str(r["slot_axis"]),
            r["rule"] or "",
            "" if r["params"] is None else f"{r['params']:,}",
        )
    Console(width=160).print(table)
    click.echo(f"passes: {' -> '.join(info.passes)}")
    for label, value in (
        ("arguments traced with a fixed value", info.fixed),
        ("arguments traced as tensors, required", ", ".join(info.required)),
        ("run whole to follow their training flag", ", ".join(info.modes_run_whole)),
        (
            "training flags read at each call",
            ", ".join(n or "(the model)" for n in info.modes_read),
        ),
        ("branches kept in the compile mode", info.mode_dependent),
    ):
        if value:
            click.echo(f"{label}: {value}")
    return EXIT_OK


# ------------------------------------------------------------------------------------ demo
@main.command("demo")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="folder for the artifacts (default: a new folder in the current directory)",
)
@click.option("--quick", is_flag=True, help="a few epochs only (a smoke test)")
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="training epochs (default 30, quick 3)",
)
@click.option("--seed", type=int, default=0)
@_command
def demo_cmd(out_dir, quick, epochs, seed):
    """Train a CNN on upright digits, plain and compiled for C4 (global and layer-wise), and
    evaluate all three on upright and rotated digits."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from equivfx.demo import run_demo

    folder = _demo_folder(out_dir)
    epochs = epochs if epochs is not None else (3 if quick else 30)
    console = Console(width=max(110, Console().width))
    console.print(
        f"equivfx demo: scikit-learn digits (1,797 real 8x8 images), trained upright only, "
        f"{epochs} epochs per model; artifacts in {folder}/"
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as prog:
        result = run_demo(epochs=epochs, seed=seed, out_dir=folder, progress=prog)
    table = Table(title="test accuracy (trained on upright digits only)")
    for col in (
        "model",
        "upright",
        "rot90",
        "rot180",
        "rot270",
        "rotated (mean)",
        "invariant",
        "params",
        "train s",
    ):
        table.add_column(col, justify="right" if col != "model" else "left")
    for r in result.rows:
        table.add_row(
            r["model"],
            f"{r['upright']:.3f}",
            f"{r['rot90']:.3f}",
            f"{r['rot180']:.3f}",
            f"{r['rot270']:.3f}",
            f"{r['rotated']:.3f}",
            "yes" if r["invariant"] else f"no ({r['max_error']:.2g})",
            f"{r['parameters']:,}",
            f"{r['train_seconds']:.1f}",
        )
    console.print(table)
    results = folder / "results.json"
    from equivfx.checkpoints import atomic_write

    with atomic_write(results) as tmp:
        tmp.write_text(
            json.dumps(
                {
                    "epochs": epochs,
                    "seed": seed,
                    "rows": result.rows,
                    "artifacts": result.artifacts,
                },
                indent=2,
            )
            + "\n"
        )
    console.print(
        f"wrote {', '.join(Path(a).name for a in result.artifacts)} and results.json to "
        f"{folder}/ in {result.seconds:.0f} s. C4-invariant models cannot tell a 6 from "
        "a 9 rotated by 180 degrees; the pose readout keeps that information."
    )
    console.print(f"try: equivfx verify {folder}/equivfx-global-C4.pt2")
    return EXIT_OK


def _demo_folder(out_dir) -> Path:
    from equivfx.checkpoints import CheckpointError
    from equivfx.errors import explain

    if out_dir is not None:
        folder = Path(out_dir)
        if folder.exists() and any(folder.iterdir()):
            raise CheckpointError(
                explain(
                    "the demo folder is not empty",
                    str(folder),
                    "a new or empty folder",
                    "choose another --out",
                )
            )
    else:
        base = Path("equivfx-demo")
        folder, i = base, 1
        while folder.exists():
            i += 1
            folder = Path(f"{base}-{i}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(
            explain(
                "cannot create the demo folder",
                f"{folder}: {err}",
                "a writable location",
                "choose another --out",
            )
        ) from err
    return folder


if __name__ == "__main__":  # pragma: no cover
    main()
