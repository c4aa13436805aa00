"""The old system's tools as commands: conflux check, conflux loadtest and conflux bench, run for real."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures.daemon import both_sources, wait_converged
from tests.support import REPO

BOTH = {"customers": "customers", "products": "products"}


def _conflux(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conflux", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout_s)


@pytest.fixture
def deployment(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=1000, products=500)
    daemon = daemon_factory(sources=both_sources(upstream.url, poll_interval_s=1),
                            sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=60)
    return upstream, analytics, daemon


def test_check_passes_against_a_running_deployment(deployment, tmp_path):
    upstream, _sink, daemon = deployment
    # The config gives the sink; its control port is 0 (picked at start), so the URL is passed as well.
    out = _conflux("check", "-c", str(daemon.config_path), "--upstream", upstream.url, "--daemon", daemon.url,
                   "--json", str(tmp_path / "check.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["ok"] and [s["step"] for s in report["steps"]][-1] == "customer arrived at the sink"
    assert report["end_to_end_ms"] is not None and report["end_to_end_ms"] > 0


def test_check_fails_and_says_why_when_the_daemon_is_down(deployment):
    upstream, sink, daemon = deployment
    assert daemon.stop() == 0
    out = _conflux("check", "--upstream", upstream.url, "--daemon", daemon.url, "--sink", sink.url, "--timeout", "2")
    assert out.returncode == 1
    assert "[FAIL] daemon health" in out.stdout


def test_loadtest_burst_and_throughput_reach_the_sink(deployment, tmp_path):
    upstream, sink, _daemon = deployment
    burst = _conflux("loadtest", "--mode", "burst", "--records", "60", "--concurrency", "4", "--upstream",
                     upstream.url, "--sink", sink.url, "--json", str(tmp_path / "burst.json"))
    assert burst.returncode == 0, burst.stdout + burst.stderr
    report = json.loads((tmp_path / "burst.json").read_text())
    assert report["succeeded"] == 60 and report["success_rate"] == 1.0
    assert report["reached_sink"] == report["distinct_keys_changed"] and report["response_ms"]["p99"] is not None
    steady = _conflux("loadtest", "--mode", "throughput", "--target", "36000", "--duration", "3s", "--upstream",
                      upstream.url, "--sink", sink.url, "--json", str(tmp_path / "steady.json"))
    assert steady.returncode == 0, steady.stdout + steady.stderr
    report = json.loads((tmp_path / "steady.json").read_text())
    assert 15 <= report["succeeded"] <= 40 and report["reached_sink"] == report["distinct_keys_changed"]


@pytest.mark.slow
def test_bench_reports_the_contract_fields(tmp_path):
    out = _conflux("bench", "--records", "20000", "--baseline-records", "2000", "--changes-per-s", "200",
                   "--change-seconds", "2", "--json", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for field in ("records", "export_s", "records_per_s", "limit_records_per_s", "ratio_to_limit",
                  "ratio_to_baseline", "peak_rss_mib", "cpu_s_per_million", "webhook_p50_ms", "webhook_p99_ms"):
        assert result[field] is not None, field
    assert result["records"] == 20000 and result["checksums_equal"] is True
    assert list(tmp_path.glob("throughput-embedded-*.svg"))


@pytest.mark.slow
def test_bench_runs_a_delete_heavy_and_a_shaping_export_and_compares_them_with_the_plain_one(tmp_path):
    out = _conflux("bench", "--records", "20000", "--baseline-records", "0", "--changes-per-s", "0", "--deletes",
                   "--shaping", "--json", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    deletes, shaping = result["deletes"], result["shaping"]
    assert deletes["checksums_equal"] and deletes["deletes_checksums_equal"], deletes
    assert 0.10 <= deletes["deleted_fraction"] < 0.12 and deletes["soft_deleted"] > 0 and deletes["hard_deleted"] > 0
    for name, report in deletes["reconcile"].items():  # the hard deletes were found by the reconcile
        assert report["deleted"] > 0 and not report["refused"] and report["duration_s"] > 0, (name, report)
    assert sum(report["deleted"] for report in deletes["reconcile"].values()) == deletes["hard_deleted"]
    assert shaping["records_equal"] and shaping["sample_equal"], shaping
    for run in (deletes, shaping):
        assert run["plain_records_per_s"] == result["records_per_s"] and run["ratio_to_plain"] > 0
