"""The merger process: keeps the latest version of every key it owns and delivers it to the sinks.

Reads frames from one ring per consumer, merges them per source (``workers.merge``), and flushes a
source when its sinks' ``batch_size`` records are pending, when the oldest has waited their
``flush_interval_s``, or, when none of its deliveries is in flight, as soon as ``LINGER_S`` has passed,
so a quiet pipeline delivers within milliseconds and a busy one sends full batches. Each flush goes to
every sink of the source (``workers.delivery``); once all of them have it, the merger acknowledges its
positions to the consumers so they can commit.

Backpressure: a source waits while a sink of it has ``max_in_flight`` deliveries out (or is failing);
its records wait in the log, because each consumer keeps a bounded number of its messages in flight
per topic. As a last guard, the merger stops reading its rings when everything pending exceeds the
sum of the sources' ``max_pending_records``; the rings fill and the consumers stop reading the log.

Failures: a chunk a sink finds too large (413) is split in halves until it fits. Writing dead letters
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
from conflux.ipc.messages import Acks, FlushNow, MergeBatch
from conflux.ipc.shm import RingFull, RingReader, RingWriter
from conflux.log import open_log
from conflux.workers.base import AsyncWorker
from conflux.workers.delivery import Dispatcher, Route
from conflux.workers.merge import FlushUnit, MergeState, Token
from conflux.workers.resilience import sleep_unless
from conflux.workers.sinks import make_sinks

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
        self.reading = True
        self.flush_now = False
        self.exit_code = ExitCode.OK
        self.sinks: dict = {}
        self.dispatcher: Dispatcher | None = None

    async def main_async(self) -> int:
        self.quick_stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.sinks = make_sinks(self.config, stopping=self.quick_stop)
        for sink in self.sinks.values():
            await sink.start()
        self.routes = {source.name: Route([self.sinks[name] for name in self.config.sink_names_of(source)])
                       for source in self.config.sources}
        self.max_pending_total = sum(route.max_pending_records for route in self.routes.values()) or 1
        self.dead_letters = open_log(self.config).dead_letters()
        self.dispatcher = Dispatcher(self.routes, self.dead_letters, self.config.retry, self._pause)
        self.readers = [RingReader(spec) for spec in self.spec.inbound]
        self.ack_writers = [RingWriter(spec) for spec in self.spec.outbound]
        self._start_reading()
        self.deliveries: set[asyncio.Task] = set()
        try:
            await self._flush_loop()
        finally:
            self._stop_reading()
            if self.deliveries and not self.stop_quickly:
                await asyncio.wait(self.deliveries, timeout=self.config.daemon.shutdown_timeout_s)
            for task in self.deliveries:
                task.cancel()
            for sink in self.sinks.values():
                await sink.close()
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

    async def _pause(self, delay_s: float) -> bool:
        """Sleep, but wake at once on a quick stop; False if we are stopping quickly."""
        return await sleep_unless(self.quick_stop, delay_s)

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
                if stale:
                    metrics.dedup_skipped.labels("stale").inc(stale)
            elif isinstance(frame, FlushNow):
                self.flush_now = True
        if reader.used_bytes:  # more than one read's worth: come back on the next loop turn
            asyncio.get_running_loop().call_soon(self._on_frames, reader)
        metrics.processing_duration.labels("merge").observe(time.perf_counter() - started)
        if self.state.pending_count >= self.max_pending_total:
            self._stop_reading()
        self.wake.set()

    # -- flushing ---------------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            idle_tokens = self.state.take_idle_tokens()
            if idle_tokens:
                self._acknowledge(idle_tokens)
            stopping = self.stopping.is_set()
            if stopping and (self.stop_quickly or self.state.pending_count == 0):
                return
            due, delay_s = self._due(stopping)
            for source in due:
                task = asyncio.create_task(self._deliver(self.state.take(source)))
                self.deliveries.add(task)
                task.add_done_callback(self._delivery_done)
            if due:
                if not self.reading and not stopping and self.state.pending_count < self.max_pending_total:
                    self._start_reading()
                continue
            self.wake.clear()
            waits = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(self.stopping.wait())]
            await asyncio.wait(waits, timeout=delay_s, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()

    def _due(self, stopping: bool) -> tuple[list[str], float | None]:
        """The sources to flush now, and otherwise how long until a timer would make one due (None:
        nothing to wait for but a delivery finishing or a frame arriving)."""
        due, delay_s = [], None
        for source, state in self.state.sources.items():
            if not state.pending or self.dispatcher.busy(source):
                continue
            route = self.routes[source]
            if stopping or self.flush_now or len(state.pending) >= route.batch_size:
                due.append(source)
                continue
            linger_s = LINGER_S if self.dispatcher.idle(source) else route.flush_interval_s
            wait_s = max(0.0, min(linger_s, route.flush_interval_s) - state.age_s())
            if wait_s == 0.0:
                due.append(source)
            else:
                delay_s = wait_s if delay_s is None else min(delay_s, wait_s)
        if due:
            self.flush_now = False
        return due, delay_s

    def _delivery_done(self, task: asyncio.Task) -> None:
        self.deliveries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._crash("a delivery", task.exception())

    async def _deliver(self, unit: FlushUnit) -> None:
        """Every sink of the source takes the unit (or dead-letters what it refuses), then its tokens
        are acknowledged; if the process stops quickly first, the consumers re-read it."""
        try:
            if await self.dispatcher.deliver(unit):
                self._acknowledge(unit.tokens)
        finally:
            self.wake.set()

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
        if self.dispatcher is None:  # a heartbeat before the sinks have started
            return {}
        self._send_acks()
        pending = self.state.pending_count
        metrics.queue_depth.labels(f"merger-{self.spec.index}-pending").set(pending)
        now = time.monotonic()
        out = {"pending": pending, "in_flight": self.dispatcher.in_flight,
               "delivered": self.dispatcher.delivered_records, "keys_known": self.state.keys_known}
        for sink in self.sinks.values():
            failing_s = round(now - sink.failing_since, 3) if sink.failing_since is not None else 0.0
            prefix = "sink_" if sink.name == "default" else f"sink.{sink.name}."
            out.update({f"{prefix}circuit": metrics.CIRCUIT_VALUES[sink.breaker.state],
                        f"{prefix}failing_s": failing_s, f"{prefix}last_status": sink.last_status,
                        f"{prefix}in_flight": self.dispatcher.by_sink.get(sink.name, 0)})
        return out


def acks_per_frame(positions: list, max_frame_bytes: int) -> int:
    """How many positions one ack frame may carry so that it fits the ack ring (a small ring and long
    topic names make 1000 too many)."""
    longest = max(len(position.topic.encode()) for position in positions)
    fitting = (max_frame_bytes - ACKS_OVERHEAD_BYTES) // (longest + POSITION_OVERHEAD_BYTES)
    return max(1, min(ACKS_PER_FRAME, fitting))
