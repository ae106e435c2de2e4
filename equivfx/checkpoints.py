"""Loading models and checkpoints, and writing artifacts atomically with a JSON sidecar.

Inputs: a model factory ``package.module:factory`` (the current directory is importable, as with
``python -m``), weights as a state_dict in ``.pt``/``.pth`` (loaded with ``weights_only=True``),
``.safetensors``, or a ``.pt2`` exported program; a fully pickled module only with ``trust_pickle``.

Outputs (chosen by the extension): ``.pt2`` (torch.export, dynamic batch; loads with plain
``torch.export.load(path).module()``), ``.onnx`` (runs under onnxruntime), ``.pt`` /
``.safetensors``
(the compiled module's state_dict). Beside every output goes ``OUT.json``. Files are written to a
temporary file in the same folder and renamed into place, so a reader never sees half a file; an
existing output is refused unless ``force``, and an input is never overwritten.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from equivfx.errors import EquivFXError, explain

__all__ = [
    "CheckpointError",
    "OUTPUT_FORMATS",
    "WEIGHT_FORMATS",
    "load_factory",
    "load_weights",
    "apply_weights",
    "save_artifact",
    "load_artifact",
    "sidecar_path",
    "sha256",
    "atomic_write",
    "parse_shape",
    "parse_model_args",
]

log = logging.getLogger(__name__)

WEIGHT_FORMATS = (".pt", ".pth", ".safetensors", ".pt2")
OUTPUT_FORMATS = (".pt2", ".onnx", ".pt", ".safetensors")
SIDECAR_FORMAT = "equivfx-artifact/1"


class CheckpointError(EquivFXError, ValueError):
    """A model, checkpoint or output path is missing, corrupt, of the wrong format or mismatched."""


# ------------------------------------------------------------------------------------ parsing
def parse_shape(text: str) -> tuple[int, ...]:
    """``"2,1,28,28"`` -> ``(2, 1, 28, 28)``.

    Raises:
        CheckpointError: anything but a comma-separated list of positive ints.
    """
    try:
        shape = tuple(int(p) for p in text.replace(" ", "").split(",") if p != "")
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise CheckpointError(
            explain(
                "bad --input-shape",
                text,
                "comma-separated positive ints",
                "e.g. --input-shape 2,1,28,28 (batch first)",
            )
        )
    return shape


def parse_model_args(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``["width=64", "name=resnet"]`` -> ``{"width": 64, "name": "resnet"}`` (Python literals or
    text)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise CheckpointError(
                explain("bad --model-arg", pair, "key=value", "e.g. --model-arg width=64")
            )
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


# ------------------------------------------------------------------------------------ models
def load_factory(spec: str, model_args: dict[str, Any] | None = None) -> nn.Module:
    """Import ``package.module:factory`` and call it with ``model_args``.

    The current directory is importable (as with ``python -m``). The factory may be a function or an
    ``nn.Module`` class.

    Raises:
        CheckpointError: bad spec, module or attribute missing, or the factory does not return a
            Module.
    """
    modname, sep, attr = spec.partition(":")
    if not sep or not modname or not attr:
        raise CheckpointError(
            explain(
                "MODEL must be package.module:factory or an equivfx artifact",
                spec,
                "e.g. mypkg.models:make_net, or a path to a .pt2 artifact with its .json sidecar",
                "write the module path, a colon and the factory name",
            )
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(modname)
    except Exception as err:  # noqa: BLE001 - report any import failure the same way
        raise CheckpointError(
            explain(
                f"cannot import {modname!r} for MODEL {spec!r}",
                f"{type(err).__name__}: {err}",
                "an importable module",
                "run from the folder that contains the package, or install it",
            )
        ) from err
    try:
        factory = getattr(module, attr)
    except AttributeError as err:
        raise CheckpointError(
            explain(
                f"module {modname!r} has no attribute {attr!r}",
                spec,
                "a factory function or nn.Module class",
                f"check the name after the colon ({attr})",
            )
        ) from err
    try:  # the arguments first: a TypeError inside the factory is the factory's own
        inspect.signature(factory).bind(**(model_args or {}))
    except TypeError as err:
        raise CheckpointError(
            explain(
                f"calling {spec} failed",
                str(err),
                "arguments the factory accepts",
                "pass them with --model-arg key=value",
            )
        ) from err
    except ValueError:  # no signature to read (a builtin): calling it will tell
        pass
    model = factory(**(model_args or {}))
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            explain(
                f"{spec} did not return a torch.nn.Module",
                type(model).__name__,
                "an nn.Module",
                "make the factory return the model",
            )
        )
    return model


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(
            explain(f"{what} not found", str(path), "an existing file", "check the path")
        )
    if not path.is_file():
        raise CheckpointError(explain(f"{what} is not a file", str(path), "a file"))


def load_weights(
    path: str | Path, trust_pickle: bool = False
) -> dict[str, torch.Tensor] | nn.Module:
    """Read a checkpoint: a state_dict (``.pt``/``.pth``/``.safetensors``/``.pt2``), or a pickled
    module when ``trust_pickle`` (unpickling runs code, so it is refused otherwise).

    Raises:
        CheckpointError: missing or corrupt file, unknown format, or a pickle without opt-in.
    """
    path = Path(path)
    _require_file(path, "weights file")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_FORMATS:
        raise CheckpointError(
            explain(
                "unknown weights format",
                path.name,
                f"one of {', '.join(WEIGHT_FORMATS)}",
                "save a state_dict with torch.save(model.state_dict(), 'w.pt')",
            )
        )
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                explain(
                    "corrupt safetensors file",
                    f"{path.name}: {err}",
                    "a file written by safetensors.torch.save_file",
                )
            ) from err
    if suffix == ".pt2":
        try:
            ep = torch.export.load(str(path))
        except Exception as err:  # noqa: BLE001 - torch raises many kinds here
            raise CheckpointError(
                explain(
                    "corrupt .pt2 file",
                    f"{path.name}: {err}",
                    "a file written by torch.export.save",
                )
            ) from err
        return dict(ep.state_dict)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        text = str(err)
        if "TorchScript" in text:
            raise CheckpointError(
                explain(
                    "the checkpoint is a TorchScript archive, not a state_dict",
                    path.name,
                    "a state_dict (torch.save(model.state_dict(), ...)), .safetensors or .pt2",
                    "re-save its weights: torch.save(torch.jit.load(path).state_dict(), "
                    "'weights.pt')",
                )
            ) from err
        if "Unsupported global" in text:  # a pickled object (a module ...), not plain tensors
            if not trust_pickle:
                raise CheckpointError(
                    explain(
                        "the checkpoint is a pickled object, not a plain state_dict; unpickling "
                        "runs "
                        "arbitrary code",
                        path.name,
                        "a state_dict (torch.save(model.state_dict(), ...))",
                        "re-save the weights as a state_dict, or pass --trust-pickle if you trust "
                        "the "
                        "file's author",
                    )
                ) from err
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=False)
            except Exception as err2:  # noqa: BLE001
                raise CheckpointError(
                    explain("cannot unpickle the checkpoint", f"{err2}", "a torch.save file")
                ) from err2
        else:
            raise CheckpointError(
                explain("corrupt checkpoint", f"{path.name}: {err}", "a file written by torch.save")
            ) from err
    if isinstance(obj, nn.Module):
        if not trust_pickle:  # pragma: no cover - weights_only refuses modules before this
            raise CheckpointError(explain("a pickled module needs --trust-pickle", path.name))
        return obj
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # the common {"state_dict": ..., "epoch": ...} wrapper
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            explain(
                "the checkpoint is not a state_dict",
                type(obj).__name__,
                "a dict of tensor names to tensors",
                "save model.state_dict()",
            )
        )
    return obj


def apply_weights(model: nn.Module, weights: dict[str, torch.Tensor] | nn.Module) -> nn.Module:
    """Load ``weights`` into ``model`` strictly; mismatched keys and shapes are reported by name."""
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if wrong:
            parts.append(
                "shape mismatch "
                + _few([f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in wrong])
            )
        raise CheckpointError(
            explain(
                "the weights do not match the model",
                "; ".join(parts),
                "the keys and shapes of model.state_dict()",
                "pass the checkpoint of this model (and its --model-arg)",
            )
        )
    model.load_state_dict(weights)
    return model


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ------------------------------------------------------------------------------------ writing
def sidecar_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


@contextlib.contextmanager
def atomic_write(path: str | Path, force: bool = False, inputs: tuple = ()) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success rename it onto ``path``.

    Raises:
        CheckpointError: ``path`` exists (and not ``force``), is one of ``inputs``, or its folder is
            missing or not writable.
    """
    path = Path(path)
    resolved = path.resolve()
    for inp in inputs:
        if inp is not None and Path(inp).resolve() == resolved:
            raise CheckpointError(
                explain(
                    "the output would overwrite an input",
                    str(path),
                    "a new file name",
                    "choose another -o",
                )
            )
    if path.exists() and not force:
        raise CheckpointError(
            explain(
                "the output exists",
                str(path),
                "a new path",
                "pass --force to replace it, or choose another -o",
            )
        )
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointError(
            explain(
                "the output folder does not exist",
                str(folder),
                "an existing folder",
                f"mkdir -p {folder}",
            )
        )
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=folder)
    except OSError as err:
        raise CheckpointError(
            explain(
                "cannot write to the output folder",
                f"{folder}: {err}",
                "a writable folder",
                "choose another -o",
            )
        ) from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _terminate_as_exit():
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def _terminate_as_exit():
    """While an output is written: SIGTERM (a killed CI job, ``timeout``) raises SystemExit
    (status 143), so the half-written temporary file is removed as on Ctrl-C, where by default
    the process died leaving it. Only in the main thread, and only where nobody set a handler."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def exit_(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is exit_:  # not one set meanwhile
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_artifact(
    emodel: nn.Module,
    out: str | Path,
    example: torch.Tensor,
    meta: dict,
    force: bool = False,
    inputs: tuple = (),
) -> dict:
    """Write ``emodel`` to ``out`` (format by extension) and its sidecar ``out.json``.

    Returns:
        The sidecar dict as written.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise CheckpointError(
            explain(
                "unknown output format",
                out.name,
                f"one of {', '.join(OUTPUT_FORMATS)}",
                "e.g. -o model.pt2",
            )
        )
    side = sidecar_path(out)
    if out.exists() and not force:
        raise CheckpointError(
            explain(
                "the output exists",
                str(out),
                "a new path",
                "pass --force to replace it, or choose another -o",
            )
        )
    if side.exists() and not force:
        raise CheckpointError(
            explain(
                "the output's sidecar exists",
                str(side),
                "a new path",
                "pass --force to replace it, or choose another -o",
            )
        )
    emodel = emodel.eval()
    # the sidecar is written (and renamed) inside the artifact's write, so an artifact never lands
    # without its sidecar and a failed write of either leaves neither. (Should the artifact's own
    # final rename fail, a new sidecar would sit beside the old artifact: its sha256 then does
    # not match, and verify refuses the pair.)
    with atomic_write(out, force=force, inputs=inputs) as tmp:
        if suffix == ".pt2":
            _export_pt2(emodel, example, tmp)
        elif suffix == ".onnx":
            _export_onnx(emodel, example, tmp)
        elif suffix == ".pt":
            torch.save(emodel.state_dict(), tmp)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in emodel.state_dict().items()}, str(tmp))
        meta = {"format": SIDECAR_FORMAT, "artifact": out.name, **meta, "sha256": sha256(tmp)}
        with atomic_write(side, force=True, inputs=inputs) as side_tmp:
            side_tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return meta


