"""What compile's check of opaque leaves costs: an opaque ResNet-style model, compiled with and
without example inputs.

A leaf module with no op rule (here the whole model: its forward branches on a tensor's value,
so fx cannot trace it) runs on the folded batch; with ``example_inputs`` compile also runs it on
each slot's part of its folded input (and once more from another random seed) to see that it
treats each sample on its own (``equivfx.passes.leaf_check``). This script times
``equivfx.compile`` with and without example inputs (medians of interleaved repeats), the part
of it spent in ``per_slot_difference`` (wrapped and timed), and one folded forward of the model
for scale: the check should cost about two folded forwards (|G| per-slot passes, plus the rerun).

Run: ``python benchmarks/bench_leaf_check.py [--quick] [--json PATH] [--threads N]``
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_global import ResNetish, parse_timing_args, timing_parser  # noqa: E402

import equivfx  # noqa: E402
import equivfx.compiler as compiler  # noqa: E402


class Opaque(nn.Module):
    """The ResNet-style model behind a data-dependent branch: traced as one opaque node."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ResNetish()

    def forward(self, x):
        if x.abs().amax() > 1e9:  # a branch on a tensor's value: fx cannot trace it
            x = x / 2
        return self.net(x)


def main() -> None:
    args = parse_timing_args(timing_parser(__doc__))
    repeats = 2 if args.quick else 5
    spent = {"seconds": 0.0, "calls": 0}
    check = compiler.per_slot_difference

    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return check(*a, **k)
        finally:
            spent["seconds"] += time.perf_counter() - start
            spent["calls"] += 1

    compiler.per_slot_difference = timed
    torch.manual_seed(0)
    model = Opaque().eval()
    x = torch.randn(4, 3, 32, 32)
    rows = []
    for spec in ["C4"] if args.quick else ["C4", "D4"]:
        G = equivfx.group(spec)
        times = {"with examples": [], "without": [], "check": []}
        for _ in range(repeats):  # interleaved
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fallback's warnings
                spent.update(seconds=0.0, calls=0)
                start = time.perf_counter()
                emodel = equivfx.compile(model, G, example_inputs=x)
                times["with examples"].append(time.perf_counter() - start)
                times["check"].append(spent["seconds"])
                start = time.perf_counter()
                equivfx.compile(model, G)
                times["without"].append(time.perf_counter() - start)
        assert emodel.equivfx_info.trace_path == "opaque" and spent["calls"] == 1
        folded_input = torch.cat([G.act(G.inverse(g), x) for g in G.elements])
        with torch.no_grad():
            model(folded_input)
            forwards = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(folded_input)
                forwards.append(time.perf_counter() - start)
        row = {"group": spec, "batch": 4, **{k: statistics.median(v) for k, v in times.items()}}
        row["folded forward"] = statistics.median(forwards)
        row["check / folded forward"] = row["check"] / row["folded forward"]
        rows.append(row)
        print(
            f"opaque ResNet-style {spec} B=4: compile with examples {row['with examples']:.3f} s "
            f"(leaf check {row['check']:.3f} s = {row['check / folded forward']:.2f} folded "
            f"forwards of {row['folded forward']:.3f} s), without {row['without']:.3f} s",
            flush=True,
        )
    if args.json:
        result = {"torch": torch.__version__, "threads": args.threads, "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
