"""Delivering a merger's flush units to the sinks of their source, and what that leaves behind.

Runs in merger processes. A unit (everything pending for one source) goes to each of the source's sinks
at once; each sink gets it in chunks of its own ``batch_size``, retries each chunk until it is
acknowledged (``workers.sinks.base.Sink.deliver``), halves a chunk it finds too large, and sends the
records it refuses for good to the dead-letter queue. Only when every sink of the source has taken
the unit are its tokens acknowledged, so an offset is committed only once every sink has the records
before it. Each sink counts its own deliveries in flight (``max_in_flight``), so a sink that is down
holds back only the sources routed to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from conflux import metrics
from conflux.config import RetryConfig
from conflux.ipc.messages import DeadLetter
from conflux.log.base import DeadLetterStore
from conflux.workers.batching import dead_letter_id
from conflux.workers.merge import DELETED, POSITION, RECORD, FlushUnit
from conflux.workers.resilience import Backoff
from conflux.workers.sinks.base import Chunk, Delivery, Sink

logger = logging.getLogger(__name__)


class Route:
    """The sinks of one source, and the flush settings they agree on (the strictest of each)."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks
        self.batch_size = min(sink.options.batch_size for sink in sinks)
        self.flush_interval_s = min(sink.options.flush_interval_s for sink in sinks)
        self.max_pending_records = min(sink.options.max_pending_records for sink in sinks)


class Dispatcher:
    """The deliveries in flight in one merger, per source and per sink."""

    def __init__(self, routes: dict[str, Route], dead_letters: DeadLetterStore, retry: RetryConfig,
                 pause: Callable[[float], asyncio.Future]) -> None:
        self.routes = routes
        self.dead_letters = dead_letters
        self.retry = retry
        self.pause = pause
        self.by_source: dict[str, int] = dict.fromkeys(routes, 0)
        self.by_sink: dict[str, int] = {}
        self.delivered_records = 0

    def busy(self, source: str) -> bool:
        """Whether a new unit of ``source`` must wait: a sink of it has no room, or is failing while this
        source already has a delivery in flight (more would only queue behind the same outage)."""
        for sink in self.routes[source].sinks:
            if self.by_sink.get(sink.name, 0) >= sink.options.max_in_flight:
                return True
            if self.by_source[source] and sink.failing_since is not None:
                return True
        return False

    def idle(self, source: str) -> bool:
        return self.by_source[source] == 0

    @property
    def in_flight(self) -> int:
        return sum(self.by_source.values())

    async def deliver(self, unit: FlushUnit) -> bool:
        """Every sink of the unit's source took it (or dead-lettered what it refused); False if the
        process is stopping quickly (the consumers re-read it after the restart)."""
        sinks = self.routes[unit.source].sinks
        self.by_source[unit.source] += 1
        for sink in sinks:
            self.by_sink[sink.name] = self.by_sink.get(sink.name, 0) + 1
        try:
            taken = await asyncio.gather(*(self._deliver_to(sink, unit) for sink in sinks))
        finally:
            self.by_source[unit.source] -= 1
            for sink in sinks:
                self.by_sink[sink.name] -= 1
        if not all(taken):
            return False
        metrics.records_delivered.labels(unit.source).inc(unit.records)
        deletes = sum(value[DELETED] for value in unit.values)
        if deletes:
            metrics.records_deleted.labels(unit.source).inc(deletes)
        self.delivered_records += unit.records
        return True

    async def _deliver_to(self, sink: Sink, unit: FlushUnit) -> bool:
        todo = list(reversed(Chunk(unit.source, unit.keys, unit.values).cut(sink.options.batch_size)))
        while todo:  # a stack: the halves of a split chunk go next
            chunk = todo.pop()
            started = time.perf_counter()
            outcome = await sink.deliver(chunk)
            if outcome is None:
                return False
            metrics.processing_duration.labels("sink").observe(time.perf_counter() - started)
            if outcome.too_large and len(chunk) > 1:
                halves = chunk.halves()
                logger.info("%s answered 413 to batch %s of %d records; sending it as %d and %d", sink.name,
                            chunk.batch_id, len(chunk), len(halves[0]), len(halves[1]))
                todo.extend(reversed(halves))
                continue
            rejected = _reasons(sink, outcome)
            if rejected and not await self._dead_letter(sink, chunk, rejected):
                return False
            metrics.sink_records.labels(sink.name, chunk.source, "taken").inc(len(chunk) - len(rejected))
            if rejected:
                metrics.sink_records.labels(sink.name, chunk.source, "rejected").inc(len(rejected))
            _count_effects(sink, chunk.source, outcome)
        return True

    async def _dead_letter(self, sink: Sink, chunk: Chunk, rejected: dict[int, str]) -> bool:
        now = time.time()
        entries = []
        for index, reason in rejected.items():
            key, value = chunk.keys[index], chunk.values[index]
            position = value[POSITION]
            entries.append(DeadLetter(
                id=dead_letter_id(chunk.source, _stage_id(sink), value[RECORD]), source=chunk.source,
                reason=reason, stage="sink", record=value[RECORD], key=key,
                origin=f"{position.topic}/{position.partition}/{position.offset}", first_seen=now, last_seen=now))
        if not await self._write_dead_letters(chunk, entries):
            return False
        metrics.dlq_records.labels(chunk.source, "sink_rejected").inc(len(entries))
        logger.warning("sink %r rejected %d of %d records of batch %s; they are in the dead-letter queue",
                       sink.name, len(entries), len(chunk), chunk.batch_id)
        return True

    async def _write_dead_letters(self, chunk: Chunk, entries: list[DeadLetter]) -> bool:
        """Retried with backoff; the last failure propagates and crashes the merger. The store may fail in
        any way its backend can (SQLite full or locked, a Kafka error, a missing topic)."""
        backoff = Backoff.from_config(self.retry)
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                await asyncio.to_thread(self.dead_letters.add, entries)
                return True
            except Exception as exc:
                metrics.dlq_write_failures.labels(chunk.source).inc()
                if attempt == self.retry.max_attempts:
                    raise
                delay_s = backoff.next_delay_s()
                logger.warning("writing %d dead letters of batch %s failed (%s: %s); attempt %d of %d, next in "
                               "%.1f s", len(entries), chunk.batch_id, type(exc).__name__, exc, attempt,
                               self.retry.max_attempts, delay_s)
                if not await self.pause(delay_s):
                    return False
        return False


def _reasons(sink: Sink, outcome: Delivery) -> dict[int, str]:
    """The sink's reasons, saying which sink (when there are several) and that a single record was
    still too large alone."""
    prefix = "" if sink.name == "default" else f"sink {sink.name!r}: "
    if outcome.too_large:
        return {index: f"{prefix}too large even alone: {reason}" for index, reason in outcome.rejected.items()}
    return {index: prefix + reason for index, reason in outcome.rejected.items()} if prefix else outcome.rejected


def _count_effects(sink: Sink, source: str, outcome: Delivery) -> None:
    """The applied, deleted and stale counts a sink reports (0 from one that does not say)."""
    for effect, count in (("applied", outcome.applied), ("deleted", outcome.deleted), ("stale", outcome.stale)):
        if count:
            metrics.sink_effects.labels(sink.name, source, effect).inc(count)


def _stage_id(sink: Sink) -> str:
    """Part of a dead letter's id: the same record refused by two sinks is two entries."""
    return "sink" if sink.name == "default" else f"sink:{sink.name}"
