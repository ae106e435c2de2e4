"""Numeric verification of equivariance, localisation, and hypothesis strategies (``strategies``).

``equivfx.verify.strategies`` imports hypothesis and is not imported here.
"""

from equivfx.verify.check import ALL_ELEMENTS_UP_TO, elements_to_check, verify
from equivfx.verify.report import Report
from equivfx.verify.tolerance import TOLERANCES, tolerance

__all__ = ["ALL_ELEMENTS_UP_TO", "Report", "TOLERANCES", "elements_to_check", "tolerance", "verify"]
