"""Mixing-layer layouts against one convolution of the same shape on a ready-made input.

All compute out(g) = sum_u W_u * s(g u) for every slot g without a Python loop over slots:

- gather (``mix_layout="gather"``, the default, :class:`equivfx.passes.mixing.MixingConv2d`
  with ``layout="gather"``): index the folded slots with the Cayley table T[g][u] into
  (|G| B, |G| C, H, W) in one copy, then one convolution with |G| C input channels; bitwise
  equivariant (every slot sums its blocks in the order of u). Without autograd the copy goes to
  a per-thread buffer kept between calls, in the memory format the layer measured faster at its
  first call (``GATHER_FORMAT = "auto"``: channels-first or channels-last, reported per row);
- gather, channels-first: the same layer with ``GATHER_FORMAT = "nchw"``;
- gather, fresh copy: the same gather into a new tensor at every call (what the layer does while
  autograd records, and what it did before the buffer);
- fused (``mix_layout="fused"``, :class:`equivfx.passes.mixing.MixingConv2d`): move the slots onto
  the channel axis once, (B, |G| C, H, W), and convolve with the |G| x |G| block weight
  [W_(g^-1 v)]: no permuted copy; equivariant up to float rounding;
- fused, kept layout: the fused layer as ``keep-channel-layout`` calls it between two fused layers
  (``channels_in=True, channels_out=True``): its input already (B, |G| C, H, W), its output left
  there: one convolution with the block weight;
- blocks: one convolution of the unpermuted slots with the |G| blocks stacked as output channels
  (|G| Cout), then a gather-and-sum of the diagonal Y[T[g][u], u].

The target (issue 6): a mixing layer within 10 % of one convolution of the same shape (the
gathered input, (|G| B, |G| C, H, W) -> (|G| B, Cout, H, W), already in memory).

Run: python benchmarks/mixing_layout.py [--quick] [--json PATH]
Threads are pinned (torch.set_num_threads) and named in the output; timings are medians of
interleaved torch.utils.benchmark runs; ratios are taken within each round (paired), then the
median over the rounds.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_global import parse_timing_args, timing_parser  # noqa: E402

import equivfx  # noqa: E402
import equivfx.passes.mixing as mixing  # noqa: E402
from equivfx.passes.mixing import (  # noqa: E402
    SlotGather,
    channels_to_slots,
    slots_to_channels,
    widen,
)


def blocks_mix(s, weight_blocks, bias, table, n):
    """out(g) = sum_u W_u * s(g u) as one conv with n*Cout outputs and a diagonal gather-sum."""
    cout = weight_blocks.shape[0] // n
    y = F.conv2d(s, weight_blocks, None, padding=1)  # (n B, n_u Cout, H, W): W_u * s(v)
    y = y.unflatten(0, (n, -1)).unflatten(2, (n, cout))  # (n_v, B, n_u, Cout, H, W)
    y = y.movedim(2, 1)  # (n_v, n_u, B, Cout, H, W)
    u = torch.arange(n)
    out = y[table, u[None, :]].sum(1)  # (n_g, B, Cout, H, W)
    return (out + bias.view(1, 1, -1, 1, 1)).flatten(0, 1)


def report(rows: list[dict], threads: int, path: str | None) -> None:
    """Print the run's machine and torch build, and write it with ``rows`` to ``path`` (JSON)."""
    meta = dict(
        torch=torch.__version__,
        threads=threads,
        machine=platform.machine(),
        processor=platform.processor() or platform.platform(),
    )
    print(json.dumps(meta))
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


def channels_first(layer, s):
    """``layer(s)`` with the gather's memory format fixed to channels-first."""
    mixing.GATHER_FORMAT = "nchw"
    try:
        return layer(s)
    finally:
        mixing.GATHER_FORMAT = "auto"


