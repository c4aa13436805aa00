"""The Kafka changelog sink alone, against the real broker: chunks built as a merger builds them go
through ``attempt``/``deliver``, and the sink's topic is read back."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ConfigSource,
    NewTopic,
    ResourceType,
)

from conflux import metrics
from conflux.config import load_config, to_toml
from conflux.log import open_log
from conflux.workers.delivery import Dispatcher, Route
from conflux.workers.merge import FlushUnit
from conflux.workers.sinks import Delivery, Retry, make_sinks
from conflux.workers.sinks.base import NULL_HASH
from conflux.workers.sinks.kafka import KafkaSink
from tests.fixtures.kafka_sink import chunk, java_partition, latest_per_key, murmur2, read_topic, version
from tests.support import wait_until

pytestmark = pytest.mark.kafka

TIMEOUT_S = 30.0


@pytest.fixture
def prefix() -> Iterator[str]:
    return f"conflux-sink-test-{uuid.uuid4().hex[:8]}."


@pytest.fixture
def sink_topics(kafka_admin: AdminClient, prefix: str) -> Iterator[str]:
    """The test's topic prefix; every topic under it is deleted at teardown."""
    yield prefix
    names = [name for name in kafka_admin.list_topics(timeout=10).topics if name.startswith(prefix)]
    if names:
        for future in kafka_admin.delete_topics(names, operation_timeout=30).values():
            future.result(timeout=30)


def sink_config(directory: Path, bootstrap: str, prefix: str, **options):
    """A config with the embedded log and one Kafka sink "events" (the sink under test)."""
    settings = {"log": {"path": str(directory / "conflux.db"), "partitions": 3, "topic_prefix": prefix,
                        "bootstrap_servers": bootstrap},
                "daemon": {"state_dir": str(directory / "var")},
                "sources": [{"name": "customers", "url": "http://127.0.0.1:9/api/customers"}],
                "sinks": [{"name": "events", "type": "kafka", "timeout_s": 10.0, **options}]}
    path = directory / "conflux.toml"
    path.write_text(to_toml(settings))
    return load_config(path)


def make_sink(config, stopping: asyncio.Event | None = None) -> KafkaSink:
    sink = make_sinks(config, stopping=stopping, instance="merger-0")["events"]
    assert isinstance(sink, KafkaSink)
    return sink


async def attempt_once(sink: KafkaSink, *chunks) -> list:
    await sink.start()
    try:
        return [await sink.attempt(item) for item in chunks]
    finally:
        await sink.close()


def create_topic(admin: AdminClient, name: str, *, partitions: int = 1, config: dict[str, str]) -> None:
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1, config=config)],
                                  operation_timeout=30)
    futures[name].result(timeout=30)
    wait_until(lambda: all(p.leader >= 0 for p in admin.list_topics(name, timeout=5).topics[name].partitions.values()),
               timeout_s=30, message=f"topic {name} with a leader")


def set_topic(admin: AdminClient, name: str, key: str, value: str) -> None:
    entry = ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.TOPIC, name, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


def topic_settings(admin: AdminClient, name: str) -> dict:
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, name)])
    return next(iter(futures.values())).result(timeout=30)


def test_one_record_per_record_with_key_headers_and_tombstones_on_a_created_compacted_topic(
        tmp_path, kafka_bootstrap, kafka_admin, sink_topics):
    config = sink_config(tmp_path, kafka_bootstrap, sink_topics)
    items = [version("1", b'{"id":1,"name":"Ada"}', offset=11), version("2", b'{"id":2,"name":"Bo"}', offset=12),
             version("caf\u00e9", b'{"id":"caf\\u00e9"}', offset=13), version("3", None, offset=14)]
    sent = chunk("customers", items)
    (outcome,) = asyncio.run(attempt_once(make_sink(config), sent))
    assert outcome == Delivery({}, 200, applied=4, deleted=1)

    topic = f"{sink_topics}customers.records"
    messages = read_topic(kafka_bootstrap, topic)
    assert sorted(m.key() for m in messages) == sorted(key.encode() for key, _ in items)
    by_key = {m.key().decode(): m for m in messages}
    for key, value in items:
        message = by_key[key]
        deleted = value[5]
        assert message.value() == (None if deleted else bytes(value[2]))
        assert message.headers() == [
            ("conflux-op", b"delete" if deleted else b"upsert"), ("conflux-updated-at", b"2026-01-02T03:04:05Z"),
            ("conflux-hash", (NULL_HASH if deleted else value[1]).encode()), ("conflux-source", b"customers"),
            ("conflux-batch", sent.batch_id.encode()), ("conflux-seq", str(value[4].offset).encode())]

    # Created compacted, with [log] partitions and min.insync.replicas set on the topic itself.
    assert len(kafka_admin.list_topics(topic, timeout=10).topics[topic].partitions) == 3
    settings = topic_settings(kafka_admin, topic)
    assert settings["cleanup.policy"].value == "compact"
    assert settings["min.insync.replicas"].value == "1"
    assert settings["min.insync.replicas"].source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value
    assert settings["max.message.bytes"].value == str(16 << 20)


