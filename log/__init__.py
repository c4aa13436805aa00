"""The partitioned, durable log behind one interface (``log.base``): embedded SQLite or Kafka."""

from __future__ import annotations

from conflux.config import Config
from conflux.log.base import LogBackend


def open_log(config: Config) -> LogBackend:
    """The configured backend's handle; opens no connection until one of its methods is called."""
    if config.log.backend == "kafka":
        from conflux.log.kafka import KafkaLog

        return KafkaLog(config)
    from conflux.log.embedded import EmbeddedLog

    return EmbeddedLog(config)

