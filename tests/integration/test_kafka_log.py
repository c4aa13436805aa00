"""The Kafka backend behind the log interface, driven in-process against the real broker: topics,
publish and group consumption, checkpoints, dead letters, and where librdkafka settings come from."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, ConfigSource, NewTopic

from conflux.config import Config, load_config
from conflux.errors import ConfigError
from conflux.ipc.messages import DeadLetter
from conflux.log.base import Checkpoint, OutgoingMessage, dlq_topic
from conflux.log.kafka import KafkaLog
from conflux.secrets import known_secrets
from tests.support import wait_until

SOURCES = ("customers", "products")


def kafka_config(bootstrap: str, group: str, *, partitions: int = 3) -> Config:
    return msgspec.convert({
        "log": {"backend": "kafka", "bootstrap_servers": bootstrap, "group": group, "topic_prefix": f"{group}.",
                "partitions": partitions},
        "sources": [{"name": name, "url": f"http://127.0.0.1:1/api/{name}"} for name in SOURCES],
    }, Config)


@pytest.fixture
def config(kafka_bootstrap: str, kafka_group_id: str) -> Config:
    return kafka_config(kafka_bootstrap, kafka_group_id)


@pytest.fixture
def prepared(config: Config) -> KafkaLog:
    log = KafkaLog(config)
    log.prepare({config.topic_of(source): config.log.partitions for source in config.sources})
    return log


def topic_config(admin: AdminClient, topic: str) -> dict[str, str]:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return {name: entry.value for name, entry in entries.items()}


def test_prepare_creates_each_topic_with_the_configured_partitions(config, kafka_admin):
    log = KafkaLog(config)
    topics = {config.topic_of(source): 3 for source in config.sources}
    assert log.prepare(topics) == topics
    metadata = kafka_admin.list_topics(timeout=10).topics
    prefix = config.log.topic_prefix
    for topic in topics:
        assert len(metadata[topic].partitions) == 3
        assert len(metadata[dlq_topic(topic)].partitions) == 1
        assert topic_config(kafka_admin, dlq_topic(topic))["cleanup.policy"] == "compact"
    assert topic_config(kafka_admin, f"{prefix}conflux.checkpoints")["cleanup.policy"] == "compact"
    assert len(metadata[f"{prefix}conflux.sources"].partitions) >= len(config.sources)
    assert log.prepare(topics) == topics  # a second instance finds everything in place


def test_an_existing_topic_with_fewer_partitions_is_used_as_it_is(config, kafka_admin, caplog):
    topic = config.topic_of(config.sources[0])
    kafka_admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(timeout=30)
    with caplog.at_level(logging.WARNING, logger="conflux.log.kafka"):
        actual = KafkaLog(config).prepare({topic: 6})
    assert actual == {topic: 2}
    assert len(kafka_admin.list_topics(topic=topic, timeout=10).topics[topic].partitions) == 2
    assert any("has 2 partitions, fewer than the 6 configured" in r.getMessage() for r in caplog.records)


def test_publish_waits_for_delivery_and_the_group_commits_only_upwards(config, prepared):
    topic = config.topic_of(config.sources[0])
    messages = [OutgoingMessage(topic, i % 3, f"key-{i}".encode(), f"batch-{i}".encode()) for i in range(30)]

    async def publish():
        producer = prepared.producer()
        try:
            return await producer.publish(messages)
        finally:
            await producer.close()

    positions = asyncio.run(publish())
    assert [(p.topic, p.partition) for p in positions] == [(m.topic, m.partition) for m in messages]
    assert sorted(p.offset for p in positions if p.partition == 0) == list(range(10))

    read = consume(prepared, 30)
    assert sorted(read) == sorted((p.partition, p.offset, m.payload) for p, m in zip(positions, messages))
    ends = prepared.end_offsets([topic])
    assert ends == {(topic, p): 10 for p in range(3)}
    assert prepared.committed_offsets() == {(topic, 0): 7, (topic, 1): 10}


def consume(log: KafkaLog, count: int) -> list[tuple[int, int, bytes]]:
    """Read ``count`` messages with a group member, committing upwards and then (ignored) downwards."""
    consumer = log.consumer(0, [])
    assigned: list = []
    consumer.start(assigned.extend, lambda tps: None)
    read: list = []
    deadline = time.monotonic() + 30
    while len(read) < count:
        assert time.monotonic() < deadline, f"read {len(read)} of {count} messages"
        read += consumer.poll(64, 0.2)
    topic = read[0].topic
    consumer.commit({(topic, 0): 7, (topic, 1): 10})
    consumer.commit({(topic, 0): 3})  # a stale caller: commits never go down
    assert consumer.committed([(topic, 0), (topic, 1), (topic, 2)]) == {(topic, 0): 7, (topic, 1): 10, (topic, 2): 0}
    lags = {lag.partition: (lag.committed, lag.end) for lag in consumer.lags() if lag.topic == topic}
    assert lags == {0: (7, 10), 1: (10, 10), 2: (0, 10)}
    consumer.close()
    return [(m.partition, m.offset, m.payload) for m in read]


def test_checkpoints_are_read_back_by_any_new_handle(config, prepared):
    store = prepared.checkpoints()
    assert store.load("customers") is None
    store.save(Checkpoint("customers", "2024-01-01T00:00:00Z", 1_704_067_200_000_000, 10.0, 11.0))
    store.save(Checkpoint("customers", "2024-01-02T00:00:00Z", 1_704_153_600_000_000, 10.0, 12.0))
    store.save(Checkpoint("products", "2024-01-03T00:00:00Z", 1_704_240_000_000_000, 13.0, 14.0))
    store.close()
    fresh = KafkaLog(config).checkpoints()  # another process, another instance: only Kafka in common
    assert fresh.load("customers").watermark == "2024-01-02T00:00:00Z"
    assert set(fresh.load_all()) == {"customers", "products"}
    fresh.close()


def letter(entry_id: str, source: str, seen: float) -> DeadLetter:
    return DeadLetter(id=entry_id, source=source, reason="missing key", stage="fetch",
                      record=msgspec.Raw(b'{"name": "x"}'), origin="page 1", first_seen=seen, last_seen=seen)


def test_dead_letters_upsert_list_remove_and_purge_across_handles(config, prepared):
    writer = prepared.dead_letters()
    writer.add([letter("a", "customers", 100.0), letter("b", "customers", 101.0), letter("c", "products", 102.0)])
    writer.add([letter("a", "customers", 200.0)])  # the same record failing again
    reader = KafkaLog(config).dead_letters()
    entries = {e.id: e for e in reader.list()}
    assert (entries["a"].first_seen, entries["a"].last_seen, entries["a"].attempts) == (100.0, 200.0, 2)
    assert [e.id for e in reader.list("products")] == ["c"]
    assert bytes(reader.get("b").record) == b'{"name": "x"}'

    assert reader.remove(["a", "b"], unless_seen_after=150.0) == 1  # "a" failed again after 150: it stays
    assert reader.purge("products") == 1
    wait_until(lambda: [e.id for e in writer.list()] == ["a"], timeout_s=10, message="tombstones seen by the writer")
    assert [e.id for e in KafkaLog(config).dead_letters().list()] == ["a"]
    writer.close()
    reader.close()


def test_librdkafka_settings_pass_through_with_secrets_from_env_and_files(tmp_path, monkeypatch):
    secret_file = tmp_path / "password"
    secret_file.write_text("from-a-file\n")
    monkeypatch.setenv("CONFLUX_TEST_SASL_PASSWORD", "from-the-env")
    path = tmp_path / "conflux.toml"
    path.write_text(f"""
