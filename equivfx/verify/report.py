"""The verification report."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

__all__ = ["Report"]

INTERPOLATED_NOTE = (
    "the input action is interpolated: equivariance is approximate by construction; "
    "compare max_error with the interpolation error of the action itself"
)
"""verify's note for an interpolated action (the summary says it in a line of its own)."""


@dataclass(frozen=True)
class Report:
    """What :func:`equivfx.verify` found.

    Attributes:
        ok: every checked element passed within tolerance.
        max_error: the largest absolute error, float64, over all checked elements and outputs.
        per_element: element name -> its largest absolute error.
        first_bad_node: for a compiled model that fails, the name of the first graph node whose
        value
            breaks its annotated representation (None when all pass or the model has no graph).
        first_bad_node_detail: that node's ``format_node()``, source line and error.
        group: the group's spec.
        exact: whether the group's input action is exact (interpolated actions are approximate, and
            their error is reported, not hidden).
        rtol, atol: the tolerance used.
        dtype: the output dtype.
        checked: names of the checked elements, generators first.
        input_action, output_action: descriptions of the actions checked.
        nan_outputs: how many of the model's output values on the example are NaN (NaN compares
            equal to NaN, so those are not checked, and the report fails: ``ok`` is False and
            the CLI exits 2, nothing having been shown to be violated).
        notes: what else the check found (shown by :meth:`summary`).
    """

    ok: bool
    max_error: float
    per_element: dict[str, float]
    first_bad_node: str | None
    group: str
    exact: bool
    rtol: float
    atol: float
    dtype: str
    checked: tuple[str, ...]
    input_action: str
    output_action: str
    first_bad_node_detail: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    nan_outputs: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checked"] = list(self.checked)
        d["notes"] = list(self.notes)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """The report as a JSON string (``"ok"`` first). Non-finite errors (an output whose
        NaNs or shape differ between g . x and x gives an infinite error) are the strings
        ``"inf"``, ``"-inf"`` and ``"nan"``: JSON has no such numbers (``Infinity`` is refused
        by strict parsers, JavaScript's among them)."""
        return json.dumps(_finite(self.to_dict()), indent=indent, allow_nan=False)

    def summary(self) -> str:
        """One paragraph for humans and assertion messages."""
        status = "equivariant" if self.ok else "NOT equivariant"
        worst = max(self.per_element.items(), key=lambda kv: kv[1]) if self.per_element else None
        s = (
            f"{status} under {self.group} (input: {self.input_action}; output: "
            f"{self.output_action}): max error {self.max_error:.3g} "
            f"(rtol={self.rtol:g}, atol={self.atol:g}, {self.dtype}) over {len(self.checked)} "
            "elements"
        )
        if worst and not self.ok:
            s += f"; worst element {worst[0]} ({worst[1]:.3g})"
        if self.first_bad_node:
            s += f"; first bad node: {self.first_bad_node}"
            if self.first_bad_node_detail:
                s += f"\n{self.first_bad_node_detail}"
        if not self.exact:
            s += "\n(the input action is interpolated, so equivariance is approximate)"
        for note in self.notes:
            if note != INTERPOLATED_NOTE:  # said just above
                s += f"\nnote: {note}"
        return s

    def __str__(self) -> str:
        return self.summary()


def _finite(value):
    """``value`` (nested dicts, lists, floats) with non-finite floats as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
