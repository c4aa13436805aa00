"""Thin helpers over librdkafka clients: metadata, offsets, topic creation, and the translation of
their exceptions into ``LogError`` / ``LogUnavailable``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KafkaPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from conflux.errors import LogError, LogUnavailable
from conflux.log.base import TopicPartition
from conflux.log.kafka.settings import METADATA_TIMEOUT_S, TOPIC_READY_TIMEOUT_S

logger = logging.getLogger(__name__)


TRANSIENT = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                       KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.REQUEST_TIMED_OUT, KafkaError._TRANSPORT})


def call(method: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a librdkafka method, turning its exceptions into ours."""
    try:
        return method(*args, **kwargs)
    except KafkaException as exc:
        raise translated(exc) from None


def translated(exc: KafkaException) -> LogError:
    error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    text = error.str() if error is not None else str(exc)
    if error is not None and error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
                                              KafkaError._TIMED_OUT):
        return LogUnavailable(f"Kafka is not reachable: {text}")
    return LogError(f"Kafka: {text}")


def first_error(partitions: list[KafkaPartition]) -> KafkaError | None:
    return next((tp.error for tp in partitions if tp.error is not None), None)


def metadata(client, topic: str | None = None):
    return call(client.list_topics, topic=topic, timeout=METADATA_TIMEOUT_S)


def partition_count(client, topic: str) -> int:
    found = metadata(client, topic).topics.get(topic)
    if found is None or found.error is not None:
        raise LogError(f"topic {topic!r} does not exist in Kafka")
    return len(found.partitions)


def partitions_of(client, topics: Iterable[str]) -> list[TopicPartition]:
    """Every partition of those of ``topics`` that exist."""
    out = []
    for topic in sorted(topics):
        found = metadata(client, topic).topics.get(topic)
        if found is not None and found.error is None:
            out.extend((topic, partition) for partition in sorted(found.partitions))
    return out


def high_watermark(consumer: Consumer, tp: TopicPartition, timeout_s: float = METADATA_TIMEOUT_S) -> int:
    """The partition's end. Right after a topic is created, or while leadership moves, brokers answer
    'not leader' for a moment: ask again until the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = consumer.get_watermark_offsets(KafkaPartition(*tp), timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() not in TRANSIENT or time.monotonic() >= deadline:
                raise translated(exc) from None
            time.sleep(0.1)
            continue
        if found is None:
            raise LogUnavailable(f"no offsets for {tp[0]}/{tp[1]} within {timeout_s} s")
        return found[1]


def create_topics(admin: AdminClient, topics: list[NewTopic]) -> None:
    futures = call(admin.create_topics, topics, operation_timeout=TOPIC_READY_TIMEOUT_S)
    for name, future in futures.items():
        try:
            future.result(timeout=TOPIC_READY_TIMEOUT_S + 5)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # another instance was quicker
                raise LogError(f"cannot create topic {name}: {exc.args[0].str()}") from None
        else:
            logger.info("created topic %s", name)


def wait_for_topics(admin: AdminClient, names: list[str]) -> dict[str, int]:
    """Partition counts once every topic exists with a leader for each partition (creation is async)."""
    deadline = time.monotonic() + TOPIC_READY_TIMEOUT_S
    while True:
        topics = metadata(admin).topics
        ready = {name: topics[name] for name in names if name in topics and topics[name].error is None
                 and all(p.leader >= 0 for p in topics[name].partitions.values())}
        if len(ready) == len(names):
            return {name: len(topic.partitions) for name, topic in ready.items()}
        if time.monotonic() > deadline:
            raise LogError(f"topics not ready within {TOPIC_READY_TIMEOUT_S:.0f} s: {sorted(set(names) - set(ready))}")
        time.sleep(0.1)


def replication_for(cluster, configured: int) -> int:
    """The replication factor of topics Conflux creates: the configured one, or min(3, brokers)."""
    return configured or min(3, len(cluster.brokers))


def durable_config(replication: int) -> dict[str, str]:
    """min.insync.replicas = replication - 1 (at least 1): with acks=all a write is acknowledged only
    once that many replicas have it, so one broker can fail without losing an acknowledged record,
    and one can be down without stopping writes. The broker's default of 1 would acknowledge a
    write held by the leader alone."""
    return {"min.insync.replicas": str(max(1, replication - 1))}


def topic_setting(admin: AdminClient, topic: str, name: str) -> str | None:
    """One setting of a topic as the broker applies it (its own, or the broker's default)."""
    futures = call(admin.describe_configs, [ConfigResource(ResourceType.TOPIC, topic)],
                   request_timeout=METADATA_TIMEOUT_S)
    try:
        entries = next(iter(futures.values())).result(timeout=METADATA_TIMEOUT_S + 5)
    except KafkaException as exc:
        raise translated(exc) from None
    entry = entries.get(name)
    return None if entry is None else entry.value
