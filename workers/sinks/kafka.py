"""The Kafka changelog sink: one Kafka record per Conflux record, on a compacted topic per source
(``[[sinks]] type = "kafka"``).

Runs in merger processes, one instance per merger and configured Kafka sink. A record's Kafka key is
the Conflux key (UTF-8), its value the record's JSON bytes as merged (none for a delete: a tombstone),
and its headers say what it is (``headers``). librdkafka's murmur2_random partitioner puts a key where
Java's default partitioner would, so every version of a key lands in one partition, in order.

A chunk is acknowledged only when every record's delivery report came back positive (acks=all,
idempotence) and, with ``transactional`` (the default), the chunk's transaction has committed: a
read_committed consumer sees a chunk whole or not at all. A failed report, a queue that does not drain
within ``timeout_s``, an unreachable cluster are an outage (a ``Retry``: the open transaction is
aborted, so nothing of the failed attempt becomes visible to read_committed consumers). A record larger
than its topic takes is refused for good (the DLQ). A missing topic is created on first use, compacted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from functools import partial
from typing import Any, NamedTuple

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from xxhash import xxh3_64_hexdigest

from conflux import metrics
from conflux.config import Config, KafkaSinkConfig, RetryConfig
from conflux.errors import LogError
from conflux.log.kafka.client import (
    create_topics,
    durable_config,
    metadata,
    replication_for,
    topic_setting,
    wait_for_topics,
)
from conflux.log.kafka.producer import DeliveryReports, PolledProducer, produce
from conflux.log.kafka.settings import (
    CALLBACKS,
    COMPACTED,
    MAX_MESSAGE_BYTES,
    PRODUCER_DEFAULTS,
    PRODUCER_REQUIRED,
    KafkaSettings,
    connection_keys,
    resolve_secrets,
)
from conflux.workers.merge import DELETED, HASH, POSITION, RECORD, UPDATED
from conflux.workers.sinks.base import NULL_HASH, TOO_LARGE, Chunk, Delivery, Retry, Sink

logger = logging.getLogger(__name__)

DELIVERED = 200  # last_status of a chunk the cluster took (the field is an HTTP status for the HTTP sink)
# Kafka's v2 record batch: a batch header, then per record a few varints beyond key, value and headers.
BATCH_OVERHEAD_BYTES = 61
RECORD_OVERHEAD_BYTES = 32
# Delivery reports come by message.timeout.ms (= timeout_s) at the latest; this covers the callbacks' way back.
REPORT_GRACE_S = 5.0
# A transaction may stay open this much longer than its messages may wait (librdkafka requires >=).
TRANSACTION_MARGIN_MS = 30_000
CLOSE_TIMEOUT_S = 5.0
ABORT_TIMEOUT_S = 5.0
# Java's default partitioner (murmur2 of the key): consumers in any language agree on where a key lives.
PARTITIONER = {"partitioner": "murmur2_random"}


class Message(NamedTuple):
    """One Kafka record of a chunk, and the chunk index it came from."""

    index: int
    key: bytes
    value: Any  # the record's JSON bytes (msgspec.Raw), None for a tombstone
    headers: list[tuple[str, str]]


class KafkaSink(Sink):
    """One per merger process and configured Kafka sink; librdkafka clients are made on first use."""

    kind = "kafka"
    Options = KafkaSinkConfig

    def __init__(self, name: str, options: KafkaSinkConfig, retry: RetryConfig, *,
                 stopping: asyncio.Event | None = None, context: Config | None = None) -> None:
        super().__init__(name, options, retry, stopping=stopping, context=context)
        self.producer: PolledProducer | None = None
        self.transactions: Transactions | None = None
        self.admin_settings: dict[str, Any] = {}
        self.max_message_bytes = MAX_MESSAGE_BYTES
        self._limits: dict[str, int] = {}     # topic -> the largest record (bytes) it takes
        self._lock = asyncio.Lock()           # one chunk at a time: a producer has one transaction at a time

    async def start(self) -> None:
        """Build the clients' settings (reading the secrets); nothing connects before the first chunk."""
        await super().start()
        producer_settings, self.admin_settings = self.client_settings()
        self.max_message_bytes = int(producer_settings.get("message.max.bytes", MAX_MESSAGE_BYTES))
        self.producer = PolledProducer(producer_settings)
        if self.options.transactional:
            self.transactions = Transactions(self.producer, self.options.timeout_s)

    def client_settings(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(producer, admin) librdkafka settings. On the log's cluster the [kafka.*] tables' security keys
        apply first, as for the log's clients; then this sink's own ``producer`` table."""
        options, log = self.options, self.context.log
        own = resolve_secrets(options.producer, f"sink {self.name!r}: producer")
        on_log_cluster = options.bootstrap_servers in ("", log.bootstrap_servers)
        shared = KafkaSettings(self.context).connection() if on_log_cluster else {}
        base = {"bootstrap.servers": options.bootstrap_servers or log.bootstrap_servers, "log.connection.close": False,
                **shared}
        timeout_ms = int(options.timeout_s * 1000)
        required = {**PRODUCER_REQUIRED, **PARTITIONER, "message.timeout.ms": timeout_ms}
        if options.transactional:
            required.update({"transactional.id": self.transactional_id(),
                             "transaction.timeout.ms": timeout_ms + TRANSACTION_MARGIN_MS})
        producer = {**base, **PRODUCER_DEFAULTS, **own, **required, **CALLBACKS}
        return producer, {**base, **connection_keys(own), **CALLBACKS}

    def transactional_id(self) -> str:
        """Stable for a merger slot of this instance, unique across instances: a restarted merger fences
        its crashed predecessor and aborts the transaction it left open, at once instead of after
        transaction.timeout.ms. The instance is the host and the state directory."""
        where = xxh3_64_hexdigest(f"{socket.gethostname()}:{self.context.daemon.state_dir}".encode())[:12]
        slot = self.instance or f"pid-{os.getpid()}"
        return f"{self.context.log.group}.sink.{self.name}.{where}.{slot}"

    async def close(self) -> None:
        if self.producer is None:
            return
        if self.transactions is not None and self.transactions.open:  # a delivery was cancelled: do not leave
            await self.transactions.fail()  # read_committed consumers waiting for transaction.timeout.ms
        await self.producer.close(CLOSE_TIMEOUT_S)

    def topic_of(self, source: str) -> str:
        return self.options.topic_of(source, self.context.log.topic_prefix)

    # -- one attempt ------------------------------------------------------------------------------------

    async def attempt(self, chunk: Chunk) -> Delivery | Retry:
        started = time.perf_counter()
        topic = self.topic_of(chunk.source)
        try:
            limit = await self._record_limit(topic)
            messages, refused = to_messages(chunk, limit, topic)
            async with self._lock:
                outcome = await self._send(topic, messages, refused, len(chunk))
        except (KafkaException, LogError, TimeoutError) as exc:
            outcome = self._failed(exc)
        if isinstance(outcome, Retry) or outcome.too_large:  # look at the topic again next time: its
            self._limits.pop(topic, None)                      # limit may have changed, it may be gone
        label = "ok" if isinstance(outcome, Delivery) else "error"
        metrics.sink_request_duration.labels(label, self.name).observe(time.perf_counter() - started)
        self.last_status = (outcome.status or DELIVERED) if isinstance(outcome, Delivery) else 0
        return outcome

    async def _send(self, topic: str, messages: list[Message], refused: dict[int, str],
                    count: int) -> Delivery | Retry:
        """Produce the messages in a transaction of their own, or abort it and raise."""
        try:
            return await self._send_once(topic, messages, refused, count)
        except (KafkaException, TimeoutError):
            if self.transactions is not None:
                await self.transactions.fail()
            raise

    async def _send_once(self, topic: str, messages: list[Message], refused: dict[int, str],
                         count: int) -> Delivery | Retry:
        if self.transactions is not None:
            await self.transactions.begin()
        reports = await self._produce_all(topic, messages, refused)
        await asyncio.wait_for(asyncio.shield(reports.future), timeout=self.options.timeout_s + REPORT_GRACE_S)
        outcome = judge(reports, messages, refused, count, topic)
        if self.transactions is not None:
            if isinstance(outcome, Delivery) and not outcome.too_large:
                await self.transactions.commit()
            else:
                await self.transactions.fail()
        return outcome

    async def _produce_all(self, topic: str, messages: list[Message], refused: dict[int, str]) -> DeliveryReports:
        producer = self.producer.client()
        reports = DeliveryReports(len(messages), asyncio.get_running_loop())
        deadline = time.monotonic() + self.options.timeout_s
        for seq, message in enumerate(messages):
            try:
                await produce(producer, topic, message.value, message.key, headers=message.headers,
                              on_delivery=partial(reports.report, seq), deadline=deadline)
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() != KafkaError.MSG_SIZE_TOO_LARGE:
                    raise
                # librdkafka's own message.max.bytes: refused before it left, for good
                refused[message.index] = f"record too large for the producer (message.max.bytes): {error.str()}"
                reports.refuse(seq, error)
        return reports

    async def _record_limit(self, topic: str) -> int:
        """The largest record ``topic`` takes; the topic is created first if it does not exist."""
        if topic not in self._limits:
            topic_bytes = await asyncio.to_thread(self._prepare_topic, topic)
            self._limits[topic] = min(topic_bytes, self.max_message_bytes) - BATCH_OVERHEAD_BYTES
        return self._limits[topic]

    def _prepare_topic(self, topic: str) -> int:
        """Create ``topic`` if missing (compacted, durable as the log's topics); its max.message.bytes.
        Runs in a thread: the admin calls block."""
        admin = AdminClient(self.admin_settings)
        try:
            cluster = metadata(admin)
            found = cluster.topics.get(topic)
            if found is None or found.error is not None:
                replication = replication_for(cluster, self.options.replication_factor)
                partitions = self.options.partitions or self.context.log.partitions
                config = {**COMPACTED, **durable_config(replication), "max.message.bytes": str(MAX_MESSAGE_BYTES)}
                create_topics(admin, [NewTopic(topic, num_partitions=partitions, replication_factor=replication,
                                               config=config)])
                wait_for_topics(admin, [topic])
            return int(topic_setting(admin, topic, "max.message.bytes") or MAX_MESSAGE_BYTES)
        finally:
            admin.poll(0)  # hands librdkafka's queued log lines to our logger before the client goes

    def _failed(self, exc: Exception) -> Retry:
        """An outage: the cluster is unreachable, a report failed, a transaction could not commit."""
        if isinstance(exc, TimeoutError):
            return Retry("timeout", f"Kafka did not take the records within timeout_s ({self.options.timeout_s} s)")
        if isinstance(exc, LogError):
            return Retry(type(exc).__name__, str(exc))
        error = exc.args[0]
        if error.fatal():
            logger.error("%s: the producer hit a fatal error (%s); a new one is made", self._label(), error.str())
            self.producer.discard()
        return Retry(error.name(), f"Kafka: {error.str()}")


def headers(chunk: Chunk, value: tuple) -> list[tuple[str, str]]:
    """What a record is, in its Kafka headers. conflux-seq (the version's log offset) orders versions of
    a key stamped with the same updated_at, as the HTTP sink's ``seq`` does."""
    deleted = value[DELETED]
    return [("conflux-op", "delete" if deleted else "upsert"), ("conflux-updated-at", value[UPDATED]),
            ("conflux-hash", NULL_HASH if deleted else value[HASH]), ("conflux-source", chunk.source),
            ("conflux-batch", chunk.batch_id), ("conflux-seq", str(value[POSITION].offset))]


def to_messages(chunk: Chunk, limit: int, topic: str) -> tuple[list[Message], dict[int, str]]:
    """The chunk's records as Kafka records, and the reasons of those larger than ``limit`` bytes."""
    messages: list[Message] = []
    refused: dict[int, str] = {}
    for index, (key, value) in enumerate(zip(chunk.keys, chunk.values)):
        key_bytes = key.encode()
        data = None if value[DELETED] else value[RECORD]
        labels = headers(chunk, value)
        size = (len(key_bytes) + (len(data) if data is not None else 0) + RECORD_OVERHEAD_BYTES
                + sum(len(name) + len(text) for name, text in labels))
        if size > limit:
            refused[index] = (f"record of {size} bytes is larger than topic {topic} takes "
                              f"({limit + BATCH_OVERHEAD_BYTES} bytes, max.message.bytes)")
            continue
        messages.append(Message(index, key_bytes, data, labels))
    return messages, refused


def judge(reports: DeliveryReports, messages: list[Message], refused: dict[int, str], count: int,
          topic: str) -> Delivery | Retry:
    """The chunk's outcome from its delivery reports (all in). A record the broker finds too large for
    the topic makes the chunk too large: the dispatcher halves it down to that record alone, which is
    then refused (it can fail a whole batch of small ones with it)."""
    failed = {seq: error for seq, error in reports.errors.items() if messages[seq].index not in refused}
    if not failed:
        tombstones = sum(message.value is None for message in messages if message.index not in refused)
        return Delivery(refused, DELIVERED, applied=count - len(refused), deleted=tombstones)
    first = failed[min(failed)]
    if all(error.code() == KafkaError.MSG_SIZE_TOO_LARGE for error in failed.values()):
        reason = f"the broker refused a record as too large for topic {topic}: {first.str()}"
        return Delivery(dict.fromkeys(range(count), reason), TOO_LARGE)
    return Retry(first.name(), f"Kafka refused {len(failed)} of {len(messages)} records: {first.str()}")


class Transactions:
    """One transaction per chunk on a transactional producer. A transaction that fails is aborted and its
    producer replaced: after the broker refused records, librdkafka (2.x) can keep sequence numbers the
    broker no longer expects, and the next transaction fails as well. A new producer's init_transactions
    starts clean, and aborts whatever the old one left open. The blocking calls run in threads while the
    poll thread keeps serving the callbacks."""

    def __init__(self, producer: PolledProducer, timeout_s: float) -> None:
        self.producer = producer
        self.timeout_s = timeout_s
        self.initialised: Producer | None = None  # the client init_transactions ran on
        self.open = False

    async def begin(self) -> None:
        client = self.producer.client()
        if self.initialised is not client:
            await asyncio.to_thread(client.init_transactions, self.timeout_s)
            self.initialised = client
        client.begin_transaction()
        self.open = True

    async def commit(self) -> None:
        await asyncio.to_thread(self.initialised.commit_transaction, self.timeout_s)
        self.open = False

    async def fail(self) -> None:
        """Abort the open transaction (bounded) and replace the producer."""
        if self.open and self.initialised is not None:
            try:
                await asyncio.to_thread(self.initialised.abort_transaction, min(self.timeout_s, ABORT_TIMEOUT_S))
            except KafkaException as exc:  # the next producer's init_transactions aborts it
                logger.info("aborting a Kafka transaction failed: %s", exc.args[0].str())
        self.open = False
        self.initialised = None
        self.producer.discard()
