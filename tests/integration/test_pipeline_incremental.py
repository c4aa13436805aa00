"""Incremental syncs on the embedded log: changes in the watermark's own second, late old versions,
restarts that resume from the checkpoint, and malformed records that go to the dead-letter queue."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import time

import msgspec
import requests

from tests.fixtures.daemon import both_sources, source, wait_converged
from tests.support import REPO, wait_until

BOTH = {"customers": "customers", "products": "products"}
SECRET = "test-webhook-secret"


def _touch(upstream_url: str, collection: str, key: str, **fields) -> dict:
    response = requests.put(f"{upstream_url}/api/{collection}/{key}", json=fields, timeout=10)
    response.raise_for_status()
    return response.json()


def test_changes_in_the_watermark_second_are_not_missed(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=2000, products=1000)
    daemon = daemon_factory(sources=both_sources(upstream.url, poll_interval_s=0.3),
                            sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=60)
    # Bursts of updates and inserts, each burst inside one second (second-precision stamps), while
    # incremental syncs keep running: many land in the same second as the watermark they advance.
    for burst in range(4):
        stamps = set()
        for i in range(40):
            record = _touch(upstream.url, "customers", str(1 + burst * 40 + i), tier=f"burst-{burst}")
            stamps.add(record["updated_at"])
        created = requests.post(f"{upstream.url}/api/products", json={"name": f"new-{burst}", "price": 1.5,
                                                                      "stock": 3, "warehouse": "W1"}, timeout=10)
        assert created.status_code == 201, created.text
        wait_converged(upstream.url, analytics.url, BOTH, timeout_s=30)
    report = daemon.status()["sources"]["customers"]
    assert report["last_sync_type"] == "incremental" and report["watermark"] >= max(stamps)
    assert daemon.stop() == 0


def test_an_older_version_arriving_late_does_not_overwrite_a_newer_one(upstream_factory, analytics,
                                                                        daemon_factory):
    upstream = upstream_factory(customers=500, products=10)
    daemon = daemon_factory(sources=[source("customers", upstream.url, poll_interval_s=0.5, webhook_secret=SECRET),
                                     source("products", upstream.url, poll_interval_s=0.5)],
                            sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=60)
    newer = _touch(upstream.url, "customers", "7", tier="platinum")
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=30)
    stale = {**newer, "tier": "stale-copy", "updated_at": "2026-01-01T00:00:00Z"}
    body = msgspec.json.encode(stale)
    timestamp = str(int(time.time()))
    signature = "sha256=" + hmac.new(SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    response = requests.post(f"{daemon.url}/webhook/customers", data=body, timeout=10,
                             headers={"X-Conflux-Signature": signature, "X-Conflux-Timestamp": timestamp,
                                      "Content-Type": "application/json"})
    assert response.status_code == 202, response.text
    # The stale copy went through the log (202 means durable); wait until the consumer has committed
    # past it, then the sink must still hold the newer version.
    wait_until(lambda: (parts := daemon.status()["partitions"]) and all(p["lag"] == 0 for p in parts),
               timeout_s=30, message="consumers to commit past the webhook")
    stored = requests.get(f"{analytics.url}/records/customers/7", timeout=10).json()
    assert json.loads(json.dumps(stored["data"]))["tier"] == "platinum"
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=10)
    # An idle daemon has nothing to wait for: its drain ends long before the 30 s deadline (the poll's
    # timeout; past it the daemon is SIGKILLed and the exit code is not 0).
    assert daemon.stop(timeout_s=10) == 0, "an idle daemon took long to drain"


def test_restart_resumes_from_checkpoint_without_a_second_full_sync(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=3000, products=3000)
    daemon = daemon_factory(sources=both_sources(upstream.url, poll_interval_s=0.5),
                            sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=60)
    first = daemon.status()["sources"]["customers"]
    assert first["syncs_ok"] >= 1
    assert daemon.stop() == 0
    for key in range(1, 21):  # changed while the daemon was down
        _touch(upstream.url, "customers", str(key), tier="while-down")
    restarted = daemon.restart()
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=60)
    report = wait_until(lambda: restarted.sync_ok("customers"), timeout_s=30, message="a sync after restart")
    assert report["last_sync_type"] == "incremental"
    assert report["last_sync_records"] < 3000, "the first sync after a restart re-read everything"
    assert "full sync" not in restarted.log()
    assert restarted.stop() == 0


def test_malformed_records_go_to_the_dlq_with_reasons_while_the_rest_flows(upstream_factory, analytics,
                                                                         daemon_factory):
    upstream = upstream_factory(customers=2000, products=1000, malformed_rate=0.02)
    daemon = daemon_factory(sources=both_sources(upstream.url),
                            sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=60)
    malformed = requests.get(f"{upstream.url}/admin/malformed", timeout=10).json()
    expected = {(c, json.dumps(item["record"], sort_keys=True)) for c, items in malformed.items() for item in items}
    assert len(expected) >= 40

    def dlq_entries():
        out = subprocess.run([sys.executable, "-m", "conflux", "dlq", "list", "-c", str(daemon.config_path),
                              "--json"], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    entries = wait_until(lambda: (e := dlq_entries()) and len(e) >= len(expected) and e, timeout_s=30,
                         message="dead letters for every malformed record")
    got = {(e["source"], json.dumps(e["record"], sort_keys=True)) for e in entries}
    assert got == expected
    for entry in entries:
        assert entry["reason"] and entry["stage"] == "fetch" and entry["origin"].startswith(upstream.url)
        assert "missing key field" in entry["reason"] or "not an ISO 8601 timestamp" in entry["reason"]
    assert daemon.stop() == 0
