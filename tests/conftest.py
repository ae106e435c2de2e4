"""Shared pytest configuration for the equivfx test suite."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

import equivfx.passes.mixing as mixing

# --------------------------------------------------------------------------------------------------
# Hypothesis profiles: chosen by the HYPOTHESIS_PROFILE environment variable (default "dev").
#   dev      quick local runs, no deadline (examples compile models: 0.1 to 0.5 s each, more
#            on a loaded machine, where hypothesis' 200 ms default failed them at random)
#   ci       derandomized (reproducible across runs), no deadline (shared CI machines are noisy),
#            prints the reproduction blob of a failure
#   nightly  many examples
# --------------------------------------------------------------------------------------------------

settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile("ci", derandomize=True, max_examples=15, deadline=None, print_blob=True)
settings.register_profile("nightly", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _channels_first_mixing(monkeypatch):
    """Gather-layout mixing convolutions choose their memory format by timing by default
    (``GATHER_FORMAT = "auto"``), and the formats differ by float rounding; every test function
    runs with channels-first so its bitwise comparisons do not depend on the machine's timings.
    Tests of the other formats set ``equivfx.passes.mixing.GATHER_FORMAT`` themselves; work done
    in module-scoped fixtures and in subprocesses (test_reproduce, the CLI tests) keeps the default
    and compares with tolerances."""
    monkeypatch.setattr(mixing, "GATHER_FORMAT", "nchw")