[log]
backend = "kafka"
bootstrap_servers = "127.0.0.1:9"

[kafka.producer]
linger.ms = 50
sasl.username = "conflux"
sasl.password_env = "CONFLUX_TEST_SASL_PASSWORD"

[kafka.consumer]
session.timeout.ms = 9000
ssl.key.password_file = "{secret_file}"
""")
    config = load_config(path)
    log = KafkaLog(config)
    producer = log.settings("producer", {"linger.ms": 5}, {"acks": "all"})
    assert (producer["linger.ms"], producer["sasl.password"], producer["ssl.key.password"]) == (
        50, "from-the-env", "from-a-file")
    assert "sasl.password_env" not in producer and producer["acks"] == "all"
    consumer = log.group_settings("g")
    assert consumer["session.timeout.ms"] == 9000 and consumer["sasl.username"] == "conflux"
    assert consumer["enable.auto.commit"] is False and consumer["partition.assignment.strategy"] == "cooperative-sticky"
    assert {"from-the-env", "from-a-file"} <= set(known_secrets(config))  # blanked out of every log line

    monkeypatch.delenv("CONFLUX_TEST_SASL_PASSWORD")
    with pytest.raises(ConfigError, match=r"kafka\.producer\.sasl\.password_env"):
        load_config(path)  # `conflux config check` and the supervisor refuse it
    with pytest.raises(ConfigError, match=r"kafka\.producer\.sasl\.password_env"):
        log.settings("producer", {}, {})  # and so does a worker, reading it after fork


def test_topics_conflux_creates_require_replication_minus_one_in_sync_replicas(config, kafka_admin):
    """With acks=all, min.insync.replicas is how many replicas hold a write before it is acknowledged;
    the broker's default (1) would let an acknowledged record live on the leader alone. One broker here:
    replication 1, so the value is 1, set on the topic itself (a unit test covers replication 3)."""
    topics = {config.topic_of(source): 3 for source in config.sources}
    KafkaLog(config).prepare(topics)
    prefix = config.log.topic_prefix
    created = [*topics, *map(dlq_topic, topics), f"{prefix}conflux.checkpoints", f"{prefix}conflux.sources"]
    for topic in created:
        resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
        entry = kafka_admin.describe_configs([resource])[resource].result(timeout=30)["min.insync.replicas"]
        assert (entry.value, entry.source) == ("1", ConfigSource.DYNAMIC_TOPIC_CONFIG.value), topic
