"""Publishing batches to the source topics from an asyncio loop, with acks=all and idempotence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from conflux.errors import LogError
from conflux.ipc.messages import Position
from conflux.log.base import OutgoingMessage
from conflux.log.kafka.client import partition_count

logger = logging.getLogger(__name__)


class _Delivery:
    """The delivery reports of one ``publish`` call; resolves its future on the loop once all are in."""

    __slots__ = ("error", "future", "loop", "positions", "remaining")

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[list[Position]] = loop.create_future()
        self.positions: list[Position | None] = [None] * count
        self.remaining = count
        self.error: KafkaError | None = None

    def report(self, index: int, error: KafkaError | None, message) -> None:
        """librdkafka's delivery callback, on the producer's poll thread."""
        if error is not None:
            self.error = self.error or error
        else:
            self.positions[index] = Position(message.topic(), message.partition(), message.offset())
        self.remaining -= 1
        if self.remaining == 0:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if self.future.done():
            return
        if self.error is not None:
            self.future.set_exception(LogError(f"Kafka delivery failed: {self.error.str()}"))
        else:
            self.future.set_result(self.positions)


class KafkaProducer:
    """Publishes from one asyncio loop (a fetcher or the control process). ``publish`` returns when
    every message's delivery report came back positive: acks=all, so the records are on every in-sync
    replica. A thread polls the producer, which is where librdkafka runs the delivery callbacks."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._producer: Producer | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._partitions: dict[str, int] = {}

    def _client(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self._settings)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=_poll_until, args=(self._producer, self._stop),
                                            name="kafka-poll", daemon=True)
            self._thread.start()
        return self._producer

    def _discard(self) -> None:
        """After a fatal error (an idempotence violation) the client is unusable; the next call makes a new one."""
        self._stop.set()
        self._producer = self._thread = None

    def partitions_for(self, topic: str) -> int:
        if topic not in self._partitions:
            self._partitions[topic] = partition_count(self._client(), topic)
        return self._partitions[topic]

    async def publish(self, messages: list[OutgoingMessage]) -> list[Position]:
        """Every message names its partition (``partitions_for`` of its records' key hashes), so all
        versions of a key stay in one partition. The Kafka key is the batch's first record key: a
        batch carries many keys, all of which hash to that partition, and the key only labels it."""
        if not messages:
            return []
        producer = self._client()
        delivery = _Delivery(len(messages), asyncio.get_running_loop())
        for index, message in enumerate(messages):
            await self._produce(producer, message, partial(delivery.report, index))
        return await delivery.future

    async def _produce(self, producer: Producer, message: OutgoingMessage, on_delivery: Callable) -> None:
        wait_s = 0.001
        while True:
            try:
                producer.produce(message.topic, message.payload, message.key, partition=message.partition,
                                 on_delivery=on_delivery)
                return
            except BufferError:  # librdkafka's queue is full: wait for deliveries to make room, never drop
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, 0.05)
            except KafkaException as exc:
                error = exc.args[0]
                if error.fatal() or error.code() == KafkaError._FATAL:
                    self._discard()
                hint = " (lower the source's page_size)" if error.code() == KafkaError.MSG_SIZE_TOO_LARGE else ""
                raise LogError(f"cannot produce to {message.topic}/{message.partition}: {error.str()}{hint}") from None

    async def close(self) -> None:
        """Deliver what is queued (bounded), then destroy the client."""
        if self._producer is None:
            return
        self._stop.set()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._thread.join)
        left = await loop.run_in_executor(None, self._producer.flush, 10.0)
        if left:
            logger.warning("%d messages were still undelivered at close", left)
        self._producer = self._thread = None


def _poll_until(producer: Producer, stop: threading.Event) -> None:
    """The producer's poll thread: delivery reports, errors and log lines are served here."""
    while not stop.is_set():
        producer.poll(0.1)
