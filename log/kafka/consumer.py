"""The consumer-group member that reads the source topics (and holds a fetcher's seat among the sources).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import OFFSET_STORED, Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KafkaPartition

from conflux.errors import LogError, LogUnavailable
from conflux.ipc.messages import PartitionLag
from conflux.log.base import AssignCallback, LogMessage, TopicPartition
from conflux.log.kafka.client import call, first_error, high_watermark, partition_count
from conflux.log.kafka.settings import COMMIT_TIMEOUT_S, METADATA_TIMEOUT_S, log_client_error

logger = logging.getLogger(__name__)


class KafkaConsumer:
    """One member of a consumer group, used from one thread: a consumer process reading the source
    topics, or a fetcher's seat in the source-ownership group. Rebalance callbacks run inside ``poll``
    and are cooperative (incremental): on_assign and on_revoke only name the partitions that change."""

    SERVE_BATCH = 64

    def __init__(self, settings: dict[str, Any], topics: list[str]) -> None:
        self._settings = settings
        self._topics = topics
        self._consumer: Consumer | None = None
        self._callbacks: tuple[AssignCallback, AssignCallback] | None = None
        self._assigned: set[TopicPartition] = set()
        self._committed: dict[TopicPartition, int] = {}
        self._assigning: dict[TopicPartition, int] | None = None  # seeks made inside on_assign
        self._stash: list[LogMessage] = []  # read while serving callbacks; handed out by the next poll
        self._commit_results: list[tuple[KafkaError | None, list[KafkaPartition]]] = []
        self._in_callback = self._lost = self._closing = False

    def start(self, on_assign: AssignCallback, on_revoke: AssignCallback) -> None:
        self._callbacks = (on_assign, on_revoke)
        self._consumer = Consumer({**self._settings, "on_commit": self._on_commit})
        call(self._consumer.subscribe, self._topics, on_assign=self._handle_assign,
              on_revoke=self._handle_revoke, on_lost=self._handle_lost)

    # -- rebalance callbacks (inside consume or close) ----------------------------------------------

    def _handle_assign(self, consumer: Consumer, partitions: list[KafkaPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._assigning, self._in_callback = {}, True
        try:
            if tps and not self._closing:  # a closing member's assignment is dropped by librdkafka anyway
                self._callbacks[0](tps)
            offsets = self._assigning
        finally:
            self._assigning, self._in_callback = None, False
        # The assignment is applied after the callback, so its seeks become the starting offsets.
        call(consumer.incremental_assign, [KafkaPartition(t, p, offsets.get((t, p), OFFSET_STORED)) for t, p in tps])
        self._assigned.update(tps)

    def _handle_revoke(self, consumer: Consumer, partitions: list[KafkaPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._in_callback = True
        try:
            if tps:
                self._callbacks[1](tps)
        finally:
            self._in_callback = False
            call(consumer.incremental_unassign, partitions)
            self._assigned.difference_update(tps)
            self._forget(set(tps))

    def _handle_lost(self, consumer: Consumer, partitions: list[KafkaPartition]) -> None:
        """The session expired: others may own these already, so nothing may be committed for them."""
        logger.warning("lost %d partitions (session expired); their new owners re-read from the last commit",
                       len(partitions))
        self._lost = True
        try:
            self._handle_revoke(consumer, partitions)
        finally:
            self._lost = False

    def _forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self._committed.pop(tp, None)
        self._stash = [m for m in self._stash if (m.topic, m.partition) not in tps]

    def _serve_callbacks(self) -> None:
        """Run pending rebalance callbacks before a blocking call. A member that does not serve them
        cannot rejoin the group, and its synchronous commits hang until the coordinator evicts it."""
        if not self._in_callback and not self._closing:
            self._stash.extend(self._messages(call(self._consumer.consume, self.SERVE_BATCH, 0)))

    # -- the LogConsumer interface ------------------------------------------------------------------

    def poll(self, max_messages: int, timeout_s: float) -> list[LogMessage]:
        if self._stash:
            out, self._stash = self._stash[:max_messages], self._stash[max_messages:]
            return out
        return self._messages(call(self._consumer.consume, max_messages, timeout_s))

    def _messages(self, messages: list) -> list[LogMessage]:
        out = []
        for message in messages:
            error = message.error()
            if error is None:
                out.append(LogMessage(message.topic(), message.partition(), message.offset(), message.value()))
            elif error.fatal():
                raise LogError(f"Kafka consumer failed: {error.str()}")
            else:
                log_client_error(error)
        return out

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if self._assigning is not None:
            self._assigning[partition] = offset
            return
        self._stash = [m for m in self._stash if (m.topic, m.partition) != partition]
        call(self._consumer.seek, KafkaPartition(partition[0], partition[1], offset))

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Synchronous, only upwards, and only for partitions this member still owns. A commit refused
        mid-rebalance raises LogError; the caller retries at its next interval."""
        self._serve_callbacks()
        wanted = {tp: offset for tp, offset in offsets.items()
                  if tp in self._assigned and offset > self._committed.get(tp, -1)}
        if not wanted:
            return
        if self._lost:
            raise LogError("not committing: the partitions were lost to a rebalance")
        partitions = [KafkaPartition(t, p, o) for (t, p), o in wanted.items()]
        if self._in_callback:  # the rebalance waits for this callback, so a synchronous commit is safe
            error = first_error(call(self._consumer.commit, offsets=partitions, asynchronous=False))
        else:
            error = self._commit_serving_callbacks(partitions)
        if error is not None:
            raise LogError(f"commit refused (retried at the next commit): {error.str()}")
        self._committed.update(wanted)

    def _commit_serving_callbacks(self, partitions: list[KafkaPartition]) -> KafkaError | None:
        """Commit asynchronously and serve callbacks until the result is in. A synchronous commit made
        while a rebalance waits for this member can hang: the rebalance needs a rejoin only we can make."""
        self._commit_results.clear()
        call(self._consumer.commit, offsets=partitions, asynchronous=True)
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        while not self._commit_results:
            if time.monotonic() > deadline:
                raise LogUnavailable(f"commit not confirmed within {COMMIT_TIMEOUT_S:.0f} s")
            self._stash.extend(self._messages(call(self._consumer.consume, self.SERVE_BATCH, 0.01)))
        error, results = self._commit_results.pop(0)
        return error or first_error(results)

    def _on_commit(self, error: KafkaError | None, partitions: list[KafkaPartition]) -> None:
        self._commit_results.append((error, partitions))

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Each partition's committed offset. One never committed starts at 0: if retention already
        deleted offset 0, auto.offset.reset=earliest moves the read to the oldest message left."""
        wanted = [KafkaPartition(t, p) for t, p in partitions]
        found = call(self._consumer.committed, wanted, timeout=METADATA_TIMEOUT_S)
        out = {(tp.topic, tp.partition): max(tp.offset, 0) for tp in found}
        self._committed.update(out)
        return out

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        owned = [KafkaPartition(t, p) for t, p in partitions if (t, p) in self._assigned]
        if owned:
            call(self._consumer.pause, owned)

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        owned = [KafkaPartition(t, p) for t, p in partitions if (t, p) in self._assigned]
        if owned:
            call(self._consumer.resume, owned)

    def lags(self) -> list[PartitionLag]:
        """From the high watermark of the last fetch; a partition not fetched yet asks the broker."""
        out = []
        for tp in sorted(self._assigned):
            end = call(self._consumer.get_watermark_offsets, KafkaPartition(*tp), cached=True)
            if end is None or end[1] < 0:
                end = (0, high_watermark(self._consumer, tp, timeout_s=0.5))
            out.append(PartitionLag(tp[0], tp[1], self._committed.get(tp, 0), end[1]))
        return out

    def partition_count(self, topic: str) -> int:
        return partition_count(self._consumer, topic)

    def close(self) -> None:
        """Leave the group (on_revoke runs first, so acked work is committed) and destroy the client."""
        if self._consumer is None:
            return
        self._serve_callbacks()
        self._closing = True
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            logger.warning("closing the Kafka consumer: %s", exc)
        self._consumer = None
