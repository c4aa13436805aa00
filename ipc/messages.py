"""Every message that crosses a process boundary, as typed, tagged msgspec Structs.

Three channels, three unions:
- the log carries ``Batch`` (JSON, so records stay ``msgspec.Raw`` bytes end to end);
- the shared-memory rings carry ``RingFrame`` (consumer -> merger) and ``AckFrame`` (merger -> consumer);
- the supervisor's socketpair with each worker carries ``ControlMessage`` (msgpack).
Hot-path Structs are ``array_like`` (no field names on the wire) and ``gc=False`` where they hold no
cycles. Codecs for them are built once in ``ipc.codec``.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Literal

from msgspec import Raw, Struct

SyncType = Literal["full", "incremental", "webhook", "replay"]

# ---------------------------------------------------------------------------------------------
# The record columns: every structure that carries records carries these, in this order.

RECORD_COLUMNS = ("keys", "updated", "updated_us", "hashes", "key_hashes", "records", "deleted")
# Columns left empty when no record sets them: a batch without deletes carries `deleted` as [].
OPTIONAL_COLUMNS = frozenset({"deleted"})


def take(columns: object, indices: Sequence[int]) -> list[list]:
    """The rows ``indices`` (in that order) of each record column of ``columns``: a ``Batch``, or the
    fetcher's page columns. C-level ``itemgetter`` per column, no per-record Python."""
    if len(indices) > 1:
        pick = itemgetter(*indices)
        return [list(pick(column)) if column else [] for column in map(columns.__getattribute__, RECORD_COLUMNS)]
    return [[column[index] for index in indices] if column else []
            for column in map(columns.__getattribute__, RECORD_COLUMNS)]


def cut(columns: object, start: int, stop: int) -> list[list]:
    """The rows ``start:stop`` of each record column of ``columns`` (an empty optional column stays empty)."""
    return [getattr(columns, name)[start:stop] for name in RECORD_COLUMNS]


# ---------------------------------------------------------------------------------------------
# The log


class Batch(Struct, array_like=True, gc=False, tag="batch"):
    """Records of one source for one partition. Columns, not per-record objects: a batch of 500
    records is ten lists, and every record's JSON stays as the upstream sent it."""

    message_id: str
    source: str
    sync: str
    created_us: int
    keys: list[str]
    updated: list[str]        # the text the sink gets: the upstream's own ISO 8601, or an epoch as ISO 8601 UTC
    updated_us: list[int]     # the same instant as microseconds since the epoch, for ordering
    hashes: list[str]         # xxh3-64 of each record's bytes, 16 hex digits: the content hash
    key_hashes: list[int]     # xxh3-64 of each key: picks the partition and the merger
    records: list[Raw]
    # True where the version is a delete (a delete marker, a filtered-out record, a reconcile); [] when
    # none is. Readers of batches written before this column simply see none.
    deleted: list[bool] = []

    @property
    def count(self) -> int:
        return len(self.keys)

    def subset(self, indices: Sequence[int]) -> Batch:
        """The same message with only these records (the consumer's deduplicated share)."""
        return Batch(self.message_id, self.source, self.sync, self.created_us, *take(self, indices))


class BatchHead(Struct, array_like=True, gc=False, tag="batch"):
    """A ``Batch`` read without taking its records apart: what a consumer needs to deduplicate and
    route a message. Everything it does not look at stays one raw slice of the payload."""

    message_id: str
    source: str
    sync: str
    created_us: int
    keys: Raw
    updated: Raw
    updated_us: Raw
    hashes: list[str]
    key_hashes: list[int]
    records: Raw

    @property
    def count(self) -> int:
        return len(self.hashes)


class Position(Struct, array_like=True, frozen=True, gc=False):
    """Where a message sits in the log."""

    topic: str
    partition: int
    offset: int


# ---------------------------------------------------------------------------------------------
# Rings: consumer -> merger and merger -> consumer


class MergeBatch(Struct, array_like=True, gc=False, tag="b"):
    """A log message for one merger, with the token to acknowledge. Its payload (a ``Batch``) passes
    through byte for byte when nothing in it was a duplicate, the usual case, which costs the consumer
    no re-encoding; otherwise it is the ``Batch.subset`` of the fresh records."""

    consumer: int
    generation: int
    position: Position
    batch: Raw


class FlushNow(Struct, array_like=True, gc=False, tag="f"):
    """A draining consumer asks the merger to deliver what it holds without waiting for the timer."""

    consumer: int
    generation: int


