"""The exact mixing layer's two memory formats over a grid of shapes: why the layer measures.

For each group (C4, D4), map size (8 to 64) and channel count (8 to 64), at B = 8: the gather
layout's work without autograd, (|G| B, C, H, W) -> gathered (|G| B, |G| C, H, W) in the buffer ->
one convolution to C channels, channels-first (``gather_rows``, then an NCHW convolution) against
channels-last (the input made channels-last, ``gather_channels_last``, an NHWC convolution, the
output made contiguous again). Reported: each format's best time and the median over interleaved
rounds of the channels-last / channels-first ratio. A ratio that moves from well below 1 to well
above it across shapes is why ``GATHER_FORMAT = "auto"`` measures at each layer's first call
instead of following a fixed rule.

Run: ``python benchmarks/mixing_formats.py [--quick] [--json PATH] [--threads 2]``
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_global import parse_timing_args, timing_parser  # noqa: E402
from mixing_layout import report  # noqa: E402

import equivfx  # noqa: E402
from equivfx.passes.mixing import (  # noqa: E402
    gather_channels_last,
    gather_rows,
    release_workspace,
)


def main() -> None:
    args = parse_timing_args(timing_parser(__doc__))
    torch.manual_seed(0)
    sizes = [8, 32] if args.quick else [8, 16, 24, 32, 64]
    channels = [8, 32] if args.quick else [8, 16, 32, 64]
    batch = 8
    rows = []
    for spec in ("C4", "D4"):
        G = equivfx.group(spec)
        n = G.order
        table = torch.tensor(G.table)
        for size in sizes:
            for c in channels:
                s = torch.randn(n * batch, c, size, size)
                w = torch.randn(c, n * c, 3, 3) * 0.05
                b = torch.randn(c)

                def first(s=s, w=w, b=b, table=table):
                    return F.conv2d(gather_rows(s, table, workspace=True), w, b, padding=1)

                def last(s=s, w=w, b=b, table=table):
                    x = s.contiguous(memory_format=torch.channels_last)
                    y = F.conv2d(gather_channels_last(x, table, workspace=True), w, b, padding=1)
                    return y.contiguous()

                samples = {"nchw": [], "nhwc": []}
                with torch.no_grad():
                    torch.testing.assert_close(last(), first(), rtol=1e-4, atol=1e-4)
                    t = time.perf_counter()
                    first()
                    reps = max(1, round(0.05 / max(time.perf_counter() - t, 1e-5)))
                    for r in range(3 if args.quick else 5):
                        for name, fn in (("nchw", first), ("nhwc", last))[:: 1 if r % 2 else -1]:
                            t = time.perf_counter()
                            for _ in range(reps):
                                fn()
                            samples[name].append((time.perf_counter() - t) / reps * 1e3)
                release_workspace()
                ratio = statistics.median(
                    a / b for a, b in zip(samples["nhwc"], samples["nchw"], strict=True)
                )
                row = dict(
                    group=spec,
                    batch=batch,
                    channels=c,
                    size=size,
                    nchw_ms=min(samples["nchw"]),
                    nhwc_ms=min(samples["nhwc"]),
                    nhwc_over_nchw=ratio,
                )
                rows.append(row)
                print(
                    f"{spec} B={batch} C={c:2d} {size}x{size}: channels-first "
                    f"{row['nchw_ms']:.3f} ms, channels-last {row['nhwc_ms']:.3f} ms, "
                    f"last / first = {ratio:.2f}",
                    flush=True,
                )
    report(rows, args.threads, args.json)


if __name__ == "__main__":
    main()