def test_java_reference_vectors_of_murmur2():
    """The test's own murmur2 against the values in Kafka's UtilsTest.testMurmur2 (signed there)."""
    signed = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
              b"a-little-bit-longer-string": -1486304829,
              b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971, b"abc": 479470107}
    for data, expected in signed.items():
        assert murmur2(data) == expected & 0xFFFFFFFF, data


def test_a_key_lands_in_the_partition_java_puts_it_in_every_time(tmp_path, kafka_bootstrap, kafka_admin,
                                                                 sink_topics):
    config = sink_config(tmp_path, kafka_bootstrap, sink_topics, partitions=6)
    keys = [f"customer-{n}" for n in range(300)] + ["", "\u00fc", "x" * 40]
    first = chunk("customers", [version(key, b'{"v":1}', offset=1) for key in keys])
    second = chunk("customers", [version(key, b'{"v":2}', offset=2) for key in reversed(keys)])
    assert asyncio.run(attempt_once(make_sink(config), first, second)) == [Delivery({}, 200, applied=len(keys))] * 2

    topic = f"{sink_topics}customers.records"
    assert len(kafka_admin.list_topics(topic, timeout=10).topics[topic].partitions) == 6
    messages = read_topic(kafka_bootstrap, topic)
    assert len(messages) == 2 * len(keys)
    placed = {(m.key(), m.partition()) for m in messages}
    assert placed == {(key.encode(), java_partition(key.encode(), 6)) for key in keys}
    assert len({partition for _key, partition in placed}) == 6
    # Both versions of every key in one partition, in order: the newer one last.
    assert latest_per_key(messages) == dict.fromkeys(keys, b'{"v":2}')


@pytest.mark.parametrize("transactional", [True, False])
def test_a_chunk_is_acknowledged_only_when_every_report_is_back_positive(tmp_path, kafka_bootstrap, kafka_admin,
                                                                          sink_topics, transactional):
    """The topic is deleted under the sink: its records cannot be delivered, and an attempt that cannot
    deliver every one is an outage (a Retry), never a rejection. The next attempt creates the topic
    again, compacted, and delivers the chunk: once each record in a transaction, at least once without."""
    topic = f"{sink_topics}customers.records"
    config = sink_config(tmp_path, kafka_bootstrap, sink_topics, timeout_s=3.0, transactional=transactional)
    sent = chunk("customers", [version(str(n), b'{"n":%d}' % n) for n in range(50)])

    async def scenario() -> tuple:
        sink = make_sink(config)
        await sink.start()
        try:
            assert await sink.attempt(chunk("customers", [version("first", b"{}")])) == Delivery({}, 200, applied=1)
            await asyncio.to_thread(delete_topic, kafka_admin, topic)
            failed = await sink.attempt(sent)
            return failed, sink.last_status, await sink.attempt(sent), sink.last_status
        finally:
            await sink.close()

    failed, status_after_failure, delivered, last_status = asyncio.run(scenario())
    assert isinstance(failed, Retry), failed
    assert status_after_failure == 0
    assert delivered == Delivery({}, 200, applied=50) and last_status == 200
    assert topic_settings(kafka_admin, topic)["cleanup.policy"].value == "compact"
    keys = sorted(int(m.key()) for m in read_topic(kafka_bootstrap, topic))
    assert keys == list(range(50)) if transactional else sorted(set(keys)) == list(range(50))


def delete_topic(admin: AdminClient, name: str) -> None:
    admin.delete_topics([name], operation_timeout=30)[name].result(timeout=30)
    wait_until(lambda: name not in admin.list_topics(timeout=5).topics, timeout_s=30, message=f"{name} deleted")


