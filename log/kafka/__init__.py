"""The Kafka backend: the log on an Apache Kafka cluster, through thin, lazy confluent-kafka wrappers.

Nothing connects when a handle is made: ``KafkaLog`` and the wrappers below only build settings, and
each librdkafka client is created on first use, in the process that uses it (librdkafka threads do
not survive fork). The supervisor's own admin clients (``prepare``, ``ping``) live for one call and
are destroyed before it forks again.

Topics, for each source topic T: T (the configured partitions), ``T.dlq`` (dead letters, compacted,
keyed by entry id), ``<prefix>conflux.checkpoints`` (watermarks, compacted, keyed by source) and
``<prefix>conflux.sources`` (always empty: its partitions stand for sources and are assigned
through the group ``<group>.fetchers``, see ``workers.ownership``).

Settings from ``[kafka.producer]``, ``[kafka.consumer]`` and ``[kafka.admin]`` pass through to
librdkafka; a key ending in ``_env`` or ``_file`` names where a secret's value is. librdkafka errors
become ``LogError``.
"""

from conflux.log.kafka.backend import KafkaLog

__all__ = ["KafkaLog"]
