"""SQLite persistence for the analytics sink: a journal of applied batches folded into a records table.

Used by demo/analytics_store.py on the sink's event loop. Acknowledging a batch costs one INSERT: its
body goes into the ``batches`` journal with its id and its rejections, in one transaction, so a batch's
data and its id become durable together. Writing each record as its own row instead costs about 3 µs
of CPU per record on the two-core benchmark host, more than decoding, checking and applying it together
(see the throughput test), so rows are written later by *folding*: replaying journaled bodies in arrival
order into ``records`` (one ``executemany`` upsert per step) with the same last-writer-wins rule as in
memory, then clearing the folded bodies. Folding runs after a pause in the traffic (or once the backlog
is large), before ``GET /records`` answers, on stop (to a deadline) and on start.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import msgspec

from conflux.demo.analytics_wire import Rejection, decode_batch, parse_instant
from conflux.demo.checksum import record_digest

log = logging.getLogger("conflux.analytics")

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    source     TEXT NOT NULL,
    key        TEXT NOT NULL,
    updated_at TEXT NOT NULL,     -- as received
    updated_us INTEGER NOT NULL,  -- its instant, microseconds since the epoch (UTC)
    digest     INTEGER,           -- demo.checksum.record_digest as signed 64-bit; NULL for a tombstone
    data       BLOB,              -- the exact `data` bytes received; NULL for a tombstone
    seq        INTEGER NOT NULL DEFAULT 0,  -- orders versions with the same instant
    PRIMARY KEY (source, key)
);
CREATE VIEW IF NOT EXISTS tombstones AS
    SELECT source, key, updated_at, updated_us FROM records WHERE data IS NULL;
CREATE TABLE IF NOT EXISTS batches (
    seq           INTEGER PRIMARY KEY,  -- arrival order, which is the fold order
    batch_id      TEXT NOT NULL UNIQUE,
    applied       INTEGER NOT NULL,
    ignored_stale INTEGER NOT NULL,
    rejected      BLOB,                 -- JSON list of {"index", "reason"}; NULL when none
    body          BLOB                  -- the ingest body until folded into records, then NULL
);
"""

# Last writer wins by (instant, seq), equal versions included: the same rule Store applies in memory.
_FOLD_ROW = """
INSERT INTO records (source, key, updated_at, updated_us, digest, data, seq) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (source, key) DO UPDATE SET
    updated_at = excluded.updated_at, updated_us = excluded.updated_us,
    digest = excluded.digest, data = excluded.data, seq = excluded.seq
WHERE (excluded.updated_us, excluded.seq) >= (records.updated_us, records.seq)
"""

# Under steady writes a passive checkpoint rarely catches up fully, so the WAL can grow during a long
# burst; once it has been copied SQLite starts it over and truncates the file to this size.
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024

_SIGN_BIT = 1 << 63
_WRAP = 1 << 64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_rejections_decoder = msgspec.json.Decoder(list[Rejection])

# (source, key, updated_at, updated_us, signed digest or None, data or None, seq)
Row = tuple[str, str, str, int, int | None, bytes | None, int]


def to_signed(digest: int) -> int:
    """SQLite integers are signed 64-bit; store a uint64 digest in two's complement."""
    return digest - _WRAP if digest >= _SIGN_BIT else digest


def to_unsigned(stored: int) -> int:
    return stored + _WRAP if stored < 0 else stored


def journal_rows(body: bytes, rejected: list[Rejection]) -> list[Row]:
    """The records rows a journaled body contributes, in record order, rejected records left out."""
    skip = {rejection.index for rejection in rejected}
    rows: list[Row] = []
    for index, record in enumerate(decode_batch(body).records):
        if index in skip:
            continue
        updated = parse_instant(record.updated_at)
        if updated is None:
            raise ValueError(f"journaled record {index} has updated_at {record.updated_at!r}")
        updated_us = (updated - _EPOCH) // _MICROSECOND
        if record.op == "upsert":
            digest = to_signed(record_digest(record.key, record.data))
            rows.append((record.source, record.key, record.updated_at, updated_us, digest,
                         bytes(record.data), record.seq))
        else:
            rows.append((record.source, record.key, record.updated_at, updated_us, None, None, record.seq))
    return rows


