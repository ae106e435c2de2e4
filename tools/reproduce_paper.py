"""Reproduce the paper's experiments (arXiv 1906.07172, sections 5-7) on real handwritten digits.

Equivarification versus plain training versus rotation augmentation, on scikit-learn's 1,797 real
8x8 digits (``sklearn.datasets.load_digits``; MNIST, SVHN and CIFAR-10 cannot be downloaded here).
Every model has the same small CNN, the same optimiser and the same step budget, and is trained on
upright digits only; it is then scored on upright, exactly rotated (90/180/270), flipped and
arbitrarily rotated test digits, over several training fractions and seeds.

Input pipeline (the same for every model): each 8x8 digit is zero-padded to 12x12 and upsampled
exactly (nearest, factor 2) to 24x24, so the digit occupies the central 16x16 pixels and survives a
rotation by any angle without clipping (its diagonal, 22.6 px, fits in 24). Multiples of 90 degrees
and flips are exact pixel permutations (``torch.rot90``/``torch.flip``); other angles use bilinear
interpolation (``affine_grid``/``grid_sample``, the same convention as equivfx's C8/C16 actions).

Usage::

    python tools/reproduce_paper.py --json docs/results/results.json --plots docs/results/
    python tools/reproduce_paper.py --quick --json /tmp/quick.json   # CI-sized (about 1-2 min)
    python tools/reproduce_paper.py --render docs/results/results.json  # markdown tables

Output JSON: ``{"dataset": ..., "config": ..., "runs": [{"model", "train_fraction", "seed", "acc":
{"upright", "rot90", "rot180", "rot270", "rotated", "flip_lr", "flip_ud", "flipped",
"angle_0", "angle_15", ..., "angle_345", "angles_mean"}, "train_seconds", ...}]}``; the angle
grid (the costly part) is scored at the largest training fraction only. For the
``equivfx-pose-C4`` model, ``acc`` on upright and exact rotations is the paper's joint
class-and-pose accuracy (class right and decoded pose == the applied rotation); on flips and on
every point of the angle grid (where no C4 pose is correct off the multiples of 90), it is the
class decoded from the same joint argmax (``class_acc`` holds class-only numbers everywhere).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import equivfx  # noqa: E402

K = 10  # classes
SIZE = 24  # network input: 8x8 padded to 12x12, upsampled x2 (nearest)
EXACT_MODELS = ("equivfx-global-C4", "equivfx-layerwise-C4", "equivfx-global-D4", "equivfx-pose-C4")

# name -> (group, mode, readout, augment)
MODELS: dict[str, tuple[str | None, str | None, str, bool]] = {
    "plain": (None, None, "invariant", False),
    "augmented": (None, None, "invariant", True),
    "equivfx-global-C4": ("C4", "global", "invariant", False),
    "equivfx-layerwise-C4": ("C4", "layerwise", "invariant", False),
    "equivfx-global-D4": ("D4", "global", "invariant", False),
    "equivfx-pose-C4": ("C4", "global", "pose", False),
    "equivfx-global-C8": ("C8", "global", "invariant", False),
    "equivfx-global-C16": ("C16", "global", "invariant", False),
}

FULL = {
    "models": list(MODELS),
    "fractions": [1.0, 0.25, 0.1, 0.05],
    "seeds": [0, 1, 2],
    "epochs": 10,  # epochs over the full training set (200 steps); fractions: epochs * fraction,
    "min_steps": 50,  # but at least min_steps (the same for every model at a fraction)
    "angle_step": 15,
    "channels": 16,
}
QUICK = {
    "models": ["plain", "augmented", *EXACT_MODELS, "equivfx-global-C8"],
    "fractions": [1.0, 0.1],
    "seeds": [0],
    "epochs": 8,
    "min_steps": 40,
    "angle_step": 45,
    "channels": 8,
}


# ------------------------------------------------------------------------------------------ data
def prepare(x8: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) -> (N, 1, 24, 24): zero-pad 2 px, then exact nearest upsampling by 2."""
    return F.pad(x8, (2, 2, 2, 2)).repeat_interleave(2, -2).repeat_interleave(2, -1)


