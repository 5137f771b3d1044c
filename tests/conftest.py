"""Shared test configuration: hypothesis profiles only.

HYPOTHESIS_PROFILE=long runs every property test with 20x the examples
(for a soak run; the default keeps the suite fast on a shared 2-core box).
Tests that want more or fewer examples than the profile's max_examples
scale it (see tests/test_property_walk.py), so "long" scales them too.
"""
import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("default", max_examples=100, **_COMMON)
settings.register_profile("long", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
