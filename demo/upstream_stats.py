"""Request accounting of the demo upstream, served at ``GET /stats``.

Updated by the upstream process's handlers and middleware. Tests use it to see what the daemon did
to the upstream: how many pages of each style it fetched, which statuses it got, and (from the
arrival times) the request rate the server actually saw.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable

# Enough arrivals to measure a rate over a long benchmark without unbounded memory.
MAX_ARRIVALS = 100_000


class CollectionStats:
    __slots__ = ("arrivals", "requests", "status_codes")

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.status_codes: Counter[int] = Counter()
        self.arrivals: deque[float] = deque(maxlen=MAX_ARRIVALS)


class Stats:
    """Counters per collection, plus status codes of every response (``all``)."""

    def __init__(self, collections: Iterable[str]) -> None:
        self._collections = {name: CollectionStats() for name in collections}
        self._status_codes: Counter[int] = Counter()

    def record_request(self, collection: str, kind: str, *, page: bool) -> None:
        """Count a request of ``kind`` (a paging style, checksum, create, update); page fetches also
        log their arrival time."""
        stats = self._collections[collection]
        stats.requests[kind] += 1
        if page:
            stats.arrivals.append(time.time())

    def record_status(self, collection: str | None, status: int) -> None:
        self._status_codes[status] += 1
        if collection in self._collections:
            self._collections[collection].status_codes[status] += 1

    def as_dict(self, record_counts: dict[str, dict[str, int]], *, timestamps: bool) -> dict[str, object]:
        collections = {}
        for name, stats in self._collections.items():
            view: dict[str, object] = {
                **record_counts.get(name, {}),
                "requests": dict(stats.requests),
                "status_codes": {str(code): n for code, n in sorted(stats.status_codes.items())},
            }
            if timestamps:
                view["timestamps"] = list(stats.arrivals)
            collections[name] = view
        return {"collections": collections,
                "status_codes": {str(code): n for code, n in sorted(self._status_codes.items())}}