def _dynamic_batch():
    return torch.export.Dim("batch", min=1, max=1 << 20)


def _export_example(example: torch.Tensor) -> torch.Tensor:
    """The example to export with: torch.export specialises a dimension of size 1 (a batch-1
    example made "Constraints violated (batch)"), so a batch of 1 is traced as 2 copies; the
    artifact still takes any batch from 1 (the dimension's range)."""
    if example.dim() and example.shape[0] == 1:
        return torch.cat([example, example])
    return example


def _export_pt2(emodel: nn.Module, example: torch.Tensor, path: Path) -> None:
    example = _export_example(example)
    # torch.export prints the graph it traced to stderr before raising (40 lines for a model
    # with data-dependent control flow): the error says what failed
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(emodel, (example,), dynamic_shapes=({0: _dynamic_batch()},))
    except Exception as err:  # noqa: BLE001 - torch raises many kinds here
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            explain(
                "torch.export cannot export the compiled model to .pt2",
                f"{type(err).__name__}: {first}",
                "a model torch.export traces (no data-dependent control flow in its leaves)",
                "write .pt or .safetensors instead (the state_dict, rebuilt on loading)",
            )
        ) from err
    torch.export.save(ep, str(path))


def _export_onnx(emodel: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401 - the exporter needs it
    except ImportError as err:
        raise CheckpointError(
            explain(
                "ONNX output needs the onnx extra",
                "onnxscript missing",
                "pip install 'equivfx[onnx]'",
            )
        ) from err
    example = _export_example(example)
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            torch.onnx.export(
                emodel,
                (example,),
                str(path),
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: _dynamic_batch()},),
                dynamo=True,
                verbose=False,
            )
    finally:
        for lg, lv in zip(quiet, levels, strict=True):
            lg.setLevel(lv)