def main() -> None:
    args = parse_timing_args(timing_parser(__doc__))
    torch.manual_seed(0)
    configs = [
        ("C4", 8, 16, 16),
        ("D4", 8, 16, 16),
        ("C4", 32, 32, 16),
        ("D4", 8, 32, 16),
        ("C4", 8, 64, 16),
        ("D4", 8, 64, 16),
        ("C4", 8, 16, 32),  # the size of the ResNet-style CNN's first mixing layers
        ("D4", 8, 16, 32),
    ]
    if args.quick:
        configs = configs[:2]
    rows = []
    for spec, batch, channels, size in configs:
        G = equivfx.group(spec)
        n = G.order
        s = torch.randn(n * batch, channels, size, size)
        w = torch.randn(channels, n * channels, 3, 3) * 0.05  # the widened weight, blocks on dim 1
        b = torch.randn(channels)
        gather = SlotGather(G, 1)
        table = torch.tensor(G.table)
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        layer = widen(conv, n, group=G, layout="gather")
        layer_cf = widen(conv, n, group=G, layout="gather")
        fused = widen(conv, n, group=G)
        wb = w.unflatten(1, (n, channels)).transpose(0, 1).flatten(0, 1)  # (n Cout, C, 3, 3)
        ref = F.conv2d(gather(s), w, b, padding=1)
        got = blocks_mix(s, wb, b, table, n)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            for m in (layer, layer_cf, fused):
                m.weight.copy_(w)
                m.bias.copy_(b)
            torch.testing.assert_close(fused(s), ref, rtol=1e-4, atol=1e-4)
            kept = slots_to_channels(s, n)  # the layout between fused layers
            out = fused(kept, channels_in=True, channels_out=True)
            torch.testing.assert_close(channels_to_slots(out, n), ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(layer(s), ref, rtol=1e-4, atol=1e-4)  # measures its format
            assert torch.equal(channels_first(layer_cf, s), ref)
        chosen = sorted(set(layer.formats.values()))
        g_ = {"gather": gather, "s": s, "w": w, "b": b, "F": F}
        b_ = {"blocks_mix": blocks_mix, "s": s, "wb": wb, "b": b, "table": table, "n": n}
        wide_input = gather(s).contiguous()  # a tensor of the mixing layer's input shape
        g_["wide_input"] = wide_input
        t_single = benchmark.Timer(
            "F.conv2d(wide_input, w, b, padding=1)", globals=g_, num_threads=args.threads
        )
        t_fresh = benchmark.Timer(
            "F.conv2d(gather(s), w, b, padding=1)", globals=g_, num_threads=args.threads
        )
        t_gather = benchmark.Timer(
            "layer(s)", globals={"layer": layer, "s": s}, num_threads=args.threads
        )
        t_gather_cf = benchmark.Timer(
            "channels_first(layer, s)",
            globals={"channels_first": channels_first, "layer": layer_cf, "s": s},
            num_threads=args.threads,
        )
        t_blocks = benchmark.Timer(
            "blocks_mix(s, wb, b, table, n)", globals=b_, num_threads=args.threads
        )
        t_fused = benchmark.Timer(
            "fused(s)", globals={"fused": fused, "s": s}, num_threads=args.threads
        )
        t_fused_kept = benchmark.Timer(
            "fused(kept, channels_in=True, channels_out=True)",
            globals={"fused": fused, "kept": kept},
            num_threads=args.threads,
        )
        timers = {
            "gather": t_gather,
            "gather_cf": t_gather_cf,
            "fresh": t_fresh,
            "blocks": t_blocks,
            "single": t_single,
            "fused": t_fused,
            "fused_kept": t_fused_kept,
        }
        medians = {k: [] for k in timers}
        with torch.no_grad():
            for _ in range(3 if args.quick else 7):  # interleaved
                for k, t in timers.items():
                    medians[k].append(t.blocked_autorange(min_run_time=0.2).median)
        mg, mr, mb, ms, mf = (
            statistics.median(medians[k]) for k in ("gather", "fresh", "blocks", "single", "fused")
        )

        def paired(k, medians=medians):  # the ratio to one conv in each round, median of rounds
            return statistics.median(
                a / b for a, b in zip(medians[k], medians["single"], strict=True)
            )

        row = dict(
            group=spec,
            batch=batch,
            channels=channels,
            size=size,
            gather_ms=mg * 1e3,
            gather_format=chosen,
            gather_channels_first_ms=statistics.median(medians["gather_cf"]) * 1e3,
            gather_fresh_ms=mr * 1e3,
            blocks_ms=mb * 1e3,
            single_conv_ms=ms * 1e3,
            fused_ms=mf * 1e3,
            blocks_over_gather=mb / mg,
            gather_over_single_conv=paired("gather"),
            gather_channels_first_over_single_conv=paired("gather_cf"),
            gather_fresh_over_single_conv=paired("fresh"),
            fused_over_single_conv=paired("fused"),
            fused_kept_ms=statistics.median(medians["fused_kept"]) * 1e3,
            fused_kept_over_single_conv=paired("fused_kept"),
        )
        rows.append(row)
        print(
            f"{spec} B={batch} C={channels} {size}x{size}: gather {mg * 1e3:.2f} ms "
            f"({'/'.join(chosen)}; channels-first "
            f"{row['gather_channels_first_ms']:.2f}, fresh copy {mr * 1e3:.2f}), "
            f"fused {mf * 1e3:.2f} ms, blocks {mb * 1e3:.2f} ms, "
            f"one conv of the same shape {ms * 1e3:.2f} ms; per round: gather/single = "
            f"{row['gather_over_single_conv']:.2f}, channels-first/single = "
            f"{row['gather_channels_first_over_single_conv']:.2f}, fresh/single = "
            f"{row['gather_fresh_over_single_conv']:.2f}, fused/single = "
            f"{row['fused_over_single_conv']:.2f}, fused in the kept layout/single = "
            f"{row['fused_kept_over_single_conv']:.2f}",
            flush=True,
        )
    report(rows, args.threads, args.json)


if __name__ == "__main__":
    main()
