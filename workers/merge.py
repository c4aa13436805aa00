"""The merge state of one merger: the latest version of every key, and what is waiting for the sink.

Pure data structure, driven by the merger process. A record replaces the pending one for its key
only if its updated value is not older (equal wins: the later arrival of the same instant is the
newer read of the upstream). A record older than what the sink already acknowledged for its key is
dropped, so a late, old version never overwrites a newer one.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import msgspec
from msgspec import Raw
from xxhash import xxh3_128_hexdigest

from ipc.messages import MergeRecords, Position


class Pending(NamedTuple):
    updated_us: int
    content_hash: int
    record: Raw
    updated: str
    position: Position


class Token(NamedTuple):
    """What to acknowledge to whom once a flush is delivered."""

    consumer: int
    generation: int
    position: Position


class SinkRecord(msgspec.Struct, gc=False):
    source: str
    key: str
    op: str
    updated_at: str
    hash: str
    data: Raw


_sink_encoder = msgspec.json.Encoder()


class Chunk(NamedTuple):
    """One sink request: its stable id, its body, and the records it carries (for DLQ and metrics)."""

    batch_id: str
    body: bytes
    entries: list[tuple[str, str, Pending]]  # (source, key, pending)


class FlushUnit(NamedTuple):
    chunks: list[Chunk]
    tokens: list[Token]
    records: int


class MergeState:
    def __init__(self) -> None:
        self.latest: dict[str, dict[str, int]] = {}
        self.pending: dict[str, dict[str, Pending]] = {}
        self.pending_count = 0
        self.tokens: list[Token] = []
        self.oldest_at: float | None = None

    def add(self, frame: MergeRecords) -> int:
        """Merge one frame; returns how many of its records were stale."""
        latest = self.latest.setdefault(frame.source, {})
        pending = self.pending.setdefault(frame.source, {})
        position = frame.position
        stale = added = 0
        for key, updated_us, content_hash, record, updated in zip(
                frame.keys, frame.updated_us, frame.hashes, frame.records, frame.updated, strict=True):
            if updated_us < latest.get(key, -1):
                stale += 1
                continue
            current = pending.get(key)
            if current is None:
                added += 1
            elif updated_us < current.updated_us:
                stale += 1
                continue
            pending[key] = Pending(updated_us, content_hash, record, updated, position)
        self.pending_count += added
        self.tokens.append(Token(frame.consumer, frame.generation, position))
        if self.oldest_at is None:
            self.oldest_at = time.monotonic()
        return stale

    def age_s(self) -> float:
        return 0.0 if self.oldest_at is None else time.monotonic() - self.oldest_at

    def take(self, batch_size: int) -> FlushUnit:
        """Everything pending, cut into sink requests of at most ``batch_size`` records."""
        entries = [(source, key, value) for source, records in self.pending.items() for key, value in records.items()]
        unit = FlushUnit([make_chunk(entries[i:i + batch_size]) for i in range(0, len(entries), batch_size)],
                         self.tokens, len(entries))
        self.pending = {}
        self.pending_count = 0
        self.tokens = []
        self.oldest_at = None
        return unit

    def delivered(self, entries: list[tuple[str, str, Pending]]) -> None:
        """The sink took these: remember their instants so older versions are dropped from now on."""
        for source, key, value in entries:
            latest = self.latest.setdefault(source, {})
            if value.updated_us >= latest.get(key, -1):
                latest[key] = value.updated_us

    @property
    def keys_known(self) -> int:
        return sum(len(keys) for keys in self.latest.values())


def make_chunk(entries: list[tuple[str, str, Pending]]) -> Chunk:
    """The batch_id is derived from the content, so a retry, or a replay after a crash that rebuilds
    the same batch, carries the same id and the sink can recognise it."""
    records = _sink_encoder.encode([
        SinkRecord(source, key, "upsert", value.updated, f"{value.content_hash:016x}", value.record)
        for source, key, value in entries])
    batch_id = xxh3_128_hexdigest(records)
    return Chunk(batch_id, b'{"batch_id":"%s","records":%s}' % (batch_id.encode(), records), entries)
