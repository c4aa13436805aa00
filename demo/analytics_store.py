"""The analytics sink's state: the latest version of every (source, key) and per-source checksums.

Runs on the sink's event loop. The hot state (each key's parsed instant and digest) lives in dicts so an
ingest never reads SQLite; every applied batch is journaled to SQLite (demo/analytics_db.py) before it
is acknowledged and folded into the records table later. A restart with the same db file folds what is
left and reloads the dicts from the records table.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import msgspec

from conflux.demo.analytics_db import Database
from conflux.demo.analytics_wire import Change, Rejection, parse_instant
from conflux.demo.checksum import Checksum

# key -> (updated instant, seq, digest); digest None marks a tombstone, kept so a late older upsert stays
# dead. Versions are ordered by (instant, seq): seq breaks ties between versions of the same instant.
Entry = tuple[datetime, int, int | None]
INSTANT, SEQ, DIGEST = range(3)

# Folding costs more CPU than ingest itself, so it waits for a pause in the traffic (benchmarks share
# two cores with the pipeline), unless the backlog grows so large that a restart would replay for long.
FOLD_IDLE_S = 2.0
FOLD_BACKLOG_BYTES = 256 * 1024 * 1024
FOLD_STEP_BATCHES = 8  # batches per fold step; the loop serves requests between steps

_rejections_encoder = msgspec.json.Encoder()


class StoreFailed(RuntimeError):
    """SQLite refused a write; memory has moved ahead of the file and can no longer be trusted."""


class Freshness:
    """How old each applied record's updated_at is when the sink applies it (the end-to-end delay
    from the upstream's change to the analytics store). Off unless asked for: it costs a clock read
    and a subtraction per record."""

    MAX_SAMPLES = 1_000_000

    def __init__(self) -> None:
        self.enabled = False
        self.samples_s: list[float] = []

    def reset(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.samples_s = []

    def add(self, updated: list[datetime]) -> None:
        if len(self.samples_s) < self.MAX_SAMPLES:
            now = time.time()
            self.samples_s.extend(now - instant.timestamp() for instant in updated)

    def summary(self) -> dict[str, float | int | bool]:
        ordered = sorted(self.samples_s)
        out: dict[str, float | int | bool] = {"enabled": self.enabled, "count": len(ordered)}
        for name, fraction in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99), ("max_ms", 1.0)):
            out[name] = round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000, 3) \
                if ordered else None
        return out


class SourceState:
    """One source's keys, its running checksum (live records only), how many of its keys are tombstones,
    and how many deletes it applied since the process started."""

    __slots__ = ("checksum", "deletes_applied", "entries", "tombstones")

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.checksum = Checksum()
        self.tombstones = 0
        self.deletes_applied = 0

    def put(self, change: Change, entry: Entry | None) -> None:
        """Make ``change`` the key's version (the caller checked it is not older than ``entry``)."""
        record = change.record
        old_digest = None if entry is None else entry[DIGEST]
        if record.op == "upsert":
            self.entries[record.key] = (change.updated, record.seq, change.digest)
            if old_digest is not None:
                self.checksum.replace(old_digest, change.digest)
                return
            self.checksum.add(change.digest)
            if entry is not None:  # a newer upsert recreates a deleted key
                self.tombstones -= 1
        else:
            self.entries[record.key] = (change.updated, record.seq, None)
            self.deletes_applied += 1
            if old_digest is not None:
                self.checksum.remove(old_digest)
            if entry is None or old_digest is not None:  # a repeated delete leaves one tombstone
                self.tombstones += 1

    def as_dict(self) -> dict[str, object]:
        return {**self.checksum.as_dict(), "tombstones": self.tombstones, "deletes_applied": self.deletes_applied}


class BatchOutcome(msgspec.Struct, gc=False):
    applied: int
    ignored_stale: int
    rejected: list[Rejection]


def _older(change: Change, entry: Entry) -> bool:
    """Whether ``change`` is older than the stored version: by instant, then by seq. An equal version
    applies (the same record again, or a later arrival the producer could not tell apart)."""
    updated = change.updated
    return updated < entry[INSTANT] or (updated == entry[INSTANT] and change.record.seq < entry[SEQ])


