"""What only the embedded log has: its file. A full file (the ``max_bytes`` cap fails writes exactly as a
full disk does, with SQLITE_FULL), a damaged file, and the fsync that webhooks need; in-process and
through the real daemon."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import subprocess

import msgspec
import pytest
import requests

from conflux.config import Config, load_config
from conflux.errors import ExitCode, LogError
from conflux.ipc.messages import DeadLetter
from conflux.log import embedded
from conflux.log.base import OutgoingMessage
from conflux.log.embedded import EmbeddedLog, integrity_problem
from tests.fixtures.daemon import config_settings, source, wait_converged, write_config
from tests.support import REPO, conflux_argv, wait_until

MIB = 1 << 20
SYNCHRONOUS = {1: "normal", 2: "full"}  # what PRAGMA synchronous answers


def embedded_config(path, **log) -> Config:
    return msgspec.convert({"log": {"path": str(path), "partitions": 2, **log},
                            "sources": [{"name": "customers", "url": "http://127.0.0.1:1/api/customers"}]}, Config)


def prepared(path, **log) -> EmbeddedLog:
    backend = EmbeddedLog(embedded_config(path, **log))
    backend.prepare({"customers": 2})
    return backend


async def publish_until_failure(backend: EmbeddedLog, payload_bytes: int, limit: int) -> LogError | None:
    producer = backend.producer()
    try:
        for i in range(limit):
            try:
                await producer.publish([OutgoingMessage("customers", i % 2, b"k", bytes(payload_bytes))])
            except LogError as exc:
                return exc
    finally:
        await producer.close()
    return None


async def writer_synchronous(backend: EmbeddedLog, *, durable: bool) -> str:
    """The synchronous level of the connection a producer's commits run on."""
    producer = backend.producer(durable=durable)
    try:
        await producer.publish([OutgoingMessage("customers", 0, b"k", b"v")])
        # The writer thread is idle between requests: ask its connection what it runs with.
        return SYNCHRONOUS[producer._writer.conn.execute("PRAGMA synchronous").fetchone()[0]]
    finally:
        await producer.close()


def test_a_full_log_fails_writes_with_the_real_error_and_is_not_ready(tmp_path, caplog):
    """Before: the explicit ROLLBACK after SQLite's own rollback raised 'cannot rollback - no transaction
    is active', hiding SQLITE_FULL; and the ping, a read, said the log was fine."""
    backend = prepared(tmp_path / "log.db", max_bytes=MIB)
    assert backend.ping(1.0)
    error = asyncio.run(publish_until_failure(backend, 64 << 10, limit=100))
    assert error is not None, "1 MiB took 100 messages of 64 KiB"
    assert "database or disk is full (SQLITE_FULL)" in str(error) and "rollback" not in str(error)
    with caplog.at_level(logging.ERROR, logger="conflux.log.embedded"):
        assert backend.ping(1.0) is False
    assert "cannot be written: database or disk is full" in caplog.text

    store = backend.dead_letters()
    try:
        big = DeadLetter(id="x", source="customers", reason="r", stage="fetch",
                         record=msgspec.Raw(b'"' + b"x" * MIB + b'"'))
        with pytest.raises(LogError, match="dead-letter store add failed: database or disk is full"):
            store.add([big])  # a LogError, which callers handle, not a bare sqlite3 error
    finally:
        store.close()

    uncapped = EmbeddedLog(embedded_config(tmp_path / "log.db"))  # the operator raised the cap
    assert uncapped.ping(1.0)
    assert asyncio.run(publish_until_failure(uncapped, 64 << 10, limit=3)) is None


def test_a_durable_producer_commits_with_fsync_whatever_the_default(tmp_path):
    """The webhook path asks for a durable producer: with synchronous = "normal" (the default) its
    commits still run with FULL, so a webhook answered 202 survives power loss."""
    backend = prepared(tmp_path / "log.db")
    assert backend.synchronous == "normal"
    assert asyncio.run(writer_synchronous(backend, durable=True)) == "full"
    assert asyncio.run(writer_synchronous(backend, durable=False)) == "normal"
    assert asyncio.run(writer_synchronous(prepared(tmp_path / "full.db", synchronous="full"), durable=False)) == "full"


