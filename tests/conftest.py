"""Shared pytest configuration for the equivfx test suite."""

from __future__ import annotations

import os

from hypothesis import settings

# --------------------------------------------------------------------------------------------------
# Hypothesis profiles: chosen by the HYPOTHESIS_PROFILE environment variable (default "dev").
#   dev      quick local runs
#   ci       derandomized (reproducible across runs), no deadline (shared CI machines are noisy),
#            prints the reproduction blob of a failure
#   nightly  many examples
# --------------------------------------------------------------------------------------------------

settings.register_profile("dev", max_examples=20)
settings.register_profile("ci", derandomize=True, max_examples=15, deadline=None, print_blob=True)
settings.register_profile("nightly", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
