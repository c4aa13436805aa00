"""A token bucket for one source: every request to it, fetcher pages and manual syncs alike, and every
retry, takes a token first, so the upstream never sees more than ``rate_limit_rps``. A Retry-After
answer pauses the whole bucket, so every request to that source waits, not only the one that got it.

Runs in the fetcher process that owns the source, inside its event loop (no threads, no locks
beyond asyncio's).
"""

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
        self._not_before = float("-inf")
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate_per_s)
        self._updated = now

    def delay_for_next_s(self) -> float:
        """How long until a token is available (0 if one is), without taking it."""
        paused_s = max(0.0, self._not_before - self._clock())
        if self.rate_per_s <= 0:
            return paused_s
        self._refill()
        return max(paused_s, 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate_per_s)

    def pause(self, delay_s: float) -> None:
        """Hand out no token for ``delay_s`` (a server's Retry-After); a longer pause already set stays."""
        self._not_before = max(self._not_before, self._clock() + delay_s)

    async def acquire(self) -> None:
        if self.rate_per_s <= 0 and self._clock() >= self._not_before:
            return
        async with self._lock:
            while (delay_s := self.delay_for_next_s()) > 0:
                await asyncio.sleep(delay_s)
            if self.rate_per_s > 0:
                self._tokens -= 1
