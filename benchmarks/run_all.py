"""Every benchmark in one run, and the issue-6 targets judged from that run's results.

Runs, one after another in fresh processes on the same machine (so one run's figures can be read
side by side):

- ``bench_global.py`` (latency against base@B, base@GB, the loop and vmap; compile time; verify;
  e2cnn; torch.compile), ``bench_cost_passes.py``, ``mixing_layout.py``, ``bench_chunks.py``,
  ``bench_memory.py``, ``bench_leaf_check.py``, each writing ``<out>/<name>.json``;
- ``mixing_layout.py``, ``bench_chunks.py`` and ``bench_global.py``'s latency section again with
  glibc's allocator told to keep freed memory (``MALLOC_MMAP_THRESHOLD_`` and
  ``MALLOC_TRIM_THRESHOLD_`` at 1 GiB): by default glibc returns every large block to the system
  and faults it back in at the next call, which is most of what a fresh activation tensor costs on
  CPU (``<out>/<name>.tuned-malloc.json``).

Then writes ``<out>/run.json`` (the commit, the machine, start and end, each script's command and
wall time) and ``<out>/targets.md`` (each target of issue 6, the figure that judges it, met or not
and by what margin), from those JSON files only.

Run: ``python benchmarks/run_all.py [--quick] [--out docs/bench] [--docs]``
(``--summarize-only`` rewrites targets.md from the JSON files already in ``--out``.)

``--docs`` then fills ``docs/benchmarks.md`` and ``docs/layerwise.md`` from their templates in
``benchmarks/templates/``: the run's targets table and result tables go where the templates say
``{{RUN_AND_TARGETS}}``, ``{{GLOBAL}}``, ``{{TABLES}}`` and ``{{MIX_TABLE}}``. The prose around
them quotes figures of the run by hand: read the new targets.md and edit the templates first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
TUNED_LABEL = "allocator keeps freed memory"

SCRIPTS = [
    # (name, script, extra arguments, allocator)
    ("bench_global", "bench_global.py", ["--markdown", "{out}/bench_global.md"], "default"),
    ("bench_cost_passes", "bench_cost_passes.py", [], "default"),
    ("mixing_layout", "mixing_layout.py", [], "default"),
    ("bench_chunks", "bench_chunks.py", [], "default"),
    ("bench_memory", "bench_memory.py", [], "default"),
    ("bench_leaf_check", "bench_leaf_check.py", [], "default"),
    ("mixing_layout.tuned-malloc", "mixing_layout.py", [], "tuned"),
    ("bench_chunks.tuned-malloc", "bench_chunks.py", [], "tuned"),
    ("bench_global.tuned-malloc", "bench_global.py", ["--only", "latency"], "tuned"),
]


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _relative(arg: str) -> str:
    path = Path(arg)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else arg


def run_all(out: Path, quick: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    import torch

    run = dict(
        started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        commit=_git("rev-parse", "HEAD"),
        # uncommitted changes outside the results folder (earlier results are replaced)
        dirty=bool(
            _git("status", "--porcelain", "--untracked-files=no", "--", ".", f":!{_relative(out)}")
        ),
        quick=quick,
        python=platform.python_version(),
        torch=torch.__version__,
        machine=platform.machine(),
        platform=platform.platform(),
        cpus=os.cpu_count(),
        scripts=[],
    )
    for name, script, extra, allocator in SCRIPTS:
        json_path = out / f"{name}.json"
        cmd = [sys.executable, str(HERE / script), "--json", str(json_path)]
        cmd += [a.format(out=out) for a in extra] + (["--quick"] if quick else [])
        env = {**os.environ, **(TUNED_MALLOC if allocator == "tuned" else {})}
        print(f"== {name} ({allocator} allocator): {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT)
        seconds = time.perf_counter() - t
        run["scripts"].append(
            dict(
                name=name,
                command=" ".join(["python", *(_relative(c) for c in cmd[1:])]),
                allocator=allocator,
                seconds=round(seconds, 1),
                returncode=proc.returncode,
            )
        )
        if proc.returncode:
            print(f"   {name} failed with exit code {proc.returncode}", flush=True)
    run["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    return run


# ------------------------------------------------------------------------------ the targets
def _load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _per_allocator(out: Path, base: str):
    """(name, label, results) of ``base`` under each allocator this run measured it with."""
    for suffix, label in (("", "default allocator"), (".tuned-malloc", TUNED_LABEL)):
        data = _load(out, base + suffix)
        if data:
            yield base + suffix, label, data


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _latency_rows(lat: list, label: str) -> list[str]:
    """The 5 % target's rows (strict, like for like, A/A) from bench_global's latency rows, run
    under the allocator ``label`` names."""
    lines: list[str] = []
    paired = all("paired" in r for r in lat)

    def ratio(r, key):  # the paired (round by round) median where the run has it
        return r["paired"][key]["median"] if paired else r[key]

    how = "paired, median over rounds" if paired else "medians"
    ratios = [ratio(r, "global_over_best") for r in lat]
    within5 = sum(x <= 1.05 for x in ratios)
    within10 = sum(x <= 1.10 for x in ratios)
    worst = max(lat, key=lambda r: ratio(r, "global_over_best"))
    by_batch = {}
    for r in lat:
        by_batch.setdefault(r["batch"], []).append(ratio(r, "global_over_best"))
    per_b = "; ".join(f"B={b}: {min(v):.2f} to {max(v):.2f}" for b, v in sorted(by_batch.items()))
    lines.append(
        '| compiled global model (default `chunk="auto"`) within 5 % of min(base@GB, loop), '
        f"every batch size ({label}) | global / min ({how}): {per_b}; <= 1.05 in {within5} of "
        f"{len(ratios)}, <= 1.10 in {within10}; worst {ratio(worst, 'global_over_best'):.2f} "
        f"({worst['model']} {worst['group']} B={worst['batch']}) | "
        f"{_verdict(within5 == len(ratios))} ({within5}/{len(ratios)}) |"
    )
    fair = [ratio(r, "global_over_by_hand") for r in lat if "global_over_by_hand" in r]
    if fair:
        ok5 = sum(x <= 1.05 for x in fair)
        lines.append(
            "| the same, like for like: against min(fold by hand, loop), both building the "
            f"transformed batch from x ({label}; {how}) | {min(fair):.2f} to {max(fair):.2f} "
            f"(median {statistics.median(fair):.2f}); <= 1.05 in {ok5} of {len(fair)}, <= 1.10 in "
            f"{sum(x <= 1.10 for x in fair)} | {_verdict(ok5 == len(fair))} "
            f"({ok5}/{len(fair)}) |"
        )
    if paired:
        aa = [r["paired"]["a_over_a"] for r in lat]
        lines.append(
            f"| resolution: the compiled model timed twice in each round (A/A, paired; {label}) | "
            f"median ratio {min(a['median'] for a in aa):.3f} to "
            f"{max(a['median'] for a in aa):.3f}; quartiles within "
            f"[{min(a['q1'] for a in aa):.3f}, {max(a['q3'] for a in aa):.3f}] | "
            "the measurement's own spread (no target) |"
        )
    return lines


def summarize(out: Path) -> str:
    run = _load(out, "run") or {}
    lines = ["# Benchmarks: one run, and the issue-6 targets judged from it", ""]
    if run:
        lines += [
            f"Run {run['started']} to {run['finished']} at commit `{run['commit'][:10]}`"
            + (" (with uncommitted changes)" if run.get("dirty") else "")
            + f"{' (--quick)' if run.get('quick') else ''}: {run['machine']}, {run['cpus']} CPUs, "
            f"Python {run['python']}, torch {run['torch']}. Every figure below comes from the JSON "
            f"files this run wrote next to this file. Scripts and wall times:",
            "",
        ]
        for s in run["scripts"]:
            rc = "" if s["returncode"] == 0 else f", exit code {s['returncode']}"
            lines.append(
                f"- `{s['command']}` ({s['allocator']} allocator): {s['seconds']:.0f} s{rc}"
            )
        lines.append("")
    lines += ["| target | measured | verdict |", "|---|---|---|"]

    for _, label, data in _per_allocator(out, "bench_global"):
        lines += _latency_rows(data["latency"], label)
    g = _load(out, "bench_global")
    if g:
        ct = g["compile_time"]
        fits = {}
        for key in ("seconds", "seconds_with_examples"):  # least squares: seconds = a + b nodes
            line = statistics.linear_regression([r["nodes"] for r in ct], [r[key] for r in ct])
            fits[key] = (line.slope * 1e3, line.intercept * 1e3)
        worst_slope = max(f[0] for f in fits.values())
        branching = ""
        cb = g.get("compile_branching")
        if cb:
            line = statistics.linear_regression(
                [r["nodes"] for r in cb], [r["seconds"] for r in cb]
            )
            fits["branching"] = (line.slope * 1e3, line.intercept * 1e3)
            worst_slope = max(worst_slope, fits["branching"][0])
            traces = sorted({r["traces"] for r in cb})
            branching = (
                f"; residual blocks whose stochastic depth branches on its flag (with example "
                f"inputs), {cb[0]['blocks']} to {cb[-1]['blocks']} blocks ({cb[0]['nodes']} to "
                f"{cb[-1]['nodes']} nodes): b = {fits['branching'][0]:.3f} ms/node, a = "
                f"{fits['branching'][1]:.1f} ms, {' to '.join(map(str, traces))} traces at "
                "every size"
            )
        lines.append(
            "| compile time at most 1 ms per node, linear | a straight line time = a + b nodes "
            f"over {ct[0]['nodes']} to {ct[-1]['nodes']} nodes: b = {fits['seconds'][0]:.3f} "
            f"ms/node, a = {fits['seconds'][1]:.1f} ms (with example inputs b = "
            f"{fits['seconds_with_examples'][0]:.3f}, a = {fits['seconds_with_examples'][1]:.1f}); "
            "per size: "
            + ", ".join(f"{r['nodes']} nodes {r['ms_per_node']:.3f}" for r in ct)
            + f" ms/node{branching} | {_verdict(worst_slope <= 1.0)} "
            f"(margin {1 / worst_slope:.1f}x) |"
        )
        v = g["verify"]
        lines.append(
            f"| verification over all of D4 (ResNet-style, B=2) | {v['seconds']:.3f} s for "
            f"{v['elements']} elements = {v['forwards_equivalent']:.1f} forwards "
            f'(fresh `chunk="auto"` model: {v.get("seconds_fresh_auto_model", float("nan")):.3f}'
            " s) | measured (no target) |"
        )
        tc = g.get("torch_compile")
        if tc and "speedup" in tc:
            lines.append(
                f"| `torch.compile` of the compiled module | {tc['speedup']:.2f}x speed-up "
                f"(eager {tc['ms']['eager']:.2f} ms, compiled {tc['ms']['torch.compile']:.2f} ms) "
                "| measured (no target) |"
            )
        e2 = g.get("e2cnn")
        if e2:
            gather_ratio = e2["ours_over_e2cnn_exported"]
            fused_ratio = e2.get("fused_over_e2cnn_exported", float("nan"))
            lines.append(
                f"| layer-wise C4 against e2cnn (same widths) | gather {gather_ratio:.2f}x, "
                f"fused {fused_ratio:.2f}x e2cnn exported; parameters "
                f"{e2['params']['equivfx-layerwise']:,} vs {e2['params']['e2cnn']:,} | "
                "measured (no target) |"
            )
    for _, label, m in _per_allocator(out, "mixing_layout"):
        rows = m["rows"]
        gs = [r["gather_over_single_conv"] for r in rows]
        fs = [r["fused_over_single_conv"] for r in rows if "fused_over_single_conv" in r]
        cf = [r["gather_channels_first_over_single_conv"] for r in rows if "gather_format" in r]
        fixed = (
            f" (channels-first only: {min(cf):.2f} to {max(cf):.2f}x, within 10 % in "
            f"{sum(x <= 1.10 for x in cf)} of {len(cf)})"
            if cf
            else ""
        )
        ks = [r["fused_kept_over_single_conv"] for r in rows if "fused_kept_over_single_conv" in r]
        kept = (
            f"; fused in the kept layout (input and output on the channel axis, as "
            f"`keep-channel-layout` calls it between fused layers) {min(ks):.2f} to "
            f"{max(ks):.2f}x, within 10 % in {sum(x <= 1.10 for x in ks)} of {len(ks)}"
            if ks
            else ""
        )
        kept_verdict = f", fused in the kept layout {_verdict(all(x <= 1.10 for x in ks))}"
        lines.append(
            f"| mixing layer within 10 % of one convolution of the same shape ({label}) | "
            f"gather (default, bitwise equivariant) {min(gs):.2f} to {max(gs):.2f}x, within 10 % "
            f"in {sum(x <= 1.10 for x in gs)} of {len(gs)}{fixed}; fused "
            f'(`mix_layout="fused"`) '
            f"{min(fs):.2f} to {max(fs):.2f}x, within 10 % in {sum(x <= 1.10 for x in fs)} of "
            f"{len(fs)}{kept} | gather {_verdict(all(x <= 1.10 for x in gs))}, fused "
            f"{_verdict(all(x <= 1.10 for x in fs))}{kept_verdict if ks else ''} |"
        )
    for _, label, c in _per_allocator(out, "bench_chunks"):
        rows = c["rows"]
        paired = all("paired" in r for r in rows)

        def chunk_ratio(r, key, paired=paired):  # paired (round by round) where the run has it
            return r["paired"][key]["median"] if paired else r[key]

        auto = [chunk_ratio(r, "auto_over_best") for r in rows]
        fold = [chunk_ratio(r, "fold_over_best") for r in rows]
        aa = (
            f"; A/A (auto timed twice) {min(r['paired']['a_over_a']['median'] for r in rows):.3f}"
            f" to {max(r['paired']['a_over_a']['median'] for r in rows):.3f}"
            if paired
            else ""
        )
        lines.append(
            f'| `chunk="auto"` picks the fold size by measurement ({label}) | auto / min(loop, '
            f"base@GB) ({'paired, median over rounds' if paired else 'medians'}) "
            f"{min(auto):.2f} to {max(auto):.2f} (median "
            f"{statistics.median(auto):.2f}), <= 1.05 in {sum(x <= 1.05 for x in auto)} of "
            f"{len(auto)}; folding every slot {min(fold):.2f} to {max(fold):.2f}{aa} | "
            f"{_verdict(all(x <= 1.05 for x in auto))} for 5 % |"
        )
    mem = _load(out, "bench_memory")
    if mem:
        parts = []
        for r in mem["rows"]:
            parts.append(
                f"{r['model']} {r['group']} B={r['batch']}: fold all {r['chunk=None']:.1f}, "
                f"chunk=1 {r['chunk=1']:.1f}, base@B {r['base@B']:.1f}, loop {r['loop']:.1f} MiB"
            )
        ok = all(r["chunk=1"] <= max(1.25 * r["base@B"], r["loop"]) for r in mem["rows"])
        lines.append(
            "| `chunk=k`: peak activation memory about that of the base model at batch k B | "
            + "; ".join(parts)
            + f" | {_verdict(ok)} (chunk=1 within 25 % of base@B, or at most the hand-written "
            "loop, which also holds one transformed copy of the input) |"
        )
    cp = _load(out, "bench_cost_passes")
    if cp:
        parts = [
            f"{r.get('case', 'stem-head')} {r['group']} B={r['batch']} {r['speedup']:.2f}x"
            + (
                f" ({r['slots_computed']} of {r['slots']} slots"
                + (" up to the coset lift)" if r.get("coset_lift") else ")")
                if r.get("slots_computed", r.get("slots")) != r.get("slots")
                else ""
            )
            for r in cp["rows"]
        ]
        lines.append(
            "| cost passes save where they apply (outputs equal: tested) | "
            + "; ".join(parts)
            + " | measured (no target) |"
        )
    lines += ["", *tables(out)]
    return "\n".join(lines) + "\n"


def _median_quartiles(d: dict) -> str:
    """A paired ratio's cell: median [q1, q3]."""
    return f"{d['median']:.3f} [{d['q1']:.3f}, {d['q3']:.3f}]"


