"""Shared fixtures. Each concern keeps its fixtures in tests/fixtures/<concern>.py."""

from hypothesis import HealthCheck, settings

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.upstream",
    "tests.fixtures.analytics",
    "tests.fixtures.daemon",
    "tests.fixtures.postgres",
]

# CI machines are shared and slow at times: property tests must not fail on how fast examples are
# generated or run, only on what they find; and the same examples run every time.
settings.register_profile("conflux", suppress_health_check=[HealthCheck.too_slow], deadline=None, derandomize=True)
settings.load_profile("conflux")
