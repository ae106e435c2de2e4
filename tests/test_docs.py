"""The Python examples in README.md and docs/ run as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)], ids=lambda p: p.name)
def test_examples_run(path):
    namespace: dict = {}
    for block in python_blocks(path):
        if "MyNet" in block:  # a pattern for the reader's own model, shown not run
            continue
        exec(compile(block, str(path), "exec"), namespace)  # noqa: S102 - our own docs


def test_benchmark_pages_hold_the_committed_runs_figures():
    """targets.md and the benchmark pages' tables are what the run's JSON files in docs/bench give
    (after a run: ``python benchmarks/run_all.py --summarize-only --docs``)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_all

    out = ROOT / "docs" / "bench"
    assert run_all.summarize(out) == (out / "targets.md").read_text()
    for name, text in run_all.fill_docs(out).items():
        assert text == run_all.DOCS[name].read_text(), f"{name}: regenerate with --docs"
