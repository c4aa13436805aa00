"""The live status page at GET /, rendered by real headless Chromium (Debian's chromium package).

Chromium runs the page's script with a virtual-time budget and dumps the resulting DOM; the test reads
the tables, the chart and the refresh counter from it, before and after a sync it triggers. The first
render goes through a reverse proxy that serves the daemon under /conflux/, which only works if the
page uses relative URLs. With a control token set, the page asks for it, or takes it from the link's
#token= fragment. Without Chromium these tests fail with a message saying how to install it.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from tests.fixtures.daemon import source, wait_converged
from tests.support import wait_until

COUNTS = {"customers": 300, "products": 200}
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")
VIRTUAL_TIME_MS = 4500  # the page refreshes every 2 s: at least two refreshes


class Page(HTMLParser):
    """What the rendered page shows: table rows by their data-* key, texts by id, chart points by series."""

    ROW_KEYS = ("data-source", "data-sink", "data-worker", "data-partition")

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, dict[str, str]]] = {key[5:]: {} for key in self.ROW_KEYS}
        self.texts: dict[str, str] = {}
        self.chart: dict[str, list[tuple[float, float]]] = {}
        self.hidden: set[str] = set()  # ids of elements with the hidden attribute
        self._row: dict[str, str] | None = None
        self._field: str | None = None
        self._ids: list[tuple[str, str]] = []  # (tag, id) of open elements with an id
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        for key in self.ROW_KEYS:
            if tag == "tr" and key in attributes:
                self._row = self.rows[key[5:]].setdefault(attributes[key], {})
        if tag == "td" and self._row is not None:
            self._field = attributes.get("data-field")
            self._row[self._field] = ""
        if tag == "polyline":
            points = [tuple(map(float, pair.split(","))) for pair in (attributes.get("points") or "").split()]
            self.chart[attributes["data-series"]] = points
        if "id" in attributes:
            self._ids.append((tag, attributes["id"]))
            self.texts[attributes["id"]] = ""
            if "hidden" in attributes:
                self.hidden.add(attributes["id"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._field = None
        elif tag == "tr":
            self._row = None
        if self._ids and self._ids[-1][0] == tag:
            self._ids.pop()

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._field is not None:
            self._row[self._field] += data
        for _, element_id in self._ids:
            self.texts[element_id] += data


def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed to test the status page: install Debian's chromium package "
                "(apt-get install -y chromium), as .ci/run does")


def render(url: str, profile: Path) -> Page:
    result = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             f"--virtual-time-budget={VIRTUAL_TIME_MS}", "--dump-dom", url],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0 and "<html" in result.stdout, result.stderr[-2000:]
    return Page(result.stdout)


@contextmanager
def prefix_proxy(target: str, prefix: str) -> Iterator[str]:
    """A reverse proxy serving ``target`` under ``prefix`` (GET only), as an operator's nginx would."""

    class Forward(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not self.path.startswith(prefix):
                self.send_error(404, "outside the prefix")
                return
            upstream = requests.get(target + self.path[len(prefix) - 1:], timeout=10)
            self.send_response(upstream.status_code)
            self.send_header("Content-Type", upstream.headers.get("Content-Type", "text/plain"))
            self.send_header("Content-Length", str(len(upstream.content)))
            self.end_headers()
            self.wfile.write(upstream.content)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=server.serve_forever, name="prefix-proxy", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{prefix}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.browser
def test_status_page_renders_in_chromium_and_follows_a_sync(upstream_factory, analytics, daemon_factory, tmp_path):
    chromium()  # fail first, and clearly, if the browser is missing
    upstream = upstream_factory(**COUNTS)
    daemon = daemon_factory(sources=[source(name, upstream.url, poll_interval_s=3600) for name in COUNTS],
                            sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, {name: name for name in COUNTS}, timeout_s=60)
    status = wait_until(lambda: (s := daemon.status()) and len(s["throughput"]["points"]) >= 1 and s,
                        timeout_s=15, message="a first records/s point")

    with prefix_proxy(daemon.url, "/conflux/") as url:
        before = render(url, tmp_path / "profile")
    assert before.texts["error"] == ""
    assert before.texts["ready"] == "ready"
    assert int(before.texts["refreshes"]) >= 2  # it polls on its own
    for name, count in COUNTS.items():
        row = before.rows["source"][name]
        assert (row["last_sync_type"], row["last_sync_result"], row["breaker"]) == ("full", "ok", "closed")
        assert row["records_synced"] == f"{count:,}" and row["success_rate"] == "100.0 %"
        assert row["watermark"] == status["sources"][name]["watermark"]
    assert {name: row["state"] for name, row in before.rows["worker"].items()} == {
        w["name"]: "running" for w in status["workers"]}
    assert {name: row["pid"] for name, row in before.rows["worker"].items()} == {
        w["name"]: str(w["pid"]) for w in status["workers"]}
    assert {key: row["owner"] for key, row in before.rows["partition"].items()} == {
        f"{p['topic']}/{p['partition']}": p["owner"] for p in status["partitions"]}
    assert all(row["lag"] == "0" for row in before.rows["partition"].values())
    assert before.texts["total-lag"] == "0" and before.texts["sink-breaker"] == "closed"
    sink_row = before.rows["sink"]["default"]
    assert (sink_row["type"], sink_row["circuit"], sink_row["last_status"]) == ("http", "closed", "200")
    assert sink_row["sources"] == "customers, products"
    assert before.chart["fetched"] and before.chart["delivered"]

    synced = daemon.status()["sources"]["customers"]["last_sync_at"]
    assert requests.post(f"{daemon.url}/sync/customers?full=true", timeout=10).status_code == 202
    wait_until(lambda: daemon.sync_ok("customers", sync_type="full", after=synced), timeout_s=30,
               message="the requested full sync")
    wait_until(lambda: daemon.status()["throughput"]["sources"]["customers"]["fetched_total"] >= 600,
               timeout_s=15, message="the records/s history to take in the second pass")

    after = render(daemon.url + "/", tmp_path / "profile")
    assert after.rows["source"]["customers"]["records_synced"] == "600"
    assert after.rows["source"]["products"]["records_synced"] == "200"
    assert after.rows["source"]["customers"]["last_sync_at"] != "never"
    assert len(after.chart["fetched"]) > len(before.chart["fetched"])  # the chart moved on
    assert float(after.texts["chart-max"].replace(",", "")) > 0
    assert daemon.stop() == 0, daemon.log()[-3000:]


@pytest.mark.browser
def test_with_a_token_the_page_asks_for_it_or_takes_it_from_the_link(upstream_factory, analytics, daemon_factory,
                                                                     tmp_path):
    chromium()
    token = "page-token-4e1f/+="  # characters a link must carry encoded
    upstream = upstream_factory(**COUNTS)
    daemon = daemon_factory(sources=[source(name, upstream.url, poll_interval_s=3600) for name in COUNTS],
                            sink_url=analytics.url, control={"token": token})
    wait_converged(upstream.url, analytics.url, {name: name for name in COUNTS}, timeout_s=60)
    status = requests.get(f"{daemon.url}/status", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()

    asked = render(daemon.url + "/", tmp_path / "asked")
    assert "login" not in asked.hidden and "needs its control token" in asked.texts["error"]
    assert asked.rows["source"] == {} and asked.rows["worker"] == {}  # nothing shown without the token
    assert asked.texts["refreshes"] == "1"  # it stopped polling until a token is given

    wrong = render(daemon.url + "/#token=not-it", tmp_path / "wrong")
    assert "login" not in wrong.hidden and "refused that token" in wrong.texts["error"]

    shown = render(daemon.url + "/#token=" + quote(token, safe=""), tmp_path / "shown")
    assert shown.texts["error"] == "" and "login" in shown.hidden
    assert shown.texts["ready"] == "ready" and int(shown.texts["refreshes"]) >= 2
    assert {name: row["records_synced"] for name, row in shown.rows["source"].items()} == {
        name: f"{count:,}" for name, count in COUNTS.items()}
    assert set(shown.rows["worker"]) == {w["name"] for w in status["workers"]}
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_throughput_turns_counter_samples_into_rates_over_a_bounded_window():
    """Pure logic of the records/s history that /status carries for the page and `conflux top`."""
    from conflux.workers.status_page import Throughput

    fetched, delivered = Throughput.COUNTERS["fetched"], Throughput.COUNTERS["delivered"]
    history = Throughput(interval_s=2.0, window_s=6.0)
    history.add(100.0, 1000.0, {fetched: {"a": 0.0}, delivered: {}})
    assert history.view()["points"] == []  # one sample is no rate yet
    history.add(102.0, 1002.0, {fetched: {"a": 100.0, "b": 50.0}, delivered: {"a": 20.0}})
    history.add(104.0, 1004.0, {fetched: {"a": 100.0, "b": 50.0}, delivered: {"a": 10.0}})  # files were reset
    view = history.view()
    assert view["points"] == [{"t": 1002.0, "fetched_per_s": 75.0, "delivered_per_s": 10.0},
                              {"t": 1004.0, "fetched_per_s": 0.0, "delivered_per_s": 0.0}]
    assert view["sources"]["a"] == {"fetched_per_s": 0.0, "fetched_total": 100.0, "delivered_per_s": 0.0,
                                    "delivered_total": 10.0}
    for second in range(106, 120, 2):
        history.add(float(second), float(second) + 900, {fetched: {"a": 100.0}, delivered: {}})
    assert len(history.view()["points"]) == 3  # window_s / interval_s

