"""TokenBucket (workers/ratelimit.py) on a fake clock; asyncio.sleep advances the clock instead of
waiting, so the tests measure the rate without taking any time."""

from __future__ import annotations

import asyncio
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conflux.workers.ratelimit import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        # A real sleep always lets the clock move a little; a float residue such as 1e-14 added to
        # 100.0 would not, and the bucket would wait for it forever.
        self.sleeps.append(delay_s)
        self.now += max(delay_s, 1e-6)
        await _real_sleep(0)  # still yield, so concurrent acquirers interleave


_real_sleep = asyncio.sleep


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("conflux.workers.ratelimit.asyncio.sleep", fake.sleep)
    return fake


def test_zero_rate_is_unlimited(clock: Clock) -> None:
    bucket = TokenBucket(0, clock=clock)

    async def many() -> None:
        for _ in range(1000):
            await bucket.acquire()

    asyncio.run(many())
    assert clock.sleeps == [] and bucket.delay_for_next_s() == 0.0


def test_burst_is_available_at_once_then_tokens_come_at_the_rate(clock: Clock) -> None:
    bucket = TokenBucket(4.0, burst=3, clock=clock)

    async def take(n: int) -> None:
        for _ in range(n):
            await bucket.acquire()

    asyncio.run(take(3))
    assert clock.now == 100.0 and bucket.delay_for_next_s() == pytest.approx(0.25)
    asyncio.run(take(8))
    assert clock.now == pytest.approx(102.0)  # 8 more tokens at 4/s


def test_idle_time_refills_no_more_than_the_burst(clock: Clock) -> None:
    bucket = TokenBucket(10.0, burst=2, clock=clock)
    asyncio.run(bucket.acquire())
    clock.now += 3600
    assert bucket.delay_for_next_s() == 0.0

    async def take(n: int) -> None:
        for _ in range(n):
            await bucket.acquire()

    start = clock.now
    asyncio.run(take(5))
    assert clock.now - start == pytest.approx(0.3)  # 2 saved up, 3 at 10/s


def test_a_burst_below_one_still_allows_one_token(clock: Clock) -> None:
    bucket = TokenBucket(2.0, burst=0.1, clock=clock)
    assert bucket.burst == 1.0 and bucket.delay_for_next_s() == 0.0


def test_concurrent_acquirers_are_served_in_arrival_order_at_the_rate(clock: Clock) -> None:
    bucket = TokenBucket(5.0, clock=clock)
    served: list[tuple[int, float]] = []

    async def one(index: int) -> None:
        await bucket.acquire()
        served.append((index, clock.now))

    async def all_at_once() -> None:
        await asyncio.gather(*(one(index) for index in range(6)))

    asyncio.run(all_at_once())
    assert [index for index, _ in served] == list(range(6))
    times = [at for _, at in served]
    assert all(later - earlier >= 0.2 - 1e-9 for earlier, later in pairwise(times))


@settings(max_examples=60, derandomize=True, deadline=None)
@given(rate=st.floats(0.5, 1000), burst=st.integers(1, 20), count=st.integers(1, 60))
def test_never_more_than_burst_plus_rate_times_elapsed(rate: float, burst: int, count: int) -> None:
    clock = Clock()
    bucket = TokenBucket(rate, burst=burst, clock=clock)

    async def run() -> None:
        for _ in range(count):
            await bucket.acquire()

    with pytest.MonkeyPatch.context() as patch:  # hypothesis examples cannot share the fixture
        patch.setattr("conflux.workers.ratelimit.asyncio.sleep", clock.sleep)
        asyncio.run(run())
    elapsed = clock.now - 100.0
    assert count <= burst + rate * elapsed + 1e-6
    assert elapsed <= max(0.0, (count - burst) / rate) + 1e-4  # and no slower than it must be
