"""The keys of a reconciled source, on disk: what a complete full sync is compared with to find hard deletes.

Only sources with ``reconcile = true`` have an index: one SQLite file per source in
``<state_dir>/keys/``. Fetchers (pages) and the control process (webhooks) append one row per record
they publish (key, when they saw it, its updated instant, whether it is a delete): an append costs about
a microsecond, where an upsert into a keyed table costs ten. After a complete full sync that started at
T0, ``Reconcile`` folds the rows into one per key (a sort, in SQLite's C), and the live keys not seen
since T0 are the candidates for deletion. Nothing is held in RAM: a source with 50 million keys costs
disk, not memory. The file survives restarts; on Kafka it is local to the instance that holds the
source (see the README).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from xxhash import xxh3_64_intdigest

from conflux.config import Config
from conflux.errors import LogError
from conflux.workers.columns import Columns

BUSY_TIMEOUT_S = 30.0
# `rows` is append-only between reconciles; `missed` counts complete full syncs in a row that did not
# list the key, and is carried by the folded row. `parent` is the parent record's key of a child
# source's record ("" otherwise): a parent's delete deletes the children listed under it.
COLUMNS = """(
    key_hash INTEGER NOT NULL, key TEXT NOT NULL, seen_us INTEGER NOT NULL, updated_us INTEGER NOT NULL,
    deleted INTEGER NOT NULL, missed INTEGER NOT NULL DEFAULT 0, parent TEXT NOT NULL DEFAULT '')"""
# One row per key: the newest version decides `deleted` (a delete wins a tie of instants), the latest
# sighting is `seen_us`, and a sighting since the last fold (missed = 0) clears `missed`. One GROUP BY of
# plain aggregates: about half the cost of a window function over the same rows.
FOLD = """
INSERT INTO folded (key_hash, key, seen_us, updated_us, deleted, missed, parent)
SELECT key_hash, key, seen_us, packed >> 1 AS updated_us, packed & 1 AS deleted, missed, parent FROM (
    SELECT key_hash, key, max(seen_us) AS seen_us, max(updated_us * 2 + deleted) AS packed, min(missed) AS missed,
           max(parent) AS parent
    FROM rows WHERE rowid <= ? GROUP BY key_hash)