RingFrame = MergeBatch | FlushNow


class Acks(Struct, array_like=True, gc=False, tag="a"):
    """The sink has taken (or dead-lettered) every record this merger got from these positions."""

    generation: int
    positions: list[Position]


AckFrame = Acks

# ---------------------------------------------------------------------------------------------
# Dead letters


class DeadLetter(Struct, kw_only=True, gc=False):
    """One record that could not be delivered, with why and where it came from."""

    id: str                   # stable for the same record and reason, so a repeat updates the entry
    source: str
    reason: str
    stage: str                # "fetch" (malformed upstream record), "consume" or "sink"
    record: Raw               # as received
    key: str = ""
    origin: str = ""          # upstream URL and page, or topic/partition/offset
    first_seen: float = 0.0
    last_seen: float = 0.0
    attempts: int = 1


# ---------------------------------------------------------------------------------------------
# Control channel: supervisor <-> worker


class Hello(Struct, tag="hello"):
    role: str
    index: int
    pid: int


class Heartbeat(Struct, tag="hb"):
    """Sent from the worker's main loop, so a stuck loop stops heartbeating."""

    sent_at: float
    stats: dict[str, float] = {}


class PartitionsOwned(Struct, tag="parts"):
    partitions: list[tuple[str, int]]


class PartitionLag(Struct, array_like=True):
    topic: str
    partition: int
    committed: int
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)


class LagReport(Struct, tag="lag"):
    lags: list[PartitionLag]


class ReconcileReport(Struct, kw_only=True):
    """The outcome of the last reconcile of a source: keys live before it, not listed by the full sync
    (checked), deleted, waiting for a second look, kept (newer than the sync, or found by lookup)."""

    at: float = 0.0
    live: int = 0
    checked: int = 0
    deleted: int = 0
    waiting: int = 0
    kept: int = 0
    refused: bool = False
    detail: str = ""
    duration_s: float = 0.0                 # fold, decisions, lookups and the deletes' publish
    sync_started_at: float = 0.0            # when the full sync it compared with started: the deletes' updated_at


class SourceReport(Struct, kw_only=True, tag="source"):
    """A fetcher's view of one source after each sync or state change."""

    source: str
    last_sync_at: float = 0.0
    last_sync_type: str = ""
    last_sync_result: str = ""
    last_sync_records: int = 0
    records_synced: int = 0
    syncs_ok: int = 0
    syncs_failed: int = 0
    watermark: str = ""
    breaker: str = "closed"
    syncing: bool = False
    deletes_published: int = 0              # delete versions published: markers, filtered out, reconciles
    reconcile: ReconcileReport | None = None


class SourcesOwned(Struct, tag="sources"):
    sources: list[str]


class SyncNow(Struct, tag="sync"):
    """Supervisor -> fetcher (and control -> supervisor): start a sync of ``source`` now."""

    source: str
    full: bool = False


class SyncAccepted(Struct, tag="sync_ok"):
    source: str
    accepted: bool
    detail: str = ""


class StatusRequest(Struct, tag="status?"):
    """Control worker -> supervisor: send me a fresh status snapshot."""


class StatusSnapshot(Struct, tag="status"):
    """Supervisor -> control worker: the daemon's state, JSON-encoded once by the supervisor."""

    body: bytes


class Drain(Struct, tag="drain"):
    """Supervisor -> worker, just before its SIGTERM: the drain must be over within ``timeout_s`` (what is
    left of the supervisor's deadline), so a worker can finish its last commit before it would be killed."""

    timeout_s: float


ControlMessage = (
    Hello | Heartbeat | PartitionsOwned | LagReport | SourceReport | SourcesOwned | SyncNow | SyncAccepted
    | StatusRequest | StatusSnapshot | Drain
)

__all__ = [
    "OPTIONAL_COLUMNS",
    "RECORD_COLUMNS",
    "AckFrame",
    "Acks",
    "Batch",
    "BatchHead",
    "ControlMessage",
    "DeadLetter",
    "Drain",
    "FlushNow",
    "Heartbeat",
    "Hello",
    "LagReport",
    "MergeBatch",
    "PartitionLag",
    "PartitionsOwned",
    "Position",
    "ReconcileReport",
    "RingFrame",
    "SourceReport",
    "SourcesOwned",
    "StatusRequest",
    "StatusSnapshot",
    "SyncAccepted",
    "SyncNow",
    "SyncType",
    "cut",
    "take",
]
