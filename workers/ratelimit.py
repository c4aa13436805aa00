"""A token bucket for one source: every request to it, fetcher pages and manual syncs alike, and every
retry, takes a token first, so the upstream never sees more than ``rate_limit_rps``."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up. A rate of 0 means unlimited.

    Waiters are served in arrival order through a lock, so a burst of concurrent page fetches
    cannot overtake each other and exceed the rate between them.
    """

    def __init__(self, rate_per_s: float, *, burst: float = 1.0, clock=time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1.0, burst)
        self._clock = clock
        self._tokens = self.burst
        self._updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate_per_s)
        self._updated = now

    def delay_for_next_s(self) -> float:
        """How long until a token is available (0 if one is), without taking it."""
        if self.rate_per_s <= 0:
            return 0.0
        self._refill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate_per_s

    async def acquire(self) -> None:
        if self.rate_per_s <= 0:
            return
        async with self._lock:
            while (delay_s := self.delay_for_next_s()) > 0:
                await asyncio.sleep(delay_s)
            self._tokens -= 1
