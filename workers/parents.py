"""Parent -> child sources: a child (``parent = "SOURCE"``) is paged once per live record of its parent,
its url (and POST body) filled with that record's fields (``{parent.id}``).

Runs in the fetcher that holds the family: a parent and all its children (and theirs) are always
given to one fetcher (``Config.root_of``: the supervisor's assignment and the Kafka ownership group
both place a source by its family's root), so that fetcher keeps the parent's index:

- **The parent index** (``<state_dir>/parents/<parent>.db``, SQLite) holds, per parent key, the fields
  its children use, the newest version's instant, whether it is deleted, when it was last listed and
  since when it has been live. The parent's pages (and its reconcile's deletes) update it as they are
  published: 10 to 15 µs a record, for sources with children only. Nothing is held in RAM: a child
  sync reads the live parents in batches of PARENT_BATCH. The parent's first sync on an instance is
  full (whatever its checkpoint says), and its children wait for it: until then the index does not
  know every parent. A parent not listed by the last complete full sync (gone without a delete
  marker) is no longer walked.
- **A child sync** walks every live parent with the child's paginator, up to the child's
  ``max_concurrency`` parents at once, through the child's one UpstreamClient (so its rate limit,
  concurrency and credentials span all of them). An incremental sync asks each parent's children from
  the child's own watermark, except for parents that became live since the child's last complete sync:
  those are walked in full. The watermark moves to the newest record seen, but never past the sync's
  start less ``max_clock_skew_s``, because a change to a parent walked early must not be skipped for
  one seen later. A 404 or 410 for a parent's listing means the parent is gone: it is skipped.
- **Deletes.** A parent's delete (its marker, its filter, its reconcile) stops its children's walks.
  With ``reconcile = true`` on the child, the children last listed under that parent are deleted too
  (``updated_at`` = the parent's delete), through the log like any other delete.
- **The parent key.** Each child record gets the parent's key in ``parent_key_field`` (default
  ``parent_key``) unless the upstream's record has that field already; the key may use it (a key
  unique only within its parent: ``key = ["parent_key", "number"]``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from msgspec import Raw
from xxhash import xxh3_64_hexdigest

from conflux.config import Config, SourceConfig
from conflux.errors import LogError, PageFormatError, UpstreamError
from conflux.workers.batching import RecordSchema
from conflux.workers.columns import Columns, Undecodable, key_text
from conflux.workers.keyindex import KeyIndex
from conflux.workers.page_request import render_url
from conflux.workers.paging import PageInfo, Paginator
from conflux.workers.shaping import iso_utc
from conflux.workers.upstream import Response, UpstreamAnswered

logger = logging.getLogger(__name__)

PARENT_BATCH = 500
BUSY_TIMEOUT_S = 30.0
GONE = frozenset({404, 410})
NULL_RECORD = Raw(b"null")
_encode = msgspec.json.encode
_decode = msgspec.json.decode
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS parents (key TEXT PRIMARY KEY, fields BLOB, updated_us INTEGER NOT NULL, "
    "deleted INTEGER NOT NULL, seen_us INTEGER NOT NULL, first_seen_us INTEGER NOT NULL, "
    "deleted_seq INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS children (child TEXT PRIMARY KEY, synced_from_us INTEGER NOT NULL DEFAULT 0, "
    "cascaded_seq INTEGER NOT NULL DEFAULT 0)",
]


def parent_index_dir(config: Config) -> Path:
    return Path(config.daemon.state_dir) / "parents"


class Parent(NamedTuple):
    """A live parent record as a child sync sees it: its key, the fields its children use (path ->
    value; "" is the key's own value) and since when it has been live and listed."""

    key: str
    fields: dict[str, Any]
    first_seen_us: int


class ParentChange(NamedTuple):
    key: str
    fields: bytes | None        # JSON of the fields; None keeps the stored ones (a reconcile's delete)
    updated_us: int
    deleted: bool


class ParentIndex:
    """A parent source's index, shared by the parent's syncer (writes) and its children's (reads);
    thread-safe: used from the event loop's executor."""

    def __init__(self, directory: str | Path, source: str) -> None:
        self.path = str(Path(directory) / f"{source}.db")
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self.ready = asyncio.Event()      # set once the index knows every parent (set in the fetcher's loop)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            for statement in SCHEMA:
                db.execute(statement)
            self._db = db
        return self._db

    def _run(self, work: Callable[[sqlite3.Connection], Any], *, write: bool = False) -> Any:
        with self._lock:
            try:
                db = self._connection()
                if not write:
                    return work(db)
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = work(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise LogError(f"parent index {self.path}: {exc}") from None

    # -- the parent's side ----------------------------------------------------------------------------

    def record(self, changes: Sequence[ParentChange], seen_us: int) -> int:
        """A page (or a reconcile's deletes) of the parent was published at ``seen_us``. Returns how many
        parents became live or deleted (their children need a walk, or a cascade)."""
        return self._run(lambda db: self._record(db, changes, seen_us), write=True) if changes else 0

    def _record(self, db: sqlite3.Connection, changes: Sequence[ParentChange], seen_us: int) -> int:
        keys = [change.key for change in changes]
        stored = {row[0]: row for start in range(0, len(keys), 500) for row in db.execute(
            f"SELECT key, fields, updated_us, deleted, seen_us, first_seen_us, deleted_seq FROM parents "
            f"WHERE key IN ({', '.join('?' * len(keys[start:start + 500]))})", keys[start:start + 500])}
        listed_from = _meta(db, "full_started_us")
        # Deletes are numbered by a counter that only goes up, so a child's cascade resumes after the last it did.
        last_seq = _meta(db, "deleted_seq")
        rows, changed = [], 0
        for change in changes:
            row, moved = _updated_row(stored.get(change.key), change, seen_us, listed_from, last_seq + 1)
            last_seq = max(last_seq, row[6])
            changed += moved
            stored[change.key] = row
            rows.append(row)
        db.executemany("INSERT OR REPLACE INTO parents VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('deleted_seq', ?)", (last_seq,))
        return changed

    def full_sync_complete(self, started_us: int) -> None:
        """Every parent was listed since ``started_us``: one not seen since is no longer walked."""
        self._run(lambda db: db.execute("INSERT OR REPLACE INTO meta VALUES ('full_started_us', ?)", (started_us,)),
                  write=True)

    def complete(self) -> bool:
        """Whether a full sync of the parent completed on this instance (the index knows every parent)."""
        return self._run(lambda db: _meta(db, "full_started_us")) > 0

    # -- the children's side --------------------------------------------------------------------------

    def live(self, after: str, limit: int = PARENT_BATCH) -> list[Parent]:
        """The next ``limit`` live parents after key ``after``, in key order."""
        def query(db: sqlite3.Connection) -> list[tuple]:
            listed_from = _meta(db, "full_started_us")
            return db.execute("SELECT key, fields, first_seen_us FROM parents WHERE deleted = 0 AND seen_us >= ? "
                              "AND key > ? ORDER BY key LIMIT ?", (listed_from, after, limit)).fetchall()
        return [Parent(key, _decode(fields) if fields else {}, first_seen_us)
                for key, fields, first_seen_us in self._run(query)]

    def synced_from(self, child: str) -> int:
        """The start of the child's last complete sync on this instance (0: none)."""
        rows = self._run(lambda db: db.execute("SELECT synced_from_us FROM children WHERE child = ?",
                                               (child,)).fetchall())
        return rows[0][0] if rows else 0

    def child_synced(self, child: str, started_us: int) -> None:
        self._run(lambda db: db.execute(
            "INSERT INTO children (child, synced_from_us) VALUES (?, ?) "
            "ON CONFLICT(child) DO UPDATE SET synced_from_us = excluded.synced_from_us", (child, started_us)),
            write=True)

    def deleted_since(self, child: str, limit: int = PARENT_BATCH) -> list[tuple[str, int, int]]:
        """(key, delete instant, seq) of parents deleted since the child's last cascade, oldest first."""
        return self._run(lambda db: db.execute(
            "SELECT key, updated_us, deleted_seq FROM parents WHERE deleted = 1 AND deleted_seq > "
            "coalesce((SELECT cascaded_seq FROM children WHERE child = ?), 0) ORDER BY deleted_seq LIMIT ?",
            (child, limit)).fetchall())

    def cascaded(self, child: str, seq: int) -> None:
        self._run(lambda db: db.execute(
            "INSERT INTO children (child, cascaded_seq) VALUES (?, ?) "
            "ON CONFLICT(child) DO UPDATE SET cascaded_seq = excluded.cascaded_seq", (child, seq)), write=True)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _meta(db: sqlite3.Connection, name: str) -> int:
    rows = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchall()
    return rows[0][0] if rows else 0


def _updated_row(old: tuple | None, change: ParentChange, seen_us: int, listed_from: int,
                 next_seq: int) -> tuple[tuple, bool]:
    """The stored row after ``change``, and whether the parent became live or deleted with it."""
    if old is not None and (change.updated_us, change.deleted) < (old[2], bool(old[3])):
        return (*old[:4], max(old[4], seen_us), *old[5:]), False    # an older version: only a sighting
    was_live = old is not None and not old[3] and old[4] >= listed_from
    fields = change.fields if change.fields is not None or old is None else old[1]
    if change.deleted:
        seq = old[6] if old is not None and old[3] else next_seq
        return (change.key, fields, change.updated_us, 1, seen_us, old[5] if old else seen_us, seq), \
            old is None or not old[3]
    first_seen = old[5] if was_live else seen_us   # new, restored, or listed again after being missing
    return (change.key, fields, change.updated_us, 0, max(seen_us, old[4] if old else 0), first_seen, 0), not was_live


def parent_changes(schema: RecordSchema, paths: Sequence[str], columns: Columns,
                   fields: Sequence[Any]) -> list[ParentChange]:
    """What a published page of a parent source tells its index: each valid record's key, the fields
    its children use (decoded with the identity, as ``extra0``, ``extra1``, ...), instant, delete flag."""
    shape = schema.shape
    by_key: dict[str, bytes] = {}
    for field in fields:
        if field is None or type(field) is Undecodable:
            continue
        key = key_text(shape, field)
        values = {"": shape.identity.value(field, "key0")[1] if len(shape.key_names) == 1 else key}
        for index, path in enumerate(paths):
            found, value = shape.identity.value(field, f"extra{index}")
            if found and value is not None:
                values[path] = value
        by_key[key] = _encode(values)
    deleted = columns.deleted or [False] * len(columns)
    return [ParentChange(key, by_key.get(key), updated_us, flag)
            for key, updated_us, flag in zip(columns.keys, columns.updated_us, deleted, strict=True)]


class ParentStamp:
    """Adds the parent's key to each child record that lacks ``field`` (the record's bytes get one more
    member; nothing else of them changes)."""

    def __init__(self, schema: RecordSchema, field: str, key_paths: Sequence[str]) -> None:
        self.schema = schema
        self.member = _encode(field)
        self.presence = msgspec.json.Decoder(msgspec.defstruct("Presence", [("f", Any, msgspec.UNSET)],
                                                               rename={"f": field}))
        # The key (or updated, delete marker, filter) reads the stamped field: decode identities again.
        self.reread = any(path.split(".")[0] == field for path in key_paths)

    def stamp(self, records: list[Raw], fields: list[Any], parent_key: Any) -> tuple[list[Raw], list[Any]]:
        value = _encode(parent_key)
        stamped = [self._one(record, value) for record in records]
        return stamped, (self.schema.fields_of(stamped) if self.reread else fields)

    def _one(self, record: Raw, value: bytes) -> Raw:
        data = bytes(record).rstrip()
        if not data.startswith(b"{"):
            return record                      # not an object: a dead letter as it is
        try:
            if self.presence.decode(data).f is not msgspec.UNSET:
                return record                  # the upstream's own value wins
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return record
        inner = data[1:-1].strip()
        return Raw(b"{%s%s:%s}" % (inner + b"," if inner else b"", self.member, value))


class ParentGone(UpstreamError):
    """A parent's child listing answered 404 or 410: the parent is gone; its children are skipped."""


class ChildPages:
    """The ``Pages`` a child's paginator walks for one parent: the fetcher's, with that parent's fields in
    each request and its key on each record."""

    def __init__(self, pages: Any, parent: Parent) -> None:
        self.pages = pages
        self.parent = parent

    async def get(self, url: str, params: dict[str, str]) -> Response:
        try:
            return await self.pages.get(url, params, parent=self.parent)
        except UpstreamAnswered as exc:
            if exc.status in GONE:
                raise ParentGone(str(exc)) from None
            raise

    async def handle(self, response: Response) -> PageInfo:
        return await self.pages.handle(response, parent=self.parent)


class ChildWalk:
    """One sync of a child source over its parent's live records."""

    def __init__(self, source: SourceConfig, index: ParentIndex, paginator: Paginator) -> None:
        self.source = source
        self.index = index
        self.paginator = paginator
        self.counts: Counter[str] = Counter()

    async def walk(self, pages: Any, since: str | None) -> int:
        """Walk every live parent (``pages``: the sync's, with ``parent=`` support); the pages fetched."""
        synced_from = await asyncio.to_thread(self.index.synced_from, self.source.name)
        self.counts = Counter()
        fetched, after = 0, ""
        while batch := await asyncio.to_thread(self.index.live, after):
            after = batch[-1].key
            results = await _bounded([partial(self._one, pages, parent,
                                              since if parent.first_seen_us < synced_from else None)
                                      for parent in batch], self.source.max_concurrency)
            fetched += sum(results)
            if fetched > self.source.max_pages_per_sync:
                raise PageFormatError(f"{self.source.name}: the sync needs more than {self.source.max_pages_per_sync} "
                                    "pages over all parents (max_pages_per_sync)")
        logger.info("%s: walked %d parents of %s (%d gone, %d without a field the url needs)", self.source.name,
                    self.counts["parents"], self.source.parent, self.counts["gone"], self.counts["without_fields"])
        return fetched

    async def _one(self, pages: Any, parent: Parent, since: str | None) -> int:
        self.counts["parents"] += 1
        url = render_url(self.source.url, parent.fields)
        if url is None:
            self.counts["without_fields"] += 1
            logger.warning("%s: parent %r lacks a field the url %s needs; skipped", self.source.name, parent.key,
                           self.source.url)
            return 0
        try:
            return await self.paginator.walk(ChildPages(pages, parent), url, since)
        except ParentGone as exc:
            self.counts["gone"] += 1
            logger.info("%s: parent %r is gone (%s); its children skipped", self.source.name, parent.key, exc)
            return 0


async def _bounded(jobs: list[Callable[[], Awaitable[int]]], concurrency: int) -> list[int]:
    """Run at most ``concurrency`` jobs at once; the first failure cancels the rest and is raised."""
    slots = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Awaitable[int]]) -> int:
        async with slots:
            return await job()

    tasks = [asyncio.ensure_future(one(job)) for job in jobs]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


