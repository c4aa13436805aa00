"""The embedded log: a partitioned, durable log in one SQLite file (WAL mode) on the local disk.

Every process opens its own connection after fork. Messages live in ``messages`` keyed by
(channel, offset) where a channel is one (topic, partition); consumer offsets, source checkpoints
and dead letters live in the same file, so a backup of the file is a backup of the daemon.

Appends are group-committed: a producer's writer thread takes every request queued since its last
transaction and commits them together, so a fetcher publishing many pages pays one commit for all.
A commit is acknowledged only after SQLite returned from COMMIT, so anything acknowledged survives
a crash of any Conflux process. What survives power loss depends on ``synchronous``: "full" fsyncs
every commit; "normal" (the default) fsyncs only at WAL checkpoints, so the newest commits may be
lost, always as a suffix (the WAL's checksums stop recovery at the first missing frame). A durable
producer (``producer(durable=True)``, the webhook path) always commits with "full".

sqlite3 errors become ``LogError`` naming what failed and SQLite's own reason (``database or disk is
full``), so callers that retry on a log error do so instead of crashing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import msgspec

from conflux.config import Config
from conflux.errors import LogError
from conflux.ipc.codec import encode_dead_letter
from conflux.ipc.messages import DeadLetter, PartitionLag, Position
from conflux.log.base import (
    AssignCallback,
    Checkpoint,
    LogMessage,
    OutgoingMessage,
    TopicPartition,
    decode_dead_letter,
)

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS topics (name TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS channels (
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL, partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL DEFAULT 0, UNIQUE (topic, partition));
CREATE TABLE IF NOT EXISTS messages (
    channel INTEGER NOT NULL, offset INTEGER NOT NULL, appended_at REAL NOT NULL, payload BLOB NOT NULL,
    PRIMARY KEY (channel, offset));
CREATE TABLE IF NOT EXISTS offsets (
    grp TEXT NOT NULL, channel INTEGER NOT NULL, next_offset INTEGER NOT NULL, committed_at REAL NOT NULL,
    PRIMARY KEY (grp, channel));
CREATE TABLE IF NOT EXISTS checkpoints (source TEXT PRIMARY KEY, body BLOB NOT NULL, saved_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY, source TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    attempts INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS probe (body BLOB);
"""
# The supervisor's ping writes this much in a transaction it rolls back: a log that cannot take it is full.
PROBE_BYTES = 64 << 10
# Less free space than this on the log's filesystem counts as full: the WAL needs room to grow.
MIN_FREE_BYTES = 1 << 20
# The integrity check at start: its row checks stop after this long, and the start goes on with a warning.
INTEGRITY_CHECK_BUDGET_S = 10.0
# The ping waits at most this long for a busy writer; one still busy then is a working log.
PING_LOCK_WAIT_S = 0.25
# Files this process has checked: a reload reopens the log without reading every page again.
_checked_paths: set[str] = set()

_checkpoint_encoder = msgspec.json.Encoder()
_checkpoint_decoder = msgspec.json.Decoder(tuple[str, str, int, float, float])