def _paired_cells(p: dict | None) -> list[str]:
    """bench_chunks' paired columns (a run from before they existed: dashes)."""
    if p is None:
        return ["-", "-", "-"]
    a = p["auto_over_best"]
    return [
        _median_quartiles(a),
        f"{p['fold_over_best']['median']:.3f}",
        f"{p['a_over_a']['median']:.3f}",
    ]


def _section(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown section: a heading, then a table of ``rows`` (cells as text) under ``header``."""

    def line(cells):
        return "| " + " | ".join(cells) + " |"

    return [f"## {title}", "", line(header), "|" + "---|" * len(header), *map(line, rows), ""]


def tables(out: Path) -> list[str]:
    """The per-benchmark tables of this run (bench_global's own are in bench_global.md)."""
    lines: list[str] = []
    cp = _load(out, "bench_cost_passes")
    if cp:
        header = [
            "case", "group", "B", "slots computed", "no cost passes (ms)", "cost passes (ms)",
            "speed-up (paired median)", "quartiles", "max abs difference",
        ]  # fmt: skip
        rows = [
            [
                r.get("case", "stem-head"),
                r["group"],
                str(r["batch"]),
                f"{r.get('slots_computed', '-')} of {r.get('slots', '-')}"
                + (", then all" if r.get("coset_lift") else ""),
                f"{r['plain_ms']:.2f}",
                f"{r['optimized_ms']:.2f}",
                f"{r['speedup']:.2f}x",
                f"[{r['speedup_q1']:.2f}, {r['speedup_q3']:.2f}]" if "speedup_q1" in r else "-",
                f"{r['max_abs_diff']:.1e}",
            ]
            for r in cp["rows"]
        ]
        lines += _section("Cost passes (`bench_cost_passes.json`)", header, rows)
    tuned = _load(out, "bench_global.tuned-malloc")
    if tuned and all("paired" in r for r in tuned["latency"]):
        header = [
            "model", "group", "B", "global (ms; chose)", "base@GB (ms)", "loop (ms)", "rounds",
            "global / min(base@GB, loop)", "global / min(fold by hand, loop)", "A/A",
        ]  # fmt: skip

        q = _median_quartiles
        rows = [
            [
                r["model"],
                r["group"],
                str(r["batch"]),
                f"{r['ms']['global']:.2f} ({','.join(map(str, r.get('auto_chose') or [])) or '-'})",
                f"{r['ms']['base@GB']:.2f}",
                f"{r['ms']['loop']:.2f}",
                str(r["paired"]["rounds"]),
                q(r["paired"]["global_over_best"]),
                q(r["paired"]["global_over_by_hand"]),
                q(r["paired"]["a_over_a"]),
            ]
            for r in tuned["latency"]
        ]
        title = (
            f"The compiled global model, {TUNED_LABEL} (`bench_global.tuned-malloc.json`): "
            "paired median [quartiles] over rounds"
        )
        lines += _section(title, header, rows)
    for name, label, m in _per_allocator(out, "mixing_layout"):
        header = [
            "group", "B", "C", "size", "one conv, same shape", "gather (default; format)",
            "gather, channels-first", "gather, fresh copy", "fused", "blocks",
            "gather / one conv", "channels-first / one conv", "fresh copy / one conv",
            "fused / one conv", "fused, kept layout", "fused, kept layout / one conv",
        ]  # fmt: skip

        def ms(r, key):
            return f"{r[key]:.2f}" if key in r else "-"

        rows = [
            [
                r["group"],
                str(r["batch"]),
                str(r["channels"]),
                f"{r['size']}x{r['size']}",
                ms(r, "single_conv_ms"),
                ms(r, "gather_ms")
                + (f" ({'/'.join(r['gather_format'])})" if "gather_format" in r else ""),
                *(
                    ms(r, k)
                    for k in (
                        "gather_channels_first_ms",
                        "gather_fresh_ms",
                        "fused_ms",
                        "blocks_ms",
                        "gather_over_single_conv",
                        "gather_channels_first_over_single_conv",
                        "gather_fresh_over_single_conv",
                        "fused_over_single_conv",
                        "fused_kept_ms",
                        "fused_kept_over_single_conv",
                    )
                ),  # fmt: skip
            ]
            for r in m["rows"]
        ]
        lines += _section(f"Mixing-layer layouts, {label} (`{name}.json`), ms", header, rows)
    for name, label, c in _per_allocator(out, "bench_chunks"):
        header = [
            "model", "group", "B", "fold all (`chunk=None`)", "`chunk=1`",
            '`chunk="auto"` (chose)', "loop over g", "base@GB", "auto / min(loop, base@GB)",
            "fold all / min", "paired: auto / min [quartiles]", "paired: fold all / min",
            "paired A/A",
        ]  # fmt: skip
        rows = [
            [
                r["model"],
                r["group"],
                str(r["batch"]),
                f"{r['ms']['fold all']:.2f}",
                f"{r['ms']['chunk=1']:.2f}",
                f"{r['ms']['auto']:.2f} ({','.join(map(str, r['auto_chose']))})",
                f"{r['ms']['loop']:.2f}",
                f"{r['ms']['base@GB']:.2f}",
                f"{r['auto_over_best']:.2f}",
                f"{r['fold_over_best']:.2f}",
                *_paired_cells(r.get("paired")),
            ]
            for r in c["rows"]
        ]
        lines += _section(f"Slots per pass, {label} (`{name}.json`), ms", header, rows)
    mem = _load(out, "bench_memory")
    if mem:
        keys = [k for k in mem["rows"][0] if k not in ("model", "group", "batch")]
        rows = [
            [r["model"], r["group"], str(r["batch"]), *(f"{r[k]:.1f}" for k in keys)]
            for r in mem["rows"]
        ]
        lines += _section(
            "Peak tensor memory during one forward (`bench_memory.json`), MiB",
            ["model", "group", "B", *keys],
            rows,
        )
    return lines


DOCS = {
    "benchmarks.md": ROOT / "docs" / "benchmarks.md",
    "layerwise.md": ROOT / "docs" / "layerwise.md",
}


def fill_docs(out: Path) -> dict[str, str]:
    """The documentation pages of ``DOCS`` with their placeholders filled from ``out``'s
    targets.md and bench_global.md."""
    targets = (out / "targets.md").read_text().splitlines()

    def first(start: int, test) -> int:
        return next(i for i in range(start, len(targets)) if test(targets[i]))

    run_line = first(0, lambda line: line.startswith("Run "))
    last_target = first(run_line, lambda line: line.startswith("| cost passes"))
    tables = first(0, lambda line: line.startswith("## Cost passes"))
    mix = first(0, lambda line: line.startswith("## Mixing-layer layouts, default"))
    mix_end = first(mix + 2, lambda line: not line.strip())
    fills = {
        "{{RUN_AND_TARGETS}}": "\n".join(targets[run_line : last_target + 1]),
        "{{GLOBAL}}": (out / "bench_global.md").read_text().rstrip("\n"),
        "{{TABLES}}": "\n".join(targets[tables:]).rstrip("\n"),
        "{{MIX_TABLE}}": "\n".join(targets[mix + 2 : mix_end]),
    }
    cuda = _load(out, "bench_cuda")  # from the GPU machine, not from run_all (no GPU here)
    if cuda:
        sys.path.insert(0, str(HERE))
        from bench_cuda import render_markdown as render_cuda

        fills["{{CUDA}}"] = render_cuda(cuda).rstrip("\n")
    pages = {}
    for name in DOCS:
        text = (HERE / "templates" / name).read_text()
        for key, value in fills.items():
            text = text.replace(key, value)
        pages[name] = text
    return pages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"))
    ap.add_argument("--summarize-only", action="store_true")
    ap.add_argument("--docs", action="store_true", help="fill docs/ from benchmarks/templates/")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if not args.summarize_only:
        run_all(out, args.quick)
    text = summarize(out)
    (out / "targets.md").write_text(text)
    g = _load(out, "bench_global")
    if g:  # its tables, rendered again from the JSON (the same figures)
        sys.path.insert(0, str(HERE))
        from bench_global import render_markdown

        command = "python benchmarks/run_all.py" + (" --quick" if g.get("quick") else "")
        (out / "bench_global.md").write_text(render_markdown(g, command))
    if args.docs:
        for name, text in fill_docs(out).items():
            DOCS[name].write_text(text)
    print(text)


if __name__ == "__main__":
    main()
