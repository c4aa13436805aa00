"""Producing from an asyncio loop, with acks=all and idempotence: the lazily made client and the
thread that polls it, delivery reports resolved on the loop, and the wait for room in a full queue.
``KafkaProducer`` publishes the log's batches; the Kafka changelog sink (``workers.sinks.kafka``)
builds on the same pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from conflux.errors import LogError
from conflux.ipc.messages import Position
from conflux.log.base import OutgoingMessage
from conflux.log.kafka.client import partition_count
from conflux.log.kafka.settings import log_client_error

logger = logging.getLogger(__name__)

MAX_QUEUE_WAIT_S = 0.05


class DeliveryReports:
    """The delivery reports of messages produced together. ``future`` resolves on the loop, to this
    object, once every message has its report, good or bad; ``errors`` holds the bad ones by index."""

    __slots__ = ("_lock", "errors", "future", "loop", "positions", "remaining")

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[DeliveryReports] = loop.create_future()
        self.positions: list[Position | None] = [None] * count
        self.errors: dict[int, KafkaError] = {}
        self.remaining = count
        # Reports come on the poll thread, refusals (``refuse``) on the loop: the count needs a lock.
        self._lock = threading.Lock()
        if count == 0:
            self.future.set_result(self)

    def report(self, index: int, error: KafkaError | None, message) -> None:
        """librdkafka's delivery callback, on the producer's poll thread."""
        if error is not None:
            self.errors[index] = error
        else:
            self.positions[index] = Position(message.topic(), message.partition(), message.offset())
        self._count_one()

    def refuse(self, index: int, error: KafkaError) -> None:
        """``produce`` refused the message: that is its report, it will get no other."""
        self.errors[index] = error
        self._count_one()

    def _count_one(self) -> None:
        with self._lock:
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(self)


async def produce(producer: Producer, topic: str, value: Any, key: Any, *, on_delivery: Callable,
                  deadline: float | None = None, **options: Any) -> None:
    """Queue one message. While librdkafka's queue is full, wait for deliveries to make room: never
    drop. Past ``deadline`` (time.monotonic()) raise TimeoutError; librdkafka's own errors propagate."""
    wait_s = 0.001
    while True:
        try:
            producer.produce(topic, value, key, on_delivery=on_delivery, **options)
            return
        except BufferError:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("the producer's queue did not drain in time") from None
            await asyncio.sleep(wait_s)
            wait_s = min(wait_s * 2, MAX_QUEUE_WAIT_S)


class PolledProducer:
    """A librdkafka producer made on first use, in the process that uses it, and the thread that polls
    it: that is where librdkafka runs the delivery callbacks, error callbacks and log lines."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._producer: Producer | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def client(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self._settings)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=_poll_until, args=(self._producer, self._stop),
                                            name="kafka-poll", daemon=True)
            self._thread.start()
        return self._producer

    def discard(self) -> None:
        """After a fatal error (an idempotence violation, a fenced transactional id) the client is
        unusable; the next call makes a new one."""
        self._stop.set()
        self._producer = self._thread = None

    async def close(self, flush_timeout_s: float = 10.0) -> None:
        """Deliver what is queued (bounded), then destroy the client."""
        if self._producer is None:
            return
        self._stop.set()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._thread.join)
        left = await loop.run_in_executor(None, self._producer.flush, flush_timeout_s)
        if left:
            logger.warning("%d messages were still undelivered at close", left)
        self._producer = self._thread = None


class KafkaProducer(PolledProducer):
    """Publishes the log's batches from one asyncio loop (a fetcher or the control process). ``publish``
    returns when every message's delivery report came back positive: acks=all, so the records are on
    every in-sync replica."""

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings)
        self._partitions: dict[str, int] = {}

    def partitions_for(self, topic: str) -> int:
        if topic not in self._partitions:
            self._partitions[topic] = partition_count(self.client(), topic)
        return self._partitions[topic]

    async def publish(self, messages: list[OutgoingMessage]) -> list[Position]:
        """Every message names its partition (``partitions_for`` of its records' key hashes), so all
        versions of a key stay in one partition. The Kafka key is the batch's first record key: a
        batch carries many keys, all of which hash to that partition, and the key only labels it."""
        if not messages:
            return []
        producer = self.client()
        reports = DeliveryReports(len(messages), asyncio.get_running_loop())
        for index, message in enumerate(messages):
            await self._produce(producer, message, partial(reports.report, index))
        await reports.future
        if reports.errors:
            error = reports.errors[min(reports.errors)]
            raise LogError(f"Kafka delivery failed: {error.str()}")
        return reports.positions

    async def _produce(self, producer: Producer, message: OutgoingMessage, on_delivery: Callable) -> None:
        try:
            await produce(producer, message.topic, message.payload, message.key, partition=message.partition,
                          on_delivery=on_delivery)
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal() or error.code() == KafkaError._FATAL:
                self.discard()
            hint = " (lower the source's page_size)" if error.code() == KafkaError.MSG_SIZE_TOO_LARGE else ""
            raise LogError(f"cannot produce to {message.topic}/{message.partition}: {error.str()}{hint}") from None


def _poll_until(producer: Producer, stop: threading.Event) -> None:
    """The producer's poll thread: delivery reports, errors and log lines are served here. poll raises
    librdkafka's fatal errors (a fenced or aborted transactional producer): the client is unusable then,
    its owner replaces it on its next call, and the thread ends."""
    while not stop.is_set():
        try:
            producer.poll(0.1)
        except KafkaException as exc:
            log_client_error(exc.args[0])
            if exc.args[0].fatal():
                return
