"""Backoff with full jitter, Retry-After parsing and the circuit breaker (workers/resilience.py),
driven by a seeded random source and an injected clock instead of sleeping."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conflux.config import RetryConfig
from conflux.workers.resilience import MAX_RETRY_AFTER_S, Backoff, CircuitBreaker, parse_retry_after

FUZZ = settings(max_examples=100, derandomize=True, deadline=None)
NOW = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- backoff ------------------------------------------------------------------------------------------


@FUZZ
@given(base_s=st.floats(0.001, 5), factor=st.floats(1, 1000), seed=st.integers(0, 2**32), attempts=st.integers(1, 40))
def test_full_jitter_stays_within_its_bounds(base_s: float, factor: float, seed: int, attempts: int) -> None:
    max_s = base_s * factor
    backoff = Backoff(base_s=base_s, max_s=max_s, rng=random.Random(seed))
    for attempt in range(attempts):
        ceiling = min(max_s, base_s * 2 ** attempt)
        assert base_s / 2 <= backoff.next_delay_s() <= max(ceiling, base_s / 2)
    assert backoff.attempt == attempts


def test_the_ceiling_doubles_up_to_max_and_the_draws_really_spread() -> None:
    backoff = Backoff(base_s=0.1, max_s=3.0, rng=random.Random(5))
    for _ in range(10):
        backoff.next_delay_s()
    draws = []
    for _ in range(2000):
        backoff.attempt = 10                     # ceiling capped at max_s = 3.0
        draws.append(backoff.next_delay_s())
    assert min(draws) == 0.05 and max(draws) <= 3.0
    assert sum(d > 2.25 for d in draws) > 300 and sum(d < 0.75 for d in draws) > 300  # uniform, not clustered
    backoff.reset()
    assert backoff.attempt == 0 and backoff.next_delay_s() <= 0.1


def test_backoff_from_config() -> None:
    backoff = Backoff.from_config(RetryConfig(base_s=0.5, max_s=4.0), rng=random.Random(1))
    assert (backoff.base_s, backoff.max_s, backoff.floor_s) == (0.5, 4.0, 0.25)


@pytest.mark.parametrize(("retry_after_s", "expected_s"), [
    (0.0, 0.2),                  # 0 means the minimum backoff, never a hot loop
    (0.05, 0.2),
    (7.0, 7.0),
    (45.0, 45.0),                # above max_s: the server knows best
    (10_000.0, MAX_RETRY_AFTER_S),
])
def test_retry_after_replaces_the_draw_but_never_goes_below_base(retry_after_s: float, expected_s: float) -> None:
    backoff = Backoff(base_s=0.2, max_s=30.0, rng=random.Random(0))
    assert backoff.next_delay_s(retry_after_s) == expected_s
    assert backoff.attempt == 1


# -- Retry-After ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "expected"), [
    ("120", 120.0),
    (" 3 ", 3.0),
    ("0", 0.0),
    (format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True), 30.0),
    ("Wed, 01 May 2024 10:01:00 GMT", 60.0),
    ("Wed, 01 May 2024 09:00:00 GMT", 0.0),      # a date in the past: go now (Backoff adds the floor)
    (None, None), ("", None), ("soon", None), ("-5", None), ("1.5", None),
    ("Wed, 01 May 99999 10:00:00 GMT", None),
    ("²", None), ("٣", None),                    # Unicode digits are not HTTP digits
])
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == expected


@FUZZ
@given(header=st.one_of(st.text(max_size=40), st.text(st.characters(categories=["Nd", "No", "Zs"]), max_size=4),
                        st.from_regex(r"\A[0-9]{1,400}\Z"),
                        st.datetimes(timezones=st.just(UTC)).map(lambda d: format_datetime(d, usegmt=True))))
def test_parse_retry_after_never_raises(header: str) -> None:
    """Regression: '²'.isdigit() is True but float('²') raises, so one odd header crashed a fetch."""
    delay = parse_retry_after(header, now=NOW)
    assert delay is None or delay >= 0


# -- circuit breaker ------------------------------------------------------------------------------


def breaker(clock: Clock, changes: list[str], failures: int = 3) -> CircuitBreaker:
    return CircuitBreaker(failures=failures, cooldown_s=10.0, clock=clock, on_change=changes.append)


def test_opens_after_consecutive_failures_only() -> None:
    clock, changes = Clock(), []
    cb = breaker(clock, changes)
    cb.record_failure()
    cb.record_failure()
    cb.record_success()                     # resets the count
    cb.record_failure()
    cb.record_failure()
    assert cb.state == cb.CLOSED and cb.allow()
    cb.record_failure()
    assert cb.state == cb.OPEN and changes == ["open"]
    assert not cb.allow() and cb.wait_s() == 10.0


def test_cools_down_to_one_probe_then_closes_on_success() -> None:
    clock, changes = Clock(), []
    cb = breaker(clock, changes, failures=1)
    cb.record_failure()
    clock.now += 9.5
    assert not cb.allow() and cb.wait_s() == pytest.approx(0.5)
    clock.now += 0.5
    assert cb.allow() and cb.state == cb.HALF_OPEN
    assert not cb.allow() and not cb.allow()   # one probe at a time
    assert cb.wait_s() == 0.0
    cb.record_success()
    assert cb.state == cb.CLOSED and cb.allow() and cb.allow()
    assert changes == ["open", "half_open", "closed"]


def test_a_failed_probe_opens_again_for_a_full_cool_down() -> None:
    clock, changes = Clock(), []
    cb = breaker(clock, changes, failures=2)
    cb.record_failure()
    cb.record_failure()
    clock.now += 10
    assert cb.allow()
    clock.now += 3                              # the probe took a while, then failed
    cb.record_failure()
    assert cb.state == cb.OPEN and cb.opened_at == clock.now and cb.wait_s() == 10.0
    assert not cb.allow()
    clock.now += 10
    assert cb.allow() and cb.state == cb.HALF_OPEN
    assert changes == ["open", "half_open", "open", "half_open"]


def test_failures_while_open_do_not_extend_the_cool_down() -> None:
    clock, changes = Clock(), []
    cb = breaker(clock, changes, failures=1)
    cb.record_failure()
    clock.now += 5
    cb.record_failure()                          # a request sent before it opened fails late
    assert cb.wait_s() == 5.0 and changes == ["open"]


def test_breaker_from_config() -> None:
    cb = CircuitBreaker.from_config(RetryConfig(breaker_failures=7, breaker_cooldown_s=2.5))
    assert (cb.failure_threshold, cb.cooldown_s, cb.state) == (7, 2.5, "closed")
