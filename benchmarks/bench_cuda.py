"""What a compiled model costs on a CUDA device, against what users would write instead.

The same models, groups and batch sizes as ``bench_global.py`` (a ResNet-style CNN and a small ViT
at 32x32, a 1D sequence model; C4 and D4, or Shift4 and ShiftRev4 for the sequences; B = 1, 8, 64)
and the same variants: ``base@B``, ``base@GB`` (the |G| passes folded into a batch built
beforehand), ``fold-by-hand`` (build that batch from x, run, pool), ``loop`` (the hand-written loop
over g), ``global`` (``chunk="auto"``, measured on the device at its first call), ``global-fold``
(``chunk=None``), ``layerwise`` and ``layerwise-fused``. Every variant runs in short blocks, round
after round in a shuffled order, the device synchronised at the end of each block (kernels run
asynchronously: a clock read without waiting measures how long they took to queue); per-variant
medians and round-by-round ratios, with ``global`` timed twice as an A/A control. Peak memory:
``torch.cuda.max_memory_allocated`` over one call of each variant, above what was allocated before
it (inputs and weights).

TF32 stays at PyTorch's defaults (on for cuDNN convolutions, off for matrix products). This
script does not run in CI (CI has no GPU); its figures come from the GPU machine some tasks are
lent, named in the output.

Also (``--part torch-compile``): ``torch.compile(mode="reduce-overhead")`` of the compiled model
against the same of the base model at batch |G| B.

Run: ``python benchmarks/bench_cuda.py [--quick] [--json PATH] [--part latency|torch-compile|all]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_global import MODELS, _quartiles, paired_ms, paired_ratios  # noqa: E402

import equivfx  # noqa: E402
from equivfx.passes.modules import synchronize  # noqa: E402

VARIANTS = [
    "base@B",
    "base@GB",
    "fold-by-hand",
    "loop",
    "global",
    "global (A/A)",
    "global-fold",
    "layerwise",
    "layerwise-fused",
]


def _paired_on(device: torch.device, fns: dict, quick: bool) -> dict:
    """``paired_ms`` of ``fns`` (warmed up), the device waited for at the end of each block; a
    first estimate of each from 5 calls."""
    estimate = {}
    for k, fn in fns.items():
        t = time.perf_counter()
        for _ in range(5):
            fn()
        synchronize({device})
        estimate[k] = (time.perf_counter() - t) * 1e3 / 5
    return paired_ms(
        fns,
        estimate,
        budget_s=1.0 if quick else 4.0,
        block_s=0.02,
        sync=lambda: synchronize({device}),
    )


def _peak_mib(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def bench(quick: bool, device: torch.device) -> list[dict]:
    rows = []
    for name, (factory, shape, specs) in MODELS.items():
        torch.manual_seed(0)
        model = factory().eval().to(device)
        for label in ["C4", "D4"]:
            G = equivfx.group(specs[label])
            for B in [1, 8, 64]:
                x = torch.randn(B, *shape, device=device)
                xg = torch.cat([G.act(G.inverse(g), x) for g in G.elements])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    glob = equivfx.compile(model, G, example_inputs=x).eval()
                    fold = equivfx.compile(model, G, example_inputs=x, chunk=None).eval()
                    layer = equivfx.compile(model, G, mode="layerwise", example_inputs=x).eval()
                    fused = equivfx.compile(
                        model, G, mode="layerwise", mix_layout="fused", example_inputs=x
                    ).eval()

                def loop(model=model, G=G, x=x):
                    return torch.stack([model(G.act(G.inverse(g), x)) for g in G.elements]).mean(0)

                def by_hand(model=model, G=G, x=x):
                    xs = torch.cat([G.act(G.inverse(g), x) for g in G.elements])
                    return model(xs).unflatten(0, (G.order, -1)).mean(0)

                fns = {
                    "base@B": lambda model=model, x=x: model(x),
                    "base@GB": lambda model=model, xg=xg: model(xg),
                    "fold-by-hand": by_hand,
                    "loop": loop,
                    "global": lambda m=glob, x=x: m(x),
                    "global (A/A)": lambda m=glob, x=x: m(x),
                    "global-fold": lambda m=fold, x=x: m(x),
                    "layerwise": lambda m=layer, x=x: m(x),
                    "layerwise-fused": lambda m=fused, x=x: m(x),
                }
                with torch.no_grad():
                    for fn in fns.values():  # warm-up; chunk="auto" and the mixing layers measure
                        fn()
                    synchronize({device})
                    samples = _paired_on(device, fns, quick)
                    peak = {k: _peak_mib(fns[k], device) for k in VARIANTS if "A/A" not in k}
                chunks = getattr(glob, "equivfx_chunks", None)
                chose = sorted(set(chunks.chosen.values())) if chunks is not None else None
                ms = {k: statistics.median(v) for k, v in samples.items()}
                row = dict(  # rounds, global_over_best, global_over_by_hand, a_over_a
                    model=name,
                    group=G.spec,
                    batch=B,
                    ms=ms,
                    peak_mib=peak,
                    auto_chose=chose,
                    **paired_ratios(samples),
                )
                rows.append(row)
                print(
                    f"{name:7s} {G.spec:9s} B={B:<3d} "
                    + " ".join(f"{k}={v:.3f}" for k, v in ms.items())
                    + f" | chose={chose} | paired over {row['rounds']} rounds: global/best="
                    f"{row['global_over_best']['median']:.3f} global/by-hand="
                    f"{row['global_over_by_hand']['median']:.3f} A/A="
                    f"{row['a_over_a']['median']:.3f} | peak MiB "
                    + " ".join(f"{k}={v:.1f}" for k, v in peak.items() if v is not None),
                    flush=True,
                )
    return rows


TORCH_COMPILE_CASES = [("resnet", "C4", 8), ("vit", "D4", 1), ("seq1d", "D4", 8)]


def bench_torch_compile(quick: bool, device: torch.device, out: Path | None) -> list[dict]:
    """``torch.compile(mode="reduce-overhead")`` (CUDA graphs: one launch per forward) of the
    compiled global model and of the base model at batch |G| B, paired as above: on a GPU the
    small models here are bound by the Python and launches of each call, which CUDA graphs
    remove."""
    rows = []
    for name, label, B in TORCH_COMPILE_CASES:
        factory, shape, specs = MODELS[name]
        torch.manual_seed(0)
        model = factory().eval().to(device)
        G = equivfx.group(specs[label])
        x = torch.randn(B, *shape, device=device)
        xg = torch.cat([G.act(G.inverse(g), x) for g in G.elements])
        glob = equivfx.compile(model, G, example_inputs=x).eval()
        t = time.perf_counter()
        with torch.no_grad():
            cglob = torch.compile(glob, mode="reduce-overhead")
            cbase = torch.compile(model, mode="reduce-overhead")
            for _ in range(3):  # compile, record the graph, replay
                diff = (cglob(x) - glob(x)).abs().max().item()
                cbase(xg)
            synchronize({device})
            first = time.perf_counter() - t
            fns = {
                "global": lambda m=glob, x=x: m(x),
                "base@GB": lambda m=model, xg=xg: m(xg),
                "compiled global": lambda m=cglob, x=x: m(x),
                "compiled global (A/A)": lambda m=cglob, x=x: m(x),
                "compiled base@GB": lambda m=cbase, xg=xg: m(xg),
            }
            samples = _paired_on(device, fns, quick)
        n = len(samples["global"])
        ratio = [samples["compiled global"][i] / samples["compiled base@GB"][i] for i in range(n)]
        aa = [samples["compiled global"][i] / samples["compiled global (A/A)"][i] for i in range(n)]
        row = dict(
            model=name,
            group=G.spec,
            batch=B,
            ms={k: statistics.median(v) for k, v in samples.items()},
            rounds=n,
            compiled_global_over_compiled_base=_quartiles(ratio),
            a_over_a=_quartiles(aa),
            first_calls_seconds=first,
            max_abs_diff=diff,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out is not None:  # what was measured survives a later timeout
            out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _q(d: dict) -> str:
    return f"{d['median']:.3f} [{d['q1']:.3f}, {d['q3']:.3f}]"


def render_markdown(result: dict) -> str:
    """The run's tables (ms: medians over the paired rounds; ratios: paired medians [quartiles])."""
    m = result["meta"]
    out = [
        f"Measured {m['date']} on an {m['gpu']} (CUDA {m['cuda']}, cuDNN {m['cudnn']}) with "
        f"`python benchmarks/bench_cuda.py{' --quick' if m.get('quick') else ''}`: torch "
        f"{m['torch']}, Python {m['python']}, {m['cpu_threads']} CPU threads.",
        "",
    ]
    if result.get("latency"):
        out += [
            "| model | group | B | base@B | base@GB | fold by hand | loop | global (auto chose) "
            "| global (fold all) | layer-wise | layer-wise (fused) | global / min(base@GB, "
            "loop) | global / min(fold by hand, loop) | A/A | peak MiB: base@GB, global, "
            "layer-wise |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["latency"]:
            ms, pk = r["ms"], r["peak_mib"]
            chose = ",".join(map(str, r.get("auto_chose") or [])) or "-"
            out.append(
                f"| {r['model']} | {r['group']} | {r['batch']} | {ms['base@B']:.3f} | "
                f"{ms['base@GB']:.3f} | {ms['fold-by-hand']:.3f} | {ms['loop']:.3f} | "
                f"{ms['global']:.3f} ({chose}) | {ms['global-fold']:.3f} | "
                f"{ms['layerwise']:.3f} | {ms['layerwise-fused']:.3f} | "
                f"{_q(r['global_over_best'])} | {_q(r['global_over_by_hand'])} | "
                f"{_q(r['a_over_a'])} | {pk['base@GB']:.1f}, {pk['global']:.1f}, "
                f"{pk['layerwise']:.1f} |"
            )
    if result.get("torch_compile"):
        out += [
            "",
            '`torch.compile(mode="reduce-overhead")` of the compiled model and of the base model '
            "at batch |G| B (ms):",
            "",
            "| model | group | B | global | base@GB | compiled global | compiled base@GB | "
            "compiled global / compiled base@GB | A/A | first three calls (s) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["torch_compile"]:
            ms = r["ms"]
            out.append(
                f"| {r['model']} | {r['group']} | {r['batch']} | {ms['global']:.3f} | "
                f"{ms['base@GB']:.3f} | {ms['compiled global']:.3f} | "
                f"{ms['compiled base@GB']:.3f} | {_q(r['compiled_global_over_compiled_base'])} | "
                f"{_q(r['a_over_a'])} | {r['first_calls_seconds']:.1f} |"
            )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a dry run)")
    ap.add_argument(
        "--part", choices=["latency", "torch-compile", "all"], default="all", help="what to run"
    )
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            "bench_cuda.py: no CUDA device (torch.cuda.is_available() is False); run it on a "
            "machine with an NVIDIA GPU, or use bench_global.py for the CPU"
        )
    device = torch.device(args.device)
    meta = dict(
        torch=torch.__version__,
        equivfx=equivfx.__version__,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        cpu_threads=torch.get_num_threads(),
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        quick=args.quick,
    )
    print(json.dumps(meta), flush=True)
    result = dict(meta=meta)
    if args.part in ("latency", "all"):
        result["latency"] = bench(args.quick, device)
    if args.part in ("torch-compile", "all"):
        partial = Path(args.json).with_suffix(".torch_compile.json") if args.json else None
        result["torch_compile"] = bench_torch_compile(args.quick, device, partial)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
