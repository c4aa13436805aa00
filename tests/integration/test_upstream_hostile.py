"""The daemon against a hostile or buggy upstream (the demo upstream's hostile flags), all real processes
on 127.0.0.1. A second demo upstream with --record-requests plays "the foreign origin" and shows every
request that reached it, headers and bodies.

- Credentials and static headers go only to the source's own origin: a next link or a redirect to
  another origin fails the sync, unless allowed_origins names it, and then it gets none of them (nor
  a cookie); a token request is never redirected anywhere.
- One record too deep to decode goes to the DLQ; the rest of its page arrives; the watermark moves.
- A record stamped in 2999 goes to the DLQ and never becomes the watermark.
- The same two in a webhook body: the other records of the body are accepted.
- A looping cursor or next link, a page count past max_pages_per_sync, a page (or gzip bomb) past
  max_page_bytes: each fails the sync with a clear error in /status and the log, and the daemon runs on.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import msgspec
import pytest
import requests

from tests.fixtures.daemon import source, wait_converged
from tests.support import REPO, wait_until

TOKEN = "tok-hostile-7d1e2f"
CLIENT_SECRET = "cs-hostile-93ab0c"
TENANT = "acme-tenant-5521"
CUSTOMERS = {"customers": "customers"}
BEARER = {"Authorization": f"Bearer {TOKEN}"}
# What must never reach another origin, by header name.
PRIVATE_HEADERS = {"authorization", "x-api-key", "x-tenant", "cookie"}


def _received(foreign) -> list[dict]:
    """The requests the foreign origin saw, other than the test's own look at them."""
    view = requests.get(f"{foreign.url}/admin/requests", timeout=10).json()
    assert view["recording"], "start the foreign upstream with record_requests=True"
    return [r for r in view["requests"] if not r["path_qs"].startswith("/admin/")]


def _assert_nothing_private(foreign) -> list[dict]:
    received = _received(foreign)
    for request in received:
        names = {name.lower() for name, _value in request["headers"]}
        assert not names & PRIVATE_HEADERS, f"{request['path_qs']} carried {names & PRIVATE_HEADERS}"
        text = msgspec.json.encode(request).decode()
        for secret in (TOKEN, CLIENT_SECRET, TENANT):
            assert secret not in text, f"{request['path_qs']} carried a secret"
    return received


def _report(daemon, name: str = "customers") -> dict:
    return daemon.status()["sources"][name]


def _failed_with(daemon, *words: str, timeout_s: float = 60.0) -> dict:
    def failed():
        report = _report(daemon)
        result = report.get("last_sync_result") or ""
        return report if result.startswith("failed") and all(word in result for word in words) else None

    try:
        return wait_until(failed, timeout_s=timeout_s, message=f"a sync failed with {words}")
    except AssertionError:
        raise AssertionError(f"last result: {_report(daemon).get('last_sync_result')!r}") from None


def _hop_setup(upstream_factory, hop: str) -> tuple:
    """The foreign origin, and a primary upstream whose pages lead there (by next link or redirect),
    with the source that walks them: credentials, a static header, and a cookie from the primary."""
    foreign = upstream_factory(customers=450, products=0, record_requests=True)
    if hop == "next_link":
        primary = upstream_factory(customers=450, products=0, require_token=TOKEN, set_cookie=True,
                                   count_header="X-Tenant", next_link_origin=foreign.url)
        options = {"path": "customers/link", "pagination": "link",
                   "auth": {"type": "bearer", "token_env": "CRM_TOKEN"}}
    else:
        primary = upstream_factory(customers=450, products=0, require_token=TOKEN, set_cookie=True,
                                   count_header="X-Tenant", redirect_pages_to=foreign.url)
        options = {"auth": {"type": "header", "header": "X-API-Key", "value_env": "CRM_TOKEN"}}
    return foreign, primary, {"page_size": 100, "poll_interval_s": 0.5, "headers": {"X-Tenant": TENANT}, **options}


@pytest.mark.parametrize("hop", ["next_link", "redirect"])
def test_a_hop_to_another_origin_fails_the_sync_and_nothing_reaches_it(hop, upstream_factory, analytics,
                                                                       daemon_factory):
    """Regression: next links were followed to any origin with the source's Authorization, API key and
    static headers, and aiohttp kept the API key (and cookies) across a cross-origin redirect."""
    foreign, primary, options = _hop_setup(upstream_factory, hop)
    daemon = daemon_factory(sources=[source("customers", primary.url, **options)], sink_url=analytics.url,
                            env={"CRM_TOKEN": TOKEN})
    report = _failed_with(daemon, "refused", f"origin http://127.0.0.1:{foreign.url.rsplit(':', 1)[1]}",
                          "allowed_origins")
    assert report["syncs_ok"] == 0
    wait_until(lambda: _report(daemon)["syncs_failed"] >= 2, timeout_s=30, message="the next sync to fail as well")
    assert _received(foreign) == []
    assert "allowed_origins" in daemon.log() and TOKEN not in daemon.log()
    assert daemon.service.proc.poll() is None