# ------------------------------------------------------------------------------------ reading
def load_sidecar(path: str | Path) -> dict:
    side = sidecar_path(path)
    if not side.exists():
        raise CheckpointError(
            explain(
                "no sidecar beside the artifact",
                str(side),
                f"{side.name}, written by equivfx compile",
                "compile the model with equivfx compile, or give MODEL as "
                "package.module:factory with --group",
            )
        )
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(explain("corrupt sidecar", f"{side.name}: {err}", "JSON")) from err
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(
            explain("not an equivfx sidecar", side.name, f"format {SIDECAR_FORMAT!r}")
        )
    missing = [k for k in ("group", "input_shape") if k not in meta]
    if missing:
        raise CheckpointError(
            explain(
                "the sidecar lacks " + ", ".join(missing),
                side.name,
                "the keys equivfx compile writes",
                "recompile the artifact with equivfx compile",
            )
        )
    shape = meta["input_shape"]
    if not (
        isinstance(shape, list)
        and shape
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise CheckpointError(
            explain(
                "the sidecar's input_shape is not a list of positive ints",
                repr(shape),
                "e.g. [2, 1, 28, 28]",
                "recompile the artifact, or pass --input-shape",
            )
        )
    return meta


class OnnxModule(nn.Module):
    """An onnxruntime session as a module (for verification of .onnx artifacts)."""

    def __init__(self, path: str | Path):
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)


