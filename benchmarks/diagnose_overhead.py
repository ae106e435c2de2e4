"""What the compiled global model does beyond folding the slots by hand: two diagnostics.

1. Kernel time: ``torch.profiler`` over 20 forwards of the ResNet-style CNN of ``bench_global.py``
   (C4, B = 8), the base model on the pre-built |G| B batch against the compiled model
   (``chunk=None``): total self CPU time of all aten ops, the least of 5 interleaved rounds. Equal
   totals mean the compiled model runs the same kernels; what wall-clock ratios show beyond that is
   Python overhead or noise.
2. The chunk wrapper: the 1D model at B = 1 under Shift4 compiled with ``chunk="auto"`` (one slot
   is computed, so there is nothing to choose and it calls the flat graph) against ``chunk=None``
   (the flat graph itself), medians of interleaved runs: the wrapper's own cost.

3. The input transform: the base model on a batch lifted at each call (``equivfx_lift``, its
   gather called without the module around it, and the same lift op by op), after a lift whose
   result it does not read, and on a fresh copy of the batch built beforehand (controls: is it the
   lift's ops, its Python, its running at all, or the batch being new?), against the same batch
   built beforehand, paired (``bench_global.paired_ms``), for configurations where the strict 5 %
   target was missed (seq1d ShiftRev4 and ResNet D4 at B = 1, ViT C4 at B = 8).
4. Convolution shapes: the two mixing layouts' convolutions with the same arithmetic, C4, 16
   channels, 32x32, B = 8: |G| B samples with |G| C -> C channels (gather) against B samples with
   |G| C -> |G| C channels (fused), on ready-made inputs, paired.

5. The lift: op by op (one action per slot, then a cat) against one gather with a per-sample
   index, below and above ``Lift.GATHER_LIMIT`` (where the module switches), medians.

6. Page faults: minor page faults per forward (``getrusage``) of the ResNet under D4 at B = 8, the
   base model eager and as a plain ``torch.fx.symbolic_trace`` on the pre-built batch, and the
   compiled model (``chunk=None``), each in a fresh child process (the counts depend on what the
   process allocated before), under glibc's default allocator and with freed memory kept
   (``run_all.TUNED_MALLOC``): an fx graph frees each value right after its last use, earlier
   than eager Python frees locals, which changes which blocks glibc returns to the system. In the
   same processes, the timing that follows from it for the ResNet under C4 at B = 8 (the
   like-for-like miss of the 13:44 run, 2026-11-28): the base model as a plain fx trace, the
   compiled model with its lift taken out (an identity) and the compiled model, all on the batch
   built beforehand but the last, and the fold by hand, paired against the eager base model on
   that batch: whether the compiled model's gap over the fold by hand is the lift's or fx's.

7. The compiled model's own Python: (a) a model whose ops cost almost nothing (a flip, a cumsum
   and a sum of a (1, 8, 16) input under ShiftRev4), compiled (``chunk="auto"`` and
   ``chunk=None``), against its plain fx trace on the lifted batch built beforehand, and the
   lift and the pool modules against their bare ops, hot medians (microseconds): what equivfx's
   layers cost per call beyond their kernels; (b) inside real forwards (B = 1, where the strict
   5 % target is missed), the compiled model and the same ops written by hand (the bare gather,
   the model's layers, a view and a mean before its last linear layer) against the base model on
   the batch built beforehand, paired: what is left to remove, and what the transform costs
   however it is written; also the compiled model with fx's own generated code (submodules
   reached by ``getattr`` chains, as before :mod:`equivfx.passes.codegen`).

Run: ``python benchmarks/diagnose_overhead.py [--threads 2] [--part6 | --python-only]``
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from torch.fx.graph import CodeGen
from torch.profiler import ProfilerActivity, profile
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_global import MODELS, median_ms, paired_ms  # noqa: E402

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


def _paired_ratios(fns: dict, den: str, budget_s: float = 6.0) -> dict:
    """For every other entry k, the median over rounds of fns[k] / fns[den], all timed in each
    round (paired)."""
    estimate = {
        k: benchmark.Timer("fn()", globals={"fn": fn}).timeit(5).mean * 1e3 for k, fn in fns.items()
    }
    s = paired_ms(fns, estimate, budget_s)
    return {
        k: statistics.median(a / b for a, b in zip(s[k], s[den], strict=True))
        for k in fns
        if k != den
    }


def _paired_ratio(fns: dict, num: str, den: str, budget_s: float = 6.0) -> float:
    """Median over rounds of fns[num] / fns[den], both timed in each round (paired)."""
    return _paired_ratios({num: fns[num], den: fns[den]}, den, budget_s)[num]


def _cached_gather(lift, x):
    """The gather ``lift`` cached for ``x``'s per-sample shape (after a call on ``x``), bound to
    ``x``'s shape: the lift without the module around it."""
    return next(g for g in lift._gathers.values() if g is not None).bound(x.shape)