Publish = Callable[[Columns, str], Awaitable[None]]


class Cascade:
    """A reconciled child's deletes of the children of deleted parents."""

    def __init__(self, source: SourceConfig, index: ParentIndex, keys: KeyIndex, publish: Publish) -> None:
        self.source = source
        self.index = index
        self.keys = keys
        self.publish = publish

    async def run(self) -> int:
        """Delete the live children of every parent deleted since the last run; how many were deleted."""
        deleted = 0
        while rows := await asyncio.to_thread(self.index.deleted_since, self.source.name):
            instants = {key: updated_us for key, updated_us, _seq in rows}
            children = await asyncio.to_thread(self.keys.children_of, list(instants))
            doomed = [child for child in children if child.updated_us < instants[child.parent]]
            if doomed:
                await self._delete(doomed, instants)
            deleted += len(doomed)
            await asyncio.to_thread(self.index.cascaded, self.source.name, rows[-1][2])
        if deleted:
            logger.info("%s: deleted %d records of deleted parents", self.source.name, deleted)
        return deleted

    async def _delete(self, doomed: list, instants: dict[str, int]) -> None:
        stamps = [instants[child.parent] for child in doomed]
        texts = [iso_utc(us) for us in stamps]
        hashes = [xxh3_64_hexdigest(f"delete\0{c.key}\0{text}".encode()) for c, text in zip(doomed, texts, strict=True)]
        columns = Columns(keys=[c.key for c in doomed], updated=texts, updated_us=stamps, hashes=hashes,
                          key_hashes=[c.key_hash for c in doomed], records=[NULL_RECORD] * len(doomed),
                          deleted=[True] * len(doomed), dead=[])
        await self.publish(columns, "reconcile")
        now_us = time.time_ns() // 1000
        for parent in sorted({c.parent for c in doomed}):
            mine = [index for index, child in enumerate(doomed) if child.parent == parent]
            await asyncio.to_thread(self.keys.seen, [doomed[i].key for i in mine], [doomed[i].key_hash for i in mine],
                                    [stamps[i] for i in mine], [True] * len(mine), now_us, parent=parent)
