"""The merger process: keeps the latest version of every key it owns and delivers batches to the sink.

Reads frames from one ring per consumer, merges them (``workers.merge``), and flushes when
``batch_size`` records are pending, when the oldest has waited ``flush_interval_s``, or, when the sink
is idle, as soon as ``linger_s`` has passed, so a quiet pipeline delivers within milliseconds and a
busy one sends full batches. After the sink acknowledges a flush, the merger acknowledges its
positions to the consumers so they can commit.

Backpressure: when ``max_pending_records`` are waiting (the sink is slow or down), the merger stops
reading its rings; the rings fill, the consumers stop reading the log, and the backlog stays on disk.

Failures: a batch the sink finds too large (413) is split in halves until it fits. Writing dead letters
is retried with backoff ([retry], up to ``max_attempts``). Anything that still escapes a delivery (or
the ring reader) crashes the merger with exit code 1: the supervisor restarts it and the consumers,
seeing the ring's reader change, re-read everything it held. A delivery is never dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from conflux import metrics
from conflux.errors import ExitCode
from conflux.ipc.codec import decode_batch, encode_ack_frame, ring_frame_decoder
from conflux.ipc.messages import Acks, DeadLetter, FlushNow, MergeBatch
from conflux.ipc.shm import RingFull, RingReader, RingWriter
from conflux.log import open_log
from conflux.workers.base import AsyncWorker
from conflux.workers.batching import dead_letter_id
from conflux.workers.merge import DELETED, POSITION, RECORD, Chunk, FlushUnit, MergeState, Token, split_chunk
from conflux.workers.resilience import Backoff
from conflux.workers.sinks import Delivery, HttpSink

logger = logging.getLogger(__name__)

LINGER_S = 0.02
ACKS_PER_FRAME = 1000
# msgpack of one Position (array header, topic string header, two 64-bit ints) beyond the topic's bytes,
# and of an Acks frame beyond its positions.
POSITION_OVERHEAD_BYTES = 24
ACKS_OVERHEAD_BYTES = 32
FRAMES_PER_READ = 64


class MergerWorker(AsyncWorker):
    role = "merger"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.state = MergeState()
        self.readers: list[RingReader] = []
        self.ack_writers: list[RingWriter] = []
        self.ack_backlog: dict[int, list[Acks]] = defaultdict(list)
        self.in_flight = 0
        self.reading = True
        self.flush_now = False
        self.delivered_records = 0
        self.exit_code = ExitCode.OK

    async def main_async(self) -> int:
        sink_config = self.config.sink
        self.quick_stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.sink = HttpSink(sink_config, self.config.retry, stopping=self.quick_stop)
        await self.sink.start()
        self.dead_letters = open_log(self.config).dead_letters()
        self.readers = [RingReader(spec) for spec in self.spec.inbound]
        self.ack_writers = [RingWriter(spec) for spec in self.spec.outbound]
        self._start_reading()
        self.deliveries: set[asyncio.Task] = set()
        deliveries = self.deliveries
        try:
            await self._flush_loop(deliveries)
        finally:
            self._stop_reading()
            if deliveries and not self.stop_quickly:
                await asyncio.wait(deliveries, timeout=self.config.daemon.shutdown_timeout_s)
            for task in deliveries:
                task.cancel()
            await self.sink.close()
            self.dead_letters.close()
        return self.exit_code

    def _quit(self) -> None:
        super()._quit()
        self.quick_stop.set()

    def _crash(self, what: str, exc: BaseException) -> None:
        """Stop at once with exit code 1; the consumers re-read whatever this merger held."""
        logger.error("%s failed: %s: %s; the merger exits so that its records are re-read", what,
                     type(exc).__name__, exc, exc_info=exc)
        self.exit_code = ExitCode.CRASH
        self._quit()

    # -- reading ----------------------------------------------------------------------------------------

    def _start_reading(self) -> None:
        loop = asyncio.get_running_loop()
        self.reading = True
        for reader in self.readers:
            loop.add_reader(reader.wait_fd, self._on_frames, reader)
            self._on_frames(reader)  # frames that arrived while we were not listening

    def _stop_reading(self) -> None:
        loop = asyncio.get_running_loop()
        self.reading = False
        for reader in self.readers:
            loop.remove_reader(reader.wait_fd)

    def _on_frames(self, reader: RingReader) -> None:
        # A reader callback's exception would only be logged by the loop, and the frames it took lost.
        try:
            self._read_frames(reader)
        except Exception as exc:
            self._crash("reading a ring", exc)

    def _read_frames(self, reader: RingReader) -> None:
        if not self.reading:
            return
        started = time.perf_counter()
        for payload in reader.read_many(FRAMES_PER_READ):
            frame = ring_frame_decoder.decode(payload)
            if isinstance(frame, MergeBatch):
                token = Token(frame.consumer, frame.generation, frame.position)
                stale = self.state.add(decode_batch(frame.batch), token)
            elif isinstance(frame, FlushNow):
                self.flush_now = True
                continue
            if stale:
                metrics.dedup_skipped.labels("stale").inc(stale)
        if reader.used_bytes:  # more than one read's worth: come back on the next loop turn
            asyncio.get_running_loop().call_soon(self._on_frames, reader)
        metrics.processing_duration.labels("merge").observe(time.perf_counter() - started)
        if self.state.pending_count >= self.config.sink.max_pending_records:
            self._stop_reading()
        self.wake.set()

    # -- flushing ---------------------------------------------------------------------------------------

    async def _flush_loop(self, deliveries: set[asyncio.Task]) -> None:
        while True:
            idle_tokens = self.state.take_idle_tokens()
            if idle_tokens:
                self._acknowledge(idle_tokens)
            stopping = self.stopping.is_set()
            if stopping and (self.stop_quickly or self.state.pending_count == 0):
                return
            delay_s = self._flush_delay_s(stopping)
            if delay_s == 0.0:
                unit = self.state.take(self.config.sink.batch_size)
                task = asyncio.create_task(self._deliver(unit))
                deliveries.add(task)
                task.add_done_callback(self._delivery_done)
                if not self.reading and not stopping:
                    self._start_reading()
                continue
            self.wake.clear()
            waits = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(self.stopping.wait())]
            await asyncio.wait(waits, timeout=delay_s, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()

    def _flush_delay_s(self, stopping: bool) -> float | None:
        """0 to flush now, else how long until a timer would make us flush (None: nothing to wait for)."""
        state, sink = self.state, self.config.sink
        if state.pending_count == 0:
            return None
        if self.in_flight >= sink.max_in_flight or (self.in_flight and self.sink.failing_since is not None):
            return None  # a delivery finishing wakes us
        if stopping or self.flush_now or state.pending_count >= sink.batch_size:
            self.flush_now = False
            return 0.0
        age_s = state.age_s()
        linger_s = LINGER_S if self.in_flight == 0 else sink.flush_interval_s
        return max(0.0, min(linger_s, sink.flush_interval_s) - age_s)

    def _delivery_done(self, task: asyncio.Task) -> None:
        self.deliveries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._crash("a delivery", task.exception())

    async def _deliver(self, unit: FlushUnit) -> None:
        """Every chunk acknowledged by the sink or dead-lettered, then the unit's tokens acknowledged."""
        self.in_flight += 1
        try:
            todo = list(reversed(unit.chunks))  # a stack: the halves of a split chunk go next
            while todo:
                chunk = todo.pop()
                started = time.perf_counter()
                outcome = await self.sink.deliver(chunk.batch_id, chunk.body, len(chunk.keys))
                if outcome is None:
                    return  # stopping quickly: the consumers re-read these after restart
                metrics.processing_duration.labels("sink").observe(time.perf_counter() - started)
                if outcome.too_large and len(chunk.keys) > 1:
                    halves = split_chunk(chunk)
                    logger.info("sink answered 413 to batch %s of %d records; sending it as %d and %d", chunk.batch_id,
                                len(chunk.keys), len(halves[0].keys), len(halves[1].keys))
                    todo.extend(reversed(halves))
                    continue
                if not await self._record_outcome(chunk, _reasons(outcome)):
                    return
            self._acknowledge(unit.tokens)
        finally:
            self.in_flight -= 1
            self.wake.set()

    async def _record_outcome(self, chunk: Chunk, rejected: dict[int, str]) -> bool:
        """Count the delivered records and dead-letter the rejected ones; False if stopping quickly."""
        if rejected and not await self._dead_letter(chunk, rejected):
            return False
        delivered = len(chunk.keys) - len(rejected)
        metrics.records_delivered.labels(chunk.source).inc(delivered)
        deletes = sum(value[DELETED] for index, value in enumerate(chunk.values) if index not in rejected)
        if deletes:
            metrics.records_deleted.labels(chunk.source).inc(deletes)
        self.delivered_records += delivered
        return True

    async def _dead_letter(self, chunk: Chunk, rejected: dict[int, str]) -> bool:
        now = time.time()
        entries = []
        for index, reason in rejected.items():
            key, value = chunk.keys[index], chunk.values[index]
            position = value[POSITION]
            entries.append(DeadLetter(
                id=dead_letter_id(chunk.source, "sink", value[RECORD]), source=chunk.source, reason=reason,
                stage="sink", record=value[RECORD], key=key,
                origin=f"{position.topic}/{position.partition}/{position.offset}", first_seen=now, last_seen=now))
        if not await self._write_dead_letters(chunk, entries):
            return False
        metrics.dlq_records.labels(chunk.source, "sink_rejected").inc(len(entries))
        logger.warning("sink rejected %d of %d records of batch %s; they are in the dead-letter queue",
                       len(entries), len(chunk.keys), chunk.batch_id)
        return True

    async def _write_dead_letters(self, chunk: Chunk, entries: list[DeadLetter]) -> bool:
        """Retried with backoff; the last failure propagates and crashes the merger (see _crash). The store
        may fail in any way its backend can (SQLite full or locked, a Kafka error, a missing topic)."""
        retry = self.config.retry
        backoff = Backoff.from_config(retry)
        loop = asyncio.get_running_loop()
        for attempt in range(1, retry.max_attempts + 1):
            try:
                await loop.run_in_executor(None, self.dead_letters.add, entries)
                return True
            except Exception as exc:
                metrics.dlq_write_failures.labels(chunk.source).inc()
                if attempt == retry.max_attempts:
                    raise
                delay_s = backoff.next_delay_s()
                logger.warning("writing %d dead letters of batch %s failed (%s: %s); attempt %d of %d, next in "
                               "%.1f s", len(entries), chunk.batch_id, type(exc).__name__, exc, attempt,
                               retry.max_attempts, delay_s)
                if not await self._pause(delay_s):
                    return False
        return False

    async def _pause(self, delay_s: float) -> bool:
        """Sleep, but wake at once on a quick stop; False if we are stopping quickly."""
        try:
            await asyncio.wait_for(self.quick_stop.wait(), timeout=delay_s)
        except TimeoutError:
            return True
        return False

    # -- acknowledging ------------------------------------------------------------------------------------

    def _acknowledge(self, tokens: list[Token]) -> None:
        grouped: dict[tuple[int, int], list] = defaultdict(list)
        for token in tokens:
            grouped[(token.consumer, token.generation)].append(token.position)
        for (consumer, generation), positions in grouped.items():
            per_frame = acks_per_frame(positions, self.ack_writers[consumer].max_frame_bytes)
            for start in range(0, len(positions), per_frame):
                self.ack_backlog[consumer].append(
                    Acks(generation=generation, positions=positions[start:start + per_frame]))
        self._send_acks()

    def _send_acks(self) -> None:
        """Never block on a consumer: what does not fit now waits here for the next delivery or tick."""
        for consumer, backlog in self.ack_backlog.items():
            while backlog:
                try:
                    self.ack_writers[consumer].try_write(encode_ack_frame(backlog[0]))
                except RingFull:
                    break
                backlog.pop(0)

    def stats(self) -> dict[str, float]:
        self._send_acks()
        pending = self.state.pending_count
        metrics.queue_depth.labels(f"merger-{self.spec.index}-pending").set(pending)
        failing_since = self.sink.failing_since
        return {"pending": pending, "in_flight": self.in_flight, "delivered": self.delivered_records,
                "keys_known": self.state.keys_known, "sink_circuit": metrics.CIRCUIT_VALUES[self.sink.breaker.state],
                "sink_failing_s": round(time.monotonic() - failing_since, 3) if failing_since is not None else 0.0,
                "sink_last_status": self.sink.last_status}



def _reasons(outcome: Delivery) -> dict[int, str]:
    """A single record that is still too large is refused on its own: say so in its dead letter."""
    if outcome.too_large:
        return {index: f"too large even alone: {reason}" for index, reason in outcome.rejected.items()}
    return outcome.rejected


def acks_per_frame(positions: list, max_frame_bytes: int) -> int:
    """How many positions one ack frame may carry so that it fits the ack ring (a small ring and long
    topic names make 1000 too many)."""
    longest = max(len(position.topic.encode()) for position in positions)
    fitting = (max_frame_bytes - ACKS_OVERHEAD_BYTES) // (longest + POSITION_OVERHEAD_BYTES)
    return max(1, min(ACKS_PER_FRAME, fitting))
