"""PostgresSink (workers/sinks/postgres.py) against a real PostgreSQL server: upserts by (updated_at, seq),
hard and soft deletes with tombstones, the ledger that applies a chunk once, records PostgreSQL refuses
going to the dead-letter queue while the rest commits, and outages retried until the server is back.

Each test has a schema of its own (``pg_schema``); outage tests that stop a server use one of their own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import threading
import time

import msgspec
import psycopg
import pytest
from prometheus_client import REGISTRY
from xxhash import xxh3_64_hexdigest

from conflux.config import Config, LogConfig, PostgresColumn, PostgresSinkConfig, RetryConfig
from conflux.ipc.messages import Position
from conflux.log import open_log
from conflux.workers.delivery import Dispatcher, Route
from conflux.workers.merge import FlushUnit
from conflux.workers.sinks import sink_class
from conflux.workers.sinks.base import NULL_HASH, Chunk, Delivery, Retry
from conflux.workers.sinks.postgres import PostgresSink
from tests.fixtures.postgres import query

RETRY = RetryConfig(base_s=0.02, max_s=0.2, breaker_failures=2, breaker_cooldown_s=0.2)
SOURCE = "customers"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
BASE_S = 1_700_000_000


def version(key: str, record: dict | bytes | None = None, *, at_s: float, offset: int,
            deleted: bool = False) -> tuple[str, tuple]:
    """(key, the merger's value tuple) for one version: a record's JSON (bytes kept as they are)."""
    if record is None:
        record = {"id": key}
    data = record if isinstance(record, bytes) else json.dumps(record).encode()
    updated_us = round((BASE_S + at_s) * 1_000_000)
    text = (EPOCH + dt.timedelta(microseconds=updated_us)).isoformat().replace("+00:00", "Z")
    return key, (updated_us, xxh3_64_hexdigest(data), msgspec.Raw(data), text,
                 Position("conflux.customers", 0, offset), deleted)


def chunk_of(*versions: tuple[str, tuple], source: str = SOURCE) -> Chunk:
    return Chunk(source, [key for key, _ in versions], [value for _, value in versions])


def instant(at_s: float) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=round((BASE_S + at_s) * 1_000_000))


def make_sink(dsn: str, schema: str, *, name: str = "warehouse", **options) -> PostgresSink:
    return PostgresSink(name, PostgresSinkConfig(dsn=dsn, schema=schema, timeout_s=options.pop("timeout_s", 5.0),
                                                 **options), RETRY)


async def delivered(sink: PostgresSink, *chunks: Chunk) -> list[Delivery]:
    """Start the sink, deliver each chunk in turn (retrying like the merger), close it."""
    await sink.start()
    try:
        return [await sink.deliver(chunk) for chunk in chunks]
    finally:
        await sink.close()


async def attempted(sink: PostgresSink, chunk: Chunk) -> Delivery | Retry:
    """Start the sink, make one attempt (no retries), close it."""
    await sink.start()
    try:
        return await sink.attempt(chunk)
    finally:
        await sink.close()


def deliver(dsn: str, schema: str, *chunks: Chunk, **options) -> list[Delivery]:
    return asyncio.run(delivered(make_sink(dsn, schema, **options), *chunks))


def rows(dsn: str, schema: str, table: str = SOURCE, columns: str = "key, updated_at, seq, hash, data") -> dict:
    return {row[0]: row[1:] for row in query(dsn, f'SELECT {columns} FROM "{schema}"."{table}" ORDER BY key')}


def retries(reason: str, sink: str) -> float:
    return REGISTRY.get_sample_value("conflux_sink_retries_total", {"reason": reason, "sink": sink}) or 0.0


# -- the table and upserts ------------------------------------------------------------------------------


def test_entry_point_and_upsert_create_the_documented_layout(postgres_dsn, pg_schema):
    assert sink_class("postgres") is PostgresSink
    record = {"id": "a", "name": "Ada", "tags": ["x"], "nested": {"b": 1, "a": 2.5}}
    [outcome] = deliver(postgres_dsn, pg_schema, chunk_of(version("a", record, at_s=0.000123, offset=7),
                                                          version("b", at_s=1, offset=7)))
    assert outcome == Delivery({}, applied=2, stale=0)
    layout = query(postgres_dsn, "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                                 "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                   (pg_schema, SOURCE))
    assert layout == [("key", "text", "NO"), ("updated_at", "timestamp with time zone", "NO"),
                      ("seq", "bigint", "NO"), ("hash", "text", "NO"), ("data", "jsonb", "YES"),
                      ("synced_at", "timestamp with time zone", "NO")]
    table = rows(postgres_dsn, pg_schema)
    assert table["a"] == (instant(0.000123), 7, xxh3_64_hexdigest(json.dumps(record).encode()), record)
    assert set(table) == {"a", "b"}
    tables = {name for (name,) in query(postgres_dsn, "SELECT table_name FROM information_schema.tables "
                                                      "WHERE table_schema = %s", (pg_schema,))}
    assert tables == {SOURCE, f"{SOURCE}_deleted", "conflux_batches"}
    indexes = {name for (name,) in query(postgres_dsn, "SELECT indexname FROM pg_indexes WHERE schemaname = %s",
                                         (pg_schema,))}
    assert f"{SOURCE}_updated_at_idx" in indexes and "conflux_batches_applied_at_idx" in indexes


def test_a_newer_version_replaces_and_an_older_one_is_stale(postgres_dsn, pg_schema):
    first, newer, older, tie_lower_seq, tie_higher_seq = deliver(
        postgres_dsn, pg_schema,
        chunk_of(version("a", {"v": 1}, at_s=10, offset=5), version("b", {"v": 1}, at_s=10, offset=5)),
        chunk_of(version("a", {"v": 2}, at_s=20, offset=6)),
        chunk_of(version("a", {"v": 0}, at_s=15, offset=9), version("b", {"v": 3}, at_s=11, offset=9)),
        chunk_of(version("b", {"v": 4}, at_s=11, offset=8)),       # same instant as b's row, earlier in the log
        chunk_of(version("b", {"v": 5}, at_s=11, offset=10)))      # same instant, later in the log: wins
    assert (first.applied, newer.applied) == (2, 1)
    assert (older.applied, older.stale) == (1, 1)  # a at 15 < 20 is stale; b at 11 > 10 applies
    assert (tie_lower_seq.applied, tie_lower_seq.stale) == (0, 1)
    assert (tie_higher_seq.applied, tie_higher_seq.stale) == (1, 0)
    table = rows(postgres_dsn, pg_schema)
    assert table["a"][0] == instant(20) and table["a"][3] == {"v": 2}
    assert table["b"][:2] == (instant(11), 10) and table["b"][3] == {"v": 5}


# -- deletes --------------------------------------------------------------------------------------------


def test_hard_delete_removes_the_row_and_keeps_a_tombstone(postgres_dsn, pg_schema):
    _, deleted = deliver(postgres_dsn, pg_schema,
                         chunk_of(version("a", at_s=1, offset=1), version("b", at_s=1, offset=1)),
                         chunk_of(version("a", at_s=2, offset=2, deleted=True),
                                  version("never-seen", at_s=2, offset=2, deleted=True),
                                  version("b", at_s=0.5, offset=2, deleted=True)))  # older than b's row: stale
    assert (deleted.applied, deleted.deleted, deleted.stale) == (2, 2, 1)
    assert set(rows(postgres_dsn, pg_schema)) == {"b"}
    tombstones = rows(postgres_dsn, pg_schema, f"{SOURCE}_deleted", "key, updated_at, seq")
    assert tombstones == {"a": (instant(2), 2), "never-seen": (instant(2), 2)}


def test_soft_delete_nulls_data_and_sets_deleted_at(postgres_dsn, pg_schema):
    _, deleted = deliver(postgres_dsn, pg_schema,
                         chunk_of(version("a", {"v": 1}, at_s=1, offset=1), version("b", at_s=1, offset=1)),
                         chunk_of(version("a", at_s=2, offset=2, deleted=True),
                                  version("never-seen", at_s=2, offset=2, deleted=True)),
                         delete_mode="soft")
    assert (deleted.applied, deleted.deleted, deleted.stale) == (2, 2, 0)
    table = rows(postgres_dsn, pg_schema, columns="key, updated_at, hash, data, deleted_at")
    assert table["a"] == (instant(2), NULL_HASH, None, instant(2))
    assert table["never-seen"] == (instant(2), NULL_HASH, None, instant(2))
    assert table["b"][2:] == ({"id": "b"}, None)
    tables = {name for (name,) in query(postgres_dsn, "SELECT table_name FROM information_schema.tables "
                                                      "WHERE table_schema = %s", (pg_schema,))}
    assert f"{SOURCE}_deleted" not in tables


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_an_older_upsert_after_a_delete_never_resurrects_the_key(postgres_dsn, pg_schema, mode):
    _, _, late = deliver(postgres_dsn, pg_schema,
                         chunk_of(version("a", {"v": 1}, at_s=1, offset=1)),
                         chunk_of(version("a", at_s=10, offset=3, deleted=True)),
                         chunk_of(version("a", {"v": 2}, at_s=5, offset=2)),
                         delete_mode=mode)
    assert (late.applied, late.stale) == (0, 1)
    live = query(postgres_dsn, f'SELECT key FROM "{pg_schema}"."{SOURCE}" WHERE data IS NOT NULL')
    assert live == []


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_a_newer_upsert_after_a_delete_recreates_the_key(postgres_dsn, pg_schema, mode):
    _, _, restored = deliver(postgres_dsn, pg_schema,
                             chunk_of(version("a", {"v": 1}, at_s=1, offset=1)),
                             chunk_of(version("a", at_s=10, offset=3, deleted=True)),
                             chunk_of(version("a", {"v": 3}, at_s=12, offset=4)),
                             delete_mode=mode)
    assert (restored.applied, restored.stale) == (1, 0)
    columns = "key, updated_at, data" + (", deleted_at" if mode == "soft" else "")
    table = rows(postgres_dsn, pg_schema, columns=columns)
    assert table == {"a": (instant(12), {"v": 3}, *((None,) if mode == "soft" else ()))}
    if mode == "hard":
        assert rows(postgres_dsn, pg_schema, f"{SOURCE}_deleted", "key") == {}


# -- the ledger -----------------------------------------------------------------------------------------


def test_the_same_chunk_twice_is_applied_once(postgres_dsn, pg_schema):
    chunk = chunk_of(version("a", {"v": 1}, at_s=1, offset=1), version("b", at_s=1, offset=1, deleted=True))
    again = chunk_of(version("a", {"v": 1}, at_s=1, offset=1), version("b", at_s=1, offset=1, deleted=True))
    assert again.batch_id == chunk.batch_id  # a retry, or the same records re-read after a crash
    first, second = deliver(postgres_dsn, pg_schema, chunk, again)
    assert (first.applied, first.deleted, first.duplicate) == (2, 1, False)
    assert (second.applied, second.stale, second.duplicate, second.rejected) == (0, 2, True, {})
    ledger = query(postgres_dsn, f'SELECT sink, batch_id FROM "{pg_schema}".conflux_batches')
    assert ledger == [("warehouse", chunk.batch_id)]
    synced = query(postgres_dsn, f'SELECT synced_at FROM "{pg_schema}"."{SOURCE}"')
    assert len(synced) == 1  # the replay did not touch the row (synced_at would move)
    # Another sink of the same database keeps its own ledger rows: it applies the chunk itself.
    [other] = deliver(postgres_dsn, pg_schema, chunk, name="mirror", table="{source}_mirror")
    assert (other.applied, other.duplicate) == (2, False)


# -- records PostgreSQL refuses ----------------------------------------------------------------------------


AMOUNT = {SOURCE: {"amount": PostgresColumn(field="order.amount", type="numeric(12,2)", index=True),
                   "city": PostgresColumn(field="address.city"), "extra": PostgresColumn(field="x", type="jsonb")}}


def test_typed_columns_are_extracted_in_the_same_statement(postgres_dsn, pg_schema):
    record = {"order": {"amount": "12.5"}, "address": {"city": "Oslo"}, "x": {"y": [1]}}
    deliver(postgres_dsn, pg_schema, chunk_of(version("a", record, at_s=1, offset=1),
                                              version("b", {"order": {}}, at_s=1, offset=1)), columns=AMOUNT)
    table = rows(postgres_dsn, pg_schema, columns="key, amount::text, city, extra")
    assert table == {"a": ("12.50", "Oslo", {"y": [1]}), "b": (None, None, None)}
    indexes = {name for (name,) in query(postgres_dsn, "SELECT indexname FROM pg_indexes WHERE schemaname = %s",
                                         (pg_schema,))}
    assert f"{SOURCE}_amount_idx" in indexes and f"{SOURCE}_city_idx" not in indexes


def test_a_restart_does_not_queue_behind_readers_and_a_new_typed_column_is_added(postgres_dsn, pg_schema):
    """A reader holds the table (an open transaction). A sink starting again with the same typed columns
    must not ALTER the table (its exclusive lock would wait behind the reader, and every query behind it);
    a typed column added to the config later is added, and filled by the next versions."""
    deliver(postgres_dsn, pg_schema, chunk_of(version("a", {"order": {"amount": 1}, "tier": "gold"}, at_s=1,
                                                      offset=1)), columns=AMOUNT)
    reading, done = threading.Event(), threading.Event()

    def reader() -> None:
        with psycopg.connect(postgres_dsn) as connection:  # a transaction: its lock lasts until the end
            connection.execute(f'SELECT count(*) FROM "{pg_schema}"."{SOURCE}"')
            reading.set()
            done.wait(30)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert reading.wait(10)
        again = asyncio.run(attempted(make_sink(postgres_dsn, pg_schema, columns=AMOUNT, timeout_s=1.0),
                                      chunk_of(version("a", {"order": {"amount": 2}}, at_s=2, offset=2))))
        assert isinstance(again, Delivery) and again.applied == 1, again
    finally:
        done.set()
        thread.join(10)
    tier = {SOURCE: {**AMOUNT[SOURCE], "tier": PostgresColumn(field="tier")}}
    deliver(postgres_dsn, pg_schema, chunk_of(version("a", {"order": {"amount": 3}, "tier": "gold"}, at_s=3,
                                                      offset=3)), columns=tier)
    assert rows(postgres_dsn, pg_schema, columns="key, amount::text, tier") == {"a": ("3.00", "gold")}


def test_records_postgresql_refuses_are_rejected_and_the_rest_commits(postgres_dsn, pg_schema):
    good = [version(f"k{i}", {"order": {"amount": i}}, at_s=1, offset=1) for i in range(10)]
    bad_amount = version("bad-amount", {"order": {"amount": "twelve"}}, at_s=1, offset=1)
    bad_json = version("bad-json", b'{"text": "a\\u0000b"}', at_s=1, offset=1)  # jsonb has no U+0000
    nul_key = version("nul\x00key", at_s=1, offset=1)
    chunk = chunk_of(*good[:3], bad_amount, *good[3:7], bad_json, nul_key, *good[7:])
    first, replay = deliver(postgres_dsn, pg_schema, chunk, chunk, columns=AMOUNT)
    assert set(first.rejected) == {3, 8, 9}
    assert "22P02" in first.rejected[3] and 'invalid input syntax for type numeric: "twelve"' in first.rejected[3]
    assert "PostgreSQL refused the record" in first.rejected[8] and "\\u0000" in first.rejected[8]
    assert "NUL" in first.rejected[9]
    assert (first.applied, first.stale) == (10, 0)
    assert set(rows(postgres_dsn, pg_schema)) == {f"k{i}" for i in range(10)}
    # A replay (the first answer lost) applies nothing and repeats the refusals, so none is lost.
    assert replay.duplicate and replay.rejected == first.rejected


def test_refused_records_reach_the_dead_letter_queue(postgres_dsn, pg_schema, tmp_path):
    config = Config(log=LogConfig(path=str(tmp_path / "log.db")))
    dead_letters = open_log(config).dead_letters()
    sink = make_sink(postgres_dsn, pg_schema, columns=AMOUNT)
    keys, values = zip(version("ok", {"order": {"amount": 1}}, at_s=1, offset=4),
                       version("bad", {"order": {"amount": "n/a"}}, at_s=1, offset=4), strict=True)

    async def scenario() -> bool:
        await sink.start()
        try:
            dispatcher = Dispatcher({SOURCE: Route([sink])}, dead_letters, RETRY, asyncio.sleep)
            return await dispatcher.deliver(FlushUnit(SOURCE, list(keys), list(values), []))
        finally:
            await sink.close()

    try:
        assert asyncio.run(scenario())
        [entry] = dead_letters.list()
    finally:
        dead_letters.close()
    assert (entry.key, entry.stage, entry.source) == ("bad", "sink", SOURCE)
    assert entry.reason.startswith("sink 'warehouse': PostgreSQL refused the record: 22P02")
    assert json.loads(bytes(entry.record)) == {"order": {"amount": "n/a"}}
    assert set(rows(postgres_dsn, pg_schema)) == {"ok"}


def test_copy_text_escaping_round_trips_keys_and_records(postgres_dsn, pg_schema):
    awkward = "tab\there\nnew\\line\r"
    record = b'{\n\t"s": "back\\\\slash \\t tab \\n nl \\"q\\" \xc3\xa9 \\u00e9",\r\n "n": 1}'
    deliver(postgres_dsn, pg_schema, chunk_of(version(awkward, record, at_s=1, offset=1)))
    table = rows(postgres_dsn, pg_schema)
    assert list(table) == [awkward]
    assert table[awkward][3] == json.loads(record)


# -- outages ----------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_server_is_a_retry_never_a_rejection(pg_schema):
    sink = make_sink(f"postgresql://conflux@127.0.0.1:{_closed_port()}/conflux", pg_schema, timeout_s=2.0)
    outcome = asyncio.run(attempted(sink, chunk_of(version("a", at_s=1, offset=1))))
    assert isinstance(outcome, Retry) and outcome.reason == "OperationalError"
    assert "PostgreSQL unreachable or failing" in outcome.message and "refused" in outcome.message
    assert sink.last_status == 0


def test_a_missing_table_without_create_tables_is_an_outage_naming_it(postgres_dsn, pg_schema):
    sink = make_sink(postgres_dsn, pg_schema, create_tables=False)
    outcome = asyncio.run(attempted(sink, chunk_of(version("a", at_s=1, offset=1))))
    assert isinstance(outcome, Retry) and outcome.reason == "UndefinedTable"
    assert f'relation "{pg_schema}.conflux_batches" does not exist' in outcome.message


def test_a_kept_connection_that_was_terminated_is_replaced_without_a_retry(postgres_dsn, pg_schema):
    """A server restart, an idle timeout or a proxy ends a connection kept between chunks: the next chunk
    goes through on a new connection within the same attempt, without backoff or a breaker failure."""
    name = f"w{pg_schema[-6:]}"  # the backend's application_name, to terminate only this test's
    before = sum(retries(reason, name) for reason in ("OperationalError", "AdminShutdown", "InterfaceError"))

    async def scenario() -> list[Delivery]:
        sink = make_sink(postgres_dsn, pg_schema, name=name)
        await sink.start()
        try:
            first = await sink.deliver(chunk_of(version("a", at_s=1, offset=1)))
            killed = await asyncio.to_thread(query, postgres_dsn, "SELECT pg_terminate_backend(pid) FROM "
                                             "pg_stat_activity WHERE application_name = %s", (f"conflux-{name}",))
            assert killed == [(True,)]
            second = await sink.deliver(chunk_of(version("b", at_s=1, offset=2)))
            return [first, second]
        finally:
            await sink.close()

    first, second = asyncio.run(scenario())
    assert first.applied == 1 and second.applied == 1
    assert sum(retries(reason, name) for reason in ("OperationalError", "AdminShutdown", "InterfaceError")) == before
    assert set(rows(postgres_dsn, pg_schema)) == {"a", "b"}


def test_a_statement_that_waits_too_long_times_out_and_is_retried(postgres_dsn, pg_schema):
    """A row locked by another session: statement_timeout (timeout_s) ends the wait, the attempt is a Retry,
    and once the lock goes the chunk is applied."""
    deliver(postgres_dsn, pg_schema, chunk_of(version("a", {"v": 1}, at_s=1, offset=1)))
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with psycopg.connect(postgres_dsn) as connection:
            connection.execute(f'SELECT * FROM "{pg_schema}"."{SOURCE}" WHERE key = %s FOR UPDATE', ("a",))
            locked.set()
            release.wait(30)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    sink = make_sink(postgres_dsn, pg_schema, timeout_s=1.0)

    async def scenario() -> tuple[Delivery | Retry, Delivery]:
        await sink.start()
        try:
            assert await asyncio.to_thread(locked.wait, 10)
            chunk = chunk_of(version("a", {"v": 2}, at_s=2, offset=2))
            waited = await sink.attempt(chunk)
            release.set()
            return waited, await sink.deliver(chunk)
        finally:
            release.set()
            await sink.close()

    try:
        waited, delivered_ = asyncio.run(scenario())
    finally:
        release.set()
        holder.join(10)
    assert isinstance(waited, Retry) and waited.reason == "QueryCanceled"
    assert "statement timeout" in waited.message
    assert delivered_.applied == 1
    assert rows(postgres_dsn, pg_schema)["a"][3] == {"v": 2}


@pytest.mark.slow
def test_a_stopped_server_opens_the_breaker_and_delivery_resumes_when_it_is_back(postgres_server_factory):
    server = postgres_server_factory()
    name = "outage"
    states: list[str] = []

    async def scenario() -> Delivery:
        sink = make_sink(server.dsn, "public", name=name, timeout_s=2.0)
        sink.breaker.on_change_hooks.append(states.append)
        await sink.start()
        try:
            assert (await sink.deliver(chunk_of(version("a", at_s=1, offset=1)))).applied == 1
            await asyncio.to_thread(server.stop)
            task = asyncio.create_task(sink.deliver(chunk_of(version("b", at_s=1, offset=2))))
            deadline = time.monotonic() + 30
            while "open" not in states:
                assert not task.done(), f"delivered while the server was down: {task.result()}"
                assert time.monotonic() < deadline, "the breaker did not open within 30 s"
                await asyncio.sleep(0.05)
            await asyncio.to_thread(server.start)
            return await asyncio.wait_for(task, 60)
        finally:
            await sink.close()

    outcome = asyncio.run(scenario())
    assert outcome.applied == 1 and states[0] == "open" and states[-1] == "closed"
    assert set(rows(server.dsn, "public")) == {"a", "b"}
