"""The whole pipeline on the real Kafka broker: equality, the DLQ command, checkpoints that outlive an
instance's disk, and a broker restart in the middle of a sync."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from tests.fixtures.analytics import predicted_rejections
from tests.fixtures.daemon import both_sources, source, wait_converged
from tests.support import REPO, wait_until

pytestmark = pytest.mark.kafka

BOTH = {"customers": "customers", "products": "products"}


@pytest.fixture
def kafka_log(kafka_bootstrap: str, kafka_group_id: str) -> dict:
    """[log] settings of a Kafka-backed daemon with this test's own group and topic prefix."""
    return {"backend": "kafka", "bootstrap_servers": kafka_bootstrap, "group": kafka_group_id,
            "topic_prefix": f"{kafka_group_id}.", "partitions": 4}


def dlq_entries(config_path) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "conflux", "dlq", "list", "-c", str(config_path), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_full_sync_converges_on_kafka_and_dlq_list_reads_the_dlq_topics(upstream_factory, analytics,
                                                                         daemon_factory, kafka_log):
    upstream = upstream_factory(customers=3000, products=2000, malformed_rate=0.01)
    daemon = daemon_factory(sources=[source("customers", upstream.url, page_size=250),
                                     source("products", upstream.url, page_size=300)],
                            sink_url=analytics.url, log=kafka_log)
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=90)
    status = daemon.status()
    assert status["daemon"]["backend"] == "kafka"
    assert {s["fetcher"] for s in status["sources"].values()} == {"fetcher-0"}
    # The group gives the consumer processes the configured partitions of every topic between them.
    every_partition = sorted((f"{kafka_log['topic_prefix']}{name}", p) for name in BOTH for p in range(4))
    wait_until(lambda: sorted(tuple(p) for w in daemon.workers("consumer") for p in w["partitions"]) == every_partition,
               timeout_s=30, message="the consumer processes owning every partition once")

    malformed = requests.get(f"{upstream.url}/admin/malformed", timeout=10).json()
    expected = {(name, m["reason"]) for name in BOTH for m in malformed[name]}
    assert len(expected) > 0
    entries = wait_until(lambda: len(e := dlq_entries(daemon.config_path)) >= sum(map(len, malformed.values())) and e,
                         timeout_s=30, message="every malformed record in the Kafka DLQ")
    assert len(entries) == sum(len(malformed[name]) for name in BOTH)
    assert {e["source"] for e in entries} == set(BOTH)
    assert all(e["stage"] == "fetch" and e["reason"] and e["record"] for e in entries)
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_a_replacement_instance_with_an_empty_disk_resumes_from_the_kafka_checkpoints(
        upstream_factory, analytics, daemon_factory, kafka_log):
    upstream = upstream_factory(customers=2000, products=1000)
    sources = [source(name, upstream.url, poll_interval_s=60) for name in BOTH]
    first = daemon_factory(sources=sources, sink_url=analytics.url, log=kafka_log)
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=60)
    wait_until(lambda: all(first.sync_ok(name, sync_type="full") for name in BOTH), timeout_s=30,
               message="both full syncs saved their checkpoints")
    assert first.stop() == 0, first.log()[-3000:]

    for key in (3, 141, 1999):
        requests.put(f"{upstream.url}/api/customers/{key}", json={"note": "changed"}, timeout=10).raise_for_status()
    # A new machine: fresh directory and state dir, nothing shared with the first but Kafka.
    second = daemon_factory(sources=sources, sink_url=analytics.url, log=kafka_log)
    assert second.directory != first.directory
    reports = wait_until(lambda: all(second.sync_ok(name) for name in BOTH) and second.status()["sources"],
                         timeout_s=60, message="the first sync of each source on the new instance")
    for name in BOTH:
        assert (reports[name]["last_sync_type"], reports[name]["syncs_ok"]) == ("incremental", 1), reports[name]
        assert reports[name]["last_sync_records"] < 100, reports[name]
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=60)
    assert second.stop() == 0, second.log()[-3000:]


def test_a_broker_restart_mid_sync_loses_nothing(upstream_factory, analytics, daemon_factory, kafka_log,
                                                  kafka_broker_control):
    upstream = upstream_factory(customers=15000, products=15000, latency_ms=40)
    daemon = daemon_factory(sources=[source(name, upstream.url, page_size=250, max_concurrency=1) for name in BOTH],
                            sink_url=analytics.url, log=kafka_log)

    def mid_sync() -> bool:
        syncing = all(report.get("syncing") for report in daemon.status()["sources"].values())
        return syncing and sink_count(analytics.url) > 0

    wait_until(mid_sync, timeout_s=60, message="records flowing while both sources sync")
    kafka_broker_control.stop()
    wait_until(lambda: not daemon.status()["ready"]["log"], timeout_s=30,
               message="the daemon noticing that the broker is gone")
    assert sink_count(analytics.url) < 30000
    kafka_broker_control.start()

    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=120)
    assert all(w["state"] == "running" for w in daemon.workers())
    assert daemon.stop() == 0, daemon.log()[-3000:]


def sink_count(analytics_url: str) -> int:
    stats = requests.get(f"{analytics_url}/stats", timeout=10).json()["sources"]
    return sum(stats.get(name, {}).get("count", 0) for name in BOTH)


def test_dlq_replay_on_kafka_delivers_and_removes_the_entries(upstream_factory, analytics_factory, daemon_factory,
                                                               kafka_log):
    upstream = upstream_factory(customers=1500, products=500)
    sink = analytics_factory(reject_rate=0.05)
    daemon = daemon_factory(sources=both_sources(upstream.url),
                            sink_url=sink.url, log=kafka_log)
    refused = predicted_rejections(upstream.url, {"customers": "id", "products": "sku"}, 0.05)
    entries = wait_until(lambda: len(e := dlq_entries(daemon.config_path)) == len(refused) and e, timeout_s=90,
                         message="every refused record in the Kafka DLQ")
    assert {(e["source"], e["key"]) for e in entries} == refused and all(e["stage"] == "sink" for e in entries)
    requests.post(f"{sink.url}/admin/faults", json={"reject_rate": 0.0}, timeout=10).raise_for_status()
    out = subprocess.run([sys.executable, "-m", "conflux", "dlq", "replay", "-c", str(daemon.config_path),
                          "--timeout", "90"], capture_output=True, text=True, cwd=REPO, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["delivered"] == len(entries) and report["pending"] == 0
    assert dlq_entries(daemon.config_path) == []
    wait_converged(upstream.url, sink.url, BOTH, timeout_s=60)
    assert daemon.stop() == 0
