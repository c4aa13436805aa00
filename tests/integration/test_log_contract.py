"""One contract for the log interface (``conflux.log.base``), run in-process against both backends: the
embedded SQLite log and Kafka (the session's real broker). Each test gets a log of its own (a fresh
file, or a fresh topic prefix and consumer group) with two sources of three partitions.

Where the two backends legitimately differ, the test says so:
- the embedded log is assigned partitions by the supervisor; Kafka's group assigns them, during a poll;
- Kafka's ``prepare`` also creates the ``.dlq``, checkpoints and sources topics; the embedded log keeps
  dead letters and checkpoints in tables of the same file;
- a partition never committed reads as committed at the first offset still in the log (embedded) or at
  0 (Kafka); with nothing trimmed, as here, both are 0.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import pytest

from conflux.config import Config
from conflux.ipc.messages import DeadLetter
from conflux.log import open_log
from conflux.log.base import Checkpoint, LogBackend, LogMessage, OutgoingMessage, TopicPartition, dlq_topic
from tests.support import wait_until

PARTITIONS = 3
SOURCES = ("customers", "products")
READ_TIMEOUT_S = 30.0
BACKENDS = ["embedded", pytest.param("kafka", marks=pytest.mark.kafka)]


@dataclass
class Log:
    """A backend under test, its config, and the customers topic the tests write to."""

    name: str
    config: Config
    backend: LogBackend
    topic: str

    def reopen(self) -> LogBackend:
        """A new handle on the same log, as another process would make."""
        return open_log(self.config)

    @property
    def partitions(self) -> list[TopicPartition]:
        return [(self.topic, p) for p in range(PARTITIONS)]

    @property
    def assignment(self) -> list[TopicPartition]:
        """Every partition of both source topics: what one consumer owns when it is alone."""
        return [(self.config.topic_of(s), p) for s in self.config.sources for p in range(PARTITIONS)]


def contract_config(backend: str, tmp_path, bootstrap: str) -> Config:
    group = f"contract-{uuid.uuid4().hex[:10]}"
    log = {"backend": backend, "path": str(tmp_path / "log.db"), "partitions": PARTITIONS, "group": group,
           "topic_prefix": f"{group}."}
    if backend == "kafka":
        log["bootstrap_servers"] = bootstrap
    return msgspec.convert({"log": log, "sources": [{"name": n, "url": f"http://127.0.0.1:1/api/{n}"}
                                                    for n in SOURCES]}, Config)


@pytest.fixture(params=BACKENDS)
def fresh(request, tmp_path) -> Iterator[Log]:
    """A log nobody has prepared yet."""
    kafka = request.param == "kafka"
    admin = request.getfixturevalue("kafka_admin") if kafka else None
    config = contract_config(request.param, tmp_path, request.getfixturevalue("kafka_bootstrap") if kafka else "")
    yield Log(request.param, config, open_log(config), config.topic_of(config.sources[0]))
    if admin is not None:
        _delete_topics(admin, config.log.topic_prefix)


@pytest.fixture
def log(fresh: Log) -> Log:
    """A prepared log: both source topics exist with three partitions."""
    fresh.backend.prepare({fresh.config.topic_of(s): PARTITIONS for s in fresh.config.sources})
    return fresh


def _delete_topics(admin, prefix: str) -> None:
    """Leave the shared broker as we found it."""
    names = [name for name in admin.list_topics(timeout=10).topics if name.startswith(prefix)]
    if names:
        for future in admin.delete_topics(names, operation_timeout=30).values():
            future.result(timeout=30)


def publish(backend: LogBackend, messages: list[OutgoingMessage], *, durable: bool = False) -> list:
    async def run():
        producer = backend.producer(durable=durable)
        try:
            return await producer.publish(messages)
        finally:
            await producer.close()

    return asyncio.run(run())


def messages_for(topic: str, per_partition: int, tag: str = "m") -> list[OutgoingMessage]:
    return [OutgoingMessage(topic, p, f"k{p}".encode(), f"{tag}-{p}-{i}".encode())
            for i in range(per_partition) for p in range(PARTITIONS)]


@dataclass
class Member:
    """A started consumer, plus whatever it read while waiting for its assignment (Kafka assigns
    partitions inside a poll, so messages can arrive before every partition is ours)."""

    log: Log
    assigned: set[TopicPartition] = field(default_factory=set)
    buffer: list[LogMessage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.consumer = self.log.backend.consumer(0, self.log.assignment)
        self.consumer.start(self.assigned.update, self.assigned.difference_update)
        wait_until(self._assigned_all, timeout_s=READ_TIMEOUT_S, message="every partition assigned")

    def _assigned_all(self) -> bool:
        if set(self.log.assignment) <= self.assigned:
            return True
        self.buffer += self.consumer.poll(100, 0.1)
        return False

    def read(self, count: int) -> list[LogMessage]:
        """Exactly ``count`` messages (more would fail the test), in the order they were handed out."""
        deadline = time.monotonic() + READ_TIMEOUT_S
        out, self.buffer = self.buffer, []
        while len(out) < count:
            assert time.monotonic() < deadline, f"read {len(out)} of {count} messages"
            out += self.consumer.poll(count - len(out), 0.2)
        assert len(out) == count, f"read {len(out)} messages, expected {count}"
        return out

    def read_until(self, wanted: set[tuple[int, int]]) -> list[LogMessage]:
        """Poll until every (partition, offset) in ``wanted`` arrived; return everything read meanwhile."""
        deadline = time.monotonic() + READ_TIMEOUT_S
        out, self.buffer = self.buffer, []
        while not wanted <= {(m.partition, m.offset) for m in out}:
            assert time.monotonic() < deadline, f"waiting for {sorted(wanted)}, read {len(out)}"
            out += self.consumer.poll(100, 0.2)
        return out

    def close(self) -> None:
        self.consumer.close()


def by_partition(messages: list[LogMessage]) -> dict[int, list[tuple[int, bytes]]]:
    out: dict[int, list[tuple[int, bytes]]] = {}
    for message in messages:
        out.setdefault(message.partition, []).append((message.offset, message.payload))
    return out


# -- topics --------------------------------------------------------------------------------------------


def test_prepare_creates_topics_once_and_never_shrinks_them(fresh: Log):
    topics = {fresh.config.topic_of(s): PARTITIONS for s in fresh.config.sources}
    assert fresh.backend.end_offsets(topics) == {}  # nothing exists before prepare
    assert fresh.backend.prepare(topics) == topics
    assert fresh.backend.end_offsets(topics) == {(t, p): 0 for t in topics for p in range(PARTITIONS)}
    assert fresh.reopen().prepare(topics) == topics  # a second instance finds everything in place
    assert fresh.reopen().prepare({fresh.topic: PARTITIONS + 2})[fresh.topic] == PARTITIONS  # used as it is

    async def partitions_seen_by_a_producer() -> int:
        producer = fresh.reopen().producer()
        try:
            return producer.partitions_for(fresh.topic)
        finally:
            await producer.close()

    assert asyncio.run(partitions_seen_by_a_producer()) == PARTITIONS
    if fresh.name == "kafka":  # the embedded log keeps these in tables of its file
        existing = set(fresh.backend.end_offsets([dlq_topic(fresh.topic)]))
        assert existing == {(dlq_topic(fresh.topic), 0)}


# -- publish, read, commit -----------------------------------------------------------------------------


def test_published_messages_are_read_back_in_order_per_partition(log: Log):
    sent = messages_for(log.topic, per_partition=10)
    positions = publish(log.backend, sent)
    assert [(p.topic, p.partition) for p in positions] == [(m.topic, m.partition) for m in sent]
    assert {p: sorted(pos.offset for pos in positions if pos.partition == p) for p in range(PARTITIONS)} == {
        p: list(range(10)) for p in range(PARTITIONS)}

    member = Member(log)
    try:
        read = by_partition(member.read(30))
    finally:
        member.close()
    for partition in range(PARTITIONS):
        assert read[partition] == [(i, f"m-{partition}-{i}".encode()) for i in range(10)]
    assert log.backend.end_offsets([log.topic]) == {tp: 10 for tp in log.partitions}


def test_a_durable_producer_publishes_like_any_other(log: Log):
    """The webhook path's producer: fsynced commits on the embedded log, what acks=all gives on Kafka."""
    positions = publish(log.backend, [OutgoingMessage(log.topic, 1, b"k", b"webhook")], durable=True)
    assert [(p.partition, p.offset) for p in positions] == [(1, 0)]
    member = Member(log)
    try:
        assert [(m.partition, m.offset, m.payload) for m in member.read(1)] == [(1, 0, b"webhook")]
    finally:
        member.close()


