"""The Python examples in README.md and docs/ run as written."""

from __future__ import annotations

import re
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
