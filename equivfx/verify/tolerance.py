"""Tolerances: one per-dtype table; errors computed in float64 and scaled.

A pair of values passes when ``|a - b| <= atol + rtol * max(|a|, |b|)``.
"""

from __future__ import annotations

import torch

__all__ = ["TOLERANCES", "check_tolerance", "tolerance", "abs_error", "within"]

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    # dtype: (rtol, atol)
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
    torch.complex64: (1e-5, 1e-6),
    torch.complex128: (1e-10, 1e-12),
}
"""(rtol, atol) by dtype. Exact groups on deterministic kernels give 0 or a few ulps, far inside."""


def check_tolerance(name: str, value) -> None:
    """Raise unless ``value`` (``rtol`` or ``atol``) is None or a finite number >= 0: a negative
    bound fails every model, an infinite or NaN one passes (or fails) every model."""
    import math
    import numbers

    from equivfx.errors import VerifyArgumentError, explain

    if value is None:
        return
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise VerifyArgumentError(
            explain(
                f"{name} must be a finite number >= 0",
                repr(value),
                f"e.g. {name}=1e-5, or None for the dtype's default",
                "pass a non-negative float",
            )
        )


def tolerance(dtype: torch.dtype, rtol: float | None = None, atol: float | None = None):
    """(rtol, atol) for ``dtype``, overridden by explicit values; integer dtypes compare exactly."""
    check_tolerance("rtol", rtol)
    check_tolerance("atol", atol)
    base = TOLERANCES.get(dtype, (0.0, 0.0))
    return (base[0] if rtol is None else float(rtol), base[1] if atol is None else float(atol))


def _f64(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.to(torch.complex128) if t.is_complex() else t.to(torch.float64)


def abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 (0.0 for empty tensors; inf for NaN or a shape mismatch)."""
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    a64, b64 = _f64(a), _f64(b)
    d = torch.where(a64 == b64, 0.0, (a64 - b64).abs())  # equal infinities: 0, not inf - inf
    if torch.isnan(d).any():
        return (
            float("inf")
            if not torch.equal(torch.isnan(a64), torch.isnan(b64))
            else float(torch.nan_to_num(d, nan=0.0).max())
        )
    return float(d.max())


def within(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    """Whether every pair passes ``|a-b| <= atol + rtol * max(|a|, |b|)`` (float64)."""
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    a64, b64 = _f64(a), _f64(b)
    d = (a64 - b64).abs()
    bound = atol + rtol * torch.maximum(a64.abs(), b64.abs())
    both_nan = torch.isnan(a64) & torch.isnan(b64)
    # the bound is infinite where either value is: an infinity passes only against itself
    close = torch.isfinite(d) & (d <= bound)
    return bool((close | both_nan | (a64 == b64)).all())