def connect(path: str, *, synchronous: str = "normal", max_bytes: int = 0) -> sqlite3.Connection:
    """A connection for this thread, in WAL mode, waiting (not failing) when another writer holds the lock.
    ``max_bytes`` caps the file (0: no cap); past it writes fail as on a full disk."""
    try:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=60.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        conn.execute("PRAGMA busy_timeout=60000")
        conn.executescript(SCHEMA)
        cap(conn, max_bytes)
    except (sqlite3.Error, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _reason(exc)
        raise LogError(f"cannot open embedded log {path}: {reason}") from exc
    return conn


def cap(conn: sqlite3.Connection, max_bytes: int) -> None:
    """Past ``max_bytes`` (0: no cap) this connection's writes fail with SQLITE_FULL, as on a full disk.
    A cap below the file's size holds it at its size: nothing is lost, it just cannot grow."""
    if max_bytes:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={max(1, max_bytes // page_size)}")


def _reason(exc: BaseException) -> str:
    """SQLite's message and code name: 'database or disk is full (SQLITE_FULL)'."""
    name = getattr(exc, "sqlite_errorname", "")
    return f"{exc} ({name})" if name else str(exc)


def translated(doing: str):
    """Turn the sqlite3 errors of a method into LogError('embedded log <doing> failed: <SQLite's reason>')."""
    def decorate(method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except sqlite3.Error as exc:
                raise LogError(f"embedded log {doing} failed: {_reason(exc)}") from exc
        return wrapper
    return decorate


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT. SQLite rolls back by itself after SQLITE_FULL or an I/O error: a
    ROLLBACK then would fail with 'cannot rollback' and hide the real error, so only what is open is."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def integrity_problem(conn: sqlite3.Connection, budget_s: float) -> str | None:
    """SQLite's own report if ``PRAGMA quick_check`` finds the file damaged, else None. Row checks still
    running after ``budget_s`` are stopped (a large file on a slow disk must not stall the start)."""
    # The b-tree walk (every page read once, ~1 s per GB from the page cache) is one VDBE opcode that
    # nothing interrupts; the row-by-row checks after it are many, and stop at the budget.
    deadline = time.monotonic() + budget_s
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    try:
        rows = conn.execute("PRAGMA quick_check(10)").fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupted" not in str(exc):
            return _reason(exc)
        logger.warning("integrity check of the embedded log: pages sound, row checks stopped after %.0f s", budget_s)
        return None
    except sqlite3.DatabaseError as exc:  # damaged where the check itself has to read
        return _reason(exc)
    finally:
        conn.set_progress_handler(None, 0)
    found = [row[0] for row in rows]
    return None if found == ["ok"] else "; ".join(found).replace("\n", "; ")[:500]


class EmbeddedLog:
    """The embedded backend's handle. Holds only the settings until a method opens something."""

    name = "embedded"

    def __init__(self, config: Config) -> None:
        self.path = config.log.path
        self.synchronous = config.log.synchronous
        self.max_bytes = config.log.max_bytes
        self.group = config.log.group
        self.retention_s = config.log.retention_s
        self._ping_problem: str | None = None

    def _connect(self, synchronous: str | None = None) -> sqlite3.Connection:
        return connect(self.path, synchronous=synchronous or self.synchronous, max_bytes=self.max_bytes)

    @translated("prepare")
    def prepare(self, topics: dict[str, int]) -> dict[str, int]:
        """Supervisor, at each generation: check the file once per process, then create missing topics."""
        conn = self._connect()
        try:
            self._check_integrity(conn)
            with write_transaction(conn):
                for topic, wanted in topics.items():
                    self._create_topic(conn, topic, wanted)
            return dict(conn.execute("SELECT name, partitions FROM topics").fetchall())
        finally:
            conn.close()

    def _check_integrity(self, conn: sqlite3.Connection) -> None:
        if self.path in _checked_paths or self.path == ":memory:":
            return
        problem = integrity_problem(conn, INTEGRITY_CHECK_BUDGET_S)
        if problem is not None:
            raise LogError(f"the embedded log {self.path} is damaged (PRAGMA quick_check: {problem}); restore it "
                           "from a backup, or move it aside to start empty (docs/OPERATIONS.md)")
        _checked_paths.add(self.path)

    @staticmethod
    def _create_topic(conn: sqlite3.Connection, topic: str, wanted: int) -> None:
        conn.execute("INSERT OR IGNORE INTO topics (name, partitions) VALUES (?, ?)", (topic, wanted))
        actual = conn.execute("SELECT partitions FROM topics WHERE name = ?", (topic,)).fetchone()[0]
        if actual < wanted:
            logger.warning("topic %s has %d partitions, fewer than the %d configured; using it as it is",
                           topic, actual, wanted)
        conn.executemany("INSERT OR IGNORE INTO channels (topic, partition) VALUES (?, ?)",
                         [(topic, p) for p in range(actual)])

    def producer(self, *, durable: bool = False) -> EmbeddedProducer:
        """``durable``: every publish is fsynced before it returns, whatever ``synchronous`` says (webhooks:
        their sender was told 202 and will not send again, so power loss must not take them)."""
        return EmbeddedProducer(self, synchronous="full" if durable else self.synchronous)

    def consumer(self, member: int, assignment: list[TopicPartition]) -> EmbeddedConsumer:
        return EmbeddedConsumer(self, assignment)

    def checkpoints(self) -> SqliteCheckpointStore:
        return SqliteCheckpointStore(self._connect())

    def dead_letters(self) -> SqliteDeadLetterStore:
        return SqliteDeadLetterStore(self._connect())

    @translated("read of committed offsets")
    def committed_offsets(self) -> dict[TopicPartition, int]:
        conn = self._connect()
        try:
            rows = conn.execute(
                "SELECT c.topic, c.partition, o.next_offset FROM offsets o JOIN channels c ON c.id = o.channel "
                "WHERE o.grp = ?", (self.group,)).fetchall()
            return {(topic, partition): offset for topic, partition, offset in rows}
        finally:
            conn.close()

    @translated("read of end offsets")
    def end_offsets(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        conn = self._connect()
        try:
            wanted = set(topics)
            rows = conn.execute("SELECT topic, partition, next_offset FROM channels").fetchall()
            return {(topic, partition): end for topic, partition, end in rows if topic in wanted}
        finally:
            conn.close()

    def ping(self, timeout_s: float) -> bool:
        """Supervisor, every few seconds (/ready): can the log take a write? A log that can be read but
        not written (disk full, the max_bytes cap, a read-only file) is not ready."""
        problem = self._write_problem(timeout_s)
        if problem != self._ping_problem:
            if problem:
                logger.error("the embedded log cannot be written: %s", problem)
            else:
                logger.info("the embedded log can be written again")
            self._ping_problem = problem
        return problem is None

    def _write_problem(self, timeout_s: float) -> str | None:
        """Why a write would fail now, or None. The probe is rolled back (no disk write): the cap shows in
        it, a full disk in the free space."""
        try:
            free_bytes = _free_bytes(self.path)
            if free_bytes < MIN_FREE_BYTES:
                return f"{free_bytes} bytes free on the disk holding {self.path}"
            conn = sqlite3.connect(self.path, timeout=min(timeout_s, PING_LOCK_WAIT_S), isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            return exc.strerror if isinstance(exc, OSError) and exc.strerror else _reason(exc)
        try:
            cap(conn, self.max_bytes)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO probe (body) VALUES (zeroblob(?))", (PROBE_BYTES,))
            return None
        except sqlite3.Error as exc:
            busy = getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            return None if busy else _reason(exc)  # busy: a writer is at work, so the log is writable
        finally:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            conn.close()

    @translated("trim")
    def trim(self) -> int:
        """Delete messages the group has committed past once they are older than retention_s."""
        conn = self._connect()
        try:
            cutoff = time.time() - self.retention_s
            cursor = conn.execute(
                "DELETE FROM messages WHERE appended_at < ? AND offset < COALESCE("
                "(SELECT next_offset FROM offsets o WHERE o.grp = ? AND o.channel = messages.channel), 0)",
                (cutoff, self.group))
            return cursor.rowcount
        finally:
            conn.close()


def _free_bytes(path: str) -> int:
    if path == ":memory:":
        return MIN_FREE_BYTES
    stats = os.statvfs(Path(path).parent)
    return stats.f_bavail * stats.f_frsize


# ---------------------------------------------------------------------------------------------
# Producer


class _AppendRequest:
    __slots__ = ("future", "loop", "messages")

    def __init__(self, messages: list[OutgoingMessage], loop: asyncio.AbstractEventLoop) -> None:
        self.messages = messages
        self.loop = loop
        self.future: asyncio.Future[list[Position]] = loop.create_future()


class EmbeddedProducer:
    """Publishes from an asyncio loop through one writer thread that group-commits to SQLite."""

    def __init__(self, log: EmbeddedLog, *, synchronous: str) -> None:
        self._log = log
        self._requests: queue.SimpleQueue[_AppendRequest | None] = queue.SimpleQueue()
        self._writer = _Writer(log, synchronous)
        self._thread: threading.Thread | None = None
        self._partitions: dict[str, int] = {}

    @translated("read of topics")
    def partitions_for(self, topic: str) -> int:
        if not self._partitions:
            conn = self._log._connect()
            try:
                self._partitions = dict(conn.execute("SELECT name, partitions FROM topics").fetchall())
            finally:
                conn.close()
        try:
            return self._partitions[topic]
        except KeyError:
            raise LogError(f"topic {topic!r} does not exist in the embedded log") from None

    async def publish(self, messages: list[OutgoingMessage]) -> list[Position]:
        if not messages:
            return []
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="log-writer", daemon=True)
            self._thread.start()
        request = _AppendRequest(messages, asyncio.get_running_loop())
        self._requests.put(request)
        return await request.future

    async def close(self) -> None:
        if self._thread is not None:
            self._requests.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    def _write_loop(self) -> None:
        writer = self._writer
        try:
            while True:
                batch = [self._requests.get()]
                while not self._requests.empty() and len(batch) < 256:
                    batch.append(self._requests.get_nowait())
                requests = [request for request in batch if request is not None]
                if requests:
                    writer.commit(requests)
                if None in batch:
                    return
        finally:
            writer.close()


class _Writer:
    """The writer thread's connection, opened on first use and again after a failed open, so a log that
    cannot be opened fails each publish with the reason instead of leaving it waiting forever."""

    def __init__(self, log: EmbeddedLog, synchronous: str) -> None:
        self._log = log
        self._synchronous = synchronous
        self.conn: sqlite3.Connection | None = None  # the writer thread's; opened on its first commit
        self._channels: dict[TopicPartition, int] = {}

    def commit(self, requests: list[_AppendRequest]) -> None:
        try:
            if self.conn is None:
                self._open()
            results = _append(self.conn, self._channels, [request.messages for request in requests])
        except Exception as exc:  # whatever it is, every waiting publish hears of it; none waits forever
            error = exc if isinstance(exc, LogError) else LogError(f"embedded log append failed: {_reason(exc)}")
            for request in requests:
                request.loop.call_soon_threadsafe(_fail, request.future, error)
            return
        for request, positions in zip(requests, results, strict=True):
            request.loop.call_soon_threadsafe(_resolve, request.future, positions)

    def _open(self) -> None:
        conn = self._log._connect(self._synchronous)
        try:
            rows = conn.execute("SELECT id, topic, partition FROM channels").fetchall()
        except sqlite3.Error:
            conn.close()
            raise
        self._channels = {(topic, partition): channel for channel, topic, partition in rows}
        self.conn = conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _append(conn: sqlite3.Connection, channels: dict[TopicPartition, int],
            groups: list[list[OutgoingMessage]]) -> list[list[Position]]:
    """One transaction for all groups; offsets are taken inside it, so concurrent writers interleave safely."""
    now = time.time()
    with write_transaction(conn):
        next_offsets: dict[int, int] = {}
        rows, results = [], []
        for messages in groups:
            positions = []
            for message in messages:
                channel = channels.get((message.topic, message.partition))
                if channel is None:
                    raise LogError(f"no partition {message.partition} in topic {message.topic!r}")
                if channel not in next_offsets:
                    next_offsets[channel] = conn.execute(
                        "SELECT next_offset FROM channels WHERE id = ?", (channel,)).fetchone()[0]
                offset = next_offsets[channel]
                next_offsets[channel] = offset + 1
                rows.append((channel, offset, now, message.payload))
                positions.append(Position(message.topic, message.partition, offset))
            results.append(positions)
        conn.executemany("INSERT INTO messages (channel, offset, appended_at, payload) VALUES (?, ?, ?, ?)", rows)
        conn.executemany("UPDATE channels SET next_offset = ? WHERE id = ?",
                         [(offset, channel) for channel, offset in next_offsets.items()])
    return results


def _resolve(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


# ---------------------------------------------------------------------------------------------
# Consumer


class EmbeddedConsumer:
    """Reads the partitions the supervisor assigned to this consumer process, from one connection."""

    IDLE_WAIT_MAX_S = 0.02

    def __init__(self, log: EmbeddedLog, assignment: list[TopicPartition]) -> None:
        self._log = log
        self._assignment = list(assignment)
        self._conn: sqlite3.Connection | None = None
        self._channels: dict[TopicPartition, int] = {}
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._next_start = 0
        self._idle_version: int | None = None  # data_version when a read last found nothing new

    @translated("consumer start")
    def start(self, on_assign: AssignCallback, on_revoke: AssignCallback) -> None:
        self._conn = self._log._connect()
        rows = self._conn.execute("SELECT id, topic, partition FROM channels").fetchall()
        known = {(topic, partition): channel for channel, topic, partition in rows}
        missing = [tp for tp in self._assignment if tp not in known]
        if missing:
            raise LogError(f"assigned partitions do not exist: {missing}")
        self._channels = {tp: known[tp] for tp in self._assignment}
        self._positions = self.committed(self._assignment)
        on_assign(list(self._assignment))

    @translated("read")
    def poll(self, max_messages: int, timeout_s: float) -> list[LogMessage]:
        deadline = time.monotonic() + timeout_s
        wait_s = 0.001
        while True:
            messages = self._read(max_messages)
            if messages or time.monotonic() >= deadline:
                return messages
            time.sleep(min(wait_s, max(0.0, deadline - time.monotonic())))
            wait_s = min(wait_s * 2, self.IDLE_WAIT_MAX_S)

    def _read(self, max_messages: int) -> list[LogMessage]:
        """Round-robin over unpaused partitions so one busy partition cannot starve the others.
        ``PRAGMA data_version`` changes only when another connection commits, so an idle poll
        costs one pragma instead of a query per partition."""
        active = [tp for tp in self._assignment if tp not in self._paused]
        if not active:
            return []
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._idle_version:
            return []
        out: list[LogMessage] = []
        per_partition = max(1, max_messages // len(active))
        start = self._next_start % len(active)
        self._next_start += 1
        for tp in active[start:] + active[:start]:
            rows = self._conn.execute(
                "SELECT offset, payload FROM messages WHERE channel = ? AND offset >= ? ORDER BY offset LIMIT ?",
                (self._channels[tp], self._positions[tp], per_partition)).fetchall()
            if rows:
                self._positions[tp] = rows[-1][0] + 1
                out.extend(LogMessage(tp[0], tp[1], offset, payload) for offset, payload in rows)
            if len(out) >= max_messages:
                break
        self._idle_version = None if out else version
        return out

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._positions[partition] = offset
        self._idle_version = None

    @translated("commit")
    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        now = time.time()
        rows = [(self._log.group, self._channels[tp], offset, now) for tp, offset in offsets.items()]
        # Commits only go up, even if a stale caller asks for less.
        self._conn.executemany(
            "INSERT INTO offsets (grp, channel, next_offset, committed_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (grp, channel) DO UPDATE SET next_offset = max(next_offset, excluded.next_offset), "
            "committed_at = excluded.committed_at", rows)

    @translated("read of committed offsets")
    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        out = {}
        for tp in partitions:
            row = self._conn.execute("SELECT next_offset FROM offsets WHERE grp = ? AND channel = ?",
                                     (self._log.group, self._channels[tp])).fetchone()
            out[tp] = row[0] if row else self._first_offset(tp)
        return out

    def _first_offset(self, tp: TopicPartition) -> int:
        row = self._conn.execute("SELECT min(offset) FROM messages WHERE channel = ?", (self._channels[tp],)).fetchone()
        return row[0] if row and row[0] is not None else 0

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        self._paused.update(partitions)

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        self._paused.difference_update(partitions)
        self._idle_version = None

    @translated("read of lags")
    def lags(self) -> list[PartitionLag]:
        committed = self.committed(self._assignment)
        rows = self._conn.execute("SELECT topic, partition, next_offset FROM channels")
        ends = {(topic, partition): end for topic, partition, end in rows}
        return [PartitionLag(tp[0], tp[1], committed[tp], ends.get(tp, 0)) for tp in self._assignment]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---------------------------------------------------------------------------------------------
# Checkpoints and dead letters


class _Locked:
    """Stores are shared by a process's threads (the event loop's executor); one at a time per connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _locked(method):
    """One caller at a time on the store's connection; sqlite3 errors become LogError."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.Error as exc:
                raise LogError(f"embedded log {self.what} {method.__name__} failed: {_reason(exc)}") from exc
    return wrapper


class SqliteCheckpointStore(_Locked):
    what = "checkpoint store"

    @_locked
    def load(self, source: str) -> Checkpoint | None:
        row = self._conn.execute("SELECT body FROM checkpoints WHERE source = ?", (source,)).fetchone()
        return Checkpoint(*_checkpoint_decoder.decode(row[0])) if row else None

    @_locked
    def load_all(self) -> dict[str, Checkpoint]:
        rows = self._conn.execute("SELECT source, body FROM checkpoints").fetchall()
        return {source: Checkpoint(*_checkpoint_decoder.decode(body)) for source, body in rows}

    @_locked
    def save(self, checkpoint: Checkpoint) -> None:
        self._conn.execute(
            "INSERT INTO checkpoints (source, body, saved_at) VALUES (?, ?, ?) "
            "ON CONFLICT (source) DO UPDATE SET body = excluded.body, saved_at = excluded.saved_at",
            (checkpoint.source, _checkpoint_encoder.encode(tuple(checkpoint)), checkpoint.saved_at))


class SqliteDeadLetterStore(_Locked):
    what = "dead-letter store"

    @_locked
    def add(self, entries: list[DeadLetter]) -> None:
        """A repeat of an entry keeps its first_seen, takes the new last_seen and counts one more attempt."""
        if not entries:
            return
        self._conn.executemany(
            "INSERT INTO dead_letters (id, source, first_seen, last_seen, attempts, body) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen, attempts = attempts + excluded.attempts, "
            "body = excluded.body",
            [(e.id, e.source, e.first_seen, e.last_seen, e.attempts, encode_dead_letter(e)) for e in entries])

    @_locked
    def list(self, source: str | None = None) -> list[DeadLetter]:
        sql = "SELECT first_seen, last_seen, attempts, body FROM dead_letters"
        rows = (self._conn.execute(sql + " WHERE source = ? ORDER BY first_seen, id", (source,)) if source
                else self._conn.execute(sql + " ORDER BY first_seen, id"))
        return [_entry(*row) for row in rows]

    @_locked
    def get(self, entry_id: str) -> DeadLetter | None:
        row = self._conn.execute("SELECT first_seen, last_seen, attempts, body FROM dead_letters WHERE id = ?",
                                 (entry_id,)).fetchone()
        return _entry(*row) if row else None

    @_locked
    def remove(self, entry_ids: Iterable[str], *, unless_seen_after: float | None = None) -> int:
        ids = list(entry_ids)
        if unless_seen_after is None:
            cursor = self._conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in ids])
        else:
            cursor = self._conn.executemany("DELETE FROM dead_letters WHERE id = ? AND last_seen <= ?",
                                            [(i, unless_seen_after) for i in ids])
        return cursor.rowcount

    @_locked
    def purge(self, source: str | None = None) -> int:
        if source:
            return self._conn.execute("DELETE FROM dead_letters WHERE source = ?", (source,)).rowcount
        return self._conn.execute("DELETE FROM dead_letters").rowcount


def _entry(first_seen: float, last_seen: float, attempts: int, body: bytes) -> DeadLetter:
    entry = decode_dead_letter(body)
    return msgspec.structs.replace(entry, first_seen=first_seen, last_seen=last_seen, attempts=attempts)
