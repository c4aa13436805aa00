"""The Kafka backend's handle: creates the topics and hands out producers, consumers and stores.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException
from confluent_kafka import TopicPartition as KafkaPartition
from confluent_kafka.admin import AdminClient, NewTopic

from conflux.config import Config
from conflux.log.base import TopicPartition, dlq_topic
from conflux.log.kafka.client import (
    call,
    create_topics,
    durable_config,
    high_watermark,
    metadata,
    partitions_of,
    replication_for,
    wait_for_topics,
)
from conflux.log.kafka.consumer import KafkaConsumer
from conflux.log.kafka.producer import KafkaProducer
from conflux.log.kafka.settings import (
    COMPACTED,
    MAX_MESSAGE_BYTES,
    METADATA_TIMEOUT_S,
    PRODUCER_DEFAULTS,
    PRODUCER_REQUIRED,
    SOURCES_TOPIC_MIN_PARTITIONS,
    KafkaSettings,
)
from conflux.log.kafka.stores import KafkaCheckpointStore, KafkaDeadLetterStore

logger = logging.getLogger(__name__)


class KafkaLog(KafkaSettings):
    """The Kafka backend's handle. Holds only the settings until a method opens something."""

    name = "kafka"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.replication_factor = config.log.replication_factor
        self.source_topics = {source.name: config.topic_of(source) for source in config.sources}
        self.checkpoints_topic = f"{config.log.topic_prefix}conflux.checkpoints"
        self.sources_topic = f"{config.log.topic_prefix}conflux.sources"

    # -- topics -----------------------------------------------------------------------------------

    def prepare(self, topics: dict[str, int]) -> dict[str, int]:
        """Create the missing topics (supervisor, before fork); never delete or shrink one."""
        admin = AdminClient(self.settings("admin", {}, {}))
        try:
            cluster = metadata(admin)
            replication = replication_for(cluster, self.replication_factor)
            wanted = self._topic_specs(topics, replication)
            missing = [NewTopic(name, num_partitions=count, replication_factor=replication, config=config)
                       for name, (count, config) in wanted.items() if name not in cluster.topics]
            if missing:
                create_topics(admin, missing)
            actual = wait_for_topics(admin, list(wanted))
        finally:
            admin.poll(0)  # hands librdkafka's queued log lines to our logger before the client goes
        for name, count in actual.items():
            if count < wanted[name][0]:
                logger.warning("topic %s has %d partitions, fewer than the %d configured; using it as it is",
                               name, count, wanted[name][0])
        return {name: actual[name] for name in topics}

    def _topic_specs(self, topics: dict[str, int], replication: int) -> dict[str, tuple[int, dict[str, str]]]:
        """name -> (partitions, topic config). One DLQ partition: few entries, and one order per id.
        Every topic is durable (``client.durable_config``)."""
        durable = durable_config(replication)
        big = {**durable, "max.message.bytes": str(MAX_MESSAGE_BYTES)}
        specs: dict[str, tuple[int, dict[str, str]]] = {}
        for topic, partitions in topics.items():
            specs[topic] = (partitions, big)
            specs[dlq_topic(topic)] = (1, {**COMPACTED, **big})
        specs[self.checkpoints_topic] = (1, {**COMPACTED, **durable})
        specs[self.sources_topic] = (max(SOURCES_TOPIC_MIN_PARTITIONS, len(self.source_topics)), durable)
        return specs

    # -- the interface's handles --------------------------------------------------------------------

    def producer(self, *, durable: bool = False) -> KafkaProducer:
        """Every producer is durable already: acks=all waits for min.insync.replicas, which is how Kafka
        survives losing a machine (a broker's own fsync is left to its flush settings)."""
        return KafkaProducer(self.settings("producer", PRODUCER_DEFAULTS, PRODUCER_REQUIRED))

    def consumer(self, member: int, assignment: list[TopicPartition]) -> KafkaConsumer:
        """The group assigns partitions; the supervisor's member index and assignment are not used."""
        return KafkaConsumer(self.group_settings(self.group), sorted(set(self.source_topics.values())))

    def source_member(self) -> KafkaConsumer:
        """A fetcher process's seat in the source-ownership group (``workers.ownership``)."""
        return KafkaConsumer(self.group_settings(f"{self.group}.fetchers"), [self.sources_topic])

    def checkpoints(self) -> KafkaCheckpointStore:
        return KafkaCheckpointStore(self, self.checkpoints_topic)

    def dead_letters(self) -> KafkaDeadLetterStore:
        topics = {name: dlq_topic(topic) for name, topic in self.source_topics.items()}
        topics.update({topic: dlq_topic(topic) for topic in self.source_topics.values()})
        return KafkaDeadLetterStore(self, topics)

    def committed_offsets(self) -> dict[TopicPartition, int]:
        """The group's commits on the source topics, read without joining the group."""
        consumer = Consumer(self.reader_settings(self.group))
        try:
            wanted = [KafkaPartition(t, p) for t, p in partitions_of(consumer, set(self.source_topics.values()))]
            found = call(consumer.committed, wanted, timeout=METADATA_TIMEOUT_S) if wanted else []
            return {(tp.topic, tp.partition): tp.offset for tp in found if tp.offset >= 0}
        finally:
            consumer.close()

    def end_offsets(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        consumer = Consumer(self.reader_settings())
        try:
            return {tp: high_watermark(consumer, tp) for tp in partitions_of(consumer, set(topics))}
        finally:
            consumer.close()

    def ping(self, timeout_s: float) -> bool:
        admin = AdminClient(self.settings("admin", {}, {}))
        try:
            return bool(admin.list_topics(timeout=timeout_s).brokers)
        except KafkaException:
            return False
        finally:
            admin.poll(0)

    def trim(self) -> int:
        """Kafka's retention deletes old segments; nothing to do here."""
        return 0