"""


# The candidates, taken from the folded rows once: walking them in batches is then a rowid range each,
# where a query per batch over the folded rows would scan all of them every time.
PENDING = """
INSERT INTO pending (key, key_hash, updated_us, missed)
SELECT key, key_hash, updated_us, missed FROM folded WHERE deleted = 0 AND seen_us < ? ORDER BY key_hash
"""


def key_index_dir(config: Config) -> Path:
    """Where the key indexes of the reconciled sources live: ``<state_dir>/keys``."""
    return Path(config.daemon.state_dir) / "keys"


class Candidate(NamedTuple):
    """A live key that a complete full sync did not list."""

    key: str
    key_hash: int
    updated_us: int
    missed: int


class Child(NamedTuple):
    """A live key of a child source, and the parent it was last listed under."""

    key: str
    key_hash: int
    updated_us: int
    parent: str


class KeyIndex:
    """A source's index as one process sees it; thread-safe (used from an event loop's executor)."""

    def __init__(self, directory: str | Path, source: str) -> None:
        self.path = str(Path(directory) / f"{source}.db")
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                     check_same_thread=False)
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                db.execute(f"CREATE TABLE IF NOT EXISTS rows {COLUMNS}")
                if "parent" not in {row[1] for row in db.execute("PRAGMA table_info(rows)")}:  # made by 0.1.0
                    db.execute("ALTER TABLE rows ADD COLUMN parent TEXT NOT NULL DEFAULT ''")
            except sqlite3.Error as exc:
                raise LogError(f"key index {self.path}: {exc}") from None
            self._db = db
        return self._db

    def seen(self, keys: Sequence[str], key_hashes: Sequence[int], updated_us: Sequence[int],
             deleted: Sequence[bool], seen_us: int, *, parent: str = "") -> None:
        """Record that a page or webhook carried these keys at ``seen_us`` (wall clock); ``parent``: the
        key of the parent record a child source's page was listed under."""
        count = len(keys)
        rows = zip(map(_signed, key_hashes), keys, [seen_us] * count, updated_us, map(int, deleted), [parent] * count,
                   strict=True)
        self.execute_many("INSERT INTO rows (key_hash, key, seen_us, updated_us, deleted, parent) "
                          "VALUES (?, ?, ?, ?, ?, ?)", rows)

    def children_of(self, parents: Sequence[str]) -> list[Child]:
        """The live keys whose latest sighting was under one of ``parents`` (a child source's index)."""
        marks = ", ".join("?" * len(parents))
        rows = self.query(f"SELECT key_hash, key, seen_us, updated_us, deleted, parent FROM rows WHERE key_hash IN "
                          f"(SELECT key_hash FROM rows WHERE parent IN ({marks}))", tuple(parents))
        newest: dict[int, tuple] = {}
        latest: dict[int, tuple] = {}
        for row in rows:
            key_hash, _key, seen_us, updated_us, deleted, _parent = row
            if key_hash not in newest or (updated_us, deleted) > newest[key_hash][3:5]:
                newest[key_hash] = row
            if _parent and (key_hash not in latest or seen_us >= latest[key_hash][2]):
                latest[key_hash] = row   # a webhook's sighting (no parent) does not move a key to another parent
        wanted = set(parents)
        return [Child(row[1], _unsigned(key_hash), row[3], latest[key_hash][5]) for key_hash, row in newest.items()
                if not row[4] and key_hash in latest and latest[key_hash][5] in wanted]

    def seen_columns(self, columns: Columns, seen_us: int, *, parent: str = "") -> None:
        """A page or webhook carried these records: the valid ones, and the dead-lettered ones whose key
        could be read. The upstream still lists a record it serves invalid, so it is not a hard delete; its
        sighting carries the oldest instant, so it never outranks a version actually delivered (or deleted)."""
        keys, key_hashes, updated_us = list(columns.keys), list(columns.key_hashes), list(columns.updated_us)
        deleted = list(columns.deleted or [False] * len(columns))
        readable = [key for _record, key, _reason in columns.dead if key]
        keys += readable
        key_hashes += [xxh3_64_intdigest(key.encode()) for key in readable]
        updated_us += [0] * len(readable)
        deleted += [False] * len(readable)
        if keys:
            self.seen(keys, key_hashes, updated_us, deleted, seen_us, parent=parent)

    def reconcile(self, started_us: int) -> Reconcile:
        """Fold what is recorded so far, for comparing with the full sync that started at ``started_us``."""
        return Reconcile(self, started_us)

    def execute_many(self, sql: str, rows, *, script: Sequence[tuple[str, tuple]] = ()) -> None:
        """One write transaction: ``script`` statements, then ``sql`` over ``rows`` (if given)."""
        with self._lock:
            db = self._connection()
            try:
                db.execute("BEGIN IMMEDIATE")
                for statement, args in script:
                    db.execute(statement, args)
                if sql:
                    db.executemany(sql, rows)
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise LogError(f"key index {self.path}: {exc}") from None

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._connection().execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise LogError(f"key index {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class Reconcile:
    """One comparison: fold, walk the candidates in batches, decide, then ``commit`` (or ``abandon``).

    Rows appended while it runs (webhooks, the next sync) are kept: ``commit`` carries them over. Until
    ``commit`` nothing about a key changes, so a crash half-way loses no decision: the deletes already
    published are published again by the next reconcile, and the sink applies them idempotently.
    """

    def __init__(self, index: KeyIndex, started_us: int) -> None:
        self.index = index
        self.started_us = started_us
        (self.upto,), = index.query("SELECT coalesce(max(rowid), 0) FROM rows")
        index.execute_many("", (), script=[("DROP TABLE IF EXISTS folded", ()), ("DROP TABLE IF EXISTS decided", ()),
                                           (f"CREATE TABLE folded {COLUMNS}", ()), (FOLD, (self.upto,)),
                                           ("CREATE TABLE decided (key_hash INTEGER PRIMARY KEY, deleted INTEGER)",
                                            ()), *_pending_script(started_us)])
        (self.live,), = index.query("SELECT count(*) FROM folded WHERE deleted = 0")
        (self.missing,), = index.query("SELECT count(*) FROM pending")

    def candidates(self, batch: int = 1000) -> Iterator[list[Candidate]]:
        """Live keys not seen since the sync started, in batches (never all of them in memory)."""
        after = 0
        while True:
            rows = self.index.query("SELECT rowid, key, key_hash, updated_us, missed FROM pending WHERE rowid > ? "
                                    "ORDER BY rowid LIMIT ?", (after, batch))
            if not rows:
                return
            yield [Candidate(key, _unsigned(key_hash), updated, missed) for _, key, key_hash, updated, missed in rows]
            after = rows[-1][0]

    def decide(self, *, deleted: Sequence[int] = (), missed: Sequence[int] = ()) -> None:
        """Remember what was done with these candidates (by key hash): a delete was published for
        ``deleted``; ``missed`` wait for a second look."""
        rows = [(_signed(h), 1) for h in deleted] + [(_signed(h), 0) for h in missed]
        self.index.execute_many("INSERT OR REPLACE INTO decided (key_hash, deleted) VALUES (?, ?)", rows)

    def commit(self) -> None:
        """Apply the decisions and make the folded rows, plus whatever was appended since, the index."""
        self.index.execute_many("", (), script=[
            ("DROP TABLE pending", ()),
            ("UPDATE folded SET deleted = 1, missed = 0, updated_us = max(updated_us, ?) "
             "WHERE key_hash IN (SELECT key_hash FROM decided WHERE deleted = 1)", (self.started_us,)),
            ("UPDATE folded SET missed = missed + 1 WHERE key_hash IN (SELECT key_hash FROM decided WHERE deleted = 0)",
             ()),
            ("INSERT INTO folded (key_hash, key, seen_us, updated_us, deleted, missed, parent) "
             "SELECT key_hash, key, seen_us, updated_us, deleted, missed, parent FROM rows WHERE rowid > ?",
             (self.upto,)),
            ("DROP TABLE rows", ()), ("DROP TABLE decided", ()),
            ("ALTER TABLE folded RENAME TO rows", ()),
        ])

    def abandon(self) -> None:
        self.index.execute_many("", (), script=[("DROP TABLE IF EXISTS folded", ()),
                                                ("DROP TABLE IF EXISTS decided", ()),
                                                ("DROP TABLE IF EXISTS pending", ())])


def _pending_script(started_us: int) -> list[tuple[str, tuple]]:
    return [("DROP TABLE IF EXISTS pending", ()),
            ("CREATE TABLE pending (key TEXT NOT NULL, key_hash INTEGER NOT NULL, updated_us INTEGER NOT NULL, "
             "missed INTEGER NOT NULL)", ()), (PENDING, (started_us,))]


def _signed(value: int) -> int:
    """SQLite integers are signed 64-bit; xxh3-64 is unsigned."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value
