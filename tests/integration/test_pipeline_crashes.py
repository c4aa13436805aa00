"""Real processes killed with real signals: a worker of each role killed with SIGKILL mid-sync is
restarted and the sink still converges to the upstream; SIGTERM drains and exits 0."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from tests.fixtures.daemon import both_sources, wait_converged
from tests.support import wait_until

BOTH = {"customers": "customers", "products": "products"}


def _sink_total(analytics_url: str) -> int:
    stats = requests.get(f"{analytics_url}/stats", timeout=10).json()["sources"]
    return sum(value["count"] for value in stats.values())


def _slow_world(upstream_factory, analytics, daemon_factory, *, records: int = 40_000, **daemon_options):
    """A sync that takes a few seconds (upstream latency, small pages), so there is a 'mid-sync'."""
    upstream = upstream_factory(customers=records // 2, products=records // 2, latency_ms=15)
    daemon = daemon_factory(sources=both_sources(upstream.url, page_size=200, max_concurrency=2),
                            sink_url=analytics.url, **daemon_options)
    return upstream, daemon


@pytest.mark.slow
@pytest.mark.parametrize("role", ["fetcher", "consumer", "merger", "control"])
def test_kill_9_of_a_worker_mid_sync_loses_nothing(role, upstream_factory, analytics, daemon_factory):
    upstream, daemon = _slow_world(upstream_factory, analytics, daemon_factory)
    daemon.wait_running()
    wait_until(lambda: _sink_total(analytics.url) > 2_000, timeout_s=60, message="the sync to be under way")
    victim = daemon.worker_pid(role)
    assert _sink_total(analytics.url) < 40_000, "the sync finished before the kill; make it slower"
    os.kill(victim, signal.SIGKILL)

    def replaced():
        worker = next(w for w in daemon.workers(role) if w["index"] == 0)
        return worker if worker["pid"] not in (None, victim) and worker["state"] == "running" else None

    worker = wait_until(replaced, timeout_s=30, message=f"{role}-0 to be restarted")
    assert worker["restarts"] >= 1 and "SIGKILL" in worker["last_exit"]
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=120)
    assert daemon.stop() == 0, daemon.log()[-3000:]


@pytest.mark.slow
def test_sigterm_mid_sync_drains_and_exits_0_then_a_restart_completes(upstream_factory, analytics, daemon_factory):
    upstream, daemon = _slow_world(upstream_factory, analytics, daemon_factory, daemon={"shutdown_timeout_s": 20.0})
    wait_until(lambda: _sink_total(analytics.url) > 2_000, timeout_s=60, message="the sync to be under way")
    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout_s=30) == 0, daemon.log()[-3000:]
    assert time.monotonic() - started < 20
    log = daemon.log()
    assert "draining" in log and "supervisor stopped (exit 0)" in log
    stopped_at = _sink_total(analytics.url)
    assert stopped_at < 40_000
    restarted = daemon.restart()
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=120)
    assert restarted.stop() == 0


def test_second_sigterm_stops_at_once(upstream_factory, analytics_factory, daemon_factory):
    upstream = upstream_factory(customers=1000, products=1000)
    sink = analytics_factory(outage_s="0:600")  # the sink is down: a drain could never finish
    daemon = daemon_factory(sources=both_sources(upstream.url),
                            sink_url=sink.url, daemon={"shutdown_timeout_s": 60.0})
    daemon.wait_running()
    wait_until(lambda: "breaker is now open" in daemon.log() or "retried" in daemon.log(), timeout_s=60,
               message="deliveries to be failing")
    daemon.send_signal(signal.SIGTERM)
    wait_until(lambda: "draining" in daemon.log(), timeout_s=10, message="the drain to start")
    daemon.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code = daemon.wait_exit(timeout_s=20)
    assert time.monotonic() - started < 10
    assert code == 0
