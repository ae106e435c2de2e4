"""The exact layer-wise model's first call and its mixing layers' two savings, measured.

For the ResNet-style CNN of ``bench_global.py`` compiled with ``mode="layerwise"`` (default gather
layout) under C4 and D4 at B = 8 and 64, without autograd:

- first call: a freshly compiled model's first forward, in which every 2D mixing layer times its
  convolution channels-first and channels-last (``GATHER_FORMAT = "auto"``), and the formats
  the layers chose;
- then, medians of interleaved single forwards (5 rounds) of the same model with the format
  measured (``"auto"``), fixed channels-first (``"nchw"``), and channels-first with every gather
  in one tensor however large (``slots_per_gather`` forced to |G|: the layer before gathers past
  the buffer's limit went a few slots at a time).

Run: ``python benchmarks/diagnose_layerwise.py [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_global import MODELS  # noqa: E402

import equivfx  # noqa: E402
import equivfx.passes.mixing as mixing  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    factory, shape, _ = MODELS["resnet"]
    torch.manual_seed(0)
    model = factory().eval()
    in_parts = mixing.slots_per_gather
    for spec, batch in (("C4", 8), ("D4", 8), ("C4", 64), ("D4", 64)):
        G = equivfx.group(spec)
        x = torch.randn(batch, *shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layerwise = equivfx.compile(model, G, mode="layerwise", example_inputs=x[:2]).eval()
        variants = {"auto": ("auto", in_parts), "nchw": ("nchw", in_parts)}
        variants["nchw, one gather"] = ("nchw", lambda order, x: order)
        times: dict[str, list[float]] = {k: [] for k in variants}
        try:
            with torch.no_grad():
                t = time.perf_counter()
                layerwise(x)
                first = time.perf_counter() - t
                chosen = sorted(
                    {
                        f
                        for m in layerwise.modules()
                        if isinstance(m, mixing.MixingConv2d)
                        for f in m.formats.values()
                    }
                )
                for _ in range(5):
                    for name, (fmt, parts) in variants.items():
                        mixing.GATHER_FORMAT, mixing.slots_per_gather = fmt, parts
                        layerwise(x)  # warm: the allocator and the buffer
                        t = time.perf_counter()
                        layerwise(x)
                        times[name].append((time.perf_counter() - t) * 1e3)
        finally:
            mixing.GATHER_FORMAT, mixing.slots_per_gather = "auto", in_parts
            mixing.release_workspace()
        ms = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"ResNet layer-wise {spec} B={batch}: first call {first:.2f} s (formats chosen: "
            f"{'/'.join(chosen)}); per forward: measured format {ms['auto']:.1f} ms, "
            f"channels-first {ms['nchw']:.1f} ms, channels-first in one gather "
            f"{ms['nchw, one gather']:.1f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