def load_artifact(path: str | Path, rebuild: Callable[[dict], nn.Module] | None = None):
    """Load an artifact this tool wrote: ``(module, sidecar)``.

    ``.pt2`` loads with ``torch.export.load``; ``.onnx`` runs under onnxruntime; ``.pt`` and
    ``.safetensors`` hold the compiled module's state_dict, so ``rebuild(sidecar)`` must recompile
    the
    model (from the factory recorded in the sidecar) for the weights to load into.
    """
    path = Path(path)
    _require_file(path, "artifact")
    meta = load_sidecar(path)
    digest = sha256(path)
    if meta.get("sha256") != digest:  # equivfx writes it always: missing, it was removed
        raise CheckpointError(
            explain(
                "the artifact does not match its sidecar's sha256",
                path.name,
                (str(meta["sha256"])[:16] + "...") if meta.get("sha256") else "no sha256",
                "recompile it; the file or its sidecar changed after equivfx wrote them",
            )
        )
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        try:
            return torch.export.load(str(path)).module(), meta
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(
                explain("corrupt .pt2 artifact", f"{err}", "a torch.export file")
            ) from err
    if suffix == ".onnx":
        return OnnxModule(path), meta
    if rebuild is None:
        raise CheckpointError(
            explain(
                "a state_dict artifact needs its model to verify",
                path.name,
                "a sidecar naming the model factory",
            )
        )
    module = rebuild(meta)
    apply_weights(module, load_weights(path))
    return module, meta
