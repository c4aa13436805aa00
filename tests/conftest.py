"""Shared fixtures. Each concern keeps its fixtures in tests/fixtures/<concern>.py."""

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.upstream",
    "tests.fixtures.analytics",
    "tests.fixtures.daemon",
]
