"""The partitioned, durable log behind one interface (``log.base``): embedded SQLite or Kafka."""

from __future__ import annotations

from daemon.config import Config
from log.base import LogBackend


def open_log(config: Config) -> LogBackend:
    """The configured backend's handle; opens no connection until one of its methods is called."""
    if config.log.backend == "kafka":
        from log.kafka import KafkaLog

        return KafkaLog(config)
    from log.embedded import EmbeddedLog

    return EmbeddedLog(config)


def partition_for(key_hash: int, partitions: int) -> int:
    """The partitioner every producer uses, so all versions of a key meet in one partition."""
    return key_hash % partitions


def partitions_for(key_hashes: list[int], partitions: int) -> list[int]:
    """``partition_for`` over a whole column at once."""
    return [key_hash % partitions for key_hash in key_hashes]


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"
