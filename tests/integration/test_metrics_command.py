"""`conflux metrics --url U --duration D --interval I --export FILE.json`, the old system's collector,
sampling a real daemon's /metrics while a sync runs (durations shortened from the usual 300/10 s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.fixtures.daemon import source, wait_converged
from tests.support import REPO, conflux_argv

COUNTS = {"customers": 300, "products": 200}


def series_of(document: dict, name: str, **labels: str) -> dict:
    matches = [s for s in document["series"] if s["name"] == name and s["labels"] == labels]
    assert len(matches) == 1, f"{name}{labels}: {len(matches)} series"
    return matches[0]


def test_metrics_command_writes_a_json_time_series_across_a_sync(upstream_factory, analytics, daemon_factory,
                                                                  tmp_path):
    upstream = upstream_factory(**COUNTS)
    daemon = daemon_factory(sources=[source(name, upstream.url, poll_interval_s=3600) for name in COUNTS],
                            sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, {name: name for name in COUNTS}, timeout_s=60)
    export = tmp_path / "metrics.json"
    collector = subprocess.Popen(conflux_argv("metrics", "--url", daemon.url, "--duration", "3", "--interval", "0.5",
                                              "--export", str(export)),
                                 cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        first = collector.stderr.readline()
        assert "scrape 1 of 7" in first, first  # sampling has begun: now change what it samples
        assert requests.post(f"{daemon.url}/sync/customers?full=true", timeout=10).status_code == 202
        progress = collector.stderr.read()
        assert collector.wait(timeout=30) == 0, progress
    finally:
        if collector.poll() is None:
            collector.kill()
    assert f"written to {export}" in progress

    document = json.loads(export.read_text())
    assert document["url"] == f"{daemon.url}/metrics"
    assert (document["interval_s"], document["duration_s"]) == (0.5, 3.0)
    assert len(document["scrapes"]) == 7 and all(scrape["ok"] for scrape in document["scrapes"])
    times = [scrape["t"] for scrape in document["scrapes"]]
    assert times == sorted(times) and 2.8 <= times[-1] - times[0] <= 5.0

    fetched = series_of(document, "conflux_records_fetched_total", source="customers")
    assert fetched["type"] == "counter" and len(fetched["points"]) == 7
    assert fetched["summary"]["first"] == COUNTS["customers"]
    assert fetched["summary"]["delta"] == COUNTS["customers"]  # the full pass read every record again
    assert fetched["summary"]["rate_per_s"] > 0
    untouched = series_of(document, "conflux_records_fetched_total", source="products")
    assert untouched["summary"]["delta"] == 0
    running = series_of(document, "conflux_workers", role="consumer", state="running")
    assert running["type"] == "gauge" and running["summary"]["min"] == running["summary"]["max"] == 2
    assert "delta" not in running["summary"]
    assert not [s for s in document["series"] if s["name"].endswith("_bucket")]  # unless --buckets
    assert series_of(document, "conflux_processing_duration_seconds_count", stage="decode")
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_metrics_command_records_failed_scrapes_and_exits_1(tmp_path):
    export = tmp_path / "metrics.json"
    result = subprocess.run(conflux_argv("metrics", "--url", "http://127.0.0.1:9/metrics", "--duration", "0.2",
                                         "--interval", "0.1", "--export", str(export)),
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    document = json.loads(export.read_text())
    assert len(document["scrapes"]) == 3 and not any(scrape["ok"] for scrape in document["scrapes"])
    assert document["series"] == []


def inherit(disposition: str):
    """A preexec_fn giving the child SIGINT as a shell may: "ignored" (a background job), "blocked"."""
    def prepare() -> None:
        if disposition == "ignored":
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        elif disposition == "blocked":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    return prepare


@pytest.mark.parametrize(("sig", "disposition"), [(signal.SIGINT, "ignored"), (signal.SIGINT, "blocked"),
                                                  (signal.SIGTERM, "ignored")],
                         ids=["int-while-ignored", "int-while-blocked", "term"])
def test_metrics_command_writes_what_it_has_on_ctrl_c(tmp_path, sig, disposition):
    class Exposition(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"# TYPE demo_total counter\ndemo_total 7\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Exposition)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    export = tmp_path / "metrics.json"
    collector = subprocess.Popen(conflux_argv("metrics", "--url", f"http://127.0.0.1:{server.server_address[1]}",
                                              "--duration", "300", "--interval", "10", "--export", str(export)),
                                 cwd=REPO, stderr=subprocess.PIPE, text=True, preexec_fn=inherit(disposition))
    try:
        assert "scrape 1 of 31" in collector.stderr.readline()
        os.kill(collector.pid, sig)
        assert collector.wait(timeout=30) == 0
        assert "interrupted; writing what was collected" in collector.stderr.read()
    finally:
        if collector.poll() is None:
            collector.kill()
        server.shutdown()
        server.server_close()
    document = json.loads(export.read_text())
    assert len(document["scrapes"]) == 1 and document["scrapes"][0]["ok"]
    assert document["series"][0]["name"] == "demo_total" and document["series"][0]["points"][0][1] == 7
