"""Smoke tests for the real broker the Kafka tests share, and for deploy/kafka/kafka-local.

If these fail, every other Kafka test will too: look here first.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

pytestmark = pytest.mark.kafka

POLL_DEADLINE_S = 60.0


def produce(bootstrap: str, topic: str, values: list[str]) -> dict[int, list[tuple[int, str]]]:
    """Produce with acks=all and idempotence; return {partition: [(offset, value)]} from the reports."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                         "linger.ms": 5})
    reports: list[tuple[KafkaError | None, Message]] = []
    for i, value in enumerate(values):
        producer.produce(topic, key=f"key-{i % 7}", value=value,
                         on_delivery=lambda err, msg: reports.append((err, msg)))
        producer.poll(0)
    assert producer.flush(30) == 0, "messages still in flight after 30 s"
    errors = [err for err, _ in reports if err is not None]
    assert not errors, f"delivery failed: {errors[:5]}"
    assert len(reports) == len(values)
    by_partition: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for _, msg in reports:
        by_partition[msg.partition()].append((msg.offset(), msg.value().decode()))
    for entries in by_partition.values():
        assert_produce_order(entries, values)
    return dict(by_partition)


def assert_produce_order(entries: list[tuple[int, str]], values: list[str]) -> None:
    """Within a partition, offsets go up in the order the values were produced (idempotence keeps
    retried batches from overtaking each other)."""
    by_offset = [value for _, value in sorted(entries)]
    assert by_offset == sorted(by_offset, key=values.index)


@contextmanager
def group_consumer(bootstrap: str, group_id: str, topic: str) -> Iterator[Consumer]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    try:
        yield consumer
    finally:
        consumer.close()


def consume_and_commit(consumer: Consumer, count: int) -> dict[int, list[tuple[int, str]]]:
    """Poll until ``count`` messages arrived, committing each batch synchronously after reading it."""
    received: dict[int, list[tuple[int, str]]] = defaultdict(list)
    total = 0
    deadline = time.monotonic() + POLL_DEADLINE_S
    while total < count:
        assert time.monotonic() < deadline, f"only {total} of {count} messages within {POLL_DEADLINE_S}s"
        batch = consumer.consume(num_messages=100, timeout=0.5)
        for msg in batch:
            assert msg.error() is None, msg.error()
            received[msg.partition()].append((msg.offset(), msg.value().decode()))
        total += len(batch)
        if batch:
            commit(consumer, batch)
    return dict(received)


def commit(consumer: Consumer, batch: list[Message]) -> None:
    """Commit the offset after the last message of each partition in ``batch``, synchronously."""
    last: dict[tuple[str, int], int] = {}
    for msg in batch:
        last[(msg.topic(), msg.partition())] = msg.offset()
    offsets = [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in last.items()]
    results = consumer.commit(offsets=offsets, asynchronous=False)
    assert all(tp.error is None for tp in results), results


def committed(consumer: Consumer, topic: str, partitions: int) -> dict[int, int]:
    wanted = [TopicPartition(topic, p) for p in range(partitions)]
    return {tp.partition: tp.offset for tp in consumer.committed(wanted, timeout=10)}


def test_produce_consume_commit_and_resume(kafka_bootstrap, kafka_topic_factory, kafka_group_id):
    partitions = 3
    topic = kafka_topic_factory(partitions=partitions)
    first = [f"first-{i}" for i in range(300)]
    produced = produce(kafka_bootstrap, topic, first)
    assert set(produced) == set(range(partitions)), "keys should spread over every partition"

    with group_consumer(kafka_bootstrap, kafka_group_id, topic) as consumer:
        received = consume_and_commit(consumer, len(first))
        # Per partition: the same messages, in produce order, at the offsets the reports named.
        assert received == produced
        ends = {p: entries[-1][0] + 1 for p, entries in produced.items()}
        assert committed(consumer, topic, partitions) == ends

    second = [f"second-{i}" for i in range(30)]
    produced_later = produce(kafka_bootstrap, topic, second)
    with group_consumer(kafka_bootstrap, kafka_group_id, topic) as consumer:
        resumed = consume_and_commit(consumer, len(second))
    # The new member starts at the committed offsets: only new messages, none of the first run.
    assert resumed == produced_later
    for partition, entries in resumed.items():
        assert entries[0][0] == ends.get(partition, 0)


def test_kafka_local_status_reports_the_running_broker(kafka_bootstrap, kafka_broker_control):
    result = kafka_broker_control.status()
    assert result.returncode == 0, result.describe()
    assert result.last_line == f"{kafka_bootstrap} running"


def test_broker_restart_keeps_address_topics_and_offsets(kafka_bootstrap, kafka_broker_control,
                                                         kafka_topic_factory, kafka_group_id):
    topic = kafka_topic_factory(partitions=2)
    produced = produce(kafka_bootstrap, topic, [f"before-{i}" for i in range(20)])
    with group_consumer(kafka_bootstrap, kafka_group_id, topic) as consumer:
        assert consume_and_commit(consumer, 20) == produced

    kafka_broker_control.stop()
    assert kafka_broker_control.status().returncode != 0
    assert kafka_broker_control.start() == kafka_bootstrap

    produced_later = produce(kafka_bootstrap, topic, [f"after-{i}" for i in range(10)])
    with group_consumer(kafka_bootstrap, kafka_group_id, topic) as consumer:
        assert consume_and_commit(consumer, 10) == produced_later
