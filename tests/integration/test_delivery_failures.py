"""A merger that cannot write its dead letters (a full disk, a locked or broken store) retries with backoff,
and past [retry] max_attempts exits 1 so that the supervisor restarts it and the consumers re-read what it
held. Either way no partition stalls silently: once the store works again, everything is committed and the
dead-letter queue holds exactly what the sink refused.

The failure is real: a trigger in the embedded log's own SQLite file makes every dead-letter insert fail
the way a full disk does, and dropping it is the operator freeing space.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from contextlib import closing

import requests

from tests.fixtures.analytics import predicted_rejections
from tests.fixtures.daemon import both_sources
from tests.support import REPO, wait_until

REJECT_RATE = 0.05
KEYS = {"customers": "id", "products": "sku"}
FULL_DISK = ("CREATE TRIGGER IF NOT EXISTS test_disk_full BEFORE INSERT ON dead_letters "
             "BEGIN SELECT RAISE(ABORT, 'database or disk is full (injected)'); END")


def sql(daemon, statement: str) -> list[tuple]:
    with closing(sqlite3.connect(daemon.settings["log"]["path"], timeout=30)) as conn:
        return conn.execute(statement).fetchall()


def dead_letters(daemon) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "conflux", "dlq", "list", "-c", str(daemon.config_path), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def metric(daemon, name: str) -> float:
    text = requests.get(f"{daemon.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def all_committed(daemon) -> bool:
    partitions = daemon.status()["partitions"]
    return bool(partitions) and all(p["lag"] == 0 for p in partitions)


def start_with_a_full_disk(upstream_factory, analytics_factory, daemon_factory, **sections):
    """A daemon whose dead-letter writes fail from the start; the sink refuses 5 % of the records."""
    upstream = upstream_factory(customers=1000, products=500)
    sink = analytics_factory(reject_rate=REJECT_RATE)
    # Hold deliveries back until the store is broken, so that every dead letter meets the failure.
    requests.post(f"{sink.url}/admin/outage", json={"seconds": 600}, timeout=10).raise_for_status()
    daemon = daemon_factory(sources=both_sources(upstream.url), sink_url=sink.url, **sections)
    wait_until(lambda: sql(daemon, "SELECT name FROM sqlite_master WHERE name = 'dead_letters'"), timeout_s=30,
               message="the embedded log's schema")
    sql(daemon, FULL_DISK)
    requests.post(f"{sink.url}/admin/outage", json={"seconds": 0}, timeout=10).raise_for_status()
    return upstream, sink, daemon


def stalled(daemon) -> bool:
    """Every partition's lag reported since the log was written, and some offsets held back."""
    partitions = daemon.status()["partitions"]
    return all(p["end"] for p in partitions) and any(p["lag"] for p in partitions)


def assert_recovers(upstream, daemon) -> None:
    refused = predicted_rejections(upstream.url, KEYS, REJECT_RATE)
    wait_until(lambda: stalled(daemon), timeout_s=30, message="lag reports that show the held-back offsets")
    assert dead_letters(daemon) == []
    sql(daemon, "DROP TRIGGER test_disk_full")
    wait_until(lambda: all_committed(daemon) and len(dead_letters(daemon)) == len(refused), timeout_s=90,
               message="every offset committed and every refused record dead-lettered")
    assert {(e["source"], e["key"]) for e in dead_letters(daemon)} == refused


def test_a_failing_dead_letter_write_is_retried_until_the_store_works_again(
        upstream_factory, analytics_factory, daemon_factory):
    upstream, _sink, daemon = start_with_a_full_disk(
        upstream_factory, analytics_factory, daemon_factory,
        retry={"base_s": 0.05, "max_s": 0.5, "max_attempts": 1000})
    wait_until(lambda: metric(daemon, "conflux_dlq_write_failures_total") >= 3, timeout_s=60,
               message="dead-letter writes failing and retried")
    assert "database or disk is full (injected)" in daemon.log() and "attempt 2 of 1000" in daemon.log()
    assert_recovers(upstream, daemon)
    assert [w["restarts"] for w in daemon.workers("merger")] == [0, 0]
    assert daemon.stop() == 0


def test_a_dead_letter_write_that_keeps_failing_crashes_the_merger_visibly_and_nothing_is_lost(
        upstream_factory, analytics_factory, daemon_factory):
    upstream, _sink, daemon = start_with_a_full_disk(
        upstream_factory, analytics_factory, daemon_factory,
        retry={"base_s": 0.05, "max_s": 0.2, "max_attempts": 2},
        workers={"max_restarts": 100, "restart_window_s": 60.0, "restart_backoff_max_s": 1.0})
    crashed = wait_until(lambda: [w for w in daemon.workers("merger") if w["restarts"] >= 1], timeout_s=60,
                         message="a merger restarted after exhausting its dead-letter attempts")
    assert crashed[0]["last_exit"] == "exited with 1"
    assert "the merger exits so that its records are re-read" in daemon.log()
    assert metric(daemon, "conflux_worker_restarts_total") >= 1
    assert_recovers(upstream, daemon)
    assert daemon.stop() == 0
