"""The cost passes' savings: defer-lift and hoist-projection against the plain construction.

A model where both apply: input normalisation, batch norm and a 1x1 stem (commute with rotations and
flips, so they run once before the lift), a 3x3 conv body, global pooling, and a wide affine head
(runs once on the pooled value instead of |G| times). Outputs are equal (tested in
tests/passes/test_cost_passes.py); this script times them.

Run: ``python benchmarks/bench_cost_passes.py [--json PATH] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_global import median_ms  # noqa: E402

import equivfx  # noqa: E402


class StemHead(nn.Module):
    def __init__(self, width: int = 32, hidden: int = 1024, classes: int = 100):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.stem = nn.Conv2d(3, width, 1)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = torch.relu(self.stem(self.bn((x - 0.5) * 2)))
        x = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.fc3(self.fc2(self.fc1(x)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = StemHead().eval()
    rows = []
    for spec in ("C4", "D4"):
        for batch in (1, 16):
            x = torch.randn(batch, 3, 32, 32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fast = equivfx.compile(model, spec, example_inputs=x)
                slow = equivfx.compile(model, spec, example_inputs=x, optimize=False)
            env = dict(fast=fast, slow=slow, x=x)
            timers = {
                k: benchmark.Timer(f"{k}(x)", globals=env, num_threads=args.threads)
                for k in ("fast", "slow")
            }
            with torch.no_grad():
                ms = median_ms(timers, 7, 0.25)
                diff = float((fast(x) - slow(x)).abs().max())
            row = dict(
                group=spec,
                batch=batch,
                optimized_ms=ms["fast"],
                plain_ms=ms["slow"],
                speedup=ms["slow"] / ms["fast"],
                max_abs_diff=diff,
            )
            rows.append(row)
            print(
                f"{spec} B={batch}: plain {ms['slow']:.2f} ms, with cost passes {ms['fast']:.2f} "
                f"ms, speed-up {row['speedup']:.2f}x, max |difference| {diff:.2g}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"torch": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=2
            )


if __name__ == "__main__":
    main()
