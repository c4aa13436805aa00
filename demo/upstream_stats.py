"""Request accounting of the demo upstream, served at ``GET /stats``.

Updated by the upstream process's handlers and middleware. Tests use it to see what the daemon did
to the upstream: how many pages of each style it fetched, which statuses it got, (from the arrival
times) the request rate the server actually saw, how many pages were in flight at once, and the
values of the request headers named by --count-header.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping

# Enough arrivals to measure a rate over a long benchmark without unbounded memory.
MAX_ARRIVALS = 100_000


class CollectionStats:
    __slots__ = ("arrivals", "headers", "in_flight", "max_in_flight", "requests", "status_codes", "throttled")

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.status_codes: Counter[int] = Counter()
        self.arrivals: deque[float] = deque(maxlen=MAX_ARRIVALS)
        self.throttled: deque[float] = deque(maxlen=MAX_ARRIVALS)
        self.headers: dict[str, Counter[str]] = {}
        self.in_flight = self.max_in_flight = 0


class Stats:
    """Counters per collection, plus status codes of every response (``all``)."""

    def __init__(self, collections: Iterable[str], *, count_headers: Iterable[str] = ()) -> None:
        self._collections = {name: CollectionStats() for name in collections}
        self._status_codes: Counter[int] = Counter()
        self._count_headers = tuple(count_headers)

    def record_request(self, collection: str, kind: str, *, page: bool,
                       headers: Mapping[str, str] | None = None) -> None:
        """Count a request of ``kind`` (a paging style, checksum, create, update); page fetches also
        log their arrival time and the values of the counted headers."""
        stats = self._collections[collection]
        stats.requests[kind] += 1
        if page:
            stats.arrivals.append(time.time())
        for name in self._count_headers if headers is not None else ():
            stats.headers.setdefault(name, Counter())[headers.get(name, "")] += 1

    def record_throttle(self, collection: str) -> None:
        """An injected 429: when it was answered, so a test can check the client honoured Retry-After."""
        self._collections[collection].throttled.append(time.time())

    @contextlib.contextmanager
    def in_flight(self, collection: str) -> Iterator[None]:
        """Around a page request's handling: tracks how many of the collection's pages overlap."""
        stats = self._collections[collection]
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            yield
        finally:
            stats.in_flight -= 1

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
                "max_in_flight": stats.max_in_flight,
            }
            if self._count_headers:
                view["headers"] = {name: dict(values) for name, values in stats.headers.items()}
            if timestamps:
                view["timestamps"] = list(stats.arrivals)
                view["throttled_at"] = list(stats.throttled)
            collections[name] = view
        return {"collections": collections,
                "status_codes": {str(code): n for code, n in sorted(self._status_codes.items())}}