# -- a damaged file --------------------------------------------------------------------------------------


def fill_and_damage(backend: EmbeddedLog) -> None:
    """Messages enough for a tree of pages, then garbage over the messages table's root page: a page
    that starting the daemon never reads, so only an integrity check can notice."""
    assert asyncio.run(publish_until_failure(backend, 3000, limit=300)) is None
    conn = sqlite3.connect(backend.path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into the main file
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(backend.path, "r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(b"\xff" * page_size)


def test_a_damaged_log_is_refused_by_prepare(tmp_path):
    backend = prepared(tmp_path / "log.db")
    fill_and_damage(backend)
    embedded._checked_paths.discard(backend.path)  # as in a new process
    with pytest.raises(LogError, match=r"log\.db is damaged \(PRAGMA quick_check: .*btreeInitPage"):
        EmbeddedLog(embedded_config(tmp_path / "log.db")).prepare({"customers": 2})


def test_the_integrity_check_stops_at_its_budget(tmp_path, caplog):
    backend = prepared(tmp_path / "log.db")
    assert asyncio.run(publish_until_failure(backend, 64 << 10, limit=500)) is None  # 32 MiB: a check of ~0.1 s
    conn = sqlite3.connect(backend.path)
    try:
        assert integrity_problem(conn, budget_s=10.0) is None
        with caplog.at_level(logging.WARNING, logger="conflux.log.embedded"):
            assert integrity_problem(conn, budget_s=0.0) is None  # not finished: not a verdict
        assert "integrity check of the embedded log: pages sound, row checks stopped after 0 s" in caplog.text
    finally:
        conn.close()


def test_conflux_run_exits_4_on_a_damaged_log(tmp_path):
    """Before: it started, reported ready, and its consumers crash-looped on the damaged pages."""
    settings = config_settings(tmp_path, sources=[source("customers", "http://127.0.0.1:1")],
                               sink_url="http://127.0.0.1:1")
    config_path = write_config(tmp_path, settings)
    backend = EmbeddedLog(load_config(config_path))
    backend.prepare({"customers": 4})
    fill_and_damage(backend)
    proc = subprocess.run(conflux_argv("run", "-c", str(config_path)), capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == ExitCode.BOOT_ERROR, output
    assert "is damaged (PRAGMA quick_check:" in output and "restore it from a backup" in output


# -- through the daemon ------------------------------------------------------------------------------------


def ready_body(url: str, status: int) -> dict | None:
    response = requests.get(f"{url}/ready", timeout=10)
    return response.json() if response.status_code == status else None


def test_a_full_log_makes_the_daemon_not_ready_and_loses_nothing(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=20_000, products=0)
    daemon = daemon_factory(sources=[source("customers", upstream.url)], sink_url=analytics.url,
                            log={"max_bytes": MIB})
    not_ready = wait_until(lambda: (body := ready_body(daemon.url, 503)) and body["log"] is False and body,
                           timeout_s=60, message="/ready 503 because the log cannot be written")
    assert "the log is not reachable" in not_ready["reasons"]
    report = wait_until(lambda: daemon.sync_ok("customers") is None
                        and "full" in (r := daemon.status()["sources"]["customers"]).get("last_sync_result", "")
                        and r, timeout_s=30, message="the sync failing on the full log")
    assert "database or disk is full (SQLITE_FULL)" in report["last_sync_result"]
    assert "rollback" not in report["last_sync_result"]

    assert daemon.stop(signal.SIGTERM) == 0  # drains: what the sink took is committed
    write_config(daemon.directory, {**daemon.settings, "log": {**daemon.settings["log"], "max_bytes": 0}})
    again = daemon.restart()
    wait_until(lambda: ready_body(again.url, 200), timeout_s=30, message="/ready 200 with room in the log")
    wait_converged(upstream.url, analytics.url, {"customers": "customers"}, timeout_s=120)
