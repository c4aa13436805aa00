"""The merge state of one merger: the latest version of every key, and what is waiting for the sink.

Pure data structure, driven by the merger process. Versions of a key are ordered by (updated_at, log
offset): of two versions with the same instant (second-precision timestamps make that common), the
one at the greater offset is the later observation and wins, whatever order they arrive in (a key
always lives in one partition, so its offsets are comparable). A record replaces the pending one for
its key unless it is older in that order; a record older than the version already handed to the
sink is dropped, so a late, old version never overwrites a newer one. A copy at the *same* position
is not older: it is a re-read of the same message (after a consumer restart, say) whose delivery may
still be owed, and it is delivered again. The offset goes to the sink as each record's ``seq``, so the
sink breaks ties the same way.

Hot path: a frame whose keys are all new (the usual case during a sync) is merged with two C-level
set checks and one ``dict.update``; only frames that touch known keys go record by record.
"""

from __future__ import annotations

import time
from itertools import repeat
from operator import add, attrgetter, itemgetter, mul
from typing import NamedTuple

import msgspec
from msgspec import Raw
from xxhash import xxh3_64_hexdigest, xxh3_128_hexdigest

from conflux.ipc.messages import Batch, Position

# A pending record is a plain tuple (fast to build): (updated_us, hash, record, updated text, position,
# is a delete). A delete is a version like any other: ordered, deduplicated and merged the same way.
UPDATED_US, HASH, RECORD, UPDATED, POSITION, DELETED = range(6)
# A version's place in the order as one int: updated_us, then the log offset (< 2**63, Kafka's int64).
OFFSET_SPAN = 1 << 63
_updated_us_of = itemgetter(UPDATED_US)
_offset_of = attrgetter("offset")
_position_of = itemgetter(POSITION)


class Token(NamedTuple):
    """What to acknowledge to whom once a flush is delivered."""

    consumer: int
    generation: int
    position: Position


class SinkRecord(msgspec.Struct, array_like=False, gc=False):
    source: str
    key: str
    op: str
    updated_at: str
    hash: str
    data: Raw | None  # null for a delete: a deleted record's fields never leave Conflux
    seq: int  # the log offset: breaks ties between versions with the same updated_at


_sink_encoder = msgspec.json.Encoder()
# A record's `hash` describes the `data` the sink receives: for a delete that is null.
NULL_HASH = xxh3_64_hexdigest(b"null")


class Chunk(NamedTuple):
    """One sink request for one source: its stable id, its body, and its records (for DLQ and metrics)."""

    batch_id: str
    body: bytes
    source: str
    keys: list[str]
    values: list[tuple]


class FlushUnit(NamedTuple):
    chunks: list[Chunk]
    tokens: list[Token]
    records: int