def test_a_record_larger_than_the_topic_takes_is_refused_alone(tmp_path, kafka_bootstrap, kafka_admin, sink_topics):
    topic = f"{sink_topics}customers.records"
    create_topic(kafka_admin, topic, config={"cleanup.policy": "compact", "max.message.bytes": "20000"})
    config = sink_config(tmp_path, kafka_bootstrap, sink_topics)
    big = b'{"blob":"%s"}' % base64.b64encode(os.urandom(24000))
    sent = chunk("customers", [version("1", b'{"id":1}'), version("2", big), version("3", b'{"id":3}')])
    (outcome,) = asyncio.run(attempt_once(make_sink(config), sent))
    assert isinstance(outcome, Delivery) and list(outcome.rejected) == [1], outcome
    assert "larger than topic" in outcome.rejected[1] and "20000" in outcome.rejected[1]
    assert sorted(m.key() for m in read_topic(kafka_bootstrap, topic)) == [b"1", b"3"]


@pytest.mark.parametrize("transactional", [True, False])
def test_a_record_the_broker_refuses_as_too_large_is_dead_lettered_and_the_rest_delivered(
        tmp_path, kafka_bootstrap, kafka_admin, sink_topics, transactional):
    """The topic's limit shrinks after the sink learnt it: the broker refuses the batch holding the big
    record (and the small ones batched with it), the dispatcher halves the chunk, and the sink, having
    read the topic's new limit, refuses that record alone."""
    config = sink_config(tmp_path, kafka_bootstrap, sink_topics, transactional=transactional)
    topic = f"{sink_topics}customers.records"
    big = b'{"blob":"%s"}' % base64.b64encode(os.urandom(24000))
    keys = [str(n) for n in range(8)]
    records = [big if key == "5" else b'{"id":%s}' % key.encode() for key in keys]
    values = [version(key, data, offset=20)[1] for key, data in zip(keys, records)]
    log = open_log(config)
    dead_letters = log.dead_letters()

    async def scenario() -> bool:
        sink = make_sink(config)
        await sink.start()
        try:
            assert await sink.attempt(chunk("customers", [version("warm-up", b"{}")])) == Delivery({}, 200, applied=1)
            await asyncio.to_thread(set_topic, kafka_admin, topic, "max.message.bytes", "20000")
            dispatcher = Dispatcher({"customers": Route([sink])}, dead_letters, config.retry, _no_pause)
            return await dispatcher.deliver(FlushUnit("customers", keys, values, []))
        finally:
            await sink.close()

    try:
        assert asyncio.run(scenario()) is True
        entries = dead_letters.list()
    finally:
        dead_letters.close()
    assert [(entry.key, entry.stage) for entry in entries] == [("5", "sink")]
    assert "larger than topic" in entries[0].reason and "20000" in entries[0].reason, entries[0].reason
    live = latest_per_key(read_topic(kafka_bootstrap, topic))
    assert live == {"warm-up": b"{}", **{key: data for key, data in zip(keys, records) if key != "5"}}


async def _no_pause(delay_s: float) -> bool:
    return True


def test_an_unreachable_cluster_is_a_retry_and_deliver_keeps_trying_until_stopped(tmp_path, prefix):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    config = sink_config(tmp_path, closed, prefix, timeout_s=2.0)
    sent = chunk("customers", [version("1", b'{"id":1}')])

    async def scenario() -> tuple:
        stopping = asyncio.Event()
        sink = make_sink(config, stopping)
        await sink.start()
        try:
            first = await sink.attempt(sent)
            before = _retries()
            delivering = asyncio.create_task(sink.deliver(sent))
            while _retries() == before:  # the retry loop went round at least once
                assert not delivering.done(), delivering.result()
                await asyncio.sleep(0.05)
            stopping.set()
            return first, await asyncio.wait_for(delivering, timeout=60), sink.last_status
        finally:
            await sink.close()

    first, delivered, last_status = asyncio.run(scenario())
    assert isinstance(first, Retry) and "not reachable" in first.message, first
    assert delivered is None and last_status == 0


def _retries() -> float:
    return sum(sample.value for family in metrics.sink_retries.collect() for sample in family.samples
               if sample.name.endswith("_total") and sample.labels["sink"] == "events")


def test_the_sink_type_is_registered_and_its_config_keys_are_checked(tmp_path, prefix):
    config = sink_config(tmp_path, "127.0.0.1:9", prefix, topic="{prefix}cdc.{source}", transactional=False)
    sink = make_sink(config)
    assert sink.topic_of("customers") == f"{prefix}cdc.customers"
    assert msgspec.structs.asdict(sink.options)["transactional"] is False
