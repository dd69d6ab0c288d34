"""Hypothesis profiles for the config property tests; import this module to apply them.

HYPOTHESIS_PROFILE=dev (the default: a quick run, 50 examples), ci (the default when CI is
set, as .ci/run runs: 150 examples) or deep (many examples, no deadline):
    HYPOTHESIS_PROFILE=deep python -m pytest tests/test_inetdconf_props.py
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=150, deadline=None)
settings.register_profile(
    "deep",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DEFAULT = "ci" if os.environ.get("CI") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", DEFAULT))
