"""Retry timing and circuit breaking, shared by upstream fetches and sink deliveries.

Pure logic with an injectable clock, so the unit tests drive time instead of sleeping.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

from conflux.config import RetryConfig

Clock = Callable[[], float]
MAX_RETRY_AFTER_S = 600.0  # a server asking for more than this is treated as asking for this
_shared_rng = random.Random()  # seeding a Random per request costs more than the jitter is worth


class Backoff:
    """Exponential backoff with full jitter: the n-th wait is uniform in [0, min(max, base * 2**n)].

    Full jitter spreads retries from many clients so they do not hit a recovering service in step.
    A floor of ``base_s / 2`` keeps a zero draw (or a Retry-After of 0) from becoming a hot loop.
    """

    def __init__(self, *, base_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self.attempt = 0
        self._rng = rng or _shared_rng

    @classmethod
    def from_config(cls, config: RetryConfig, rng: random.Random | None = None) -> Backoff:
        return cls(base_s=config.base_s, max_s=config.max_s, rng=rng)

    @property
    def floor_s(self) -> float:
        return self.base_s / 2

    def next_delay_s(self, retry_after_s: float | None = None) -> float:
        """The wait before the next attempt. A server's Retry-After replaces the jittered draw, but
        never goes below ``base_s`` (a Retry-After of 0 must not turn into a hot loop)."""
        ceiling = min(self.max_s, self.base_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        if retry_after_s is not None:
            return max(self.base_s, min(retry_after_s, MAX_RETRY_AFTER_S))
        return max(self.floor_s, self._rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempt = 0


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Retry-After in seconds or as an HTTP date -> seconds to wait (>= 0), or None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() also accepts '²', which float() refuses
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment is None:
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


class CircuitBreaker:
    """closed -> open after ``failures`` consecutive failures -> half_open after ``cooldown_s`` (one probe)
    -> closed on the probe's success, open again on its failure."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, *, failures: int, cooldown_s: float, clock: Clock = time.monotonic,
                 on_change: Callable[[str], None] | None = None) -> None:
        self.failure_threshold = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.on_change_hooks: list[Callable[[str], None]] = [on_change] if on_change is not None else []
        self.state = self.CLOSED
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self._probe_out = False

    @classmethod
    def from_config(cls, config: RetryConfig, **kwargs) -> CircuitBreaker:
        return cls(failures=config.breaker_failures, cooldown_s=config.breaker_cooldown_s, **kwargs)

    def allow(self) -> bool:
        """May a request go out now? In half-open, only one probe at a time."""
        if self.state == self.OPEN and self._clock() - self.opened_at >= self.cooldown_s:
            self._set(self.HALF_OPEN)
        if self.state == self.CLOSED:
            return True
        if self.state == self.HALF_OPEN and not self._probe_out:
            self._probe_out = True
            return True
        return False

    def wait_s(self) -> float:
        """How long until ``allow`` could say yes (0 when closed)."""
        if self.state == self.OPEN:
            return max(0.0, self.cooldown_s - (self._clock() - self.opened_at))
        return 0.0

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self._probe_out = False
        if self.state != self.CLOSED:
            self._set(self.CLOSED)

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        self._probe_out = False
        if self.state == self.HALF_OPEN or (self.state == self.CLOSED
                                             and self.consecutive_failures >= self.failure_threshold):
            self.opened_at = self._clock()
            self._set(self.OPEN)

    def _set(self, state: str) -> None:
        self.state = state
        for hook in self.on_change_hooks:
            hook(state)


async def sleep_unless(stopping: asyncio.Event | None, delay_s: float) -> bool:
    """Sleep ``delay_s``, but wake at once when ``stopping`` is set; False if it was (a quick stop)."""
    if stopping is None:
        await asyncio.sleep(delay_s)
        return True
    try:
        await asyncio.wait_for(stopping.wait(), timeout=delay_s)
    except TimeoutError:
        return True
    return False
