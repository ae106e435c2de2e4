"""pytest-friendly equivariance assertions.

Example:
    >>> import torch, equivfx
    >>> from equivfx.testing import assert_equivariant
    >>> report = assert_equivariant(equivfx.compile(torch.nn.Conv2d(1, 2, 3), "D4"),
    ...                             torch.randn(2, 1, 5, 5))
    >>> report.ok
    True
"""

from __future__ import annotations

from typing import Any

from equivfx.errors import EquivarianceError
from equivfx.verify import Report, verify

__all__ = ["assert_equivariant"]


def assert_equivariant(model, example_inputs, **kwargs: Any) -> Report:
    """Raise :class:`~equivfx.errors.EquivarianceError` (an AssertionError) unless ``model`` passes.

    Takes the arguments of :func:`equivfx.verify` and returns its report when the model passes.
    """
    report = verify(model, example_inputs, **kwargs)
    if not report.ok:
        raise EquivarianceError(report.summary())
    return report
