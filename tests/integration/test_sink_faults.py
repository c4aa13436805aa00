"""The daemon against a sink that does not acknowledge: a redirect, an HTML 200, 401/403/404, bodies too
large. Nothing is committed or dead-lettered for an answer that is not the sink's acknowledgement, the
wait is visible (breaker, retries, ack timeout), and once the sink answers properly everything arrives."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from tests.fixtures.daemon import both_sources, checksums, wait_converged
from tests.support import REPO, wait_until

BOTH = {"customers": "customers", "products": "products"}
FAST_RETRY = {"base_s": 0.05, "max_s": 0.5, "breaker_cooldown_s": 1.0}
LIFTED = {"redirect_to": "", "html_200": False, "fail_status": 0}


def dead_letters(daemon) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "conflux", "dlq", "list", "-c", str(daemon.config_path), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def metric(daemon, name: str, **labels) -> float | None:
    """The sum of the series matching ``labels``, None if there are none."""
    text = requests.get(f"{daemon.url}/metrics", timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if (line.startswith(name + "{") or line.startswith(name + " "))
              and all(f'{k}="{v}"' in line for k, v in labels.items())]
    return sum(values) if values else None


def all_committed(daemon) -> bool:
    partitions = daemon.status()["partitions"]
    return bool(partitions) and all(p["lag"] == 0 for p in partitions)


def stats_of(daemon, role: str) -> list[dict]:
    return [worker["stats"] for worker in daemon.workers(role)]


FAULTS = {
    "redirect": ({"redirect_to": "/login"}, "redirect", 302),
    "html-200": ({"html_200": True}, "not_acknowledged", 200),
    "401": ({"fail_status": 401}, "401", 401),
    "403": ({"fail_status": 403}, "403", 403),
    "404": ({"fail_status": 404}, "404", 404),
}


@pytest.mark.parametrize("case", FAULTS)
def test_nothing_is_committed_until_the_sink_acknowledges(upstream_factory, analytics_factory, daemon_factory, case):
    fault, reason, status = FAULTS[case]
    upstream = upstream_factory(customers=300, products=200)
    sink = analytics_factory(**fault)
    daemon = daemon_factory(sources=both_sources(upstream.url), sink_url=sink.url, retry=FAST_RETRY,
                            workers={"ack_timeout_s": 1.0})
    wait_until(lambda: all(daemon.sync_ok(name) for name in BOTH), timeout_s=60, message="the full sync in the log")
    wait_until(lambda: metric(daemon, "conflux_circuit_state", target="sink") == 2, timeout_s=30,
               message="the sink breaker to open")
    wait_until(lambda: (metric(daemon, "conflux_sink_retries_total", reason=reason) or 0) >= 5, timeout_s=30,
               message=f"retries with reason {reason}")
    # The wait is visible: the mergers' last answer, the consumers' ack timeout, in /status and /metrics.
    wait_until(lambda: status in [s.get("sink_last_status") for s in stats_of(daemon, "merger")], timeout_s=10,
               message=f"a merger's sink_last_status {status} in /status")
    wait_until(lambda: any(s.get("overdue_acks", 0) > 0 and s["oldest_unacked_s"] > 1.0
                           for s in stats_of(daemon, "consumer")), timeout_s=30, message="overdue acks in /status")
    assert metric(daemon, "conflux_oldest_unacked_seconds") > 1.0
    assert metric(daemon, "conflux_ack_timeouts_total") > 0
    assert "ack_timeout_s" in daemon.log() and f"sink answered {status}" in daemon.log()
    # ... and nothing counted as delivered: no commit, no dead letter, nothing applied.
    partitions = wait_until(lambda: (p := daemon.status()["partitions"]) and all(r["end"] for r in p) and p,
                            timeout_s=30, message="every partition's lag reported")
    assert [p["committed"] for p in partitions] == [0] * len(partitions)
    assert metric(daemon, "conflux_records_delivered_total") in (None, 0.0)
    assert dead_letters(daemon) == []
    sink_stats = requests.get(f"{sink.url}/stats", timeout=10).json()
    assert sink_stats["batches"] == 0 and sink_stats["login_requests"] == 0

    requests.post(f"{sink.url}/admin/faults", json=LIFTED, timeout=10).raise_for_status()
    wait_converged(upstream.url, sink.url, BOTH, timeout_s=60)
    wait_until(lambda: all_committed(daemon), timeout_s=30, message="every offset committed")
    assert dead_letters(daemon) == []
    wait_until(lambda: all(s.get("overdue_acks") == 0 for s in stats_of(daemon, "consumer")), timeout_s=30,
               message="no overdue acks once the sink answers")
    assert daemon.stop() == 0


def test_a_batch_too_large_is_split_and_only_a_record_too_large_alone_is_dead_lettered(
        upstream_factory, analytics_factory, daemon_factory):
    upstream = upstream_factory(customers=300, products=200)
    huge = requests.put(f"{upstream.url}/api/customers/7", json={"notes": "x" * 6000}, timeout=10)
    huge.raise_for_status()
    sink = analytics_factory(max_body_bytes=4000)  # about 15 records a request; customer 7 alone is larger
    daemon = daemon_factory(sources=both_sources(upstream.url), sink_url=sink.url, retry=FAST_RETRY)
    wait_until(lambda: all_committed(daemon) and dead_letters(daemon), timeout_s=90,
               message="every offset committed and the huge record dead-lettered")
    entries = dead_letters(daemon)
    assert [(e["source"], e["key"], e["stage"]) for e in entries] == [("customers", "7", "sink")]
    assert "413" in entries[0]["reason"] and "alone" in entries[0]["reason"]
    upstream_side, sink_side = checksums(upstream.url, sink.url, BOTH)
    assert sink_side["products"] == upstream_side["products"]
    assert sink_side["customers"][1] == upstream_side["customers"][1] - 1
    assert requests.get(f"{sink.url}/records/customers/7", timeout=10).status_code == 404
    assert daemon.stop() == 0
