"""Decoding the paper's joint (class, pose) output."""

from __future__ import annotations

import torch

from equivfx.errors import ReadoutError, explain
from equivfx.groups import FiniteGroup
from equivfx.groups import group as as_group

__all__ = ["decode_pose"]


def decode_pose(logits: torch.Tensor, group: FiniteGroup | str):
    """The paper's joint argmax over R^(|G| K): class = idx % K, pose = g_(idx // K).

    With slot i holding F(g_i^-1 . x), an input x = g . x_upright peaks at the slot of g, so the
    decoded pose is the element that maps the upright digit to the input.

    Args:
        logits: ``(|G| K,)`` or ``(B, |G| K)``, slot-major (the ``pose`` readout).
        group: the group (or its spec).

    Returns:
        ``(class, element)`` for one sample; for a batch, a LongTensor of classes and a tuple of
        elements.

    Raises:
        ReadoutError: the last axis is not a multiple of |G|.

    Example:
        >>> logits = torch.zeros(40); logits[2 * 10 + 7] = 1.0
        >>> decode_pose(logits, "C4")
        (7, r2)
    """
    G = as_group(group)
    n = logits.shape[-1]
    if logits.dim() not in (1, 2) or n % G.order:
        raise ReadoutError(
            explain(
                "pose logits must be (|G| K,) or (B, |G| K)",
                tuple(logits.shape),
                f"a last axis divisible by |G| = {G.order}",
                "pass the output of readout='pose'",
            )
        )
    k = n // G.order
    idx = logits.argmax(-1)
    cls = idx % k
    pose = idx // k
    if logits.dim() == 1:
        return int(cls), G.elements[int(pose)]
    return cls, tuple(G.elements[int(i)] for i in pose)