def load_data(split_seed: int = 0):
    """The fixed stratified split of equivfx.demo (30% test), prepared to 24x24."""
    from equivfx.demo import load_digits_split

    xtr, ytr, xte, yte = load_digits_split(split_seed)
    return prepare(xtr), ytr, prepare(xte), yte


def subsample(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a stratified subset of the training set (all of it at fraction 1)."""
    if fraction >= 1.0:
        return torch.arange(len(y))
    from sklearn.model_selection import train_test_split

    idx, _ = train_test_split(
        range(len(y)), train_size=fraction, stratify=y.numpy(), random_state=seed
    )
    return torch.as_tensor(sorted(idx))


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Counter-clockwise rotation (torch.rot90's sense): exact at multiples of 90, else bilinear."""
    if degrees % 90 == 0:
        return torch.rot90(x, int(degrees // 90) % 4, (-2, -1))
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    theta = torch.tensor([[[c, -s, 0.0], [s, c, 0.0]]], dtype=x.dtype).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ---------------------------------------------------------------------------------------- models
def make_net(channels: int = 16, seed: int = 0) -> nn.Module:
    """The one architecture: make_cnn's two 3x3 convs, each followed by a 2x2 max-pool (24 -> 6)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 6 * 6, K),
    )


def build(name: str, channels: int, seed: int, example: torch.Tensor) -> nn.Module:
    group, mode, readout, _ = MODELS[name]
    base = make_net(channels, seed)
    if group is None:
        return base
    return equivfx.compile(
        base, group, mode=mode, readout=readout, pool="mean", example_inputs=example
    )


def train(model, x, y, steps: int, seed: int, augment: bool, lr: float = 3e-3, batch: int = 64):
    """Adam on cross-entropy for a fixed number of steps (epochs of reshuffled batches)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    start = time.perf_counter()
    done = 0
    while done < steps:
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            sel = order[i : i + batch]
            xb, yb = x[sel], y[sel]
            if augment:  # random multiples of 90 degrees, per sample
                k = torch.randint(0, 4, (len(sel),), generator=gen)
                xb = torch.stack(
                    [torch.rot90(xi, int(ki), (-2, -1)) for xi, ki in zip(xb, k, strict=True)]
                )
            opt.zero_grad()
            # the pose readout's targets are (identity pose, class): index 0 * K + class = class
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------ evaluation
def test_sets(x: torch.Tensor, angle_step: int | None):
    """(name, images, C4 pose index or None): exact rotations, flips and (optionally) the angle
    grid; grid points at multiples of 90 degrees reuse the exact rotations (images None)."""
    sets = [("upright", x, 0)]
    sets += [(f"rot{90 * k}", torch.rot90(x, k, (-2, -1)), k) for k in (1, 2, 3)]
    sets += [("flip_lr", torch.flip(x, (-1,)), None), ("flip_ud", torch.flip(x, (-2,)), None)]
    for a in range(0, 360, angle_step) if angle_step else ():
        sets.append((f"angle_{a}", None if a % 90 == 0 else rotate(x, a), None))
    return sets


@torch.no_grad()
def evaluate(model, name: str, sets, y: torch.Tensor, batch: int = 256):
    pose = MODELS[name][2] == "pose"
    acc, class_acc = {}, {}
    cache = {}
    for label, xs, k in sets:
        if xs is None:  # angle at a multiple of 90: the exact rotation already scored
            a = int(label.split("_")[1])
            src = "upright" if a == 0 else f"rot{a}"
            acc[label], class_acc[label] = acc_class(cache[src], y, None, pose)
            continue
        logits = torch.cat([model(xs[i : i + batch]) for i in range(0, len(xs), batch)])
        cache[label] = logits
        acc[label], class_acc[label] = acc_class(logits, y, k, pose)
    for d in (acc, class_acc):
        d["rotated"] = sum(d[f"rot{90 * k}"] for k in (1, 2, 3)) / 3
        d["flipped"] = (d["flip_lr"] + d["flip_ud"]) / 2
        angles = [v for key, v in d.items() if key.startswith("angle_")]
        if angles:
            d["angles_mean"] = sum(angles) / len(angles)
    return acc, class_acc


def acc_class(logits, y, k, pose: bool):
    """(metric, class-only accuracy); for the pose readout the metric is joint when k is given."""
    if not pose:
        a = float((logits.argmax(-1) == y).float().mean())
        return a, a
    idx = logits.argmax(-1)
    cls, slot = idx % K, idx // K  # equivfx.decode_pose's rule, vectorised
    c = float((cls == y).float().mean())
    if k is None:
        return c, c
    return float(((cls == y) & (slot == k)).float().mean()), c


# ------------------------------------------------------------------------------------------- run
def run(cfg: dict, log=print) -> dict:
    # one thread: on a shared 2-core machine two threads contend badly (measured: 5-25x slower)
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load_data()
    # the angle grid (the costly part: 24 test sets) is scored at the largest fraction only
    grid_sets = test_sets(xte, cfg["angle_step"])
    exact_sets = test_sets(xte, None)
    full_batches = math.ceil(len(ytr) / 64)
    runs = []
    t0 = time.perf_counter()
    for fraction in cfg["fractions"]:
        for seed in cfg["seeds"]:
            idx = subsample(ytr, fraction, seed)
            steps = max(cfg["min_steps"], round(cfg["epochs"] * full_batches * fraction))
            for name in cfg["models"]:
                model = build(name, cfg["channels"], seed, xte[:2])
                secs = train(model, xtr[idx], ytr[idx], steps, seed, augment=MODELS[name][3])
                sets = grid_sets if fraction == max(cfg["fractions"]) else exact_sets
                acc, class_acc = evaluate(model, name, sets, yte)
                row = {
                    "model": name,
                    "train_fraction": fraction,
                    "seed": seed,
                    "n_train": len(idx),
                    "steps": steps,
                    "acc": acc,
                    "class_acc": class_acc,
                    "train_seconds": round(secs, 3),
                    "parameters": sum(p.numel() for p in model.parameters()),
                }
                runs.append(row)
                log(
                    f"[{time.perf_counter() - t0:6.0f}s] {name:22s} f={fraction:<5} seed={seed} "
                    f"upright={acc['upright']:.3f} rotated={acc['rotated']:.3f} "
                    f"flipped={acc['flipped']:.3f} "
                    f"angles={acc.get('angles_mean', float('nan')):.3f} "
                    f"({secs:.1f}s)"
                )
    return {
        "dataset": f"sklearn load_digits (1,797 real 8x8 digits), stratified 70/30 split "
        f"(random_state=0): {len(ytr)} train / {len(yte)} test; padded to 12x12 and "
        f"upsampled x2 nearest to {SIZE}x{SIZE}",
        "config": {
            **cfg,
            "input_size": SIZE,
            "optimizer": "Adam lr=3e-3, batch 64",
            "architecture": "conv3x3(1,c)-relu-maxpool2-conv3x3(c,2c)-relu-maxpool2-linear",
        },
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "equivfx": getattr(equivfx, "__version__", "?"),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "runs": runs,
    }


# ---------------------------------------------------------------------------------------- report
def _agg(runs, model, fraction, key):
    vals = [r["acc"][key] for r in runs if r["model"] == model and r["train_fraction"] == fraction]
    if not vals:
        return None
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return 100 * statistics.mean(vals), 100 * sd


def _cell(v):
    return "-" if v is None else f"{v[0]:.1f} ± {v[1]:.1f}"


def render(result: dict) -> str:
    """Markdown tables from a results JSON."""
    runs = result["runs"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    fractions = sorted({r["train_fraction"] for r in runs}, reverse=True)
    seeds = sorted({r["seed"] for r in runs})
    top = fractions[0]
    keys = [
        "upright",
        "rot90",
        "rot180",
        "rot270",
        "rotated",
        "flip_lr",
        "flip_ud",
        "flipped",
        "angles_mean",
    ]
    out = [
        f"Accuracy (%) by model and test set, training fraction {top}, mean ± sd over "
        f"{len(seeds)} seed(s):",
        "",
        "| model | " + " | ".join(keys) + " | train s |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for m in models:
        secs = [r["train_seconds"] for r in runs if r["model"] == m and r["train_fraction"] == top]
        out.append(
            f"| {m} | "
            + " | ".join(_cell(_agg(runs, m, top, k)) for k in keys)
            + f" | {statistics.mean(secs):.1f} |"
        )
    angles = _angles(runs, top)
    out += [
        "",
        f"Accuracy (%) by rotation angle (bilinear off the multiples of 90), training "
        f"fraction {top}, mean over seeds:",
        "",
        "| model | " + " | ".join(f"{a}°" for a in angles) + " |",
        "|---" * (len(angles) + 1) + "|",
    ]
    for m in models:
        out.append(
            f"| {m} | "
            + " | ".join(f"{_agg(runs, m, top, f'angle_{a}')[0]:.1f}" for a in angles)
            + " |"
        )
    for key in ("upright", "rotated"):
        out += [
            "",
            f"Accuracy (%) on **{key}** test digits by training fraction (mean ± sd):",
            "",
            "| model | " + " | ".join(f"{f} ({_ntrain(runs, f)} digits)" for f in fractions) + " |",
            "|---" * (len(fractions) + 1) + "|",
        ]
        for m in models:
            out.append(
                f"| {m} | " + " | ".join(_cell(_agg(runs, m, f, key)) for f in fractions) + " |"
            )
    return "\n".join(out) + "\n"


def _angles(runs, fraction):
    row = next(r for r in runs if r["train_fraction"] == fraction)
    return sorted(int(k.split("_")[1]) for k in row["acc"] if k.startswith("angle_"))


def _ntrain(runs, f):
    return next(r["n_train"] for r in runs if r["train_fraction"] == f)


def plot(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    fractions = sorted({r["train_fraction"] for r in runs}, reverse=True)
    top = fractions[0]
    angles = _angles(runs, top)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for m in models:
        ys = [_agg(runs, m, top, f"angle_{a}")[0] for a in angles]
        style = "-" if m in EXACT_MODELS else "--"
        ax.plot([*angles, 360], [*ys, ys[0]], style, marker="o", ms=3, label=m)
    ax.set_xticks(range(0, 361, 45))
    ax.set_xlabel("test rotation angle (degrees; bilinear off multiples of 90)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Trained on upright digits only (sklearn digits, fraction {top})")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    paths.append(out_dir / "accuracy_vs_angle.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, key in zip(axes, ("upright", "rotated"), strict=True):
        for m in models:
            pts = [_agg(runs, m, f, key) for f in fractions]
            ax.errorbar(
                fractions,
                [p[0] for p in pts],
                yerr=[p[1] for p in pts],
                marker="o",
                ms=3,
                capsize=2,
                label=m,
                ls="-" if m in EXACT_MODELS else "--",
            )
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([str(f) for f in fractions])
        ax.set_xlabel("training fraction (log scale)")
        ax.set_title(f"{key} test digits" + (" (mean of 90/180/270)" if key == "rotated" else ""))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%), mean ± sd over seeds")
    axes[0].set_ylim(0, 100)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    paths.append(out_dir / "accuracy_vs_fraction.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run (1 seed, 2 fractions)")
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("--plots", type=Path, help="write PNG plots into this folder (matplotlib)")
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="print markdown tables (and plots with --plots) for an existing JSON",
    )
    p.add_argument("--seeds", type=int, help="override the number of seeds")
    args = p.parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
    else:
        cfg = dict(QUICK if args.quick else FULL)
        if args.seeds:
            cfg["seeds"] = list(range(args.seeds))
        result = run(cfg)
        result["command"] = "python tools/reproduce_paper.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plots:
        for path in plot(result, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    print(render(result))
    print(f"wall time {result['wall_seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
