"""What every sink is: a named destination that takes chunks of merged records and acknowledges them.

Runs in merger processes, one instance of each configured sink per merger. ``Sink.deliver`` keeps
trying one chunk until the destination acknowledges it (a ``Delivery``, possibly naming records it
refused for good: they go to the dead-letter queue) or the process is stopping quickly (None).
Everything else is an outage: ``attempt`` answers ``Retry`` and the chunk is tried again with
exponential backoff and full jitter (honouring a Retry-After), behind a circuit breaker per sink, so a
sink that is down holds back only the sources routed to it and their backlog waits in the log.

A sink type is a subclass with a ``kind`` (the config's ``type``), an ``Options`` msgspec Struct (its
config keys) and ``attempt``; built-in types and plugins alike are found through the ``conflux.sinks``
entry-point group (``workers.sinks.registry``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar, NamedTuple

import msgspec
from msgspec import Raw
from xxhash import xxh3_64_hexdigest, xxh3_128_hexdigest

from conflux import metrics
from conflux.config import RetryConfig
from conflux.workers.merge import DELETED, HASH, POSITION, RECORD, UPDATED
from conflux.workers.resilience import Backoff, CircuitBreaker, sleep_unless

logger = logging.getLogger(__name__)

TOO_LARGE = 413
# A record's `hash` describes the `data` the sink receives: for a delete that is null.
NULL_HASH = xxh3_64_hexdigest(b"null")


class SinkRecord(msgspec.Struct, array_like=False, gc=False):
    """One record of the HTTP ingest body (the analytics contract)."""

    source: str
    key: str
    op: str
    updated_at: str
    hash: str
    data: Raw | None  # null for a delete: a deleted record's fields never leave Conflux
    seq: int  # the log offset: breaks ties between versions with the same updated_at


_sink_encoder = msgspec.json.Encoder()


class Chunk:
    """The merged records one delivery carries to one sink: the newest version of each key, in order.

    ``batch_id`` is derived from the content (keys, content hashes, log positions, ops), so a retry, or
    a re-read after a crash that rebuilds the same chunk, carries the same id and a sink's ledger or
    idempotency key recognises it. The HTTP body is built on first use only.
    """

    __slots__ = ("_batch_id", "_body", "keys", "source", "values")

    def __init__(self, source: str, keys: list[str], values: list[tuple]) -> None:
        self.source = source
        self.keys = keys
        self.values = values
        self._batch_id: str | None = None
        self._body: bytes | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def batch_id(self) -> str:
        if self._batch_id is None:
            identity = _sink_encoder.encode([self.source, self.keys, [
                (value[HASH], value[POSITION].offset, value[DELETED]) for value in self.values]])
            self._batch_id = xxh3_128_hexdigest(identity)
        return self._batch_id

    @property
    def body(self) -> bytes:
        """The analytics ingest body: {"batch_id": ..., "records": [SinkRecord, ...]}."""
        if self._body is None:
            records = _sink_encoder.encode([
                SinkRecord(self.source, key, "delete", value[UPDATED], NULL_HASH, None, value[POSITION].offset)
                if value[DELETED] else
                SinkRecord(self.source, key, "upsert", value[UPDATED], value[HASH], value[RECORD],
                           value[POSITION].offset)
                for key, value in zip(self.keys, self.values)])
            self._body = b'{"batch_id":"%s","records":%s}' % (self.batch_id.encode(), records)
        return self._body

    def cut(self, size: int) -> list[Chunk]:
        """This chunk in pieces of at most ``size`` records (one piece if it is not larger)."""
        if len(self.keys) <= size:
            return [self]
        return [Chunk(self.source, self.keys[start:start + size], self.values[start:start + size])
                for start in range(0, len(self.keys), size)]

    def halves(self) -> tuple[Chunk, Chunk]:
        """The two halves of a chunk the sink found too large, each with its own content-derived id."""
        half = len(self.keys) // 2
        return (Chunk(self.source, self.keys[:half], self.values[:half]),
                Chunk(self.source, self.keys[half:], self.values[half:]))


class Delivery(NamedTuple):
    """A sink's final answer to one chunk: the record indices it refused for good, and why. A 413
    for a chunk of several records is for the merger to split, not to dead-letter."""

    rejected: dict[int, str]
    status: int = 0          # the HTTP status where there is one
    applied: int = 0         # records that changed the destination (where the sink says)
    stale: int = 0           # records it ignored as older than what it holds
    duplicate: bool = False  # the whole chunk was applied before (a retry after a lost answer)
    deleted: int = 0         # of the applied records, the deletes (where the sink says)

    @property
    def too_large(self) -> bool:
        return self.status == TOO_LARGE


class Retry(NamedTuple):
    """An answer that is not final: why (the metric's reason label), what to log, how long to wait."""

    reason: str
    message: str
    retry_after_s: float | None = None


class Sink:
    """Base of every sink type. ``__init__`` runs in the merger after fork and opens nothing;
    ``start`` opens clients inside the running loop; ``attempt`` makes one try."""

    api_version: ClassVar[int] = 1   # the plugin API this class implements (conflux.plugins.API_VERSION)
    kind: ClassVar[str] = ""
    Options: ClassVar[type] = msgspec.Struct

    def __init__(self, name: str, options: Any, retry: RetryConfig, *, stopping: asyncio.Event | None = None,
                 context: Any = None) -> None:
        self.name = name
        self.options = options
        self.retry = retry
        self.context = context            # the daemon's Config, for sinks that need more of it
        self.breaker = CircuitBreaker.from_config(retry, on_change=self._on_breaker_change)
        self._stopping = stopping
        self.failing_since: float | None = None
        self.last_status = -1             # of the last answer: 0 = none (unreachable), -1 = no request yet

    @property
    def target(self) -> str:
        """The label of this sink's breaker in conflux_circuit_state: "sink" for the [sink] table."""
        return "sink" if self.name == "default" else f"sink:{self.name}"

    # -- what a sink type provides ------------------------------------------------------------------

    async def start(self) -> None:
        metrics.circuit_state.labels(self.target).set(0)

    async def close(self) -> None:
        """Release what ``start`` opened."""

    async def attempt(self, chunk: Chunk) -> Delivery | Retry:
        raise NotImplementedError

    # -- the retry loop every sink shares -----------------------------------------------------------

    async def deliver(self, chunk: Chunk) -> Delivery | None:
        """Deliver until acknowledged or refused as bad; None only if the process is stopping quickly."""
        backoff = Backoff.from_config(self.retry)
        while True:
            if not self.breaker.allow():
                if not await self.pause(max(self.breaker.wait_s(), backoff.floor_s)):
                    return None
                continue
            outcome = await self.attempt(chunk)
            if isinstance(outcome, Delivery):
                self.breaker.record_success()
                self.failing_since = None
                return outcome
            metrics.sink_retries.labels(outcome.reason, self.name).inc()
            logger.warning("%s: %s; batch %s (%d records) will be retried", self._label(), outcome.message,
                           chunk.batch_id, len(chunk))
            self.breaker.record_failure()
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            if not await self.pause(backoff.next_delay_s(outcome.retry_after_s)):
                return None

    async def pause(self, delay_s: float) -> bool:
        """Sleep, but wake at once on a quick stop; False if we are stopping quickly."""
        return await sleep_unless(self._stopping, delay_s)

    def _label(self) -> str:
        return "sink" if self.name == "default" else f"sink {self.name!r}"

    def _on_breaker_change(self, state: str) -> None:
        metrics.circuit_state.labels(self.target).set(metrics.CIRCUIT_VALUES[state])
        logger.warning("%s circuit breaker is now %s", self._label(), state)
