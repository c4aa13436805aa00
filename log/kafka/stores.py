"""Checkpoints and dead letters on compacted topics: read to the end, written durably.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import msgspec
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as KafkaPartition

from conflux.errors import LogError, LogUnavailable
from conflux.ipc.codec import encode_dead_letter
from conflux.ipc.messages import DeadLetter
from conflux.log.base import Checkpoint, TopicPartition, decode_dead_letter
from conflux.log.kafka.client import call, high_watermark, partitions_of
from conflux.log.kafka.settings import PRODUCER_DEFAULTS, PRODUCER_REQUIRED, READ_TIMEOUT_S, KafkaSettings

_checkpoint_encoder = msgspec.json.Encoder()
_checkpoint_decoder = msgspec.json.Decoder(tuple[str, str, int, float, float])


class _TopicReader:
    """Reads topics from their beginning, then only what was added since. Topics that do not exist
    (the daemon never ran) read as empty."""

    def __init__(self, settings: dict[str, Any], topics: Iterable[str]) -> None:
        self._settings = settings
        self._topics = sorted(set(topics))
        self._consumer: Consumer | None = None
        self._positions: dict[TopicPartition, int] = {}

    def _client(self) -> Consumer:
        if self._consumer is None:
            consumer = Consumer(self._settings)
            self._positions = dict.fromkeys(partitions_of(consumer, self._topics), 0)
            if self._positions:
                call(consumer.assign, [KafkaPartition(t, p, OFFSET_BEGINNING) for t, p in self._positions])
            self._consumer = consumer
        return self._consumer

    def read_new(self) -> list:
        """Every message added since the last call, up to the ends as they were when called."""
        consumer = self._client()
        ends = {tp: high_watermark(consumer, tp) for tp in self._positions}
        behind = {tp for tp, end in ends.items() if self._positions[tp] < end}
        messages = []
        deadline = time.monotonic() + READ_TIMEOUT_S
        while behind:
            if time.monotonic() > deadline:
                raise LogUnavailable(f"could not read {sorted(behind)} to the end within {READ_TIMEOUT_S:.0f} s")
            for message in call(consumer.consume, 1000, 0.1):
                tp = (message.topic(), message.partition())
                error = message.error()
                if error is None:
                    messages.append(message)
                    self._positions[tp] = message.offset() + 1
                elif error.code() == KafkaError._PARTITION_EOF:
                    self._positions[tp] = max(self._positions[tp], message.offset())
                elif error.fatal():
                    raise LogError(f"reading {tp}: {error.str()}")
                if tp in behind and self._positions[tp] >= ends[tp]:
                    behind.discard(tp)
        return messages

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


class _Writer:
    """Small keyed writes that must be durable before the call returns; a None value is a tombstone."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._producer: Producer | None = None

    def write(self, records: list[tuple[str, bytes, bytes | None]]) -> None:
        if self._producer is None:
            self._producer = Producer(self._settings)
        producer, errors = self._producer, []

        def report(error: KafkaError | None, message) -> None:
            if error is not None:
                errors.append(error)

        for topic, key, value in records:
            while True:
                try:
                    producer.produce(topic, value, key, on_delivery=report)
                    break
                except BufferError:
                    producer.poll(0.1)
                except KafkaException as exc:
                    raise LogError(f"cannot write to {topic}: {exc.args[0].str()}") from None
        while producer.flush(1.0):  # message.timeout.ms bounds this: a message is delivered or fails
            pass
        if errors:
            raise LogError(f"Kafka write failed: {errors[0].str()}")

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10.0)
            self._producer = None


class _Store:
    """Shared by a process's threads (the event loop's executor): one call at a time."""

    def __init__(self, log: KafkaSettings, topics: Iterable[str]) -> None:
        self._reader = _TopicReader(log.reader_settings(), topics)
        self._writer = _Writer(log.settings("producer", {**PRODUCER_DEFAULTS, "linger.ms": 0}, PRODUCER_REQUIRED))
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._reader.close()
            self._writer.close()


