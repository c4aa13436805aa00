"""The log interface: what the layers above need from a partitioned, durable log.

Two backends implement it: ``log.embedded`` (SQLite on one host) and ``log.kafka`` (Apache Kafka).
Fetchers and the control process publish through a ``LogProducer``; consumer processes read
through a ``LogConsumer``; checkpoints (source watermarks) and dead letters have small stores of
their own. Nothing above this interface knows which backend it runs on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

import msgspec

from conflux.errors import LogError
from conflux.ipc.codec import dead_letter_decoder
from conflux.ipc.messages import DeadLetter, PartitionLag, Position

TopicPartition = tuple[str, int]


class LogMessage(NamedTuple):
    topic: str
    partition: int
    offset: int
    payload: bytes


class OutgoingMessage(NamedTuple):
    topic: str
    partition: int
    key: bytes
    payload: bytes


class LogProducer(Protocol):
    """Used from one asyncio loop. ``publish`` returns once every message is durable in the log."""

    def partitions_for(self, topic: str) -> int: ...

    async def publish(self, messages: list[OutgoingMessage]) -> list[Position]: ...

    async def close(self) -> None: ...


AssignCallback = Callable[[list[TopicPartition]], None]


class LogConsumer(Protocol):
    """Used from one thread. Offsets are 'next offset to read', as in Kafka."""

    def start(self, on_assign: AssignCallback, on_revoke: AssignCallback) -> None: ...

    def poll(self, max_messages: int, timeout_s: float) -> list[LogMessage]: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...

    def commit(self, offsets: dict[TopicPartition, int]) -> None: ...

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]: ...

    def pause(self, partitions: Iterable[TopicPartition]) -> None: ...

    def resume(self, partitions: Iterable[TopicPartition]) -> None: ...

    def lags(self) -> list[PartitionLag]: ...

    def close(self) -> None: ...


class Checkpoint(NamedTuple):
    """Where a source's incremental sync resumes. Saved only after its records are durable."""

    source: str
    watermark: str          # the upstream's own text for the newest durable updated value
    watermark_us: int
    last_full_sync_at: float
    saved_at: float


class CheckpointStore(Protocol):
    def load(self, source: str) -> Checkpoint | None: ...

    def save(self, checkpoint: Checkpoint) -> None: ...

    def load_all(self) -> dict[str, Checkpoint]: ...


class DeadLetterStore(Protocol):
    def add(self, entries: list[DeadLetter]) -> None: ...

    def list(self, source: str | None = None) -> list[DeadLetter]: ...

    def get(self, entry_id: str) -> DeadLetter | None: ...

    def remove(self, entry_ids: Iterable[str], *, unless_seen_after: float | None = None) -> int: ...

    def purge(self, source: str | None = None) -> int: ...

    def close(self) -> None: ...


class LogBackend(Protocol):
    """A handle on a configured log. Creating it opens nothing; each method opens what it returns."""

    name: str

    def prepare(self, topics: dict[str, int]) -> dict[str, int]:
        """Create missing topics (name -> wanted partitions); return each topic's actual partition count."""
        ...

    def producer(self, *, durable: bool = False) -> LogProducer:
        """``durable``: each publish must survive power loss before it returns (webhooks, whose sender
        will not send again), whatever the backend's cheaper default is."""
        ...

    def consumer(self, member: int, assignment: list[TopicPartition]) -> LogConsumer: ...

    def checkpoints(self) -> CheckpointStore: ...

    def dead_letters(self) -> DeadLetterStore: ...

    def committed_offsets(self) -> dict[TopicPartition, int]: ...

    def end_offsets(self, topics: Iterable[str]) -> dict[TopicPartition, int]: ...

    def ping(self, timeout_s: float) -> bool: ...

    def trim(self) -> int: ...


def partitions_for(key_hashes: list[int], partitions: int) -> list[int]:
    """The partitioner every producer uses (a key's xxh3 hash modulo the partition count), over a whole
    column at once: all versions of a key meet in one partition."""
    return [key_hash % partitions for key_hash in key_hashes]


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


def decode_dead_letter(body: bytes) -> DeadLetter:
    """A stored dead letter. msgspec recurses into a record even to skip it, so a record nested deeper
    than that (the reason it was dead-lettered, perhaps) is cut out of the body and kept as its bytes."""
    try:
        return dead_letter_decoder.decode(body)
    except RecursionError:
        try:
            start, end = _member_span(body, b"record")
            entry = dead_letter_decoder.decode(body[:start] + b"null" + body[end:])
        except (ValueError, IndexError, RecursionError, msgspec.DecodeError) as exc:
            raise LogError(f"a stored dead letter cannot be decoded: {exc}") from None
        return msgspec.structs.replace(entry, record=msgspec.Raw(body[start:end]))


_WHITESPACE = b" \t\r\n"
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SCALAR_END = re.compile(rb"[,\]}\s]|$")
_QUOTE_OR_BRACKET = re.compile(rb'["\[\]{}]')


def _member_span(body: bytes, name: bytes) -> tuple[int, int]:
    """(start, end) of the value of member ``name`` of the JSON object ``body``, found without recursion."""
    i = _skip_space(body, 0)
    _expect(body, i, b"{")
    while True:
        key_start = _skip_space(body, i + 1)
        key_end = _value_end(body, key_start)
        i = _skip_space(body, key_end)
        _expect(body, i, b":")
        start = _skip_space(body, i + 1)
        end = _value_end(body, start)
        if body[key_start:key_end] == b'"' + name + b'"':
            return start, end
        i = _skip_space(body, end)
        _expect(body, i, b",")


def _value_end(body: bytes, i: int) -> int:
    """The index just past the JSON value that starts at ``i``: strings skipped whole, brackets counted."""
    if body[i:i + 1] not in (b"[", b"{", b'"'):
        return _SCALAR_END.search(body, i + 1).start()
    depth = 0
    while True:
        found = _QUOTE_OR_BRACKET.search(body, i)
        if found is None:
            raise ValueError("unexpected end of JSON")
        i = found.start()
        if body[i:i + 1] == b'"':
            string = _STRING.match(body, i)
            if string is None:
                raise ValueError(f"unterminated string at byte {i}")
            i = string.end()
        else:
            depth += 1 if body[i:i + 1] in (b"[", b"{") else -1
            i += 1
        if depth == 0:
            return i


def _skip_space(body: bytes, i: int) -> int:
    while body[i:i + 1] and body[i:i + 1] in _WHITESPACE:
        i += 1
    return i


def _expect(body: bytes, i: int, char: bytes) -> None:
    if body[i:i + 1] != char:
        raise ValueError(f"expected {char.decode()!r} at byte {i}")