def test_commits_only_go_up_and_survive_a_reopen(log: Log):
    publish(log.backend, messages_for(log.topic, per_partition=10))
    first, second, third = log.partitions
    member = Member(log)
    try:
        member.read(30)
        member.consumer.commit({first: 7, second: 10})
        member.consumer.commit({first: 3})  # a stale caller: ignored, never a step back
        assert member.consumer.committed(log.partitions) == {first: 7, second: 10, third: 0}
    finally:
        member.close()

    assert log.reopen().committed_offsets() == {first: 7, second: 10}  # never-committed ones are absent
    again = Member(Log(log.name, log.config, log.reopen(), log.topic))
    try:
        assert again.consumer.committed(log.partitions) == {first: 7, second: 10, third: 0}
        rest = by_partition(again.read(3 + 0 + 10))  # a new member starts where the group committed
        assert [offset for offset, _ in rest[0]] == [7, 8, 9]
        assert 1 not in rest and [offset for offset, _ in rest[2]] == list(range(10))
    finally:
        again.close()


def test_seek_back_re_reads(log: Log):
    publish(log.backend, messages_for(log.topic, per_partition=10))
    first = log.partitions[0]
    member = Member(log)
    try:
        member.read(30)
        member.consumer.seek(first, 4)
        again = by_partition(member.read(6))
        assert list(again) == [0] and [offset for offset, _ in again[0]] == list(range(4, 10))
    finally:
        member.close()