class KafkaCheckpointStore(_Store):
    """Watermarks on a compacted topic keyed by source; the newest record of a key is its checkpoint."""

    def __init__(self, log: KafkaSettings, topic: str) -> None:
        super().__init__(log, [topic])
        self._topic = topic
        self._latest: dict[str, Checkpoint] = {}

    def load(self, source: str) -> Checkpoint | None:
        return self.load_all().get(source)

    def load_all(self) -> dict[str, Checkpoint]:
        with self._lock:
            for message in self._reader.read_new():
                source, value = message.key().decode(), message.value()
                if value is None:
                    self._latest.pop(source, None)
                else:
                    self._latest[source] = Checkpoint(*_checkpoint_decoder.decode(value))
            return dict(self._latest)

    def save(self, checkpoint: Checkpoint) -> None:
        with self._lock:
            body = _checkpoint_encoder.encode(tuple(checkpoint))
            self._writer.write([(self._topic, checkpoint.source.encode(), body)])
            self._latest[checkpoint.source] = checkpoint


class KafkaDeadLetterStore(_Store):
    """Dead letters on the ``<topic>.dlq`` topics, keyed by entry id. Each record is the entry's whole
    state (first_seen, last_seen, attempts), so compaction, which keeps only the newest, loses nothing;
    a tombstone removes an entry. Writers fold onto what they read first, as the embedded upsert does."""

    def __init__(self, log: KafkaSettings, topics: dict[str, str]) -> None:
        super().__init__(log, topics.values())
        self._topics = topics  # source name or source topic -> its DLQ topic
        self._entries: dict[str, DeadLetter] = {}

    def _refresh(self) -> None:
        for message in self._reader.read_new():
            entry_id, value = message.key().decode(), message.value()
            if value is None:
                self._entries.pop(entry_id, None)
            else:
                self._entries[entry_id] = decode_dead_letter(value)

    def _topic_of(self, entry: DeadLetter) -> str:
        try:
            return self._topics[entry.source]
        except KeyError:
            raise LogError(f"no DLQ topic for source {entry.source!r}") from None

    def add(self, entries: list[DeadLetter]) -> None:
        """A repeat of an entry keeps its first_seen, takes the new last_seen and counts one more attempt."""
        if not entries:
            return
        with self._lock:
            self._refresh()
            merged: dict[str, DeadLetter] = {}
            for entry in entries:
                old = merged.get(entry.id) or self._entries.get(entry.id)
                if old is not None:
                    entry = msgspec.structs.replace(entry, first_seen=old.first_seen,
                                                    attempts=old.attempts + entry.attempts)
                merged[entry.id] = entry
            self._writer.write([(self._topic_of(e), e.id.encode(), encode_dead_letter(e)) for e in merged.values()])
            self._entries.update(merged)

    def list(self, source: str | None = None) -> list[DeadLetter]:
        with self._lock:
            self._refresh()
            entries = [e for e in self._entries.values() if source is None or e.source == source]
        return sorted(entries, key=lambda e: (e.first_seen, e.id))

    def get(self, entry_id: str) -> DeadLetter | None:
        with self._lock:
            self._refresh()
            return self._entries.get(entry_id)

    def remove(self, entry_ids: Iterable[str], *, unless_seen_after: float | None = None) -> int:
        """Entries seen again after ``unless_seen_after`` failed anew and stay."""
        with self._lock:
            self._refresh()
            doomed = [self._entries[i] for i in set(entry_ids) if i in self._entries]
            if unless_seen_after is not None:
                doomed = [e for e in doomed if e.last_seen <= unless_seen_after]
            return self._delete(doomed)

    def purge(self, source: str | None = None) -> int:
        with self._lock:
            self._refresh()
            return self._delete([e for e in self._entries.values() if source is None or e.source == source])

    def _delete(self, entries: list[DeadLetter]) -> int:
        if entries:
            self._writer.write([(self._topic_of(e), e.id.encode(), None) for e in entries])
            for entry in entries:
                self._entries.pop(entry.id, None)
        return len(entries)
