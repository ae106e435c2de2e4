"""The cost passes' savings against the plain construction (``optimize=False``).

- ``stem-head`` (defer-lift and hoist-projection): input normalisation, batch norm and a 1x1 stem
  (commute with rotations and flips, so they run once before the lift), a 3x3 conv body, global
  pooling, and a wide affine head (runs once on the pooled value instead of |G| times);
- ``deepsets`` (eliminate-dead-slots): phi per set element, a sum over the set, rho; under Perm5
  (120 slots) the lift moves past the sum, G acts trivially there, and one slot is computed;
- ``strip`` (eliminate-dead-slots, a partial kernel): convolutions over 1 x 64 strips under
  Rev@-1 x Rev@-2, whose reversal of the length-1 axis fixes every input: 2 of 4 slots computed;
- ``seq1d`` (eliminate-dead-slots, a subgroup the ops are blind to): ``bench_global.py``'s circular
  1D convolutions and mean over the sequence under ShiftRev4: they commute with every shift and the
  mean is invariant under it, so slots that differ by a shift are equal: 2 of 8 slots computed.
- ``seq1d-flat`` (defer-lift-to-cosets): the same convolutions, then a linear layer over every
  position (no op is invariant under the shifts): the convolutions run on one slot per coset of
  the shifts (2 of 8), and the coset lift after them makes the 8 slots the linear layer reads.
- ``seq1d-res`` (defer-lift-to-cosets through residual blocks): a circular stem and two residual
  blocks of circular convolutions, then a linear layer over every position: the whole residual
  network runs on 2 of 8 slots; under Shift4 (its convolutions commute with every shift) once.
- ``gcnn-chain`` (keep-channel-layout, layer-wise with ``mix_layout="fused"``): a stem, then four
  3x3 convolutions of 16 channels with ReLUs and a max pool between: every fused mixing layer
  moved the slots onto the channel axis and back; with the pass the values between stay there.
- ``gcnn-1x1``: the same with four 1x1 convolutions of 32 channels, where the moves are a larger
  share of each layer.
- ``gcnn-res`` (the same through residual sums): a stem, then four blocks x + relu(conv(x)) at
  16x16: the residual stream is moved onto the channel axis once.
- ``resnet-fused`` (the same through batch norms and shortcuts): ``bench_global.py``'s
  ResNet-style CNN (conv, batch norm, ReLU; identity and 1x1 shortcuts), layer-wise fused.
- ``gmlp-tokens`` (the same for fused linear layers, whose feature layout is (B, ..., |G| F)):
  two residual MLP blocks (64 -> 128 -> 64, GELU) on the 1,024 pixels of a 32x32 image as
  tokens; ``gmlp-flat``: the same blocks (256 -> 512 -> 256) on the flattened image.

Outputs are equal (tested in tests/passes/); this script times them. Both sides fold every slot
into one pass (``chunk=None``: how many slots ``chunk="auto"`` folds is measured at the first call,
and its pick, which ``bench_chunks.py`` judges, would blur what the passes save), and they run in
short blocks, round after round in a shuffled order (``bench_global.paired_ms``): the speed-up is
the median over rounds of the ratio within a round, with its quartiles.

Run: ``python benchmarks/bench_cost_passes.py [--quick] [--json PATH] [--threads 2] [--cases ...]``
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_global import (  # noqa: E402
    ResNetish,
    Seq1d,
    _quartiles,
    paired_ms,
    parse_timing_args,
    timing_parser,
)

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


class DeepSets(nn.Module):
    def __init__(self, features: int = 16, width: int = 256, classes: int = 10):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width))
        self.rho = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        return self.out(self.rho(self.phi(x).sum(1)))


class Strip(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.a = nn.Conv2d(8, width, (1, 5), padding=(0, 2))
        self.b = nn.Conv2d(width, width, (1, 5), padding=(0, 2))
        self.c = nn.Conv2d(width, 10, (1, 5), padding=(0, 2))

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))).mean((2, 3))


class FlatSeq(Seq1d):
    """``Seq1d`` with a linear layer over every position instead of the mean over the sequence."""

    def __init__(self, c: int = 32, classes: int = 10, length: int = 128):
        super().__init__(c, classes)
        self.fc = nn.Linear(c * length, classes)

    def forward(self, x):
        return self.fc(self.net(x).flatten(1))


class ResSeq(nn.Module):
    """Circular convolutions in two residual blocks, then a linear layer over every position."""

    def __init__(self, c: int = 32, classes: int = 10, length: int = 128):
        super().__init__()
        self.stem = nn.Conv1d(8, c, 5, padding=2, padding_mode="circular")
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv1d(c, c, 5, padding=2, padding_mode="circular"),
                nn.ReLU(),
                nn.Conv1d(c, c, 5, padding=2, padding_mode="circular"),
            )
            for _ in range(2)
        )
        self.fc = nn.Linear(c * length, classes)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for block in self.blocks:
            h = torch.relu(h + block(h))
        return self.fc(h.flatten(1))


class GChain(nn.Module):
    def __init__(self, c: int = 16, classes: int = 10, k: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2) for _ in range(4))
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for i, conv in enumerate(self.convs):
            h = torch.relu(conv(h))
            if i == 1:
                h = self.pool(h)
        return self.fc(h.mean((2, 3)))


class GRes(GChain):
    def forward(self, x):
        h = torch.relu(self.stem(x))
        for conv in self.convs:
            h = h + torch.relu(conv(h))
        return self.fc(h.mean((2, 3)))


class GMlp(nn.Module):
    """Residual MLP blocks on the pixels as tokens, (B, 1024, 3) (``tokens=True``), or on the
    flattened image, (B, 3072): linear layers only after the stem."""

    def __init__(self, width: int = 64, hidden: int = 128, classes: int = 10, tokens=True):
        super().__init__()
        self.tokens = tokens
        self.stem = nn.Linear(3 if tokens else 3 * 32 * 32, width)
        self.fc1 = nn.ModuleList(nn.Linear(width, hidden) for _ in range(2))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, width) for _ in range(2))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.stem(x.flatten(2).transpose(1, 2) if self.tokens else x.flatten(1))
        for fc1, fc2 in zip(self.fc1, self.fc2, strict=True):
            h = h + fc2(torch.nn.functional.gelu(fc1(h)))
        return self.head(h.mean(1) if self.tokens else h)


FUSED = {"mode": "layerwise", "mix_layout": "fused"}

CASES = [  # (case, model, group, per-sample shape, compile keywords)
    ("stem-head", StemHead, "C4", (3, 32, 32), {}),
    ("stem-head", StemHead, "D4", (3, 32, 32), {}),
    ("deepsets", DeepSets, "Perm5", (5, 16), {}),
    ("strip", Strip, "Rev@-1xRev@-2", (8, 1, 64), {}),
    ("seq1d", Seq1d, "ShiftRev4", (8, 128), {}),
    ("seq1d-flat", FlatSeq, "ShiftRev4", (8, 128), {}),
    ("seq1d-res", ResSeq, "ShiftRev4", (8, 128), {}),
    ("seq1d-res", ResSeq, "Shift4", (8, 128), {}),
    ("gcnn-chain", GChain, "C4", (3, 32, 32), FUSED),
    ("gcnn-1x1", functools.partial(GChain, 32, k=1), "C4", (3, 32, 32), FUSED),
    ("gcnn-res", GRes, "C4", (3, 16, 16), FUSED),
    ("gcnn-res", GRes, "D4", (3, 16, 16), FUSED),
    ("resnet-fused", ResNetish, "C4", (3, 32, 32), FUSED),
    ("gmlp-tokens", GMlp, "C4", (3, 32, 32), FUSED),
    ("gmlp-flat", functools.partial(GMlp, 256, 512, tokens=False), "C4", (3, 32, 32), FUSED),
]


def main() -> None:
    ap = timing_parser(__doc__)
    ap.add_argument("--cases", nargs="+", choices=sorted({c[0] for c in CASES}), help="only these")
    args = parse_timing_args(ap)
    rows = []
    cases = CASES[1:] if args.quick else CASES
    for case, factory, spec, shape, kw in [c for c in cases if c[0] in (args.cases or [c[0]])]:
        torch.manual_seed(0)
        model = factory().eval()
        for batch in (1, 16):
            x = torch.randn(batch, *shape)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fast = equivfx.compile(model, spec, example_inputs=x, chunk=None, **kw)
                slow = equivfx.compile(
                    model, spec, example_inputs=x, optimize=False, chunk=None, **kw
                )
            fns = {"fast": lambda fast=fast, x=x: fast(x), "slow": lambda slow=slow, x=x: slow(x)}
            with torch.no_grad():
                estimate = {
                    k: benchmark.Timer("fn()", globals={"fn": fn}, num_threads=args.threads)
                    .timeit(5)
                    .mean
                    * 1e3
                    for k, fn in fns.items()
                }
                samples = paired_ms(fns, estimate, 1.0 if args.quick else 4.0)
                diff = float((fast(x) - slow(x)).abs().max())
            ms = {k: statistics.median(v) for k, v in samples.items()}
            speedup = _quartiles(
                [a / b for a, b in zip(samples["slow"], samples["fast"], strict=True)]
            )
            graph = getattr(fast, "equivfx_flat", fast)
            lift = graph.equivfx_lift
            # defer-lift-to-cosets: the slots computed up to the coset lift, then every slot
            first = getattr(graph, "equivfx_lift_cosets", lift)
            row = dict(
                case=case,
                group=spec,
                mode=kw.get("mode", "global"),
                slots_computed=len(first.slots),
                coset_lift=first is not lift,
                slots=lift.group.order,
                batch=batch,
                optimized_ms=ms["fast"],
                plain_ms=ms["slow"],
                speedup=speedup["median"],
                speedup_q1=speedup["q1"],
                speedup_q3=speedup["q3"],
                rounds=len(samples["fast"]),
                max_abs_diff=diff,
            )
            rows.append(row)
            print(
                f"{case} {spec} B={batch} ({len(first.slots)} of {lift.group.order} slots"
                f"{' up to the coset lift' if row['coset_lift'] else ''}): "
                f"plain {ms['slow']:.2f} ms, with cost passes {ms['fast']:.2f} ms, "
                f"speed-up {row['speedup']:.2f}x [{speedup['q1']:.2f}, {speedup['q3']:.2f}] "
                f"(paired, {row['rounds']} rounds), max |difference| {diff:.2g}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"torch": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=2
            )


if __name__ == "__main__":
    main()