def test_a_paused_partition_is_not_read_until_resumed(log: Log):
    publish(log.backend, messages_for(log.topic, per_partition=2))
    first = log.partitions[0]
    member = Member(log)
    try:
        member.read(6)
        member.consumer.pause([first])
        publish(log.backend, [OutgoingMessage(log.topic, 0, b"k", b"paused-0"),
                              OutgoingMessage(log.topic, 1, b"k", b"flowing-1")])
        # The other partition's message was published after the paused one's: once it is here, the
        # paused one would have been too.
        read = member.read_until({(1, 2)})
        read += member.consumer.poll(100, 0.5)
        assert [(m.partition, m.offset) for m in read] == [(1, 2)]
        member.consumer.resume([first])
        assert [(m.partition, m.offset, m.payload) for m in member.read(1)] == [(0, 2, b"paused-0")]
    finally:
        member.close()


def test_lag_is_end_minus_committed_for_each_owned_partition(log: Log):
    publish(log.backend, messages_for(log.topic, per_partition=10))
    first, second, third = log.partitions
    member = Member(log)
    try:
        member.read(30)
        member.consumer.commit({first: 7, second: 10})
        lags = {(lag.topic, lag.partition): (lag.committed, lag.end, lag.lag) for lag in member.consumer.lags()}
    finally:
        member.close()
    assert {tp: lags[tp] for tp in log.partitions} == {first: (7, 10, 3), second: (10, 10, 0), third: (0, 10, 10)}
    other = log.config.topic_of(log.config.sources[1])
    assert {tp: lag for tp, lag in lags.items() if tp[0] == other} == {(other, p): (0, 0, 0) for p in range(3)}
    assert log.reopen().end_offsets([log.topic, other]) == {**{tp: 10 for tp in log.partitions},
                                                            **{(other, p): 0 for p in range(3)}}
    assert log.reopen().committed_offsets() == {first: 7, second: 10}