class MergeState:
    def __init__(self) -> None:
        self.latest: dict[str, dict[str, int]] = {}   # source -> key -> order() of the newest version handed over
        self.pending: dict[str, dict[str, tuple]] = {}
        self.pending_count = 0
        self.tokens: list[Token] = []
        self.oldest_at: float | None = None

    def add(self, frame: Batch, token: Token) -> int:
        """Merge a log batch's records, acknowledged with ``token`` once delivered; returns how many were stale."""
        latest = self.latest.setdefault(frame.source, {})
        pending = self.pending.setdefault(frame.source, {})
        keys = frame.keys
        if latest.keys().isdisjoint(keys) and pending.keys().isdisjoint(keys) and len(set(keys)) == len(keys):
            before = len(pending)
            pending.update(zip(keys, zip(frame.updated_us, frame.hashes, frame.records, frame.updated,
                                         repeat(token.position), frame.deleted or repeat(False))))
            stale = 0
            self.pending_count += len(pending) - before
        else:
            stale = self._add_one_by_one(frame, latest, pending, token.position)
        self.tokens.append(token)
        if self.oldest_at is None:
            self.oldest_at = time.monotonic()
        return stale

    def _add_one_by_one(self, frame: Batch, latest: dict[str, int], pending: dict[str, tuple],
                        position: Position) -> int:
        stale = added = 0
        offset = position.offset
        for key, updated_us, content_hash, record, updated, deleted in zip(
                frame.keys, frame.updated_us, frame.hashes, frame.records, frame.updated,
                frame.deleted or repeat(False, len(frame.keys)), strict=True):
            rank = updated_us * OFFSET_SPAN + offset
            handed = latest.get(key)  # not a -1 default: instants before 1970 are negative
            if handed is not None and rank < handed:
                stale += 1
                continue
            current = pending.get(key)
            if current is None:
                added += 1
            elif rank < order(current):  # equal: the same message, a later record of it wins
                stale += 1
                continue
            pending[key] = (updated_us, content_hash, record, updated, position, deleted)
        self.pending_count += added
        return stale

    def take_idle_tokens(self) -> list[Token]:
        """Tokens of frames that left nothing pending (every record was stale): there is nothing to
        deliver for them, so they can be acknowledged at once. Safe for commits: whatever made them
        stale came from an earlier offset of the same partition, which is still unacknowledged."""
        if self.pending_count or not self.tokens:
            return []
        tokens, self.tokens, self.oldest_at = self.tokens, [], None
        return tokens

    def age_s(self) -> float:
        return 0.0 if self.oldest_at is None else time.monotonic() - self.oldest_at

    def take(self, batch_size: int) -> FlushUnit:
        """Everything pending, cut into per-source sink requests of at most ``batch_size`` records.

        From here on these versions count as handed to the sink: the merger retries them until the
        sink takes them or refuses them for good, so an older version arriving later is stale.
        """
        chunks = []
        for source, records in self.pending.items():
            if not records:
                continue
            keys, values = list(records), list(records.values())
            # order() of every value, without a Python call per record
            ranks = map(add, map(mul, map(_updated_us_of, values), repeat(OFFSET_SPAN)),
                        map(_offset_of, map(_position_of, values)))
            self.latest[source].update(zip(keys, ranks))
            for start in range(0, len(keys), batch_size):
                chunks.append(make_chunk(source, keys[start:start + batch_size], values[start:start + batch_size]))
        unit = FlushUnit(chunks, self.tokens, self.pending_count)
        self.pending = {}
        self.pending_count = 0
        self.tokens = []
        self.oldest_at = None
        return unit

    @property
    def keys_known(self) -> int:
        return sum(len(keys) for keys in self.latest.values())


def order(value: tuple) -> int:
    """A pending value's place among the versions of its key: (updated_us, log offset) as one int."""
    return value[UPDATED_US] * OFFSET_SPAN + value[POSITION].offset


def make_chunk(source: str, keys: list[str], values: list[tuple]) -> Chunk:
    """The batch_id is derived from the content (records and their log offsets), so a retry, or a
    re-read after a crash that rebuilds the same batch, carries the same id and the sink recognises it."""
    records = _sink_encoder.encode([
        SinkRecord(source, key, "delete", value[UPDATED], NULL_HASH, None, value[POSITION].offset)
        if value[DELETED] else
        SinkRecord(source, key, "upsert", value[UPDATED], value[HASH], value[RECORD], value[POSITION].offset)
        for key, value in zip(keys, values)])
    batch_id = xxh3_128_hexdigest(records)
    return Chunk(batch_id, b'{"batch_id":"%s","records":%s}' % (batch_id.encode(), records), source, keys, values)


def split_chunk(chunk: Chunk) -> tuple[Chunk, Chunk]:
    """The two halves of a request the sink found too large (413), each with its own content-derived id."""
    half = len(chunk.keys) // 2
    return (make_chunk(chunk.source, chunk.keys[:half], chunk.values[:half]),
            make_chunk(chunk.source, chunk.keys[half:], chunk.values[half:]))