@pytest.mark.parametrize("hop", ["next_link", "redirect"])
def test_an_allowed_origin_is_followed_without_credentials_static_headers_or_cookies(hop, upstream_factory,
                                                                                    analytics, daemon_factory):
    foreign, primary, options = _hop_setup(upstream_factory, hop)
    daemon = daemon_factory(sources=[source("customers", primary.url, allowed_origins=[foreign.url], **options)],
                            sink_url=analytics.url, env={"CRM_TOKEN": TOKEN})
    wait_converged(primary.url, analytics.url, CUSTOMERS, timeout_s=90, upstream_headers=BEARER)
    received = _assert_nothing_private(foreign)
    assert any(r["path_qs"].startswith("/api/customers") for r in received)
    # The source's own origin still got them all: the credentials and the static header.
    stats = requests.get(f"{primary.url}/stats", timeout=10).json()
    assert stats["auth"]["rejected"] == {} and sum(stats["auth"]["accepted"].values()) >= 1
    assert set(stats["collections"]["customers"]["headers"]["X-Tenant"]) == {TENANT}
    assert _report(daemon)["last_sync_result"] == "ok"


def test_a_redirected_token_request_is_not_followed_and_the_secret_stays_home(upstream_factory, analytics,
                                                                              daemon_factory):
    """Regression: aiohttp followed a 307 of the token request and re-sent the form, client secret
    included, to wherever it pointed."""
    foreign = upstream_factory(customers=10, products=0, record_requests=True, client_secret=CLIENT_SECRET)
    primary = upstream_factory(customers=300, products=0, client_secret=CLIENT_SECRET,
                               redirect_token_to=foreign.url)
    auth = {"type": "oauth2", "token_url": f"{primary.url}/oauth/token", "client_id": "conflux",
            "client_secret_env": "CRM_CLIENT_SECRET"}
    daemon = daemon_factory(sources=[source("customers", primary.url, poll_interval_s=0.5, auth=auth)],
                            sink_url=analytics.url, env={"CRM_CLIENT_SECRET": CLIENT_SECRET})
    _failed_with(daemon, "token endpoint answered 307", f"{foreign.url}/oauth/token", "not followed")
    assert _received(foreign) == []
    assert CLIENT_SECRET not in daemon.log()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conflux", *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ), timeout=120)


def _dead_letters(daemon) -> list[dict]:
    """`conflux dlq list --json`: a record too deep to decode is shown as its text."""
    out = _cli("dlq", "list", "-c", str(daemon.config_path), "--json")
    assert out.returncode == 0, out.stderr
    return [msgspec.json.decode(line) for line in out.stdout.splitlines()]


@pytest.mark.parametrize("backend", ["embedded", "kafka"])
def test_a_record_too_deep_to_decode_goes_to_the_dlq_and_its_page_and_the_watermark_move_on(
        backend, upstream_factory, analytics, daemon_factory, request):
    """Regression: a record nested ~1,000 levels deep failed the decode of its whole page; the sync
    failed every poll and the watermark never moved. Here 3,000 levels, on two pages; every later sync
    stores the same dead letters again, which the log must be able to read back."""
    upstream = upstream_factory(customers=700, products=0, deep_records=2, deep_record_depth=3000)
    deep = {entry["key"] for entry in requests.get(f"{upstream.url}/admin/malformed?records=0", timeout=10)
            .json()["customers"] if entry["reason"] == "too_deep"}
    assert len(deep) == 2
    log = {}
    if backend == "kafka":
        group = request.getfixturevalue("kafka_group_id")
        log = {"backend": "kafka", "bootstrap_servers": request.getfixturevalue("kafka_bootstrap"), "group": group,
               "topic_prefix": f"{group}.", "partitions": 4}
    daemon = daemon_factory(sources=[source("customers", upstream.url, page_size=100, poll_interval_s=0.5)],
                            sink_url=analytics.url, log=log)
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=90)
    report = wait_until(lambda: (r := _report(daemon))["last_sync_result"] == "ok" and r["watermark"] and r,
                        timeout_s=30, message="a successful sync with a watermark")
    assert report["watermark"].startswith("2026-")
    entries = wait_until(lambda: len(e := _dead_letters(daemon)) == 2 and e, timeout_s=30,
                         message="the two deep records in the DLQ")
    assert {entry["key"] for entry in entries} == {str(key) for key in deep}
    for entry in entries:
        assert entry["reason"].startswith("record is nested too deeply to decode") and entry["stage"] == "fetch"
        assert entry["source"] == "customers" and entry["record"].endswith("]" * 3000 + "}")
    # Incremental syncs go on from the watermark: a change arrives.
    requests.put(f"{upstream.url}/api/customers/5", json={"touched": time.time()}, timeout=10).raise_for_status()
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=60)
    assert _report(daemon)["watermark"] > report["watermark"]


