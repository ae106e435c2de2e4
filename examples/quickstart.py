"""Quickstart: make an ordinary CNN rotation-invariant with equivfx, and check it.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import torch
from torch import nn

import equivfx


def main() -> None:
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    ).eval()
    x = torch.randn(4, 1, 8, 8)
    rotated = torch.rot90(x, 1, (-2, -1))

    plain_gap = (cnn(x) - cnn(rotated)).abs().max().item()
    print(f"plain CNN:        |f(x) - f(rot x)| = {plain_gap:.3g}")

    for spec, readout in [("C4", "invariant"), ("D4", "invariant"), ("D4", "slots")]:
        emodel = equivfx.compile(cnn, spec, readout=readout)
        report = equivfx.verify(emodel, x)
        shape = tuple(emodel(x).shape)
        print(f"equivfx {spec:>2} {readout:<9}: output {shape}, {report.summary().splitlines()[0]}")

    c8 = equivfx.compile(cnn, "C8")
    report = equivfx.verify(c8, x)
    print(
        f"equivfx C8 (interpolated): max error {report.max_error:.3g}, "
        f"first approximate node: {report.first_bad_node}"
    )


if __name__ == "__main__":
    main()
