"""The consumer process: reads the log, drops duplicates, routes records to mergers, commits what is acked.

One loop, no threads: poll the log, drop what was already delivered, hand each message to the merger
that owns its partition through a shared-memory ring, read acknowledgements back, commit. An offset is
committed only once the merger has acknowledged that the sink took everything up to it.

If a merger restarts (its ring's reader epoch changes), what it held is gone: the consumer
forgets everything in flight and re-reads from the last commit. The sink sees at most a repeat of an
idempotent batch, and nothing is lost.

On TERM the consumer drains: it routes nothing more, asks the mergers to flush, waits for their acks
and commits. The supervisor's ``Drain`` message (sent just before the TERM) says how much of its own
deadline is left; the consumer stops waiting early enough to make its final commit before the
supervisor would kill it.

A message waiting longer than ``[workers] ack_timeout_s`` for its acknowledgement is reported (log,
``conflux_ack_timeouts_total``, ``conflux_oldest_unacked_seconds``, heartbeat stats) and stays in flight:
its merger still holds it and keeps retrying the sink, and a merger that cannot go on exits, which
rewinds. Re-reading on a timer would only send the same records again to a sink that is not answering.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time

import msgspec

from conflux import metrics
from conflux.errors import LogError
from conflux.ipc.codec import ack_frame_decoder, decode_batch, decode_batch_head, encode_batch, encode_ring_frame
from conflux.ipc.messages import (
    Batch,
    DeadLetter,
    Drain,
    FlushNow,
    LagReport,
    MergeBatch,
    PartitionsOwned,
    Position,
)
from conflux.ipc.shm import FrameTooLarge, RingFull, RingReader, RingWriter
from conflux.log import open_log
from conflux.log.base import LogConsumer, LogMessage, TopicPartition
from conflux.workers.base import Worker
from conflux.workers.batching import dead_letter_id, fit_batch
from conflux.workers.checkpoint import InFlight, OffsetTracker
from conflux.workers.dedup import Deduplicator

logger = logging.getLogger(__name__)

POLL_BATCH = 64
# Per topic (source): a source whose sink is down holds this many of its messages, and its partitions
# pause, while the other sources go on.
MAX_IN_FLIGHT_PER_TOPIC = 512
COMMIT_INTERVAL_S = 1.0
LAG_REPORT_INTERVAL_S = 2.0
ACK_CHECK_INTERVAL_S = 1.0
IDLE_POLL_S = 0.02
ACK_WAIT_S = 0.005
# Kept out of a drain's budget for the final commit and the log's close (at most a quarter of the budget).
COMMIT_RESERVE_S = 2.0


class ConsumerWorker(Worker):
    role = "consumer"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.draining = False
        self.drain_deadline: float | None = None   # monotonic; set when the drain begins
        self.quit = False
        self.generation = 0
        self.tracker = OffsetTracker()
        self.dedup = Deduplicator()
        self.log_consumer: LogConsumer | None = None
        self.to_mergers: list[RingWriter] = []
        self.from_mergers: list[RingReader] = []
        self.merger_epochs: list[int] = []
        self.held: set[str] = set()
        self._last_commit = self._last_lag_report = self._last_ack_check = 0.0
        self.oldest_unacked_s = 0.0
        self.overdue_acks = 0
        self._owned: list[TopicPartition] = []
        self._sources_by_topic = {self.config.topic_of(source): source.name for source in self.config.sources}

    # -- lifecycle ----------------------------------------------------------------------------------

    def main(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGQUIT, self._on_quit)
        self.generation = int.from_bytes(os.urandom(6), "big") << 8
        backend = open_log(self.config)
        self.dead_letters = backend.dead_letters()
        self.to_mergers = [RingWriter(spec) for spec in self.spec.outbound]
        self.from_mergers = [RingReader(spec) for spec in self.spec.inbound]
        self.merger_epochs = [ring.reader_epoch for ring in self.to_mergers]
        self.log_consumer = backend.consumer(self.spec.index, list(self.spec.assignment))
        self.log_consumer.start(self._on_assign, self._on_revoke)
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _on_term(self, signum, frame) -> None:
        if self.draining:
            self.quit = True
        self.draining = True

    def _on_quit(self, signum, frame) -> None:
        self.quit = True

    def _loop(self) -> None:
        while not self.quit:
            self._service()
            if self.draining:
                if self._drain_expired() or self.tracker.in_flight == 0:
                    return
                self._wait_for_acks(0.05)
                continue
            if self._hold(self.tracker.topics_at(MAX_IN_FLIGHT_PER_TOPIC)):
                self._keep_group_alive()
                self._wait_for_acks(0.05)
                continue
            if self.tracker.in_flight:
                messages = self.log_consumer.poll(POLL_BATCH, 0.0)
                if not messages:  # nothing new: wait for acks instead of spinning on the log
                    self._wait_for_acks(ACK_WAIT_S)
            else:
                messages = self.log_consumer.poll(POLL_BATCH, IDLE_POLL_S)
            self._consume(messages)

    def _drain_expired(self) -> bool:
        """While draining: has our drain deadline passed? The first call starts the drain."""
        if not self.draining:
            return False
        messages, closed = self.channel.receive()
        if self.drain_deadline is None:
            budgets = [message.timeout_s for message in messages if isinstance(message, Drain)]
            # No Drain message: the TERM came from elsewhere (the kernel when the supervisor died, an operator).
            budget_s = budgets[-1] if budgets else self.config.daemon.shutdown_timeout_s
            self.drain_deadline = drain_deadline(time.monotonic(), budget_s)
            self._ask_mergers_to_flush()
        if closed:  # the supervisor is gone: nobody will wait for us, or kill us at its deadline
            logger.warning("the supervisor is gone; committing what is acknowledged and stopping")
            return True
        return time.monotonic() >= self.drain_deadline

    def _shutdown(self) -> None:
        if not self.quit:
            self._commit(force=True)
        if self.log_consumer is not None:
            self.log_consumer.close()
        logger.info("consumer stopped; %d messages were still in flight and will be re-read", self.tracker.in_flight)

    # -- the steady-state work -------------------------------------------------------------------

    def _service(self) -> None:
        """Everything besides reading the log: restarts of mergers, acks, commits, reports."""
        self._check_merger_restarts()
        self._read_acks()
        self._commit()
        self._report()
        self._check_ack_timeouts()
        self.heartbeat(in_flight=self.tracker.in_flight, keys_known=self.dedup.keys_known,
                       oldest_unacked_s=round(self.oldest_unacked_s, 3), overdue_acks=self.overdue_acks)

    def _consume(self, messages: list[LogMessage]) -> None:
        if not messages:
            return
        generation = self.generation
        started = time.perf_counter()
        log_each = logger.isEnabledFor(logging.INFO)
        per_topic: dict[str, int] = {}
        for message in messages:
            if self.generation != generation or self.quit or self.draining:
                break  # a rewind re-reads the rest from the last commit; a drain leaves it for the next start
            if (message.topic, message.partition) not in self.tracker.partitions:
                continue
            began = time.perf_counter()
            message_id, records, routed = self._route(message)
            if log_each:
                _log_processed(message, message_id, records, routed, time.perf_counter() - began)
            per_topic[message.topic] = per_topic.get(message.topic, 0) + 1
        for topic, count in per_topic.items():
            metrics.messages_processed.labels(topic).inc(count)
        if per_topic:
            per_message_s = (time.perf_counter() - started) / sum(per_topic.values())
            metrics.processing_duration.labels("consume").observe(per_message_s)

    def _route(self, message: LogMessage) -> tuple[str, int, int]:
        """Hand one log message to its merger; returns its message id, its records and how many were routed."""
        tp = (message.topic, message.partition)
        position = Position(message.topic, message.partition, message.offset)
        try:
            head = decode_batch_head(message.payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._dead_letter_message(message, f"undecodable log message: {exc}")
            self._finish(self.tracker.add(tp, InFlight(message.offset, 0, "")))
            return "", 0, 0
        if self.dedup.seen_message(head.message_id):
            metrics.dedup_skipped.labels("message_id").inc()
            self._finish(self.tracker.add(tp, InFlight(message.offset, 0, "")))
            return head.message_id, head.count, 0
        # A replay re-sends what the sink refused, so its content must not count as already delivered.
        fresh = (self.dedup.fresh_indices(head.key_hashes, head.hashes, head.source)
                 if head.sync != "replay" else None)
        merger = merger_for(message.partition, len(self.to_mergers))
        if fresh is None:  # the usual case: the payload goes to the merger as it is
            key_hashes, hashes, routed = head.key_hashes, head.hashes, head.count
            payload = message.payload
        else:
            metrics.dedup_skipped.labels("content_hash").inc(head.count - len(fresh))
            batch = decode_batch(message.payload).subset(fresh)
            key_hashes, hashes, routed = batch.key_hashes, batch.hashes, batch.count
            payload = encode_batch(batch)
        frames, too_large = self._frames(merger, position, payload, message) if routed else ([], 0)
        routed -= too_large
        entry = InFlight(message.offset, (1 << merger) if frames else 0, head.message_id, key_hashes, hashes,
                         routed, head.source, pieces=len(frames) or 1, sent_at=time.monotonic())
        self._finish(self.tracker.add(tp, entry))
        for frame in frames:
            if not self._send(merger, frame):
                break
        return head.message_id, head.count, routed

    def _frames(self, merger: int, position: Position, payload: bytes, message: LogMessage) -> tuple[list[bytes], int]:
        """The ring frames that carry ``payload`` (an encoded Batch) to ``merger``, and how many of its records
        were dead-lettered instead. One frame, unless the batch is larger than the ring takes (a message
        written by an older version or another producer): then several, each a ``Batch.subset``; a record
        too large for any frame goes to the DLQ with its reason. No size of message stops the consumer."""
        frame = encode_ring_frame(MergeBatch(self.spec.index, self.generation, position, msgspec.Raw(payload)))
        max_frame_bytes = self.to_mergers[merger].max_frame_bytes
        if len(frame) <= max_frame_bytes:
            return [frame], 0
        batch = decode_batch(payload)
        pieces, too_large = fit_batch(batch, max_frame_bytes - (len(frame) - len(payload)))
        if too_large:
            self._dead_letter_records(message, batch, too_large)
        logger.warning("message %s at %s/%d@%d is %d bytes, more than a ring frame carries (%d): sent as %d frames, "
                       "%d records too large for any frame dead-lettered", batch.message_id, message.topic,
                       message.partition, message.offset, len(frame), max_frame_bytes, len(pieces), len(too_large))
        return [encode_ring_frame(MergeBatch(self.spec.index, self.generation, position,
                                             msgspec.Raw(encode_batch(piece)))) for piece in pieces], len(too_large)

    def _send(self, merger: int, payload: bytes) -> bool:
        """Write one frame, waiting for room while still serving acks, signals and heartbeats.
        False if a rewind made the frame pointless while we waited, or the drain ran out of time."""
        ring = self.to_mergers[merger]
        generation = self.generation
        while True:
            try:
                ring.try_write(payload)
                return True
            except RingFull:
                pass
            except FrameTooLarge as exc:  # _frames sizes every frame to fit, so this is a bug, not bad input
                raise LogError(f"a frame is larger than the ring takes ({exc})") from exc
            self._service()
            if self.quit or self.generation != generation or self._drain_expired():
                return False
            select.select([ring.wait_fd, *self._ack_fds()], [], [], 0.1)

    # -- acknowledgements and commits --------------------------------------------------------------

    def _read_acks(self) -> None:
        for merger, ring in enumerate(self.from_mergers):
            for frame in ring.read_many(256):
                acks = ack_frame_decoder.decode(frame)
                if acks.generation != self.generation:
                    continue  # for a generation we abandoned when a merger restarted
                for position in acks.positions:
                    entry = self.tracker.ack((position.topic, position.partition), position.offset, merger)
                    if entry is not None:
                        self._finish([entry])

    def _finish(self, entries: list[InFlight]) -> None:
        for entry in entries:
            if entry.message_id:
                self.dedup.remember(entry.message_id, entry.key_hashes, entry.hashes, entry.source)
            entry.key_hashes = entry.hashes = []

    def _commit(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_commit < COMMIT_INTERVAL_S:
            return
        self._last_commit = now
        due = self.tracker.commits_due()
        if not due:
            return
        try:
            self.log_consumer.commit(due)
        except LogError as exc:
            logger.warning("commit failed, will retry: %s", exc)
            return
        self.tracker.committed(due)

    def _ask_mergers_to_flush(self) -> None:
        frame = encode_ring_frame(FlushNow(consumer=self.spec.index, generation=self.generation))
        for ring in self.to_mergers:
            with contextlib.suppress(RingFull):  # a full ring means a busy merger; its timer flushes soon
                ring.try_write(frame)

    # -- merger restarts and rebalances -------------------------------------------------------------

    def _merger_restarted(self) -> bool:
        """A ring's reader epoch counts reader attachments. Going from 0 to 1 is the merger's first
        start: frames written before it attached are still in the ring, nothing was lost. Any other
        change means a reader died with frames it had taken."""
        return any(new != old and not (old == 0 and new == 1)
                   for new, old in zip([ring.reader_epoch for ring in self.to_mergers], self.merger_epochs))

    def _check_merger_restarts(self) -> None:
        restarted = self._merger_restarted()
        self.merger_epochs = [ring.reader_epoch for ring in self.to_mergers]
        if restarted:
            logger.warning("a merger restarted; re-reading %d in-flight messages from the last commit",
                           self.tracker.in_flight)
            self._rewind()

    def _rewind(self) -> None:
        self.generation += 1
        self.tracker.clear_in_flight()
        for tp, offset in self.tracker.positions().items():
            self.log_consumer.seek(tp, offset)

    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        committed = self.log_consumer.committed(partitions)
        for tp in partitions:
            self.tracker.own(tp, committed[tp])
            self.log_consumer.seek(tp, committed[tp])
        self.log_consumer.pause([tp for tp in partitions if tp[0] in self.held])
        self._owned = sorted(set(self._owned) | set(partitions))
        self.channel.send(PartitionsOwned(partitions=self._owned))

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Commit what is acked on the partitions we lose; the new owner re-reads the rest."""
        due = {tp: off for tp, off in self.tracker.commits_due().items() if tp in partitions}
        if due:
            try:
                self.log_consumer.commit(due)
            except LogError as exc:
                logger.warning("commit on revoke failed; the new owner re-reads a little more: %s", exc)
        self.tracker.disown(partitions)
        self._owned = [tp for tp in self._owned if tp not in set(partitions)]
        self.channel.send(PartitionsOwned(partitions=self._owned))

    # -- backpressure, waiting, reporting -------------------------------------------------------------

    def _hold(self, topics: set[str]) -> bool:
        """Pause the partitions of ``topics`` (too many of their messages in flight), resume the others;
        True when every partition we own is paused, so there is nothing to read."""
        if topics != self.held:
            owned = list(self.tracker.partitions)
            self.log_consumer.pause([tp for tp in owned if tp[0] in topics - self.held])
            self.log_consumer.resume([tp for tp in owned if tp[0] in self.held - topics])
            self.held = topics
        return bool(topics) and all(tp[0] in topics for tp in self.tracker.partitions)

    def _keep_group_alive(self) -> None:
        """Kafka evicts a member that stops polling; paused partitions make this poll return nothing."""
        self._consume(self.log_consumer.poll(POLL_BATCH, 0.0))

    def _ack_fds(self) -> list[int]:
        return [ring.wait_fd for ring in self.from_mergers]

    def _wait_for_acks(self, timeout_s: float) -> None:
        select.select(self._ack_fds(), [], [], timeout_s)

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._last_lag_report < LAG_REPORT_INTERVAL_S:
            return
        self._last_lag_report = now
        try:
            lags = self.log_consumer.lags()
        except LogError:
            return
        for lag in lags:
            metrics.consumer_lag.labels(lag.topic, str(lag.partition)).set(lag.lag)
        metrics.queue_depth.labels(f"consumer-{self.spec.index}-in-flight").set(self.tracker.in_flight)
        self.channel.send(LagReport(lags=lags))

    def _dead_letter_records(self, message: LogMessage, batch: Batch, reasons: dict[int, str]) -> None:
        """Before any part of the message goes to a merger: the commit that follows its acks covers these."""
        now = time.time()
        origin = f"{message.topic}/{message.partition}/{message.offset}"
        self.dead_letters.add([
            DeadLetter(id=dead_letter_id(batch.source, "consume", batch.records[index]), source=batch.source,
                       reason=reason, stage="consume", record=batch.records[index], key=batch.keys[index],
                       origin=origin, first_seen=now, last_seen=now)
            for index, reason in reasons.items()])
        metrics.dlq_records.labels(batch.source, "oversized").inc(len(reasons))

    def _check_ack_timeouts(self) -> None:
        now = time.monotonic()
        if now - self._last_ack_check < ACK_CHECK_INTERVAL_S:
            return
        self._last_ack_check = now
        timeout_s = self.config.workers.ack_timeout_s
        self.oldest_unacked_s, self.overdue_acks, crossed = self.tracker.overdue(now, timeout_s)
        metrics.oldest_unacked.labels(str(self.spec.index)).set(self.oldest_unacked_s)
        if not crossed:
            return
        for tp, _entry in crossed:
            metrics.ack_timeouts.labels(tp[0]).inc()
        (topic, partition), first = crossed[0]
        logger.warning("%d log messages (first %s/%d@%d) have waited more than [workers] ack_timeout_s = %g s for the "
                       "sink's acknowledgement; they stay in flight and are committed once the sink takes them "
                       "(the sink breaker and the mergers' sink_last_status in /status say why)",
                       len(crossed), topic, partition, first.offset, timeout_s)

    def _dead_letter_message(self, message: LogMessage, reason: str) -> None:
        now = time.time()
        origin = f"{message.topic}/{message.partition}/{message.offset}"
        record = msgspec.Raw(msgspec.json.encode(message.payload.decode("utf-8", "replace")))
        source = self._sources_by_topic.get(message.topic, message.topic)
        entry = DeadLetter(id=dead_letter_id(source, "consume", message.payload), source=source,
                           reason=reason, stage="consume", record=record, origin=origin,
                           first_seen=now, last_seen=now)
        self.dead_letters.add([entry])
        metrics.messages_failed.labels(message.topic).inc()
        metrics.dlq_records.labels(source, "undecodable").inc()


def _log_processed(message: LogMessage, message_id: str, records: int, routed: int, elapsed_s: float) -> None:
    elapsed_ms = round(elapsed_s * 1000.0, 3)
    logger.info("message %s at %s/%d@%d: %d records, %d routed in %.3f ms", message_id, message.topic,
                message.partition, message.offset, records, routed, elapsed_ms,
                extra={"message_id": message_id, "records": records, "routed": routed, "elapsed_ms": elapsed_ms,
                       "topic": message.topic, "partition": message.partition, "offset": message.offset})


def drain_deadline(now: float, budget_s: float) -> float:
    """When a drain with ``budget_s`` left stops waiting for acks: early enough for the final commit."""
    return now + budget_s - min(COMMIT_RESERVE_S, budget_s / 4)


def merger_for(partition: int, mergers: int) -> int:
    """Every key lives in one partition, so routing partitions routes keys: one merger owns each key.
    Whole messages move without being split; give a topic a multiple of ``mergers`` partitions."""
    return partition % mergers
