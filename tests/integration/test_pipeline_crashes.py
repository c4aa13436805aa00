"""Real processes killed with real signals: a worker of each role killed with SIGKILL mid-sync is
restarted and the sink still converges to the upstream; SIGTERM drains and exits 0.

Every check reads state (exit codes, /status, /metrics, the sink, the log's committed offsets); wall
clocks only bound the polls."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
import requests

from conflux.config import load_config
from conflux.ipc.codec import decode_batch_head
from conflux.log import open_log
from tests.fixtures.daemon import both_sources, wait_converged
from tests.support import wait_until

BOTH = {"customers": "customers", "products": "products"}


def _sink_total(analytics_url: str) -> int:
    stats = requests.get(f"{analytics_url}/stats", timeout=10).json()["sources"]
    return sum(value["count"] for value in stats.values())


def _committed_records(config_path: Path) -> int:
    """Records in the log's messages below each partition's committed offset (read after the daemon exited)."""
    backend = open_log(load_config(config_path))
    total = 0
    for tp, committed in backend.committed_offsets().items():
        consumer = backend.consumer(0, [tp])
        consumer.start(lambda _: None, lambda _: None)
        consumer.seek(tp, 0)
        while messages := [m for m in consumer.poll(500, 0.0) if m.offset < committed]:
            total += sum(decode_batch_head(m.payload).count for m in messages)
        consumer.close()
    return total


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


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
    assert worker["restarts"] == 1 and worker["last_exit"] == "killed by SIGKILL", worker
    assert daemon.metric("conflux_worker_restarts_total", role=role) == 1, daemon.workers(role)
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=120)
    assert daemon.stop() == 0, daemon.log()[-3000:]


@pytest.mark.slow
def test_sigterm_mid_sync_drains_and_exits_0_then_a_restart_completes(upstream_factory, analytics, daemon_factory):
    upstream, daemon = _slow_world(upstream_factory, analytics, daemon_factory, daemon={"shutdown_timeout_s": 20.0})
    wait_until(lambda: _sink_total(analytics.url) > 2_000, timeout_s=60, message="the sync to be under way")
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout_s=60) == 0, daemon.log()[-3000:]
    stopped_at = _sink_total(analytics.url)
    assert stopped_at < 40_000
    # A drain (not a kill at its deadline) leaves nothing acked uncommitted and nothing committed
    # undelivered: the sink holds exactly the records of the committed messages.
    assert _committed_records(daemon.config_path) == stopped_at
    restarted = daemon.restart()
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=120)
    assert restarted.stop() == 0


def test_second_sigterm_stops_at_once(upstream_factory, analytics_factory, daemon_factory):
    upstream = upstream_factory(customers=1000, products=1000)
    sink = analytics_factory(outage_s="0:600")  # the sink is down: a drain could never finish
    daemon = daemon_factory(sources=both_sources(upstream.url),
                            sink_url=sink.url, daemon={"shutdown_timeout_s": 600.0})
    daemon.wait_running()
    wait_until(lambda: daemon.metric("conflux_sink_retries_total"), timeout_s=60, message="deliveries to be failing")
    fetcher = psutil.Process(daemon.worker_pid("fetcher"))
    daemon.send_signal(signal.SIGTERM)
    wait_until(lambda: _gone(fetcher), timeout_s=30, message="the drain's first phase to stop the fetcher")
    daemon.send_signal(signal.SIGTERM)
    # The drain alone would wait 600 s for the sink; the poll's timeout is far shorter.
    assert daemon.wait_exit(timeout_s=60) == 0


def test_workers_of_a_killed_supervisor_exit_even_while_the_sink_is_down(upstream_factory, analytics_factory,
                                                                         daemon_factory):
    """No worker outlives its supervisor: a merger draining towards a sink that is down used to spin in its
    flush loop forever once nobody was left to kill it at the drain deadline."""
    upstream = upstream_factory(customers=1000, products=1000)
    sink = analytics_factory(outage_s="0:600")
    daemon = daemon_factory(sources=both_sources(upstream.url), sink_url=sink.url,
                            daemon={"shutdown_timeout_s": 600.0})
    daemon.wait_running()
    wait_until(lambda: daemon.metric("conflux_sink_retries_total"), timeout_s=60, message="deliveries to be failing")
    workers = [psutil.Process(worker["pid"]) for worker in daemon.workers()]
    daemon.send_signal(signal.SIGKILL)
    wait_until(lambda: all(_gone(worker) for worker in workers), timeout_s=30,
               message="every worker to exit after its supervisor died")
