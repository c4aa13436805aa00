"""The topic settings the Kafka backend asks for when it creates topics (no broker needed)."""

from __future__ import annotations

import msgspec
import pytest

from conflux.config import Config
from conflux.log.kafka import KafkaLog


def kafka_log() -> KafkaLog:
    return KafkaLog(msgspec.convert({
        "log": {"backend": "kafka", "bootstrap_servers": "127.0.0.1:9", "topic_prefix": "p."},
        "sources": [{"name": "customers", "url": "http://127.0.0.1:1/"}]}, Config))


@pytest.mark.parametrize(("replication", "in_sync"), [(1, "1"), (2, "1"), (3, "2"), (5, "4")])
def test_every_created_topic_needs_all_but_one_replica_in_sync(replication: int, in_sync: str):
    specs = kafka_log()._topic_specs({"p.customers": 12}, replication)
    assert set(specs) == {"p.customers", "p.customers.dlq", "p.conflux.checkpoints", "p.conflux.sources"}
    assert {name: config["min.insync.replicas"] for name, (_, config) in specs.items()} == dict.fromkeys(specs, in_sync)
    assert specs["p.customers.dlq"][1]["cleanup.policy"] == "compact"
