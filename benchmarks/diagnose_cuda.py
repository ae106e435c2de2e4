"""Where a compiled model's time goes on a CUDA device, per call: kernels launched and CPU time.

On a GPU the benchmark's small models are bound by what each call does on the CPU (Python,
dispatch, launches; the GPU waits): ``bench_cuda.py`` measured the compiled model with
``chunk="auto"`` slower than the same model with ``chunk=None`` where the first had chosen to fold
every slot (the same graph). For each variant this prints the kernels one call launches (the
profiler's CUDA events), the CPU time of a call (queued calls, the clock read before the device
is waited for, so the GPU's own time only shows when it is the longer one) and the time of a call
waited for. Also the lift as one gather at any input size (``Lift.GATHER_LIMIT``, tuned on the
CPU, lifts inputs over 32K elements op by op: one kernel per slot and a cat).

Run: ``python benchmarks/diagnose_cuda.py [--model resnet] [--group C4] [--batch 8]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_global import MODELS  # noqa: E402

import equivfx  # noqa: E402


def per_call_ms(fn, calls: int, wait: bool) -> float:
    times = []
    for _ in range(7):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        if wait:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3 / calls)
    return statistics.median(times)


def kernels_per_call(fn) -> int:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if str(e.device_type).endswith("CUDA"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet", choices=list(MODELS))
    ap.add_argument("--group", default="C4", choices=["C4", "D4"])
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    factory, shape, specs = MODELS[args.model]
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = factory().eval().to(device)
    G = equivfx.group(specs[args.group])
    x = torch.randn(args.batch, *shape, device=device)
    xg = torch.cat([G.act(G.inverse(g), x) for g in G.elements])
    glob = equivfx.compile(model, G, example_inputs=x).eval()
    fold = equivfx.compile(model, G, example_inputs=x, chunk=None).eval()
    runner = glob.equivfx_chunks
    gather = equivfx.compile(model, G, example_inputs=x, chunk=None).eval()
    gather.equivfx_lift.GATHER_LIMIT = 1 << 40  # one gather at any size (the CPU's limit off)
    fns = {
        "base@GB": lambda: model(xg),
        "global (auto)": lambda: glob(x),
        "global (chunk=None)": lambda: fold(x),
        "auto's flat graph": lambda: glob.equivfx_flat(x),
        "lift alone": lambda: fold.equivfx_lift(x),
        "global, one-gather lift": lambda: gather(x),
        "one-gather lift alone": lambda: gather.equivfx_lift(x),
        "auto's decision alone": lambda: runner._decided((x,)),
    }
    with torch.no_grad():
        for fn in fns.values():
            fn()
            fn()
        print(
            f"{torch.cuda.get_device_name()} torch {torch.__version__}: {args.model} "
            f"{G.spec} B={args.batch}; chose {sorted(set(runner.chosen.values()))}"
        )
        for name, fn in fns.items():
            print(
                f"{name:24s} kernels {kernels_per_call(fn):4d}  CPU per call "
                f"{per_call_ms(fn, 50, wait=False):.3f} ms  waited "
                f"{per_call_ms(fn, 50, wait=True):.3f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