class Store:
    """Applies checked changes last-writer-wins by (updated_at, seq) and keeps checksums incrementally."""

    def __init__(self, *, db: Database) -> None:
        self._db = db
        self.freshness = Freshness()
        self.sources: dict[str, SourceState] = {}
        self.last_ingest_monotonic = 0.0
        while db.fold(max_batches=FOLD_STEP_BATCHES):
            pass  # batches journaled before a crash, or before a stop whose fold ran out of time
        self.batch_ids: set[str] = db.load_batch_ids()
        for source, key, updated_at, seq, digest in db.load_states():
            state = self._source(source)
            state.entries[key] = (parse_instant(updated_at), seq, digest)
            if digest is not None:
                state.checksum.add(digest)
            else:
                state.tombstones += 1
        # Cumulative byte counts of journaled and folded bodies; the difference is the backlog.
        self._journaled_bytes = self._folded_bytes = 0

    def _source(self, source: str) -> SourceState:
        state = self.sources.get(source)
        if state is None:
            state = self.sources[source] = SourceState()
        return state

    def apply(self, batch_id: str, body: bytes, changes: list[Change],
              rejected: list[Rejection]) -> BatchOutcome:
        """Apply a batch's changes in record order and journal ``body`` with its id; raises StoreFailed."""
        applied = ignored_stale = 0
        source = None
        for change in changes:
            record = change.record
            if record.source != source:  # batches rarely mix sources: look the source up once per run
                source = record.source
                state = self._source(source)
                entries = state.entries
            entry = entries.get(record.key)
            if entry is not None and _older(change, entry):
                ignored_stale += 1
                continue
            applied += 1
            state.put(change, entry)
        outcome = BatchOutcome(applied, ignored_stale, rejected)
        self._journal(batch_id, body, outcome)
        if self.freshness.enabled:
            self.freshness.add([change.updated for change in changes if change.record.op == "upsert"])
        return outcome

    def _journal(self, batch_id: str, body: bytes, outcome: BatchOutcome) -> None:
        rejected_json = _rejections_encoder.encode(outcome.rejected) if outcome.rejected else None
        try:
            self._db.journal_batch(batch_id=batch_id, body=body, applied=outcome.applied,
                                   ignored_stale=outcome.ignored_stale, rejected_json=rejected_json)
        except Exception as exc:
            raise StoreFailed(f"SQLite write of batch {batch_id!r} failed: {exc}") from exc
        self.batch_ids.add(batch_id)
        self._journaled_bytes += len(body)
        self.last_ingest_monotonic = time.monotonic()

    def previous_outcome(self, batch_id: str) -> BatchOutcome | None:
        """What an already applied batch did, for answering its duplicates."""
        summary = self._db.batch_summary(batch_id)
        return None if summary is None else BatchOutcome(*summary)

    async def record(self, source: str, key: str) -> tuple[str, int, bytes | None] | None:
        """(updated_at, seq, data or None if deleted) of one key, or None if never seen."""
        await self.fold_all()
        return self._db.record(source, key)

    @property
    def unfolded_bytes(self) -> int:
        return self._journaled_bytes - self._folded_bytes

    async def fold_all(self, *, deadline_monotonic: float = float("inf")) -> None:
        """Fold everything journaled so far, in steps; later batches may arrive between steps (and
        are left for later, so a steady stream cannot keep this from finishing)."""
        target_bytes = self._journaled_bytes
        while self._folded_bytes < target_bytes and time.monotonic() < deadline_monotonic:
            self._fold_step()
            await asyncio.sleep(0)

    async def fold_when_idle(self, *, poll_s: float = 0.2) -> None:
        """Background task: fold after FOLD_IDLE_S without ingests, or while the backlog is too large."""
        while True:
            await asyncio.sleep(poll_s)
            while self.unfolded_bytes and (
                    time.monotonic() - self.last_ingest_monotonic >= FOLD_IDLE_S
                    or self.unfolded_bytes > FOLD_BACKLOG_BYTES):
                self._fold_step()
                await asyncio.sleep(0)

    def _fold_step(self) -> None:
        folded_bytes = self._db.fold(max_batches=FOLD_STEP_BATCHES)
        # Nothing left to fold means the counts are off (they cannot be, but must not spin if they were).
        self._folded_bytes = self._folded_bytes + folded_bytes if folded_bytes else self._journaled_bytes

    def source_stats(self) -> dict[str, dict[str, object]]:
        """Per source: checksum and count of live records, tombstones held, deletes applied since start."""
        return {name: state.as_dict() for name, state in self.sources.items()}

    def close(self) -> None:
        self._db.close()
