"""The ``equivfx`` command line.

Today it has ``equivfx demo`` (the quickstart: compile a CNN for C4, D4 and C8 and verify it). The
checkpoint commands (``compile``, ``verify``, ``inspect``) land with the command-line issue.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    import equivfx

    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    ).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        gap = (cnn(x) - cnn(torch.rot90(x, 1, (-2, -1)))).abs().max().item()
    print(f"plain CNN: max |f(x) - f(rot90 x)| = {gap:.3g} (not invariant)")
    ok = True
    for spec in ("C4", "D4", "C8"):
        emodel = equivfx.compile(cnn, spec)
        report = equivfx.verify(emodel, x)
        ok &= report.ok or not report.exact
        line = report.summary().splitlines()[0]
        print(f"equivfx.compile(cnn, {spec!r}): {line}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``equivfx`` console script."""
    parser = argparse.ArgumentParser(prog="equivfx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="compile a small CNN for C4, D4 and C8 and verify it")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
