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

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import msgspec
from confluent_kafka import OFFSET_BEGINNING, OFFSET_STORED, Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as KafkaPartition
from confluent_kafka.admin import AdminClient, NewTopic

from daemon.config import Config
from daemon.errors import LogError, LogUnavailable
from daemon.secrets import read_secret
from ipc.codec import dead_letter_decoder, encode_dead_letter
from ipc.messages import DeadLetter, PartitionLag, Position
from log import dlq_topic
from log.base import AssignCallback, Checkpoint, LogMessage, OutgoingMessage, TopicPartition

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

TRANSIENT = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                       KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.REQUEST_TIMED_OUT, KafkaError._TRANSPORT})


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

_checkpoint_encoder = msgspec.json.Encoder()
_checkpoint_decoder = msgspec.json.Decoder(tuple[str, str, int, float, float])
_last_logged: dict[int, float] = {}


class KafkaLog:
    """The Kafka backend's handle. Holds only the settings until a method opens something."""

    name = "kafka"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.group = config.log.group
        self.replication_factor = config.log.replication_factor
        self.source_topics = {source.name: config.topic_of(source) for source in config.sources}
        self.checkpoints_topic = f"{config.log.topic_prefix}conflux.checkpoints"
        self.sources_topic = f"{config.log.topic_prefix}conflux.sources"

    # -- settings ---------------------------------------------------------------------------------

    def settings(self, role: str, defaults: dict[str, Any], required: dict[str, Any]) -> dict[str, Any]:
        """librdkafka settings of a client: ours, then the shared security keys, then its [kafka.<role>] table."""
        shared: dict[str, Any] = {}
        for table in ("admin", "consumer", "producer"):
            shared.update({k: v for k, v in self._table(table).items() if k.startswith(CONNECTION_PREFIXES)})
        return {"bootstrap.servers": self.config.log.bootstrap_servers, "log.connection.close": False, **defaults,
                **shared, **self._table(role), **required, "logger": librdkafka_logger, "error_cb": _log_client_error}

    def _table(self, role: str) -> dict[str, Any]:
        """A [kafka.<role>] table with ``x_env`` / ``x_file`` keys replaced by ``x`` and the secret's value."""
        out: dict[str, Any] = {}
        for key, value in getattr(self.config.kafka, role).items():
            what = f"kafka.{role}.{key}"
            if key.endswith("_env"):
                out[key[:-4]] = read_secret(env=str(value), what=what)
            elif key.endswith("_file"):
                out[key[:-5]] = read_secret(file=str(value), what=what)
            else:
                out[key] = value
        return out

    def group_settings(self, group: str) -> dict[str, Any]:
        return self.settings("consumer", CONSUMER_DEFAULTS, {**GROUP_REQUIRED, "group.id": group})

    def reader_settings(self, group: str = "") -> dict[str, Any]:
        """A consumer that never joins its group: it assigns partitions itself and commits nothing."""
        return self.settings("consumer", {"auto.offset.reset": "earliest"},
                             {**READER_REQUIRED, "group.id": group or f"{self.group}.readers"})

    # -- topics -----------------------------------------------------------------------------------

    def prepare(self, topics: dict[str, int]) -> dict[str, int]:
        """Create the missing topics (supervisor, before fork); never delete or shrink one."""
        wanted = self._topic_specs(topics)
        admin = AdminClient(self.settings("admin", {}, {}))
        try:
            metadata = _metadata(admin)
            replication = self.replication_factor or min(3, len(metadata.brokers))
            missing = [NewTopic(name, num_partitions=count, replication_factor=replication, config=config)
                       for name, (count, config) in wanted.items() if name not in metadata.topics]
            if missing:
                _create_topics(admin, missing)
            actual = _wait_for_topics(admin, list(wanted))
        finally:
            admin.poll(0)  # hands librdkafka's queued log lines to our logger before the client goes
        for name, count in actual.items():
            if count < wanted[name][0]:
                logger.warning("topic %s has %d partitions, fewer than the %d configured; using it as it is",
                               name, count, wanted[name][0])
        return {name: actual[name] for name in topics}

    def _topic_specs(self, topics: dict[str, int]) -> dict[str, tuple[int, dict[str, str]]]:
        """name -> (partitions, topic config). One DLQ partition: few entries, and one order per id."""
        specs: dict[str, tuple[int, dict[str, str]]] = {}
        for topic, partitions in topics.items():
            specs[topic] = (partitions, {"max.message.bytes": str(MAX_MESSAGE_BYTES)})
            specs[dlq_topic(topic)] = (1, {**COMPACTED, "max.message.bytes": str(MAX_MESSAGE_BYTES)})
        specs[self.checkpoints_topic] = (1, COMPACTED)
        specs[self.sources_topic] = (max(SOURCES_TOPIC_MIN_PARTITIONS, len(self.source_topics)), {})
        return specs

    # -- the interface's handles --------------------------------------------------------------------

    def producer(self) -> KafkaProducer:
        return KafkaProducer(self.settings("producer", PRODUCER_DEFAULTS, PRODUCER_REQUIRED))

    def consumer(self, member: int, members: int, assignment: list[TopicPartition]) -> KafkaConsumer:
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
            wanted = [KafkaPartition(t, p) for t, p in _partitions(consumer, set(self.source_topics.values()))]
            found = _call(consumer.committed, wanted, timeout=METADATA_TIMEOUT_S) if wanted else []
            return {(tp.topic, tp.partition): tp.offset for tp in found if tp.offset >= 0}
        finally:
            consumer.close()

    def end_offsets(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        consumer = Consumer(self.reader_settings())
        try:
            return {tp: _high_watermark(consumer, tp) for tp in _partitions(consumer, set(topics))}
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


# ---------------------------------------------------------------------------------------------
# Producer


class _Delivery:
    """The delivery reports of one ``publish`` call; resolves its future on the loop once all are in."""

    __slots__ = ("error", "future", "loop", "positions", "remaining")

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[list[Position]] = loop.create_future()
        self.positions: list[Position | None] = [None] * count
        self.remaining = count
        self.error: KafkaError | None = None

    def report(self, index: int, error: KafkaError | None, message) -> None:
        """librdkafka's delivery callback, on the producer's poll thread."""
        if error is not None:
            self.error = self.error or error
        else:
            self.positions[index] = Position(message.topic(), message.partition(), message.offset())
        self.remaining -= 1
        if self.remaining == 0:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if self.future.done():
            return
        if self.error is not None:
            self.future.set_exception(LogError(f"Kafka delivery failed: {self.error.str()}"))
        else:
            self.future.set_result(self.positions)


class KafkaProducer:
    """Publishes from one asyncio loop (a fetcher or the control process). ``publish`` returns when
    every message's delivery report came back positive: acks=all, so the records are on every in-sync
    replica. A thread polls the producer, which is where librdkafka runs the delivery callbacks."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._producer: Producer | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._partitions: dict[str, int] = {}

    def _client(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(self._settings)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=_poll_until, args=(self._producer, self._stop),
                                            name="kafka-poll", daemon=True)
            self._thread.start()
        return self._producer

    def _discard(self) -> None:
        """After a fatal error (an idempotence violation) the client is unusable; the next call makes a new one."""
        self._stop.set()
        self._producer = self._thread = None

    def partitions_for(self, topic: str) -> int:
        if topic not in self._partitions:
            self._partitions[topic] = _partition_count(self._client(), topic)
        return self._partitions[topic]

    async def publish(self, messages: list[OutgoingMessage]) -> list[Position]:
        """Every message names its partition (``log.partition_for`` of its records' key hashes), so all
        versions of a key stay in one partition. The Kafka key is the batch's first record key: a
        batch carries many keys, all of which hash to that partition, and the key only labels it."""
        if not messages:
            return []
        producer = self._client()
        delivery = _Delivery(len(messages), asyncio.get_running_loop())
        for index, message in enumerate(messages):
            await self._produce(producer, message, partial(delivery.report, index))
        return await delivery.future

    async def _produce(self, producer: Producer, message: OutgoingMessage, on_delivery: Callable) -> None:
        wait_s = 0.001
        while True:
            try:
                producer.produce(message.topic, message.payload, message.key, partition=message.partition,
                                 on_delivery=on_delivery)
                return
            except BufferError:  # librdkafka's queue is full: wait for deliveries to make room, never drop
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, 0.05)
            except KafkaException as exc:
                error = exc.args[0]
                if error.fatal() or error.code() == KafkaError._FATAL:
                    self._discard()
                hint = " (lower the source's page_size)" if error.code() == KafkaError.MSG_SIZE_TOO_LARGE else ""
                raise LogError(f"cannot produce to {message.topic}/{message.partition}: {error.str()}{hint}") from None

    async def close(self) -> None:
        """Deliver what is queued (bounded), then destroy the client."""
        if self._producer is None:
            return
        self._stop.set()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._thread.join)
        left = await loop.run_in_executor(None, self._producer.flush, 10.0)
        if left:
            logger.warning("%d messages were still undelivered at close", left)
        self._producer = self._thread = None


def _poll_until(producer: Producer, stop: threading.Event) -> None:
    """The producer's poll thread: delivery reports, errors and log lines are served here."""
    while not stop.is_set():
        producer.poll(0.1)


# ---------------------------------------------------------------------------------------------
# Consumer


class KafkaConsumer:
    """One member of a consumer group, used from one thread: a consumer process reading the source
    topics, or a fetcher's seat in the source-ownership group. Rebalance callbacks run inside ``poll``
    and are cooperative (incremental): on_assign and on_revoke only name the partitions that change."""

    SERVE_BATCH = 64

    def __init__(self, settings: dict[str, Any], topics: list[str]) -> None:
        self._settings = settings
        self._topics = topics
        self._consumer: Consumer | None = None
        self._callbacks: tuple[AssignCallback, AssignCallback] | None = None
        self._assigned: set[TopicPartition] = set()
        self._committed: dict[TopicPartition, int] = {}
        self._assigning: dict[TopicPartition, int] | None = None  # seeks made inside on_assign
        self._stash: list[LogMessage] = []  # read while serving callbacks; handed out by the next poll
        self._commit_results: list[tuple[KafkaError | None, list[KafkaPartition]]] = []
        self._in_callback = self._lost = self._closing = False

    def start(self, on_assign: AssignCallback, on_revoke: AssignCallback) -> None:
        self._callbacks = (on_assign, on_revoke)
        self._consumer = Consumer({**self._settings, "on_commit": self._on_commit})
        _call(self._consumer.subscribe, self._topics, on_assign=self._handle_assign,
              on_revoke=self._handle_revoke, on_lost=self._handle_lost)

    # -- rebalance callbacks (inside consume or close) ----------------------------------------------

    def _handle_assign(self, consumer: Consumer, partitions: list[KafkaPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._assigning, self._in_callback = {}, True
        try:
            if tps and not self._closing:  # a closing member's assignment is dropped by librdkafka anyway
                self._callbacks[0](tps)
            offsets = self._assigning
        finally:
            self._assigning, self._in_callback = None, False
        # The assignment is applied after the callback, so its seeks become the starting offsets.
        _call(consumer.incremental_assign, [KafkaPartition(t, p, offsets.get((t, p), OFFSET_STORED)) for t, p in tps])
        self._assigned.update(tps)

    def _handle_revoke(self, consumer: Consumer, partitions: list[KafkaPartition]) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        self._in_callback = True
        try:
            if tps:
                self._callbacks[1](tps)
        finally:
            self._in_callback = False
            _call(consumer.incremental_unassign, partitions)
            self._assigned.difference_update(tps)
            self._forget(set(tps))

    def _handle_lost(self, consumer: Consumer, partitions: list[KafkaPartition]) -> None:
        """The session expired: others may own these already, so nothing may be committed for them."""
        logger.warning("lost %d partitions (session expired); their new owners re-read from the last commit",
                       len(partitions))
        self._lost = True
        try:
            self._handle_revoke(consumer, partitions)
        finally:
            self._lost = False

    def _forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self._committed.pop(tp, None)
        self._stash = [m for m in self._stash if (m.topic, m.partition) not in tps]

    def _serve_callbacks(self) -> None:
        """Run pending rebalance callbacks before a blocking call. A member that does not serve them
        cannot rejoin the group, and its synchronous commits hang until the coordinator evicts it."""
        if not self._in_callback and not self._closing:
            self._stash.extend(self._messages(_call(self._consumer.consume, self.SERVE_BATCH, 0)))

    # -- the LogConsumer interface ------------------------------------------------------------------

    def poll(self, max_messages: int, timeout_s: float) -> list[LogMessage]:
        if self._stash:
            out, self._stash = self._stash[:max_messages], self._stash[max_messages:]
            return out
        return self._messages(_call(self._consumer.consume, max_messages, timeout_s))

    def _messages(self, messages: list) -> list[LogMessage]:
        out = []
        for message in messages:
            error = message.error()
            if error is None:
                out.append(LogMessage(message.topic(), message.partition(), message.offset(), message.value()))
            elif error.fatal():
                raise LogError(f"Kafka consumer failed: {error.str()}")
            else:
                _log_client_error(error)
        return out

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if self._assigning is not None:
            self._assigning[partition] = offset
            return
        self._stash = [m for m in self._stash if (m.topic, m.partition) != partition]
        _call(self._consumer.seek, KafkaPartition(partition[0], partition[1], offset))

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Synchronous, only upwards, and only for partitions this member still owns. A commit refused
        mid-rebalance raises LogError; the caller retries at its next interval."""
        self._serve_callbacks()
        wanted = {tp: offset for tp, offset in offsets.items()
                  if tp in self._assigned and offset > self._committed.get(tp, -1)}
        if not wanted:
            return
        if self._lost:
            raise LogError("not committing: the partitions were lost to a rebalance")
        partitions = [KafkaPartition(t, p, o) for (t, p), o in wanted.items()]
        if self._in_callback:  # the rebalance waits for this callback, so a synchronous commit is safe
            error = _first_error(_call(self._consumer.commit, offsets=partitions, asynchronous=False))
        else:
            error = self._commit_serving_callbacks(partitions)
        if error is not None:
            raise LogError(f"commit refused (retried at the next commit): {error.str()}")
        self._committed.update(wanted)

    def _commit_serving_callbacks(self, partitions: list[KafkaPartition]) -> KafkaError | None:
        """Commit asynchronously and serve callbacks until the result is in. A synchronous commit made
        while a rebalance waits for this member can hang: the rebalance needs a rejoin only we can make."""
        self._commit_results.clear()
        _call(self._consumer.commit, offsets=partitions, asynchronous=True)
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        while not self._commit_results:
            if time.monotonic() > deadline:
                raise LogUnavailable(f"commit not confirmed within {COMMIT_TIMEOUT_S:.0f} s")
            self._stash.extend(self._messages(_call(self._consumer.consume, self.SERVE_BATCH, 0.01)))
        error, results = self._commit_results.pop(0)
        return error or _first_error(results)

    def _on_commit(self, error: KafkaError | None, partitions: list[KafkaPartition]) -> None:
        self._commit_results.append((error, partitions))

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Each partition's committed offset. One never committed starts at 0: if retention already
        deleted offset 0, auto.offset.reset=earliest moves the read to the oldest message left."""
        wanted = [KafkaPartition(t, p) for t, p in partitions]
        found = _call(self._consumer.committed, wanted, timeout=METADATA_TIMEOUT_S)
        out = {(tp.topic, tp.partition): max(tp.offset, 0) for tp in found}
        self._committed.update(out)
        return out

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        owned = [KafkaPartition(t, p) for t, p in partitions if (t, p) in self._assigned]
        if owned:
            _call(self._consumer.pause, owned)

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        owned = [KafkaPartition(t, p) for t, p in partitions if (t, p) in self._assigned]
        if owned:
            _call(self._consumer.resume, owned)

    def lags(self) -> list[PartitionLag]:
        """From the high watermark of the last fetch; a partition not fetched yet asks the broker."""
        out = []
        for tp in sorted(self._assigned):
            end = _call(self._consumer.get_watermark_offsets, KafkaPartition(*tp), cached=True)
            if end is None or end[1] < 0:
                end = (0, _high_watermark(self._consumer, tp, timeout_s=0.5))
            out.append(PartitionLag(tp[0], tp[1], self._committed.get(tp, 0), end[1]))
        return out

    def partition_count(self, topic: str) -> int:
        return _partition_count(self._consumer, topic)

    def close(self) -> None:
        """Leave the group (on_revoke runs first, so acked work is committed) and destroy the client."""
        if self._consumer is None:
            return
        self._serve_callbacks()
        self._closing = True
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            logger.warning("closing the Kafka consumer: %s", exc)
        self._consumer = None


# ---------------------------------------------------------------------------------------------
# Checkpoints and dead letters: compacted topics, read to the end, written durably


class _TopicReader:
    """Reads topics from their beginning, then only what was added since. Topics that do not exist
    (the daemon never ran) read as empty."""

    def __init__(self, settings: dict[str, Any], topics: Iterable[str]) -> None:
        self._settings = settings
        self._topics = sorted(set(topics))
        self._consumer: Consumer | None = None
        self._positions: dict[TopicPartition, int] = {}

    def _client(self) -> Consumer:
        if self._consumer is None:
            consumer = Consumer(self._settings)
            self._positions = dict.fromkeys(_partitions(consumer, self._topics), 0)
            if self._positions:
                _call(consumer.assign, [KafkaPartition(t, p, OFFSET_BEGINNING) for t, p in self._positions])
            self._consumer = consumer
        return self._consumer

    def read_new(self) -> list:
        """Every message added since the last call, up to the ends as they were when called."""
        consumer = self._client()
        ends = {tp: _high_watermark(consumer, tp) for tp in self._positions}
        behind = {tp for tp, end in ends.items() if self._positions[tp] < end}
        messages = []
        deadline = time.monotonic() + READ_TIMEOUT_S
        while behind:
            if time.monotonic() > deadline:
                raise LogUnavailable(f"could not read {sorted(behind)} to the end within {READ_TIMEOUT_S:.0f} s")
            for message in _call(consumer.consume, 1000, 0.1):
                tp = (message.topic(), message.partition())
                error = message.error()
                if error is None:
                    messages.append(message)
                    self._positions[tp] = message.offset() + 1
                elif error.code() == KafkaError._PARTITION_EOF:
                    self._positions[tp] = max(self._positions[tp], message.offset())
                elif error.fatal():
                    raise LogError(f"reading {tp}: {error.str()}")
                if tp in behind and self._positions[tp] >= ends[tp]:
                    behind.discard(tp)
        return messages

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


class _Writer:
    """Small keyed writes that must be durable before the call returns; a None value is a tombstone."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._producer: Producer | None = None

    def write(self, records: list[tuple[str, bytes, bytes | None]]) -> None:
        if self._producer is None:
            self._producer = Producer(self._settings)
        producer, errors = self._producer, []

        def report(error: KafkaError | None, message) -> None:
            if error is not None:
                errors.append(error)

        for topic, key, value in records:
            while True:
                try:
                    producer.produce(topic, value, key, on_delivery=report)
                    break
                except BufferError:
                    producer.poll(0.1)
                except KafkaException as exc:
                    raise LogError(f"cannot write to {topic}: {exc.args[0].str()}") from None
        while producer.flush(1.0):  # message.timeout.ms bounds this: a message is delivered or fails
            pass
        if errors:
            raise LogError(f"Kafka write failed: {errors[0].str()}")

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10.0)
            self._producer = None


class _Store:
    """Shared by a process's threads (the event loop's executor): one call at a time."""

    def __init__(self, log: KafkaLog, topics: Iterable[str]) -> None:
        self._reader = _TopicReader(log.reader_settings(), topics)
        self._writer = _Writer(log.settings("producer", {**PRODUCER_DEFAULTS, "linger.ms": 0}, PRODUCER_REQUIRED))
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._reader.close()
            self._writer.close()


class KafkaCheckpointStore(_Store):
    """Watermarks on a compacted topic keyed by source; the newest record of a key is its checkpoint."""

    def __init__(self, log: KafkaLog, topic: str) -> None:
        super().__init__(log, [topic])
        self._topic = topic
        self._latest: dict[str, Checkpoint] = {}

    def load(self, source: str) -> Checkpoint | None:
        return self.load_all().get(source)

    def load_all(self) -> dict[str, Checkpoint]:
        with self._lock:
            for message in self._reader.read_new():
                source, value = message.key().decode(), message.value()
                if value is None:
                    self._latest.pop(source, None)
                else:
                    self._latest[source] = Checkpoint(*_checkpoint_decoder.decode(value))
            return dict(self._latest)

    def save(self, checkpoint: Checkpoint) -> None:
        with self._lock:
            body = _checkpoint_encoder.encode(tuple(checkpoint))
            self._writer.write([(self._topic, checkpoint.source.encode(), body)])
            self._latest[checkpoint.source] = checkpoint


class KafkaDeadLetterStore(_Store):
    """Dead letters on the ``<topic>.dlq`` topics, keyed by entry id. Each record is the entry's whole
    state (first_seen, last_seen, attempts), so compaction, which keeps only the newest, loses nothing;
    a tombstone removes an entry. Writers fold onto what they read first, as the embedded upsert does."""

    def __init__(self, log: KafkaLog, topics: dict[str, str]) -> None:
        super().__init__(log, topics.values())
        self._topics = topics  # source name or source topic -> its DLQ topic
        self._entries: dict[str, DeadLetter] = {}

    def _refresh(self) -> None:
        for message in self._reader.read_new():
            entry_id, value = message.key().decode(), message.value()
            if value is None:
                self._entries.pop(entry_id, None)
            else:
                self._entries[entry_id] = dead_letter_decoder.decode(value)

    def _topic_of(self, entry: DeadLetter) -> str:
        try:
            return self._topics[entry.source]
        except KeyError:
            raise LogError(f"no DLQ topic for source {entry.source!r}") from None

    def add(self, entries: list[DeadLetter]) -> None:
        """A repeat of an entry keeps its first_seen, takes the new last_seen and counts one more attempt."""
        if not entries:
            return
        with self._lock:
            self._refresh()
            merged: dict[str, DeadLetter] = {}
            for entry in entries:
                old = merged.get(entry.id) or self._entries.get(entry.id)
                if old is not None:
                    entry = msgspec.structs.replace(entry, first_seen=old.first_seen,
                                                    attempts=old.attempts + entry.attempts)
                merged[entry.id] = entry
            self._writer.write([(self._topic_of(e), e.id.encode(), encode_dead_letter(e)) for e in merged.values()])
            self._entries.update(merged)

    def list(self, source: str | None = None) -> list[DeadLetter]:
        with self._lock:
            self._refresh()
            entries = [e for e in self._entries.values() if source is None or e.source == source]
        return sorted(entries, key=lambda e: (e.first_seen, e.id))

    def get(self, entry_id: str) -> DeadLetter | None:
        with self._lock:
            self._refresh()
            return self._entries.get(entry_id)

    def remove(self, entry_ids: Iterable[str], *, unless_seen_after: float | None = None) -> int:
        """Entries seen again after ``unless_seen_after`` failed anew and stay."""
        with self._lock:
            self._refresh()
            doomed = [self._entries[i] for i in set(entry_ids) if i in self._entries]
            if unless_seen_after is not None:
                doomed = [e for e in doomed if e.last_seen <= unless_seen_after]
            return self._delete(doomed)

    def purge(self, source: str | None = None) -> int:
        with self._lock:
            self._refresh()
            return self._delete([e for e in self._entries.values() if source is None or e.source == source])

    def _delete(self, entries: list[DeadLetter]) -> int:
        if entries:
            self._writer.write([(self._topic_of(e), e.id.encode(), None) for e in entries])
            for entry in entries:
                self._entries.pop(entry.id, None)
        return len(entries)


# ---------------------------------------------------------------------------------------------
# Helpers: metadata, offsets, error translation


def _call(method: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a librdkafka method, turning its exceptions into ours."""
    try:
        return method(*args, **kwargs)
    except KafkaException as exc:
        raise _translated(exc) from None


def _translated(exc: KafkaException) -> LogError:
    error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
    text = error.str() if error is not None else str(exc)
    if error is not None and error.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
                                              KafkaError._TIMED_OUT):
        return LogUnavailable(f"Kafka is not reachable: {text}")
    return LogError(f"Kafka: {text}")


def _first_error(partitions: list[KafkaPartition]) -> KafkaError | None:
    return next((tp.error for tp in partitions if tp.error is not None), None)


def _metadata(client, topic: str | None = None):
    return _call(client.list_topics, topic=topic, timeout=METADATA_TIMEOUT_S)


def _partition_count(client, topic: str) -> int:
    found = _metadata(client, topic).topics.get(topic)
    if found is None or found.error is not None:
        raise LogError(f"topic {topic!r} does not exist in Kafka")
    return len(found.partitions)


def _partitions(client, topics: Iterable[str]) -> list[TopicPartition]:
    """Every partition of those of ``topics`` that exist."""
    out = []
    for topic in sorted(topics):
        found = _metadata(client, topic).topics.get(topic)
        if found is not None and found.error is None:
            out.extend((topic, partition) for partition in sorted(found.partitions))
    return out


def _high_watermark(consumer: Consumer, tp: TopicPartition, timeout_s: float = METADATA_TIMEOUT_S) -> int:
    """The partition's end. Right after a topic is created, or while leadership moves, brokers answer
    'not leader' for a moment: ask again until the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = consumer.get_watermark_offsets(KafkaPartition(*tp), timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() not in TRANSIENT or time.monotonic() >= deadline:
                raise _translated(exc) from None
            time.sleep(0.1)
            continue
        if found is None:
            raise LogUnavailable(f"no offsets for {tp[0]}/{tp[1]} within {timeout_s} s")
        return found[1]


def _create_topics(admin: AdminClient, topics: list[NewTopic]) -> None:
    futures = _call(admin.create_topics, topics, operation_timeout=TOPIC_READY_TIMEOUT_S)
    for name, future in futures.items():
        try:
            future.result(timeout=TOPIC_READY_TIMEOUT_S + 5)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # another instance was quicker
                raise LogError(f"cannot create topic {name}: {exc.args[0].str()}") from None
        else:
            logger.info("created topic %s", name)


def _wait_for_topics(admin: AdminClient, names: list[str]) -> dict[str, int]:
    """Partition counts once every topic exists with a leader for each partition (creation is async)."""
    deadline = time.monotonic() + TOPIC_READY_TIMEOUT_S
    while True:
        topics = _metadata(admin).topics
        ready = {name: topics[name] for name in names if name in topics and topics[name].error is None
                 and all(p.leader >= 0 for p in topics[name].partitions.values())}
        if len(ready) == len(names):
            return {name: len(topic.partitions) for name, topic in ready.items()}
        if time.monotonic() > deadline:
            raise LogError(f"topics not ready within {TOPIC_READY_TIMEOUT_S:.0f} s: {sorted(set(names) - set(ready))}")
        time.sleep(0.1)


def _log_client_error(error: KafkaError) -> None:
    """librdkafka's error callback and consumer error events: mostly transient (a broker went away,
    librdkafka reconnects by itself), so each kind is logged at most every ERROR_LOG_INTERVAL_S."""
    now = time.monotonic()
    if error.fatal():
        logger.error("Kafka client error (fatal): %s", error.str())
    elif now - _last_logged.get(error.code(), 0.0) >= ERROR_LOG_INTERVAL_S:
        _last_logged[error.code()] = now
        logger.warning("Kafka: %s", error.str())
