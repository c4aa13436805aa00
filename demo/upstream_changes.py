"""Background changes of the demo upstream: ``--change-rate`` random record updates and
``--delete-rate`` random deletes per second.

Each is a task in the upstream process's event loop. Steps are spread evenly over each second by
keeping to a schedule (step n is due at start + n / rate) rather than sleeping a fixed interval, so
the rate holds however long each wake-up takes. Which record changes or goes, and how, comes from an
RNG seeded from ``--seed`` (one stream for changes, another for deletes). Both pick live valid records
only, so a deleted record never comes back by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence

from conflux.demo.datagen import Key
from conflux.demo.store import Collection

# Waking more often than this costs more than it smooths; above 1/MIN_SLEEP_S changes per second
# several are applied per wake-up.
MIN_SLEEP_S = 0.005
# After a stall (a 1M-record page, a GC pause) at most this much backlog is made up, not all of it.
MAX_BACKLOG_S = 1.0

ApplyChange = Callable[[Collection, Key, dict[str, object]], object]
# (collection, key, hard) -> deletes the record
ApplyDelete = Callable[[Collection, Key, bool], object]
DELETE_STYLES = ("soft", "hard", "mixed")


class Schedule:
    """Calls ``step()`` ``rate_per_s`` times a second until cancelled; subclasses say what a step does."""

    def __init__(self, *, collections: Sequence[Collection], rate_per_s: float, rng: random.Random) -> None:
        self._collections = list(collections)
        self._rate_per_s = rate_per_s
        self._rng = rng
        self._rate_changed: asyncio.Event | None = None
        self.applied = 0

    @property
    def rate_per_s(self) -> float:
        return self._rate_per_s

    def set_rate(self, rate_per_s: float) -> None:
        self._rate_per_s = rate_per_s
        if self._rate_changed is not None:
            self._rate_changed.set()

    async def run(self) -> None:
        """Apply changes until cancelled; a new rate restarts the schedule from now."""
        self._rate_changed = asyncio.Event()
        while True:
            self._rate_changed.clear()
            if self._rate_per_s > 0 and self._collections:
                await self._run_at(self._rate_per_s)
            else:
                await self._rate_changed.wait()

    async def _run_at(self, rate_per_s: float) -> None:
        assert self._rate_changed is not None
        started = time.monotonic()
        done = 0
        while not self._rate_changed.is_set():
            elapsed_s = time.monotonic() - started
            due = int(elapsed_s * rate_per_s) - done
            if due > rate_per_s * MAX_BACKLOG_S:
                skipped = due - int(rate_per_s * MAX_BACKLOG_S)
                done += skipped
                due -= skipped
            for _ in range(due):
                self.step()
            done += due
            sleep_s = max(MIN_SLEEP_S, started + (done + 1) / rate_per_s - time.monotonic())
            with contextlib.suppress(TimeoutError):  # a rate change wakes us early
                await asyncio.wait_for(self._rate_changed.wait(), sleep_s)

    def step(self) -> None:
        raise NotImplementedError


class ChangeGenerator(Schedule):
    """Updates random live valid records across ``collections`` through ``apply`` at ``rate_per_s``."""

    def __init__(self, *, collections: Sequence[Collection], apply: ApplyChange, rate_per_s: float,
                 seed: int) -> None:
        super().__init__(collections=collections, rate_per_s=rate_per_s, rng=random.Random(f"{seed}:changes"))
        self._apply = apply

    def step(self) -> None:
        collection = self._rng.choice(self._collections)
        key = collection.random_live_key(self._rng)
        if key is not None:
            self._apply(collection, key, collection.spec.mutation(self._rng))
            self.applied += 1


class DeleteGenerator(Schedule):
    """Deletes random live valid records across ``collections`` through ``apply`` at ``rate_per_s``;
    ``style`` soft or hard, or mixed: each delete soft or hard with even odds."""

    def __init__(self, *, collections: Sequence[Collection], apply: ApplyDelete, rate_per_s: float,
                 seed: int, style: str = "soft") -> None:
        super().__init__(collections=collections, rate_per_s=rate_per_s, rng=random.Random(f"{seed}:deletes"))
        self._apply = apply
        self.style = check_delete_style(style)

    def draw_hard(self) -> bool:
        """Whether the next delete is hard, by ``style``."""
        return self.style == "hard" or (self.style == "mixed" and self._rng.random() < 0.5)

    def step(self) -> None:
        collection = self._rng.choice(self._collections)
        key = collection.random_live_key(self._rng)
        if key is not None:
            self._apply(collection, key, self.draw_hard())
            self.applied += 1


def check_delete_style(style: object) -> str:
    """``style`` if it is one of DELETE_STYLES; else ValueError naming delete_style."""
    if style not in DELETE_STYLES:
        raise ValueError(f"delete_style: must be one of {', '.join(DELETE_STYLES)}, got {style!r}")
    return str(style)
