"""GET /metrics of a real daemon: every documented series, with exactly its labels, aggregated over all
worker processes (prometheus-client multiprocess mode); and what a kill -9 of a worker does to them."""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from datetime import datetime

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.daemon import both_sources, wait_converged
from tests.support import wait_until

# The contract of issue 6: series name -> its label names (histograms: the series' own, besides le).
DOCUMENTED = {
    "conflux_records_fetched_total": {"source"},
    "conflux_records_delivered_total": {"source"},
    "conflux_messages_processed_total": {"topic"},
    "conflux_messages_failed_total": {"topic"},
    "conflux_processing_duration_seconds_bucket": {"stage", "le"},
    "conflux_dedup_skipped_total": {"reason"},
    "conflux_dlq_records_total": {"source", "reason"},
    "conflux_sync_lag_seconds": {"source"},
    "conflux_last_sync_timestamp_seconds": {"source"},
    "conflux_consumer_lag": {"topic", "partition"},
    "conflux_upstream_request_duration_seconds_bucket": {"source", "status", "le"},
    "conflux_sink_request_duration_seconds_bucket": {"status", "sink", "le"},
    "conflux_circuit_state": {"target"},
    "conflux_worker_restarts_total": {"role"},
    "conflux_workers": {"role", "state"},
    "conflux_queue_depth": {"queue"},
}
ROLES = {"control": 1, "fetcher": 1, "consumer": 2, "merger": 2}
COLLECTIONS = {"customers": "customers", "products": "products"}


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """/metrics as {series name: {sorted label items: value}}."""
    response = requests.get(f"{url}/metrics", timeout=10)
    response.raise_for_status()
    assert response.headers["Content-Type"].startswith("text/plain")
    series: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            series[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return series


def value(series: dict, name: str, **labels: str) -> float | None:
    return series.get(name, {}).get(tuple(sorted(labels.items())))


def start_pipeline(upstream_factory, analytics, daemon_factory, **sections):
    upstream = upstream_factory(customers=400, products=300)
    daemon = daemon_factory(sources=both_sources(upstream.url),
                            sink_url=analytics.url, **sections)
    wait_converged(upstream.url, analytics.url, COLLECTIONS, timeout_s=60)
    return upstream, daemon


def test_every_documented_series_is_exported_with_its_labels_after_a_sync(upstream_factory, analytics,
                                                                          daemon_factory):
    _, daemon = start_pipeline(upstream_factory, analytics, daemon_factory)
    topics_partitions = {(topic, str(p)) for topic in COLLECTIONS for p in range(4)}

    def settled():  # consumers report lag every 2 s; wait until every partition has a committed report
        series = scrape(daemon.url)
        lags = series.get("conflux_consumer_lag", {})
        settled = {(dict(k)["topic"], dict(k)["partition"]) for k, v in lags.items() if v == 0}
        delivered = value(series, "conflux_records_delivered_total", source="customers")
        assert settled == topics_partitions and delivered >= 400, f"lag 0 on {sorted(settled)}, {delivered=}"
        return series

    series = wait_until(settled, timeout_s=30, message="every partition's lag at 0 and all records counted")
    for name, label_names in DOCUMENTED.items():
        assert series.get(name), f"{name} is missing from /metrics"
        for labels in series[name]:
            assert {key for key, _ in labels} == label_names, f"{name} has labels {labels}"

    status = daemon.status()
    for name, total in (("customers", 400), ("products", 300)):
        assert value(series, "conflux_records_fetched_total", source=name) == total
        # At least once: a consumer that rewinds (a merger attached late) may deliver a batch twice.
        assert value(series, "conflux_records_delivered_total", source=name) >= total
        assert value(series, "conflux_messages_processed_total", topic=name) >= 1
        assert value(series, "conflux_messages_failed_total", topic=name) == 0
        for reason in ("malformed", "sink_rejected"):
            assert value(series, "conflux_dlq_records_total", source=name, reason=reason) == 0
        report = status["sources"][name]
        assert abs(value(series, "conflux_last_sync_timestamp_seconds", source=name) - report["last_sync_at"]) < 1e-3
        watermark_s = datetime.fromisoformat(report["watermark"]).timestamp()
        assert abs(value(series, "conflux_sync_lag_seconds", source=name) - (time.time() - watermark_s)) < 30
        assert value(series, "conflux_upstream_request_duration_seconds_count", source=name, status="200") >= 1
        assert value(series, "conflux_circuit_state", target=f"upstream:{name}") == 0
    assert value(series, "conflux_sink_request_duration_seconds_count", status="200", sink="default") >= 1
    assert value(series, "conflux_circuit_state", target="sink") == 0
    for stage in ("decode", "consume", "merge", "sink"):
        assert value(series, "conflux_processing_duration_seconds_count", stage=stage) >= 1
    assert {dict(k)["reason"] for k in series["conflux_dedup_skipped_total"]} == {"message_id", "content_hash", "stale"}
    for role, count in ROLES.items():
        assert value(series, "conflux_workers", role=role, state="running") == count
        assert value(series, "conflux_workers", role=role, state="fatal") == 0
        assert value(series, "conflux_worker_restarts_total", role=role) == 0
    queues = {dict(k)["queue"] for k in series["conflux_queue_depth"]}
    assert {"consumer-0-in-flight", "consumer-1-in-flight", "merger-0-pending", "merger-1-pending"} <= queues


def test_a_killed_worker_is_counted_restarted_and_its_live_gauges_vanish(upstream_factory, analytics,
                                                                         daemon_factory):
    _, daemon = start_pipeline(upstream_factory, analytics, daemon_factory)
    wait_until(lambda: all(p["lag"] == 0 for p in daemon.status()["partitions"]), timeout_s=20,
               message="everything committed, so the restart re-delivers nothing")
    metrics_dir = daemon.directory / "var" / "metrics"
    victim = daemon.worker_pid("merger", 1)
    # The merger's live gauges: its queue depth (livesum) and its sink breaker (livemostrecent).
    live_files = [metrics_dir / f"gauge_livesum_{victim}.db", metrics_dir / f"gauge_livemostrecent_{victim}.db"]
    wait_until(lambda: all(path.exists() for path in live_files), timeout_s=10, message="the merger's gauge files")
    delivered_before = value(scrape(daemon.url), "conflux_records_delivered_total", source="customers")

    os.kill(victim, signal.SIGKILL)

    def restarted():
        worker = next(w for w in daemon.workers("merger") if w["index"] == 1)
        return worker if worker["state"] == "running" and worker["pid"] not in (None, victim) else None

    worker = wait_until(restarted, timeout_s=30, message="merger-1 restarted")
    assert worker["restarts"] == 1 and "SIGKILL" in worker["last_exit"]
    assert not [path.name for path in live_files if path.exists()], "mark_process_dead left the dead pid's gauges"
    assert (metrics_dir / f"counter_{victim}.db").exists(), "a dead worker's counters must stay in the totals"

    def counted():
        series = scrape(daemon.url)
        running = value(series, "conflux_workers", role="merger", state="running")
        return series if running == 2 else None

    series = wait_until(counted, timeout_s=15, message="conflux_workers back to 2 running mergers")
    assert value(series, "conflux_worker_restarts_total", role="merger") == 1
    assert all(value(series, "conflux_worker_restarts_total", role=role) == 0 for role in ROLES if role != "merger")
    assert value(series, "conflux_records_delivered_total", source="customers") == delivered_before
    # The restarted merger publishes its own gauges again, under its new pid.
    wait_until(lambda: (metrics_dir / f"gauge_livesum_{worker['pid']}.db").exists(), timeout_s=10,
               message="the new merger's gauge file")
    assert daemon.stop() == 0, daemon.log()[-3000:]