# -- checkpoints ---------------------------------------------------------------------------------------


def test_checkpoints_save_load_and_the_newest_wins(log: Log):
    store = log.backend.checkpoints()
    try:
        assert store.load("customers") is None and store.load_all() == {}
        store.save(Checkpoint("customers", "2024-01-01T00:00:00Z", 1_704_067_200_000_000, 10.0, 11.0))
        store.save(Checkpoint("products", "2024-01-03T00:00:00Z", 1_704_240_000_000_000, 13.0, 14.0))
        newest = Checkpoint("customers", "2024-01-02T00:00:00Z", 1_704_153_600_000_000, 10.0, 12.0)
        store.save(newest)
        assert store.load("customers") == newest
    finally:
        store.close()
    fresh = log.reopen().checkpoints()  # another process: only the log in common
    try:
        assert fresh.load("customers") == newest
        assert {name: c.watermark for name, c in fresh.load_all().items()} == {
            "customers": "2024-01-02T00:00:00Z", "products": "2024-01-03T00:00:00Z"}
    finally:
        fresh.close()


# -- dead letters --------------------------------------------------------------------------------------


def letter(entry_id: str, source: str, seen: float, record: bytes = b'{"name": "x"}') -> DeadLetter:
    return DeadLetter(id=entry_id, source=source, reason="missing key", stage="fetch", record=msgspec.Raw(record),
                      key=entry_id, origin="page 1", first_seen=seen, last_seen=seen)


def test_dead_letters_fold_repeats_and_list_get_remove_purge(log: Log):
    writer = log.backend.dead_letters()
    try:
        writer.add([letter("a", "customers", 100.0), letter("b", "customers", 101.0),
                    letter("c", "products", 102.0), letter("d", "products", 99.0)])
        writer.add([letter("a", "customers", 200.0), letter("a", "customers", 300.0)])  # failing again, twice
    finally:
        writer.close()
    store = log.reopen().dead_letters()
    try:
        entries = store.list()
        assert [e.id for e in entries] == ["d", "a", "b", "c"]  # by first_seen
        a = store.get("a")
        assert (a.first_seen, a.last_seen, a.attempts) == (100.0, 300.0, 3)
        assert bytes(store.get("b").record) == b'{"name": "x"}' and store.get("nope") is None
        assert [e.id for e in store.list("products")] == ["d", "c"]

        assert store.remove(["a", "b"], unless_seen_after=150.0) == 1  # "a" failed again after 150: it stays
        assert store.remove(["b"]) == 0
        assert store.purge("products") == 2
        assert [e.id for e in log.reopen().dead_letters().list()] == ["a"]
        assert store.purge() == 1 and store.list() == []
    finally:
        store.close()


def test_a_dead_letter_nested_too_deep_to_decode_is_listed_with_its_bytes(log: Log):
    """A record 3,000 levels deep (one reason a record is dead-lettered) is kept and shown byte for byte."""
    deep = b'{"a":' * 3000 + b'"]}\\""' + b"}" * 3000
    store = log.backend.dead_letters()
    try:
        store.add([letter("deep", "customers", 5.0, deep), letter("flat", "customers", 6.0)])
        assert [(e.id, bytes(e.record)) for e in log.reopen().dead_letters().list()] == [
            ("deep", deep), ("flat", b'{"name": "x"}')]
        assert store.get("deep").key == "deep" and store.purge() == 2
    finally:
        store.close()
