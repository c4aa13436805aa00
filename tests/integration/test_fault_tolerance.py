"""Fault tolerance on the embedded log: sink rejections and outages, upstream storms, failing sources,
crash loops, hung workers and config reloads, each against real processes and real servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest
import requests

from tests.fixtures.analytics import predicted_rejections
from tests.fixtures.daemon import both_sources, source, wait_converged, write_config
from tests.support import REPO, wait_until

BOTH = {"customers": "customers", "products": "products"}


def _cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conflux", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout_s)


def _dlq(daemon) -> list[dict]:
    out = _cli("dlq", "list", "-c", str(daemon.config_path), "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _all_committed(daemon) -> bool:
    partitions = daemon.status()["partitions"]
    return bool(partitions) and all(p["lag"] == 0 for p in partitions)


def test_sink_rejections_go_to_the_dlq_and_replay_delivers_them(upstream_factory, analytics_factory, daemon_factory):
    upstream = upstream_factory(customers=2000, products=1000)
    sink = analytics_factory(reject_rate=0.05)
    daemon = daemon_factory(sources=both_sources(upstream.url),
                            sink_url=sink.url)
    refused = predicted_rejections(upstream.url, {"customers": "id", "products": "sku"}, 0.05)
    entries = wait_until(lambda: _all_committed(daemon) and len(e := _dlq(daemon)) >= len(refused) and e,
                         timeout_s=60, message="every refused record in the DLQ and every offset committed")
    got = {(e["source"], e["key"]) for e in entries}
    assert got == refused, f"{len(got)} dead letters, {len(refused)} predicted; extra {sorted(got - refused)[:5]}, " \
                           f"missing {sorted(refused - got)[:5]}"
    assert all(e["stage"] == "sink" and "reject" in e["reason"] and e["origin"].count("/") == 2 for e in entries)
    assert all(e["attempts"] >= 1 and e["first_seen"] <= e["last_seen"] for e in entries)
    requests.post(f"{sink.url}/admin/faults", json={"reject_rate": 0.0}, timeout=10).raise_for_status()
    out = _cli("dlq", "replay", "-c", str(daemon.config_path), "--timeout", "60")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["delivered"] == len(entries) and report["pending"] == 0
    assert _dlq(daemon) == []
    wait_converged(upstream.url, sink.url, BOTH, timeout_s=30)


def test_a_whole_batch_4xx_is_dead_lettered_not_retried_forever(upstream_factory, analytics_factory, daemon_factory):
    upstream = upstream_factory(customers=300, products=200)
    sink = analytics_factory(max_body_bytes=2000)  # every batch is too large: 413
    daemon = daemon_factory(sources=both_sources(upstream.url),
                            sink_url=sink.url)
    entries = wait_until(lambda: _all_committed(daemon) and len(e := _dlq(daemon)) >= 500 and e, timeout_s=60,
                         message="every record dead-lettered and committed")
    assert {e["stage"] for e in entries} == {"sink"} and all("413" in e["reason"] for e in entries)
    purge = _cli("dlq", "purge", "-c", str(daemon.config_path))
    assert purge.returncode == 2 and "--yes" in purge.stderr
    assert _cli("dlq", "purge", "-c", str(daemon.config_path), "--yes").returncode == 0
    assert _dlq(daemon) == []


@pytest.mark.slow
def test_sink_outage_backpressure_is_bounded_and_the_backlog_drains(upstream_factory, analytics_factory,
                                                                     daemon_factory):
    upstream = upstream_factory(customers=60_000, products=60_000)
    sink = analytics_factory()
    requests.post(f"{sink.url}/admin/outage", json={"seconds": 12}, timeout=10).raise_for_status()
    daemon = daemon_factory(sources=both_sources(upstream.url, page_size=1000),
                            sink_url=sink.url, sink={"max_pending_records": 5000})
    # While the sink is down the fetchers finish writing the whole sync to the log (disk), and
    # the rest of the tree holds a bounded amount in memory.
    wait_until(lambda: all(daemon.sync_ok(s) for s in BOTH), timeout_s=60, message="the full sync in the log")
    assert wait_until(lambda: daemon.metric("conflux_circuit_state", target="sink") == 2, timeout_s=30,
                      message="the sink breaker to open")
    tree = psutil.Process(daemon.pid)
    rss_mib = sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)]) / 2**20
    assert rss_mib < 1024, f"the process tree holds {rss_mib:.0f} MiB during the outage"
    assert daemon.metric("conflux_records_delivered_total", source="customers") in (None, 0.0)
    wait_converged(upstream.url, sink.url, BOTH, timeout_s=120)
    assert daemon.stop() == 0


def test_upstream_storms_of_errors_and_429s_still_converge(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=3000, products=3000, error_rate=0.3, throttle_rate=0.2,
                                retry_after_s=0, latency_ms=5)
    daemon = daemon_factory(sources=both_sources(upstream.url, page_size=200),
                            sink_url=analytics.url, retry={"base_s": 0.05, "max_s": 0.5, "max_attempts": 20})
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=120)
    retries = daemon.metric("conflux_upstream_retries_total", source="customers")
    assert retries and retries > 5


def test_a_failing_source_never_stalls_the_others(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=2000, products=10)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # closed again below: nothing listens there
    daemon = daemon_factory(
        sources=[source("customers", upstream.url),
                 {"name": "broken", "url": f"http://127.0.0.1:{dead_port}/api/nothing", "key": "id"}],
        sink_url=analytics.url, retry={"base_s": 0.05, "max_s": 0.2, "max_attempts": 3, "breaker_failures": 2})
    wait_converged(upstream.url, analytics.url, {"customers": "customers"}, timeout_s=60)
    broken = wait_until(lambda: (r := daemon.status()["sources"]["broken"]).get("syncs_failed") and r,
                        timeout_s=60, message="the broken source to report a failed sync")
    assert broken["last_sync_result"].startswith("failed")
    assert wait_until(lambda: daemon.metric("conflux_circuit_state", target="upstream:broken") in (1, 2),
                      timeout_s=30, message="the broken source's breaker to leave closed")


def test_a_crash_looping_slot_goes_fatal_and_the_rest_keeps_serving(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=500, products=500)
    daemon = daemon_factory(sources=both_sources(upstream.url),
                            sink_url=analytics.url, workers={"max_restarts": 3, "restart_window_s": 120.0})
    daemon.wait_running()
    for _ in range(3):
        victim = wait_until(lambda: (w := daemon.workers("fetcher")[0])["state"] == "running" and w["pid"],
                            timeout_s=30, message="fetcher-0 running")
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda v=victim: daemon.workers("fetcher")[0]["pid"] != v, timeout_s=30, message="the reap")
    fetcher = wait_until(lambda: (w := daemon.workers("fetcher")[0])["state"] == "fatal" and w, timeout_s=30,
                         message="fetcher-0 to go FATAL")
    assert fetcher["pid"] is None
    assert daemon.metric("conflux_workers", role="fetcher", state="fatal") == 1
    assert requests.get(f"{daemon.url}/ready", timeout=10).status_code == 503
    assert requests.get(f"{daemon.url}/health", timeout=10).status_code == 200
    assert all(w["state"] == "running" for w in daemon.workers() if w["role"] != "fetcher")


def test_a_hung_worker_is_aborted_and_replaced(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=500, products=500)
    daemon = daemon_factory(sources=both_sources(upstream.url),
                            sink_url=analytics.url, workers={"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 3.0})
    daemon.wait_running()
    victim = daemon.worker_pid("consumer", 0)
    os.kill(victim, signal.SIGSTOP)  # alive but silent: no heartbeats
    replaced = wait_until(lambda: (w := daemon.workers("consumer")[0])["pid"] not in (None, victim)
                          and w["state"] == "running" and w, timeout_s=30, message="consumer-0 to be replaced")
    assert replaced["last_exit"] in ("killed by SIGABRT", "killed by SIGKILL") and replaced["restarts"] == 1
    assert daemon.metric("conflux_worker_restarts_total", role="consumer") == 1
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=60)


def test_sighup_keeps_the_old_config_when_the_new_one_is_invalid_and_applies_a_valid_one(
        upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=1000, products=1000, systems=1, records_per_system=500)
    daemon = daemon_factory(sources=both_sources(upstream.url, poll_interval_s=0.5),
                            sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=60)
    generation = daemon.status()["daemon"]["generation"]
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good.replace("[control]", "[control]\nbogus_key = 1", 1))
    daemon.send_signal(signal.SIGHUP)
    reloads = wait_until(lambda: (r := daemon.status()["daemon"]["reloads"])["refused"] == 1 and r, timeout_s=15,
                         message="the refusal in /status")
    assert "control.bogus_key: unknown key" in reloads["last_refusal"] and reloads["applied"] == 0
    assert daemon.metric("conflux_reloads_total", result="refused") == 1
    assert daemon.status()["daemon"]["generation"] == generation
    settings = dict(daemon.settings)
    settings["sources"] = [*daemon.sources, source("orders", upstream.url, poll_interval_s=0.5)]
    write_config(daemon.directory, settings)
    daemon.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.status()["daemon"]["generation"] == generation + 1, timeout_s=60,
               message="a new generation")
    assert daemon.metric("conflux_reloads_total", result="applied") == 1
    wait_converged(upstream.url, analytics.url, {**BOTH, "orders": "orders"}, timeout_s=60)
    for name in BOTH:  # the old sources resumed from their checkpoints: no second full sync
        report = wait_until(lambda n=name: daemon.sync_ok(n), timeout_s=30, message=f"{name} syncing again")
        assert report["last_sync_type"] == "incremental"
    assert daemon.stop() == 0


def _outage(sink, seconds: float) -> None:
    requests.post(f"{sink.url}/admin/outage", json={"seconds": seconds}, timeout=10).raise_for_status()


def test_a_reload_during_a_sink_outage_kills_the_old_generation_at_its_deadline_and_starts_the_new_one(
        upstream_factory, analytics_factory, daemon_factory):
    upstream = upstream_factory(customers=2000, products=2000)
    sink = analytics_factory()
    _outage(sink, 600)  # a drain cannot deliver anything: the reload's deadline must pass
    daemon = daemon_factory(sources=both_sources(upstream.url), sink_url=sink.url, daemon={"shutdown_timeout_s": 6.0})
    daemon.wait_running()
    wait_until(lambda: all(daemon.sync_ok(s) for s in BOTH), timeout_s=60, message="the full sync in the log")
    wait_until(lambda: daemon.metric("conflux_sink_retries_total"), timeout_s=60, message="deliveries failing")
    daemon.send_signal(signal.SIGHUP)
    status = wait_until(lambda: (s := daemon.status())["daemon"]["generation"] == 2 and s, timeout_s=60,
                        message="the new generation")
    assert daemon.service.proc.poll() is None and status["daemon"]["state"] == "running"
    drain = status["daemon"]["reloads"]["last_drain"]
    assert drain["reason"] == "reload" and drain["deadline_passed"], drain
    # The consumers' own drain deadline lies inside the supervisor's: they made their final commit and
    # left on their own; only the mergers, still retrying the sink, were killed.
    assert {name: drain["workers"][name] for name in ("consumer-0", "consumer-1")} == {
        "consumer-0": "exited with 0", "consumer-1": "exited with 0"}, drain
    assert {drain["workers"][name] for name in ("merger-0", "merger-1")} == {"killed by SIGKILL"}, drain
    daemon.wait_running()
    _outage(sink, 0)
    wait_converged(upstream.url, sink.url, BOTH, timeout_s=90)
    assert daemon.stop() == 0


def test_a_reload_to_a_port_already_taken_is_refused_and_the_old_generation_keeps_serving(
        upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=300, products=300)
    daemon = daemon_factory(sources=both_sources(upstream.url), sink_url=analytics.url)
    before = daemon.wait_running()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_config(daemon.directory, {**daemon.settings, "control": {"listen": f"127.0.0.1:{port}"}})
        daemon.send_signal(signal.SIGHUP)
        reloads = wait_until(lambda: (r := daemon.status()["daemon"]["reloads"])["refused"] == 1 and r,
                             timeout_s=30, message="the reload to be refused")
    assert reloads["last_refusal"] == f"control.listen: cannot listen on 127.0.0.1:{port}: address in use"
    assert daemon.metric("conflux_reloads_total", result="refused") == 1
    after = daemon.status()
    assert after["daemon"]["generation"] == before["daemon"]["generation"] and after["daemon"]["state"] == "running"
    assert {w["name"]: w["pid"] for w in after["workers"]} == {w["name"]: w["pid"] for w in before["workers"]}
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=60)
    assert daemon.stop() == 0
