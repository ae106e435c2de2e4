"""Folding all slots against chunk=k and chunk="auto": time.

Time: medians of interleaved ``torch.utils.benchmark`` runs, in the same process, for the
ResNet-style CNN and the small ViT of ``bench_global.py`` at B = 8 and 64 under C4 and D4, against
the hand-written loop over g and the base model folded at |G| B. The ratios the targets are judged
on are paired as in ``bench_global.py`` (``paired_ms``): every variant, and ``chunk="auto"`` a
second time (an A/A control), in short blocks, round after round in a shuffled order; each ratio is
taken within a round, then the median and quartiles over the rounds (``paired`` in the JSON).
Peak memory is not measured: on CPU, a process's peak resident set size (``ru_maxrss``) is set by
importing torch, above any of these forward passes, and torch keeps no CPU allocator statistics.

Run: ``python benchmarks/bench_chunks.py [--quick] [--json PATH] [--threads 2]``
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_global import (  # noqa: E402
    MODELS,
    _quartiles,
    median_ms,
    paired_ms,
    parse_timing_args,
    timing_parser,
)

import equivfx  # noqa: E402


def paired_chunk_ratios(samples: dict) -> dict:
    """Round-by-round ratios against min(loop, base@GB), their quartiles, and the A/A control."""
    rounds = len(samples["auto"])

    def per_round(key):
        return _quartiles(
            [
                samples[key][i] / min(samples["loop"][i], samples["base@GB"][i])
                for i in range(rounds)
            ]
        )

    return dict(
        rounds=rounds,
        auto_over_best=per_round("auto"),
        fold_over_best=per_round("fold all"),
        chunk1_over_best=per_round("chunk=1"),
        a_over_a=_quartiles([samples["auto"][i] / samples["auto (A/A)"][i] for i in range(rounds)]),
    )


def main() -> None:
    args = parse_timing_args(timing_parser(__doc__))
    rows = []
    for name in ("resnet",) if args.quick else ("resnet", "vit"):
        factory, shape, specs = MODELS[name]
        torch.manual_seed(0)
        model = factory().eval()
        for label in ("C4",) if args.quick else ("C4", "D4"):
            G = equivfx.group(specs[label])
            for batch in (8, 64):
                x = torch.randn(batch, *shape)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    variants = {
                        "fold all": equivfx.compile(model, G, example_inputs=x[:2], chunk=None),
                        "chunk=1": equivfx.compile(model, G, example_inputs=x[:2], chunk=1),
                        "auto": equivfx.compile(model, G, example_inputs=x[:2], chunk="auto"),
                    }
                with torch.no_grad():
                    variants["auto"](x)  # the first call measures
                xg = torch.cat([G.act(G.inverse(g), x) for g in G.elements])

                def loop(model=model, G=G, x=x):
                    return torch.stack([model(G.act(G.inverse(g), x)) for g in G.elements]).mean(0)

                env = {
                    **{k.replace("=", "").replace(" ", "_"): v for k, v in variants.items()},
                    "x": x,
                    "xg": xg,
                    "model": model,
                    "loop": loop,
                }
                stmts = {
                    "fold all": "fold_all(x)",
                    "chunk=1": "chunk1(x)",
                    "auto": "auto(x)",
                    "loop": "loop()",
                    "base@GB": "model(xg)",
                }
                timers = {
                    k: benchmark.Timer(s, globals=env, num_threads=args.threads)
                    for k, s in stmts.items()
                }
                with torch.no_grad():
                    ms = median_ms(timers, 3 if args.quick else 7, 0.1 if args.quick else 0.25)
                    calls = {k: (lambda v=v, x=x: v(x)) for k, v in variants.items()}
                    calls["loop"] = loop
                    calls["base@GB"] = lambda model=model, xg=xg: model(xg)
                    samples = paired_ms(
                        {**calls, "auto (A/A)": calls["auto"]},
                        {**ms, "auto (A/A)": ms["auto"]},
                        budget_s=2.0 if args.quick else 6.0,
                    )
                paired = paired_chunk_ratios(samples)
                chosen = sorted(set(variants["auto"].equivfx_chunks.chosen.values()))
                best = min(ms["loop"], ms["base@GB"])
                row = dict(
                    model=name,
                    group=G.spec,
                    batch=batch,
                    ms=ms,
                    auto_chose=chosen,
                    auto_over_best=ms["auto"] / best,
                    fold_over_best=ms["fold all"] / best,
                    paired=paired,
                )
                rows.append(row)
                print(
                    f"{name} {G.spec} B={batch}: "
                    + " ".join(f"{k}={v:.2f}" for k, v in ms.items())
                    + f" | auto chose {chosen}, auto/best={row['auto_over_best']:.2f}, "
                    f"fold/best={row['fold_over_best']:.2f} | paired over {paired['rounds']} "
                    f"rounds: auto/best={paired['auto_over_best']['median']:.3f} "
                    f"A/A={paired['a_over_a']['median']:.3f}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"torch": torch.__version__, "threads": args.threads, "rows": rows}, indent=2
            )
        )


if __name__ == "__main__":
    main()