def input_transform() -> list[tuple]:
    rows = []
    for name, label, batch in (("seq1d", "D4", 1), ("resnet", "D4", 1), ("vit", "C4", 8)):
        factory, shape, specs = MODELS[name]
        torch.manual_seed(0)
        model = factory().eval()
        G = equivfx.group(specs[label])
        x = torch.randn(batch, *shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lift = equivfx.compile(model, G, example_inputs=x, chunk=None).equivfx_lift
        slots = list(lift.slots)
        with torch.no_grad():
            prebuilt = lift(x)
            # the module's own gather, called without the module around it (its Python)
            gather = _cached_gather(lift, x)
            fns = {
                "lifted": lambda m=model, lift=lift, x=x: m(lift(x)),
                "lifted by the bare gather": lambda m=model, g=gather, x=x: m(g(x)),
                "lifted op by op": lambda m=model, lift=lift, x=x, s=slots: m(
                    lift._each_slot(x, s)
                ),
                "lift, then prebuilt": lambda m=model, lift=lift, x=x, p=prebuilt: (lift(x), m(p)),
                "fresh copy": lambda m=model, p=prebuilt: m(p.clone()),
                "prebuilt": lambda m=model, p=prebuilt: m(p),
            }
            rows.append((name, G.spec, batch, _paired_ratios(fns, "prebuilt")))
    return rows


def conv_shapes() -> float:
    n, batch, c, size = 4, 8, 16, 32
    torch.manual_seed(0)
    gather_in = torch.randn(n * batch, n * c, size, size)
    gather_w = torch.randn(c, n * c, 3, 3)
    fused_in = torch.randn(batch, n * c, size, size)
    fused_w = torch.randn(n * c, n * c, 3, 3)
    conv = torch.nn.functional.conv2d
    with torch.no_grad():
        fns = {
            "gather": lambda: conv(gather_in, gather_w, padding=1),
            "fused": lambda: conv(fused_in, fused_w, padding=1),
        }
        return _paired_ratio(fns, "gather", "fused")


def lift_cost(threads: int) -> list[tuple]:
    from equivfx.passes.modules import Lift

    rows = []
    for spec, shape in (
        ("ShiftRev4", (1, 8, 128)),
        ("ShiftRev4", (8, 8, 128)),
        ("D4", (1, 3, 32, 32)),
        ("D4", (8, 3, 32, 32)),
        ("Perm5@-2", (1, 5, 16)),
        ("Perm5@-2", (8, 5, 16)),
        # over Lift.GATHER_LIMIT: the module lifts op by op
        ("ShiftRev4", (64, 8, 128)),
        ("D4", (64, 3, 32, 32)),
        ("Shift4", (64, 64, 1024)),
    ):
        G = equivfx.group(spec)
        lift, x = Lift(G, G.action), torch.randn(shape)
        slots = tuple(lift.slots)
        # built whatever the input's size, on another module (this one's cache stays its own)
        gather = Lift(G, G.action)._gather_for(x, slots, key=None)
        env = dict(lift=lift, x=x, slots=slots, gather=gather)
        timers = {
            "op by op": benchmark.Timer("lift._each_slot(x, slots)", globals=env),
            "gather": benchmark.Timer("gather(x)", globals=env),
            "module": benchmark.Timer("lift(x)", globals=env),
        }
        with torch.no_grad():
            lift(x)  # builds the module's index where it gathers
            ms = median_ms(timers, 5, 0.2)
        took = "gather" if any(lift._gathers.values()) else "op by op"
        rows.append((spec, shape, {k: v * 1e3 for k, v in ms.items()}, took))
    return rows


class _Featherweight(torch.nn.Module):
    """Ops that cost almost nothing: what a compiled copy adds is its own Python."""

    def forward(self, x):
        return torch.flip(x, (-1,)).cumsum(-1).sum(-1)


def own_python() -> dict:
    G = equivfx.group("ShiftRev4")
    model = _Featherweight()
    x = torch.randn(1, 8, 16)
    auto = equivfx.compile(model, G, example_inputs=x)
    flat = equivfx.compile(model, G, example_inputs=x, chunk=None)
    lift, pool = flat.equivfx_lift, flat.equivfx_readout
    trace = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        auto(x)  # the first call measures
        lifted = lift(x)
        folded = trace(lifted)
        gather = _cached_gather(lift, x)
        env = dict(auto=auto, flat=flat, trace=trace, x=x, lifted=lifted, lift=lift, pool=pool)
        env.update(gather=gather, folded=folded, n=G.order)
        stmts = {
            "chunk='auto'": "auto(x)",
            "chunk=None": "flat(x)",
            "fx trace on the lifted batch": "trace(lifted)",
            "lift module": "lift(x)",
            "bare gather": "gather(x)",
            "pool module": "pool(folded)",
            "bare mean": "folded.view(n, -1).mean(0)",
        }
        timers = {k: benchmark.Timer(v, globals=env, num_threads=1) for k, v in stmts.items()}
        return {k: v * 1e3 for k, v in median_ms(timers, 9, 0.2).items()}


def by_hand() -> list[tuple]:
    """Paired ratios over the base model on the batch built beforehand (see part 7)."""
    rows = []
    for name, label in (("seq1d", "D4"), ("vit", "C4"), ("vit", "D4"), ("resnet", "C4")):
        factory, shape, specs = MODELS[name]
        torch.manual_seed(0)
        model = factory().eval()
        G = equivfx.group(specs[label])
        x = torch.randn(1, *shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auto = equivfx.compile(model, G, example_inputs=x)
            flat = equivfx.compile(model, G, example_inputs=x, chunk=None)
        lift = flat.equivfx_lift
        with torch.no_grad():
            auto(x)  # the first call measures
            prebuilt = lift(x)
            gather = _cached_gather(lift, x)
            features, last = _split_head(model)
            # the slots the lift computes (2 of 8 for the sequence model under ShiftRev4: one
            # per coset of the shifts its circular convolutions commute with; equal cosets, so
            # their mean is the mean over the group)
            n = len(lift.slots)

            def hand(x=x, gather=gather, features=features, last=last, n=n):
                return last(features(gather(x)).view(n, 1, -1).mean(0))

            torch.testing.assert_close(hand(), flat(x))
            fx_code = _with_fx_code(auto)
            torch.testing.assert_close(fx_code(x), auto(x), rtol=0, atol=0)
            fns = {
                "chunk='auto'": lambda auto=auto, x=x: auto(x),
                "chunk='auto', fx's code": lambda m=fx_code, x=x: m(x),
                "chunk=None": lambda flat=flat, x=x: flat(x),
                "by hand": hand,
                "prebuilt": lambda m=model, p=prebuilt: m(p),
            }
            rows.append((name, G.spec, _paired_ratios(fns, "prebuilt", budget_s=8.0)))
    return rows


def _with_fx_code(emodel):
    """A copy of ``emodel`` whose graph modules run fx's own generated code (submodules reached by
    attribute chains), not :mod:`equivfx.passes.codegen`'s."""
    twin = copy.deepcopy(emodel)
    chunks = twin._modules.get("equivfx_chunks")
    for gm in (twin, *(() if chunks is None else (chunks.flat, *chunks.graphs.values()))):
        gm.graph.set_codegen(CodeGen())
        gm.recompile()
    return twin


def _split_head(model):
    """The benchmark model without its last linear layer, and that layer."""
    if hasattr(model, "head"):  # ViTish
        m = model

        def features(y):
            t = m.patch(y).flatten(2).transpose(1, 2) + m.pos
            return m.norm(m.blocks(t)).mean(1)

        return features, model.head
    if hasattr(model, "net"):  # Seq1d
        return (lambda y, m=model: m.net(y).mean(-1)), model.fc
    return (lambda y, m=model: m.pool(m.layers(m.stem(y))).flatten(1)), model.fc  # ResNetish


def own_python_lines() -> None:
    us = own_python()
    print(
        "A model whose ops cost almost nothing (ShiftRev4, B=1), hot medians in us (1 thread): "
        + ", ".join(f"{k} {v:.1f}" for k, v in us.items()),
        flush=True,
    )
    for name, spec, r in by_hand():
        print(
            f"{name} {spec} B=1, against the base model on the batch built beforehand (paired): "
            + ", ".join(f"{k} {v:.3f}" for k, v in r.items()),
            flush=True,
        )


def _resnet_folded(spec: str) -> tuple:
    """The ResNet of ``bench_global.py`` at B = 8, its group, input and compiled model
    (``chunk=None``: every slot folded)."""
    factory, shape, specs = MODELS["resnet"]
    torch.manual_seed(0)
    model = factory().eval()
    G = equivfx.group(specs[spec])
    x = torch.randn(8, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emodel = equivfx.compile(model, G, example_inputs=x, chunk=None).eval()
    return model, G, x, emodel


def page_faults() -> dict:
    model, G, x, emodel = _resnet_folded("D4")
    traced = torch.fx.symbolic_trace(model)
    fns = {
        "base eager": lambda p: model(p),
        "base as an fx graph": lambda p: traced(p),
        "compiled": lambda p: emodel(x),
    }
    faults = {k: [] for k in fns}
    with torch.no_grad():
        prebuilt = emodel.equivfx_lift(x)
        for _ in range(3):  # rounds; each variant warmed up, then 20 forwards counted
            for name, fn in fns.items():
                for _ in range(3):
                    fn(prebuilt)
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for _ in range(20):
                    fn(prebuilt)
                faults[name].append(
                    (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
                )
    return {k: statistics.median(v) for k, v in faults.items()}


def fx_against_eager() -> dict:
    """Paired ratios over the eager base model on the batch built beforehand (see part 6)."""
    model, G, x, emodel = _resnet_folded("C4")
    unlifted = copy.deepcopy(emodel)
    unlifted.equivfx_lift = torch.nn.Identity()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        prebuilt = emodel.equivfx_lift(x).clone()

        def by_hand():
            xs = torch.cat([G.act(G.inverse(g), x) for g in G.elements])
            return model(xs).unflatten(0, (G.order, -1)).mean(0)

        return _paired_ratios(
            {
                "eager": lambda: model(prebuilt),
                "fx trace": lambda: traced(prebuilt),
                "compiled, lift taken out": lambda: unlifted(prebuilt),
                "compiled": lambda: emodel(x),
                "fold by hand": by_hand,
            },
            "eager",
        )


def _faults_line(faults: dict, label: str) -> str:
    return f"ResNet D4 B=8, minor page faults per forward ({label}): " + ", ".join(
        f"{k} {v:,.0f}" for k, v in faults.items()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--faults-only", action="store_true", help="only part 6, in this process")
    ap.add_argument("--part6", action="store_true", help="only part 6, in six fresh processes")
    ap.add_argument("--python-only", action="store_true", help="only part 7")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.python_only:
        own_python_lines()
        return
    if args.part6:
        part6(args.threads)
        return
    if args.faults_only:
        tuned = os.environ.get("MALLOC_TRIM_THRESHOLD_")
        label = "allocator keeps freed memory" if tuned else "default allocator"
        print(_faults_line(page_faults(), label), flush=True)
        r = fx_against_eager()
        print(
            f"ResNet C4 B=8 ({label}), over the eager base model on the batch built beforehand "
            "(paired): " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()),
            flush=True,
        )
        return
    k = kernel_time(args.threads)
    print(
        f"ResNet C4 B=8, 20 forwards, aten self CPU time: base@GB {k['base@GB']:.1f} ms, "
        f"compiled {k['compiled']:.1f} ms ({k['compiled'] / k['base@GB']:.3f}x)",
        flush=True,
    )
    w = wrapper_cost(args.threads)
    print(
        f"1D model Shift4 B=1: chunk='auto' (chose {w['chose'] or 'nothing: one slot'}) "
        f"{w['auto'] * 1e3:.0f} us, "
        f"chunk=None {w['flat'] * 1e3:.0f} us: the wrapper costs "
        f"{(w['auto'] - w['flat']) * 1e3:.0f} us",
        flush=True,
    )
    for name, spec, batch, r in input_transform():
        print(
            f"{name} {spec} B={batch}, base model against itself on a batch built beforehand "
            f"(paired): on a batch lifted at each call {r['lifted']:.3f}, by the lift's gather "
            f"called bare {r['lifted by the bare gather']:.3f}, lifted op by op "
            f"{r['lifted op by op']:.3f}, after a lift whose result it does not read "
            f"{r['lift, then prebuilt']:.3f}, on a fresh copy {r['fresh copy']:.3f}",
            flush=True,
        )
    for spec, shape, us, took in lift_cost(args.threads):
        print(
            f"lift {spec} {shape}: op by op {us['op by op']:.1f} us, one gather "
            f"{us['gather']:.1f} us; the module ({took}) {us['module']:.1f} us",
            flush=True,
        )
    print(
        "C4, 16 channels, 32x32, B=8, same FLOPs: gather-layout convolution / fused-layout "
        f"convolution = {conv_shapes():.2f} (paired)",
        flush=True,
    )
    own_python_lines()
    part6(args.threads)


def part6(threads: int) -> None:
    from run_all import TUNED_MALLOC

    # fresh processes, three of each: the counts and timings depend on the heap's history
    for env in ({}, {}, {}, TUNED_MALLOC, TUNED_MALLOC, TUNED_MALLOC):
        subprocess.run(
            [sys.executable, __file__, "--faults-only", "--threads", str(threads)],
            env={**os.environ, **env},
            check=True,
        )


if __name__ == "__main__":
    main()