class Database:
    """The sink's SQLite file (or ``:memory:``). Not thread-safe: the event loop owns it."""

    def __init__(self, *, path: str) -> None:
        self.path = path
        # Autocommit mode: every transaction is an explicit BEGIN..COMMIT or a single statement.
        self._conn = sqlite3.connect(path, isolation_level=None)
        self._checkpointer: Checkpointer | None = None
        if path != ":memory:":
            self._conn.execute("PRAGMA journal_mode=WAL")
            # Checkpoints copy the WAL into the db and fsync both; a thread does them so the event
            # loop never waits for the disk (sqlite3 releases the GIL while it works).
            self._conn.execute("PRAGMA wal_autocheckpoint=0")
            self._conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
            self._checkpointer = Checkpointer(path=path)
            self._checkpointer.start()
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SCHEMA)
        self._add_seq_column()

    def _add_seq_column(self) -> None:
        """A db file written before records carried a seq: every stored version gets seq 0."""
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(records)")}
        if "seq" not in columns:
            self._conn.execute("ALTER TABLE records ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")

    def journal_batch(self, *, batch_id: str, body: bytes, applied: int, ignored_stale: int,
                      rejected_json: bytes | None) -> None:
        """Durably record an applied batch (one statement, so one transaction); raises sqlite3.Error."""
        self._conn.execute(
            "INSERT INTO batches (batch_id, applied, ignored_stale, rejected, body) VALUES (?, ?, ?, ?, ?)",
            (batch_id, applied, ignored_stale, rejected_json, body))

    def fold(self, *, max_batches: int) -> int:
        """Fold up to ``max_batches`` journaled bodies into records; returns their size in bytes."""
        pending = self._conn.execute(
            "SELECT seq, body, rejected FROM batches WHERE body IS NOT NULL ORDER BY seq LIMIT ?",
            (max_batches,)).fetchall()
        if not pending:
            return 0
        rows: list[Row] = []
        folded_bytes = 0
        for _seq, body, rejected_json in pending:
            folded_bytes += len(body)
            rejected = _rejections_decoder.decode(rejected_json) if rejected_json else []
            rows.extend(journal_rows(body, rejected))
        conn = self._conn
        conn.execute("BEGIN")
        try:
            conn.executemany(_FOLD_ROW, rows)
            conn.execute("UPDATE batches SET body = NULL WHERE seq <= ? AND body IS NOT NULL",
                         (pending[-1][0],))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return folded_bytes

    def load_states(self) -> Iterator[tuple[str, str, str, int, int | None]]:
        """Every folded key's (source, key, updated_at, seq, digest or None for a tombstone)."""
        for source, key, updated_at, seq, digest in self._conn.execute(
                "SELECT source, key, updated_at, seq, digest FROM records"):
            yield source, key, updated_at, seq, None if digest is None else to_unsigned(digest)

    def load_batch_ids(self) -> set[str]:
        return {batch_id for (batch_id,) in self._conn.execute("SELECT batch_id FROM batches")}

    def batch_summary(self, batch_id: str) -> tuple[int, int, list[Rejection]] | None:
        """(applied, ignored_stale, rejections) recorded for an applied batch, or None."""
        found = self._conn.execute(
            "SELECT applied, ignored_stale, rejected FROM batches WHERE batch_id = ?", (batch_id,)
        ).fetchone()
        if found is None:
            return None
        applied, ignored_stale, rejected_json = found
        return applied, ignored_stale, _rejections_decoder.decode(rejected_json) if rejected_json else []

    def record(self, source: str, key: str) -> tuple[str, int, bytes | None] | None:
        """(updated_at, seq, data or None for a tombstone) of one folded key, or None if never seen."""
        return self._conn.execute(
            "SELECT updated_at, seq, data FROM records WHERE source = ? AND key = ?", (source, key)
        ).fetchone()

    def close(self) -> None:
        """Fold the WAL back into the main file so the db is one self-contained file at rest."""
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()


class Checkpointer(threading.Thread):
    """Checkpoints the WAL every ``interval_s`` from its own connection, in its own thread.

    PASSIVE checkpoints never block the writer; SQLite restarts the WAL from its start once it has all
    been copied, so it stays about as large as the writes of one interval.
    """

    def __init__(self, *, path: str, interval_s: float = 0.5) -> None:
        super().__init__(name="sqlite-checkpointer", daemon=True)
        self._path = path
        self._interval_s = interval_s
        self._stopping = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self._path, isolation_level=None)
        try:
            while not self._stopping.wait(self._interval_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # the WAL only grows meanwhile; the data is safe in it
                    log.warning("WAL checkpoint of %s failed: %s", self._path, exc)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping.set()
        self.join()
