"""What the compiled global model does beyond folding the slots by hand: two diagnostics.

1. Kernel time: ``torch.profiler`` over 20 forwards of the ResNet-style CNN of ``bench_global.py``
   (C4, B = 8), the base model on the pre-built |G| B batch against the compiled model
   (``chunk=None``): total self CPU time of all aten ops, the least of 5 interleaved rounds. Equal
   totals mean the compiled model runs the same kernels; what wall-clock ratios show beyond that is
   Python overhead or noise.
2. The chunk wrapper: the 1D model at B = 1 compiled with ``chunk="auto"`` (which then chooses to
   fold every slot and calls the flat graph) against ``chunk=None`` (the flat graph itself), medians
   of interleaved runs: the wrapper's own cost.

Run: ``python benchmarks/diagnose_overhead.py [--threads 2]``
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_global import MODELS, median_ms  # noqa: E402

import equivfx  # noqa: E402


def kernel_time(threads: int) -> dict:
    factory, shape, _ = MODELS["resnet"]
    torch.manual_seed(0)
    model = factory().eval()
    G = equivfx.group("C4")
    x = torch.randn(8, *shape)
    xg = torch.cat([G.act(G.inverse(g), x) for g in G.elements])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emodel = equivfx.compile(model, G, example_inputs=x, chunk=None)
    out = {"base@GB": [], "compiled": []}
    with torch.no_grad():
        for _ in range(5):  # warm up both
            model(xg), emodel(x)
        for _ in range(5):  # interleaved rounds; each variant's least total (noise only adds)
            for name, fn in [("base@GB", lambda: model(xg)), ("compiled", lambda: emodel(x))]:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(20):
                        fn()
                out[name].append(sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3)
    return {k: min(v) for k, v in out.items()}


def wrapper_cost(threads: int) -> dict:
    factory, shape, specs = MODELS["seq1d"]
    torch.manual_seed(0)
    model = factory().eval()
    G = equivfx.group(specs["C4"])
    x = torch.randn(1, *shape)
    auto = equivfx.compile(model, G, example_inputs=x)
    flat = equivfx.compile(model, G, example_inputs=x, chunk=None)
    with torch.no_grad():
        auto(x)  # the first call measures
    chose = sorted(set(auto.equivfx_chunks.chosen.values()))
    env = dict(auto=auto, flat=flat, x=x)
    timers = {
        k: benchmark.Timer(f"{k}(x)", globals=env, num_threads=threads) for k in ("auto", "flat")
    }
    with torch.no_grad():
        ms = median_ms(timers, 9, 0.2)
    return dict(chose=chose, **ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    k = kernel_time(args.threads)
    print(
        f"ResNet C4 B=8, 20 forwards, aten self CPU time: base@GB {k['base@GB']:.1f} ms, "
        f"compiled {k['compiled']:.1f} ms ({k['compiled'] / k['base@GB']:.3f}x)",
        flush=True,
    )
    w = wrapper_cost(args.threads)
    print(
        f"1D model Shift4 B=1: chunk='auto' (chose {w['chose']}) {w['auto'] * 1e3:.0f} us, "
        f"chunk=None {w['flat'] * 1e3:.0f} us: the wrapper costs "
        f"{(w['auto'] - w['flat']) * 1e3:.0f} us",
        flush=True,
    )


if __name__ == "__main__":
    main()
