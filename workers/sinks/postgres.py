"""The PostgreSQL sink: a table per source, upserted from COPY, exactly once in effect through a ledger.

Runs in merger processes, on psycopg 3's async connections inside the merger's event loop. ``start``
only reads the DSN; connections are opened by the first attempt (one per delivery in flight, kept for
the next) and every table is created, when ``create_tables`` is on, the first time a source's chunk
comes. One chunk is one transaction: claim the batch in ``conflux_batches`` (already there: it was
applied before, answer a duplicate and apply nothing), COPY the records into a temporary staging table,
then one statement upserts and deletes by (updated_at, seq) (``workers.sinks.pgsql``).

What PostgreSQL refuses in a record (a typed column that does not parse, JSON that jsonb refuses, a
constraint) is found by applying halves of the chunk under savepoints, only after the whole failed:
those records go back as rejected (to the dead-letter queue) with PostgreSQL's message, and the rest
commits. Anything else (a lost connection, a timeout, a server shutting down, a missing table) is an
outage: ``Retry``, with a fresh connection next time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import msgspec
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from conflux import metrics
from conflux.config import PostgresSinkConfig, RetryConfig
from conflux.errors import ConfigError
from conflux.secrets import read_secret
from conflux.workers.sinks.base import NULL_HASH, Chunk, Delivery, Retry, Sink
from conflux.workers.sinks.pgsql import (
    COPY_STAGING,
    STAGING_DDL,
    Counts,
    Staged,
    Table,
    copy_text,
    ledger_ddl,
    ledger_statements,
)

logger = logging.getLogger(__name__)

# A record PostgreSQL refuses: bad data (class 22) or a violated constraint (class 23). Everything else is
# about the server or the connection, not one record, and is retried.
ROW_ERRORS = (psycopg.DataError, psycopg.IntegrityError)
OUTAGES = (psycopg.Error, OSError, TimeoutError)
# How much longer than statement_timeout the client waits for an answer: a server that is paused or cut off
# without a reset never answers at all.
CLIENT_GRACE_S = 2.0
PRUNE_INTERVAL_S = 3600.0
DDL_LOCK = "conflux sink tables"  # one advisory lock: mergers creating the same table at once would collide


class PostgresSink(Sink):
    """One per merger process and configured PostgreSQL sink."""

    kind = "postgres"
    Options = PostgresSinkConfig

    def __init__(self, name: str, options: PostgresSinkConfig, retry: RetryConfig, *,
                 stopping: asyncio.Event | None = None, context: Any = None) -> None:
        super().__init__(name, options, retry, stopping=stopping, context=context)
        self._dsn = ""
        self._idle: list[psycopg.AsyncConnection] = []
        self._tables: dict[str, Table] = {}
        self._ready: set[str] = set()          # sources whose tables this process has made sure of
        self._ledger = ledger_statements(options.schema)
        self._wait_s = options.timeout_s + CLIENT_GRACE_S
        self._pruned_at = 0.0

    async def start(self) -> None:
        await super().start()
        options = self.options
        self._dsn = read_secret(env=options.dsn_env, file=options.dsn_file, literal=options.dsn,
                                what=f"{self._label()}.dsn")
        try:
            conninfo_to_dict(self._dsn)
        except psycopg.ProgrammingError:
            raise ConfigError(f"{self._label()}.dsn: not a PostgreSQL connection string "
                              "(postgresql://user@host:port/db or key=value pairs)") from None
        for source in getattr(self.context, "sources", []):
            if self.name in self.context.sink_names_of(source):
                self.table(source.name)  # a name PostgreSQL would truncate stops the daemon here

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().close()

    def table(self, source: str) -> Table:
        table = self._tables.get(source)
        if table is None:
            table = self._tables[source] = Table(self.options, source)
        return table

    # -- one attempt --------------------------------------------------------------------------------

    async def attempt(self, chunk: Chunk) -> Delivery | Retry:
        staged = copy_text(chunk.keys, chunk.values, NULL_HASH)
        started = time.perf_counter()
        try:
            outcome = await self._attempt(chunk, staged)
        except OUTAGES as exc:
            metrics.sink_request_duration.labels("error", self.name).observe(time.perf_counter() - started)
            self.last_status = 0
            return Retry(type(exc).__name__, f"PostgreSQL unreachable or failing ({describe(exc)})")
        metrics.sink_request_duration.labels("ok", self.name).observe(time.perf_counter() - started)
        self.last_status = 200
        return outcome

    async def _attempt(self, chunk: Chunk, staged: Staged) -> Delivery:
        """On a kept connection if there is one; if that one turns out to be gone (the server restarted,
        an idle timeout, a proxy), once more at once on a new one. The ledger makes the second safe even
        if the first committed."""
        kept = self._checkout()
        if kept is None:
            return await self._on(await self._connect(), chunk, staged)
        try:
            return await self._on(kept, chunk, staged)
        except OUTAGES:
            if not kept.broken:
                raise
            logger.info("%s: a kept connection was lost; trying batch %s on a new one", self._label(),
                        chunk.batch_id)
        return await self._on(await self._connect(), chunk, staged)

    async def _on(self, connection: psycopg.AsyncConnection, chunk: Chunk, staged: Staged) -> Delivery:
        """Apply on ``connection``, kept for the next chunk if all went well, else closed (whatever
        happened, cancellation included: its state is unknown)."""
        try:
            outcome = await self._apply(connection, chunk, staged)
        except BaseException:
            await _discard(connection)
            raise
        self._idle.append(connection)
        return outcome

    async def _apply(self, connection: psycopg.AsyncConnection, chunk: Chunk, staged: Staged) -> Delivery:
        table = self.table(chunk.source)
        if chunk.source not in self._ready:
            await self._create(connection, table)
            self._ready.add(chunk.source)
        await self._prune(connection)
        async with connection.transaction():
            cursor = await self._bounded(connection.execute(self._ledger["claim"], (self.name, chunk.batch_id)))
            if cursor.rowcount == 0:
                return await self._duplicate(connection, chunk)
            await self._bounded(_copy(connection, staged.payload))
            refused = dict(staged.refused)
            counts = await self._apply_range(connection, table, 0, len(chunk), refused)
            if refused:
                await self._bounded(connection.execute(self._ledger["refused"], (
                    msgspec.json.encode({str(index): reason for index, reason in refused.items()}).decode(),
                    self.name, chunk.batch_id)))
        if refused:
            logger.error("%s refused %d records of batch %s for %s: %s", self._label(), len(refused),
                         chunk.batch_id, table.qualified, next(iter(refused.values())))
        applied = counts.upserted + counts.deleted
        return Delivery(refused, applied=applied, stale=len(chunk) - len(refused) - applied, deleted=counts.deleted)

    async def _apply_range(self, connection: psycopg.AsyncConnection, table: Table, lo: int, hi: int,
                           refused: dict[int, str]) -> Counts:
        """Apply records [lo, hi) under a savepoint; if PostgreSQL refuses a record among them, apply each
        half the same way, down to the single records it refuses (only after a failure: one statement in
        the usual case, about 2 log2(n) more per refused record)."""
        try:
            async with connection.transaction():
                cursor = await self._bounded(connection.execute(table.apply, {"lo": lo, "hi": hi}))
                row = await cursor.fetchone()
            return Counts(*row)
        except ROW_ERRORS as exc:
            if hi - lo == 1:
                refused[lo] = f"PostgreSQL refused the record: {describe(exc)}"
                return Counts()
        middle = (lo + hi) // 2
        first = await self._apply_range(connection, table, lo, middle, refused)
        return first.plus(await self._apply_range(connection, table, middle, hi, refused))

    async def _duplicate(self, connection: psycopg.AsyncConnection, chunk: Chunk) -> Delivery:
        """The batch was applied before (its answer was lost): apply nothing, and repeat what the first
        delivery refused, since those records may not have reached the dead-letter queue."""
        cursor = await self._bounded(connection.execute(self._ledger["previous"], (self.name, chunk.batch_id)))
        row = await cursor.fetchone()
        rejected = {int(index): reason for index, reason in (row[0] or {}).items()} if row else {}
        logger.info("%s: batch %s was applied before; nothing applied again", self._label(), chunk.batch_id)
        return Delivery(rejected, stale=len(chunk) - len(rejected), duplicate=True)

    # -- connections and tables ---------------------------------------------------------------------

    def _checkout(self) -> psycopg.AsyncConnection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        return None

    async def _connect(self) -> psycopg.AsyncConnection:
        timeout_s = self.options.timeout_s
        # libpq's connect_timeout is whole seconds, at least 2.
        connection = await self._bounded(psycopg.AsyncConnection.connect(
            self._dsn, autocommit=True, connect_timeout=max(2, math.ceil(timeout_s)),
            application_name=f"conflux-{self.name}"[:63]))
        try:
            await self._bounded(connection.execute(
                "SELECT set_config('statement_timeout', %s, false), set_config('TimeZone', 'UTC', false)",
                (f"{math.ceil(timeout_s * 1000)}ms",)))
            await self._bounded(connection.execute(STAGING_DDL))
        except BaseException:
            await _discard(connection)
            raise
        return connection

    async def _create(self, connection: psycopg.AsyncConnection, table: Table) -> None:
        """Create what is missing: schema, ledger, table, typed columns, indexes, tombstones."""
        if not self.options.create_tables:
            return  # the user's own tables: a missing one fails the chunk as an outage, naming it
        async with connection.transaction():
            await self._bounded(connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (DDL_LOCK,)))
            cursor = await self._bounded(connection.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (table.schema,)))
            if await cursor.fetchone() is None:  # CREATE SCHEMA IF NOT EXISTS needs the right even if it exists
                await self._bounded(connection.execute(sql.SQL("CREATE SCHEMA {}").format(
                    sql.Identifier(table.schema))))
            cursor = await self._bounded(connection.execute(*table.present()))
            present = {name for (name,) in await cursor.fetchall()}
            for statement in [*ledger_ddl(table.schema), *table.ddl(present)]:
                await self._bounded(connection.execute(statement))
        logger.info("%s: table %s is ready", self._label(), table.qualified)

    async def _prune(self, connection: psycopg.AsyncConnection) -> None:
        """Forget ledger rows past ledger_retention_s, once an hour per process."""
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_INTERVAL_S:
            return
        await self._bounded(connection.execute(self._ledger["prune"], (self.name, self.options.ledger_retention_s)))
        self._pruned_at = now

    async def _bounded(self, awaitable):
        return await asyncio.wait_for(awaitable, self._wait_s)


async def _copy(connection: psycopg.AsyncConnection, payload: bytes) -> None:
    async with connection.cursor() as cursor, cursor.copy(COPY_STAGING) as copy:
        await copy.write(payload)


async def _discard(connection: psycopg.AsyncConnection) -> None:
    """Close a connection in an unknown state (mid-transaction, timed out, cancelled); never raises."""
    try:
        await asyncio.wait_for(connection.close(), CLIENT_GRACE_S)
    except Exception:  # closing a broken connection can fail in any way; it is gone either way
        logger.debug("closing a PostgreSQL connection failed", exc_info=True)


def describe(exc: BaseException) -> str:
    """PostgreSQL's own message (with its SQLSTATE and detail) or the client's, on one line."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if primary:
        detail = f" ({diag.message_detail})" if diag.message_detail else ""
        return f"{diag.sqlstate}: {primary}{detail}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
