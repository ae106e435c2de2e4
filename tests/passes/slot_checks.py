"""Helpers shared by the tests of the passes that choose which slots to compute
(eliminate-dead-slots, defer-lift-to-cosets)."""

from __future__ import annotations

import torch
from torch import nn

READOUTS = [
    dict(readout="invariant"),
    dict(readout="invariant", pool="max"),
    dict(readout="invariant", pool="logsumexp"),
    dict(readout="slots"),
    dict(readout="pose"),
]
"""Every readout and pool a slot-choosing pass must leave unchanged."""


def flat(emodel):
    """A compiled model's flat graph module (the chunk runner keeps it as ``equivfx_flat``)."""
    return getattr(emodel, "equivfx_flat", emodel)


def rows_seen(module: nn.Module, run) -> int:
    """Rows ``module`` sees in one run, over all its calls (chunks run it once per chunk)."""
    rows = []
    handle = module.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return sum(rows)


def loop_oracle(model, G, x, readout="invariant", pool="mean"):
    """The definition, element by element: F(g^-1 . x) for every g, then the readout."""
    with torch.no_grad():
        slots = torch.stack([model(G.act(G.inverse(g), x)) for g in G.elements], 1)
    if readout == "slots":
        return slots
    if readout == "pose":
        return slots.flatten(1)
    if pool == "logsumexp":
        return torch.logsumexp(slots, 1) - torch.log(torch.tensor(float(G.order)))
    return {"mean": slots.mean(1), "max": slots.amax(1)}[pool]
