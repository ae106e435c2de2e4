"""The main job on an embedded default: scikit-learn's handwritten digits, trained upright only.

A small CNN, the same CNN compiled for C4 in global mode and in layer-wise mode, each trained
briefly on
upright digits (``sklearn.datasets.load_digits``: 1,797 real 8x8 images, shipped with the package),
then
evaluated on upright and on rotated test digits. Rotations by multiples of 90 degrees are exact on
the
pixel grid, so the compiled models keep their accuracy on rotated digits by construction, while the
plain CNN collapses: the paper's experiment (MNIST, C4, trained upright) in miniature.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["make_cnn", "load_digits_split", "train", "accuracy", "run_demo", "DemoResult"]


def make_cnn(channels: int = 16, classes: int = 10, seed: int = 0) -> nn.Module:
    """The demo's CNN for 8x8 digits: two 3x3 convs, a 2x2 max-pool and a linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 4 * 4, classes),
    )


def load_digits_split(seed: int = 0, test_fraction: float = 0.3):
    """scikit-learn's digits as float tensors in [0, 1], (N, 1, 8, 8), with a stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, stratify=data.target, random_state=seed)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return x[tr], y[tr], x[te], y[te]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int = 0,
    lr: float = 3e-3,
    batch: int = 64,
    on_step: Callable[[], None] | None = None,
) -> float:
    """Adam on cross-entropy; returns the training time in seconds."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            sel = order[i : i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[sel]), y[sel]).backward()
            opt.step()
            if on_step is not None:
                on_step()
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


def rotation_accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    acc = {"upright": accuracy(model, x, y)}
    for k in (1, 2, 3):
        acc[f"rot{90 * k}"] = accuracy(model, torch.rot90(x, k, (-2, -1)), y)
    acc["rotated"] = sum(acc[f"rot{90 * k}"] for k in (1, 2, 3)) / 3
    return acc


@dataclass
class DemoResult:
    rows: list[dict] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_demo(epochs: int = 12, seed: int = 0, out_dir=None, progress=None) -> DemoResult:
    """Train and evaluate the three models; write .pt2 artifacts to ``out_dir`` when given.

    Args:
        epochs: training epochs for every model (the same budget for each).
        seed: seeds the split, the initialisation and the batch order.
        out_dir: a folder for the artifacts (``plain.pt``, ``global-C4.pt2``, ``layerwise-C4.pt2``
            with their sidecars, and ``results.json``).
        progress: a ``rich.progress.Progress`` to report on, or None.
    """
    import equivfx
    from equivfx.checkpoints import save_artifact

    start = time.perf_counter()
    xtr, ytr, xte, yte = load_digits_split(seed)
    steps = epochs * ((len(ytr) + 63) // 64)
    specs = [
        ("plain CNN", None, None),
        ("equivfx global C4", "global", "equivfx-global-C4"),
        ("equivfx layer-wise C4", "layerwise", "equivfx-layerwise-C4"),
    ]
    result = DemoResult()
    example = xte[:2]
    for label, mode, name in specs:
        base = make_cnn(seed=seed)
        model = (
            base if mode is None else equivfx.compile(base, "C4", mode=mode, example_inputs=example)
        )
        task = progress.add_task(f"train {label}", total=steps) if progress else None
        seconds = train(
            model,
            xtr,
            ytr,
            epochs,
            seed=seed,
            on_step=(lambda t=task: progress.advance(t)) if progress else None,
        )
        acc = rotation_accuracies(model, xte, yte)
        if progress:
            vtask = progress.add_task(f"verify {label}", total=1)
        report = equivfx.verify(model, xte[:16], group="C4")
        if progress:
            progress.advance(vtask)
        row = {
            "model": label,
            **acc,
            "train_seconds": seconds,
            "invariant": report.ok,
            "max_error": report.max_error,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        result.rows.append(row)
        if out_dir is not None:
            if mode is None:
                path = out_dir / "plain-cnn.pt"
                from equivfx.checkpoints import atomic_write

                with atomic_write(path) as tmp:
                    torch.save(model.state_dict(), tmp)
            else:
                path = out_dir / f"{name}.pt2"
                save_artifact(
                    model,
                    path,
                    example,
                    {
                        "group": "C4",
                        "mode": mode,
                        "readout": "invariant",
                        "pool": "mean",
                        "output_action": None,
                        "input_shape": list(example.shape),
                        "model": "equivfx.demo:make_cnn",
                        "model_args": {"seed": seed},
                        "source_sha256": None,
                        "equivfx_version": equivfx.__version__,
                        "torch_version": torch.__version__,
                        "verified": {
                            "ok": report.ok,
                            "max_error": report.max_error,
                            "rtol": report.rtol,
                            "atol": report.atol,
                        },
                    },
                )
            result.artifacts.append(str(path))
    result.seconds = time.perf_counter() - start
    return result