def test_a_record_stamped_in_2999_goes_to_the_dlq_and_never_becomes_the_watermark(upstream_factory, analytics,
                                                                                 daemon_factory):
    """Regression: the 2999 stamp became the watermark; every later incremental sync asked for
    updated_since=2999... and real updates never arrived."""
    upstream = upstream_factory(customers=600, products=0, future_records=2)
    daemon = daemon_factory(sources=[source("customers", upstream.url, page_size=100, poll_interval_s=0.5)],
                            sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=90)
    entries = wait_until(lambda: len(e := _dead_letters(daemon)) == 2 and e, timeout_s=30, message="two dead letters")
    future = "'updated_at' is '2999-01-01T00:00:00Z', more than max_clock_skew_s = 300 s in the future"
    assert [entry["reason"] for entry in entries] == [future, future]
    for _change in range(2):  # each change must come through an incremental sync from the watermark
        requests.put(f"{upstream.url}/api/customers/7", json={"touched": time.time()}, timeout=10).raise_for_status()
        wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=60)
        watermark = datetime.fromisoformat(_report(daemon)["watermark"])
        assert watermark.timestamp() <= time.time() + 300
    assert _report(daemon)["last_sync_type"] == "incremental"


@pytest.mark.parametrize("case, upstream_options, source_options, words", [
    ("looping cursor", {"loop_after_pages": 3}, {"path": "customers/cursor", "pagination": "cursor"},
     ("pagination loops", "'next_cursor'")),
    ("looping link", {"loop_after_pages": 3}, {"path": "customers/link", "pagination": "link"},
     ("pagination loops", "next link")),
    ("too many pages", {}, {"max_pages_per_sync": 4}, ("more than 4 pages (max_pages_per_sync)",)),
])
def test_an_endless_walk_fails_the_sync_with_a_clear_error(case, upstream_options, source_options, words,
                                                            upstream_factory, analytics, daemon_factory):
    """Regression: a cursor or next link that repeated made a sync that never ended."""
    upstream = upstream_factory(customers=1000, products=0, **upstream_options)
    daemon = daemon_factory(sources=[source("customers", upstream.url, page_size=100, poll_interval_s=0.5,
                                            **source_options)], sink_url=analytics.url)
    _failed_with(daemon, *words)
    wait_until(lambda: _report(daemon)["syncs_failed"] >= 2, timeout_s=30, message="a second failed sync")
    report = _report(daemon)
    pages = sum(requests.get(f"{upstream.url}/stats", timeout=10).json()["collections"]["customers"]
                ["requests"].values())
    assert pages <= 5 * (report["syncs_failed"] + 1), f"{pages} page requests for {report['syncs_failed']} syncs"
    assert words[0] in daemon.log() and daemon.service.proc.poll() is None


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("upstream_options", [{"pad_pages_mib": 24}, {"pad_pages_mib": 400, "gzip_pages": True}],
                         ids=["oversized page", "gzip bomb"])
def test_a_page_past_max_page_bytes_fails_the_sync_without_filling_memory(upstream_options, upstream_factory,
                                                                          analytics, daemon_factory):
    """Regression: bodies were read whole, with automatic decompression: 400 MiB of a gzip bomb (about
    400 KiB on the wire) went into the fetcher's memory."""
    upstream = upstream_factory(customers=300, products=0, **upstream_options)
    daemon = daemon_factory(sources=[source("customers", upstream.url, page_size=100, poll_interval_s=0.5,
                                            max_page_bytes=8 << 20)], sink_url=analytics.url)
    _failed_with(daemon, "larger than 8388608 bytes (max_page_bytes")
    wait_until(lambda: _report(daemon)["syncs_failed"] >= 2, timeout_s=30, message="a second failed sync")
    assert _peak_rss_mib(daemon.worker_pid("fetcher")) < 200
    assert daemon.service.proc.poll() is None


def test_a_webhook_body_keeps_its_good_records_when_one_is_too_deep_and_one_from_the_future(
        upstream_factory, analytics, daemon_factory):
    secret = "whsec-hostile-1"
    upstream = upstream_factory(customers=300, products=0)
    daemon = daemon_factory(sources=[source("customers", upstream.url, webhook_secret=secret, poll_interval_s=3600)],
                            sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=60)
    changed = requests.put(f"{upstream.url}/api/customers/7", json={"name": "by webhook"}, timeout=10).content
    now = datetime.now().astimezone().isoformat()
    too_deep = b'{"id": 8, "updated_at": "%s", "x": %s}' % (now.encode(), b"[" * 3000 + b"]" * 3000)
    future = b'{"id": 9, "updated_at": "2999-01-01T00:00:00Z"}'
    body = b"[" + b", ".join([changed, too_deep, future]) + b"]"
    stamp = str(int(time.time()))  # the documented scheme: HMAC over "<timestamp>.<body>"
    signature = "sha256=" + hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    answer = requests.post(f"{daemon.url}/webhook/customers", data=body, timeout=30,
                           headers={"Content-Type": "application/json", "X-Conflux-Signature": signature,
                                    "X-Conflux-Timestamp": stamp})
    assert answer.status_code == 202 and answer.json() == {"accepted": 1, "dead_lettered": 2}, answer.text
    # Polling is an hour away: only the webhook can have carried the change.
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    entries = {entry["key"]: entry["reason"] for entry in _dead_letters(daemon)}
    assert entries.keys() == {"8", "9"} and entries["8"].startswith("record is nested too deeply")
    assert "max_clock_skew_s" in entries["9"]
