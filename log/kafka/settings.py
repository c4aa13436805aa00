"""librdkafka settings for every client: our defaults and requirements, the shared security keys, then
each [kafka.<role>] table, with ``_env``/``_file`` keys resolved to their secrets. Also the logging of
librdkafka's own lines and errors, each kind at most once per interval.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import KafkaError

from conflux.config import Config
from conflux.secrets import read_secret

logger = logging.getLogger(__name__)
librdkafka_logger = logging.getLogger("librdkafka")

# A page of page_size records becomes one message per partition; 16 MiB leaves room for big pages.
MAX_MESSAGE_BYTES = 16 << 20
# Sources hash onto this topic's partitions; more partitions than sources keeps collisions rare.
SOURCES_TOPIC_MIN_PARTITIONS = 12
METADATA_TIMEOUT_S = 10.0
TOPIC_READY_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 30.0
COMMIT_TIMEOUT_S = 30.0
ERROR_LOG_INTERVAL_S = 30.0
COMPACTED = {"cleanup.policy": "compact", "segment.ms": "3600000", "min.cleanable.dirty.ratio": "0.1"}
# Security settings given in any [kafka.*] table apply to every client, unless its own table says otherwise.
CONNECTION_PREFIXES = ("security.", "sasl.", "ssl.")

PRODUCER_DEFAULTS = {"compression.type": "lz4", "linger.ms": 1, "batch.size": 1_000_000,
                     "message.max.bytes": MAX_MESSAGE_BYTES, "queue.buffering.max.kbytes": 65536}
PRODUCER_REQUIRED = {"acks": "all", "enable.idempotence": True}
# fetch.queue.backoff.ms: after backpressure filled librdkafka's queue, fetch again within 20 ms, not 1 s.
CONSUMER_DEFAULTS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500, "fetch.queue.backoff.ms": 20}
GROUP_REQUIRED = {"partition.assignment.strategy": "cooperative-sticky", "enable.auto.commit": False,
                  "enable.auto.offset.store": False, "auto.offset.reset": "earliest"}
READER_REQUIRED = {"enable.auto.commit": False, "enable.partition.eof": True, "fetch.wait.max.ms": 50}


class _OncePerInterval(logging.Filter):
    """librdkafka repeats a failing reconnect every few hundred milliseconds, per client: one line of
    each kind (level and facility, e.g. ERROR FAIL) per interval is enough. Debug lines all pass."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.last: dict[tuple[int, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        kind, now = (record.levelno, record.getMessage().split(" ", 1)[0]), time.monotonic()
        if now - self.last.get(kind, -self.interval_s) < self.interval_s:
            return False
        self.last[kind] = now
        return True


librdkafka_logger.addFilter(_OncePerInterval(ERROR_LOG_INTERVAL_S))
_last_logged: dict[int, float] = {}


class KafkaSettings:
    """The librdkafka settings of every client Conflux makes, from [log] and the [kafka.*] tables."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.group = config.log.group

    def settings(self, role: str, defaults: dict[str, Any], required: dict[str, Any]) -> dict[str, Any]:
        """librdkafka settings of a client: ours, then the shared security keys, then its [kafka.<role>] table."""
        return {"bootstrap.servers": self.config.log.bootstrap_servers, "log.connection.close": False, **defaults,
                **self.connection(), **self._table(role), **required, **CALLBACKS}

    def connection(self) -> dict[str, Any]:
        """The security.*, sasl.* and ssl.* keys of every [kafka.*] table: how to reach the log's cluster."""
        shared: dict[str, Any] = {}
        for table in ("admin", "consumer", "producer"):
            shared.update(connection_keys(self._table(table)))
        return shared

    def _table(self, role: str) -> dict[str, Any]:
        return resolve_secrets(getattr(self.config.kafka, role), f"kafka.{role}")

    def group_settings(self, group: str) -> dict[str, Any]:
        return self.settings("consumer", CONSUMER_DEFAULTS, {**GROUP_REQUIRED, "group.id": group})

    def reader_settings(self, group: str = "") -> dict[str, Any]:
        """A consumer that never joins its group: it assigns partitions itself and commits nothing."""
        return self.settings("consumer", {"auto.offset.reset": "earliest"},
                             {**READER_REQUIRED, "group.id": group or f"{self.group}.readers"})


def resolve_secrets(table: dict[str, Any], where: str) -> dict[str, Any]:
    """A table of librdkafka settings with ``x_env`` / ``x_file`` keys replaced by ``x`` and the secret's
    value; ``where`` names the table in errors (``kafka.producer``, ``sinks[0] (events).producer``)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        what = f"{where}.{key}"
        if key.endswith("_env"):
            out[key[:-4]] = read_secret(env=str(value), what=what)
        elif key.endswith("_file"):
            out[key[:-5]] = read_secret(file=str(value), what=what)
        else:
            out[key] = value
    return out


def connection_keys(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in settings.items() if key.startswith(CONNECTION_PREFIXES)}


def log_client_error(error: KafkaError) -> None:
    """librdkafka's error callback and consumer error events: mostly transient (a broker went away,
    librdkafka reconnects by itself), so each kind is logged at most every ERROR_LOG_INTERVAL_S."""
    now = time.monotonic()
    if error.fatal():
        logger.error("Kafka client error (fatal): %s", error.str())
    elif now - _last_logged.get(error.code(), 0.0) >= ERROR_LOG_INTERVAL_S:
        _last_logged[error.code()] = now
        logger.warning("Kafka: %s", error.str())


# Every client logs through our logger and reports errors through log_client_error.
CALLBACKS = {"logger": librdkafka_logger, "error_cb": log_client_error}
