"""Options shared by the passes of one compilation, in one frozen value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LiftOptions:
    """What the global-construction passes need to know.

    Attributes:
        group: the FiniteGroup.
        input_action: the action bound to ``group`` on the acted input.
        acted_input: name of the placeholder G acts on (the model's first input by default).
        readout: ``slots``, ``pose``, ``invariant`` or ``equivariant``.
        pool: ``mean``, ``max`` or ``logsumexp`` (invariant readout).
        output_action: the output's action (equivariant readout), bound to ``group``.
        example_batch: batch size of the example inputs, when given (lets ``to-map`` rewrite literal
            batch sizes).
        checked_leaves: leaf modules whose code the op rules checked, in every branch it takes
            (compile runs whole the submodules that branch on their training flag): annotated
            as leaves, without the warning that they are assumed to treat samples alone.
    """

    group: Any
    input_action: Any
    acted_input: str
    readout: str = "invariant"
    pool: str = "mean"
    output_action: Any = None
    example_batch: int | None = None
    checked_leaves: frozenset[str] = frozenset()
