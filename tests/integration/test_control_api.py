"""The control API of a real daemon: /health, /ready, /status, POST /sync/{source}, POST /webhook/{source}
(signed with a timestamp, never replayed) and the bearer token. Polling is set to an hour, so every sync
and record seen here was caused by the request under test."""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import msgspec
import requests

from tests.fixtures.daemon import source, wait_converged
from tests.support import wait_until

SECRETS = {"customers": "whsec-customers-1", "products": "whsec-products-2"}
COLLECTIONS = {"customers": "customers", "products": "products"}
COUNTS = {"customers": 300, "products": 200}
QUIET = {"poll_interval_s": 3600}


def stamp_now() -> str:
    """updated_at for a webhook record: newer than the upstream's copy, and not beyond the source's
    max_clock_skew_s (a record from the future is a dead letter)."""
    return datetime.now(UTC).isoformat()


def sign(secret: str, body: bytes, timestamp: str) -> str:
    """The documented scheme, written out independently of the daemon's code."""
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def now_s() -> str:
    return str(int(time.time()))


def start(upstream_factory, analytics, daemon_factory, **sections):
    upstream = upstream_factory(**COUNTS)
    daemon = daemon_factory(
        sources=[source("customers", upstream.url, webhook_secret=SECRETS["customers"], webhook_max_bytes=4096,
                        **QUIET),
                 source("products", upstream.url, webhook_secret=SECRETS["products"], **QUIET)],
        sink_url=analytics.url, **sections)
    wait_converged(upstream.url, analytics.url, COLLECTIONS, timeout_s=60)
    return upstream, daemon


def post_webhook(url: str, name: str, body: bytes, *, signature: str | None = "", timestamp: str | None = "",
                 **kwargs) -> requests.Response:
    """Signed as a sender would (now, the source's secret) unless ``signature``/``timestamp`` say otherwise;
    None leaves that header out."""
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    timestamp = now_s() if timestamp == "" else timestamp
    if timestamp is not None:
        headers["X-Conflux-Timestamp"] = timestamp
    if signature is not None:
        headers["X-Conflux-Signature"] = signature or sign(SECRETS[name], body, timestamp or "")
    return requests.post(f"{url}/webhook/{name}", data=body, headers=headers, timeout=30, **kwargs)


def ready_answer(url: str, status: int) -> dict | None:
    """GET /ready's body if it answered ``status``."""
    response = requests.get(f"{url}/ready", timeout=10)
    return response.json() if response.status_code == status else None


def fetched_total(url: str, name: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f'conflux_records_fetched_total{{source="{name}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no conflux_records_fetched_total for {name}")


def test_health_is_always_up_and_ready_follows_the_workers(upstream_factory, analytics, daemon_factory):
    _, daemon = start(upstream_factory, analytics, daemon_factory)
    assert requests.get(f"{daemon.url}/health", timeout=10).json() == {"status": "ok"}
    ready = wait_until(lambda: ready_answer(daemon.url, 200), timeout_s=20, message="/ready 200")
    assert ready == {"ready": True, "log": True, "reasons": []}

    os.kill(daemon.worker_pid("consumer", 0), signal.SIGKILL)
    not_ready = wait_until(lambda: ready_answer(daemon.url, 503), timeout_s=10, interval_s=0.02,
                           message="/ready 503 while consumer-0 is down")
    assert not_ready["ready"] is False
    assert any("consumer-0" in reason for reason in not_ready["reasons"]), not_ready
    assert requests.get(f"{daemon.url}/health", timeout=10).status_code == 200  # liveness is not readiness
    wait_until(lambda: ready_answer(daemon.url, 200), timeout_s=30, message="/ready 200 again once consumer-0 is back")
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_status_reports_sources_workers_and_partitions(upstream_factory, analytics, daemon_factory):
    _, daemon = start(upstream_factory, analytics, daemon_factory)
    status = wait_until(lambda: (s := daemon.status()) and all(p["lag"] == 0 for p in s["partitions"]) and s,
                        timeout_s=20, message="every partition's lag reported at 0")
    now = time.time()
    for name, count in COUNTS.items():
        report = status["sources"][name]
        assert report["last_sync_type"] == "full" and report["last_sync_result"] == "ok"
        assert now - 120 < report["last_sync_at"] <= now
        assert report["records_synced"] == count
        assert report["success_rate"] == 1.0
        assert report["watermark"].endswith("Z") and report["breaker"] == "closed"
    workers = {w["name"]: w for w in status["workers"]}
    assert set(workers) == {"control-0", "fetcher-0", "consumer-0", "consumer-1", "merger-0", "merger-1"}
    for worker in workers.values():
        assert worker["state"] == "running" and worker["role"] == worker["name"].split("-")[0]
        os.kill(worker["pid"], 0)  # a live process
        assert now - 30 < worker["last_heartbeat_at"] <= now + 1
    owned = [tuple(tp) for name in ("consumer-0", "consumer-1") for tp in workers[name]["partitions"]]
    every_partition = {(topic, p) for topic in COLLECTIONS for p in range(4)}
    assert sorted(owned) == sorted(every_partition)  # each partition owned exactly once
    assert {(p["topic"], p["partition"]): p["owner"] for p in status["partitions"]} == {
        tuple(tp): name for name in ("consumer-0", "consumer-1") for tp in workers[name]["partitions"]}
    assert all(p["lag"] == 0 and p["committed"] == p["end"] for p in status["partitions"])
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_sync_now_starts_a_sync_of_the_requested_type(upstream_factory, analytics, daemon_factory):
    _, daemon = start(upstream_factory, analytics, daemon_factory)
    before = daemon.status()["sources"]["customers"]

    answer = requests.post(f"{daemon.url}/sync/customers", timeout=10)
    assert answer.status_code == 202 and answer.json()["accepted"] is True
    incremental = wait_until(lambda: daemon.sync_ok("customers", sync_type="incremental",
                                                    after=before["last_sync_at"]),
                             timeout_s=20, message="an incremental sync of customers")
    answer = requests.post(f"{daemon.url}/sync/customers?full=true", timeout=10)
    assert answer.status_code == 202 and answer.json()["full"] is True
    full = wait_until(lambda: daemon.sync_ok("customers", sync_type="full", after=incremental["last_sync_at"]),
                      timeout_s=20, message="a full sync of customers")
    assert full["syncs_ok"] == before["syncs_ok"] + 2
    assert full["last_sync_records"] == COUNTS["customers"]  # a full pass reads everything again
    assert daemon.status()["sources"]["products"]["syncs_ok"] == 1  # the other source was left alone
    assert requests.post(f"{daemon.url}/sync/nope", timeout=10).status_code == 404
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_signed_webhooks_reach_the_sink(upstream_factory, analytics, daemon_factory):
    upstream, daemon = start(upstream_factory, analytics, daemon_factory)
    changed = [requests.put(f"{upstream.url}/api/customers/{key}", json={"name": f"webhook {key}"}, timeout=10)
               for key in (7, 8, 9)]
    assert all(r.status_code == 200 for r in changed)
    one, many = changed[0].content, b"[" + b",".join(r.content for r in changed[1:]) + b"]"

    assert post_webhook(daemon.url, "customers", one).status_code == 202
    answer = post_webhook(daemon.url, "customers", many)
    assert answer.status_code == 202 and answer.json() == {"accepted": 2, "dead_lettered": 0}
    # Polling is an hour away: only the webhooks can have carried the three changes to the sink.
    wait_converged(upstream.url, analytics.url, COLLECTIONS, timeout_s=30)
    report = daemon.status()["sources"]["customers"]
    assert report["syncs_ok"] == 1
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_webhooks_unsigned_wrongly_signed_stale_or_too_large_are_refused(upstream_factory, analytics,
                                                                         daemon_factory):
    _, daemon = start(upstream_factory, analytics, daemon_factory)
    body = msgspec.json.encode({"id": 1, "updated_at": "2030-01-01T00:00:00Z", "name": "forged"})
    secret, now = SECRETS["customers"], int(time.time())
    body_only = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()  # the scheme before timestamps

    def post(signature: str | None = "", timestamp: str | None = "") -> int:
        return post_webhook(daemon.url, "customers", body, signature=signature, timestamp=timestamp).status_code

    refused = {
        "unsigned": post(signature=None),
        "no timestamp": post(timestamp=None, signature=sign(secret, body, "")),
        "body-only signature": post(signature=body_only),
        "other source's secret": post(signature=sign(SECRETS["products"], body, str(now))),
        "another body's signature": post(signature=sign(secret, body + b" ", str(now))),
        "another timestamp's signature": post(timestamp=str(now), signature=sign(secret, body, str(now - 1))),
        # Well beyond the 300 s tolerance, so a slow machine's seconds between here and the check do not matter.
        "stale": post(timestamp=str(now - 900), signature=sign(secret, body, str(now - 900))),
        "from the future": post(timestamp=str(now + 900), signature=sign(secret, body, str(now + 900))),
        "timestamp not a number": post(timestamp="soon", signature=sign(secret, body, "soon")),
        "not hex": post(signature="sha256=zz"),
        "no scheme": post(signature=sign(secret, body, str(now))[len("sha256="):]),
    }
    assert refused == dict.fromkeys(refused, 401)

    big = b'{"id": 2, "pad": "' + b"x" * 4096 + b'"}'  # customers allows 4096 bytes
    assert post_webhook(daemon.url, "customers", big).status_code == 413
    stamp = now_s()
    streamed = requests.post(f"{daemon.url}/webhook/customers", data=iter([big[:2048], big[2048:]]), timeout=30,
                             headers={"X-Conflux-Signature": sign(secret, big, stamp), "X-Conflux-Timestamp": stamp})
    assert streamed.status_code == 413  # chunked: no Content-Length to check up front
    huge = b'{"sku": "x", "pad": "' + b"y" * (1 << 20) + b'"}'  # products has the default of 1 MiB
    assert post_webhook(daemon.url, "products", huge).status_code == 413
    assert requests.post(f"{daemon.url}/webhook/nope", data=body, timeout=10).status_code == 404

    assert fetched_total(daemon.url, "customers") == COUNTS["customers"]  # nothing refused was published
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_a_replayed_webhook_is_refused_and_a_fresh_signature_is_not(upstream_factory, analytics, daemon_factory):
    _, daemon = start(upstream_factory, analytics, daemon_factory)
    body = msgspec.json.encode({"id": 4, "name": "pushed once", "updated_at": stamp_now()})
    stamp = now_s()
    signature = sign(SECRETS["customers"], body, stamp)
    first = post_webhook(daemon.url, "customers", body, signature=signature, timestamp=stamp)
    assert first.status_code == 202, first.text
    replays = [post_webhook(daemon.url, "customers", body, signature=signature, timestamp=stamp) for _ in range(3)]
    assert [r.status_code for r in replays] == [409, 409, 409] and "replay" in replays[0].json()["error"]
    # The same records signed again at another second are a new request, and taken.
    later = str(int(stamp) + 1)
    assert post_webhook(daemon.url, "customers", body, timestamp=later).status_code == 202
    assert fetched_total(daemon.url, "customers") == COUNTS["customers"] + 2  # two accepted, three refused
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_the_demo_upstreams_signed_webhooks_pass_a_token_guarded_daemon(upstream_factory, analytics, daemon_factory):
    """As deployed on Kubernetes: a control token is set, and the sender knows only the webhook secret."""
    port, secret = free_port(), "whsec-shared-3"
    upstream = upstream_factory(**COUNTS, webhook_secret=secret,
                                webhook_url=f"http://127.0.0.1:{port}/webhook/{{collection}}")
    daemon = daemon_factory(sources=[source(name, upstream.url, webhook_secret=secret, **QUIET) for name in COUNTS],
                            sink_url=analytics.url, control={"listen": f"127.0.0.1:{port}", "token": "ctl-k8s-1"})
    wait_converged(upstream.url, analytics.url, COLLECTIONS, timeout_s=60)
    for key in range(1, 21):
        assert requests.put(f"{upstream.url}/api/customers/{key}", json={"name": f"pushed {key}"},
                            timeout=10).status_code == 200
    # Polling is an hour away: only the webhooks can have carried the twenty changes to the sink.
    wait_converged(upstream.url, analytics.url, COLLECTIONS, timeout_s=30)
    webhooks = requests.get(f"{upstream.url}/stats", timeout=10).json()["webhooks"]
    assert webhooks["delivered"] >= 20 and webhooks["failed"] == 0, webhooks
    assert daemon.stop() == 0, daemon.log()[-3000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_webhook_202_means_durable_in_the_log(upstream_factory, analytics, daemon_factory):
    """Answered 202 while the sink is down, then the whole daemon is killed: the record still arrives."""
    _, daemon = start(upstream_factory, analytics, daemon_factory)
    assert requests.post(f"{analytics.url}/admin/outage", json={"seconds": 600}, timeout=10).status_code == 200
    body = msgspec.json.encode({"id": 900001, "name": "only in a webhook", "updated_at": stamp_now()})
    assert post_webhook(daemon.url, "customers", body).status_code == 202

    os.killpg(daemon.pid, signal.SIGKILL)  # the supervisor and every worker, no chance to flush anything
    daemon.wait_exit(timeout_s=10)
    assert requests.post(f"{analytics.url}/admin/outage", json={"seconds": 0}, timeout=10).status_code == 200
    restarted = daemon.restart()
    try:
        record = wait_until(lambda: requests.get(f"{analytics.url}/records/customers/900001", timeout=10).json()
                            .get("data"), timeout_s=60, message="the webhook's record in the sink")
        assert record["name"] == "only in a webhook"
    finally:
        restarted.stop()


def test_the_token_guards_status_sync_and_metrics_and_webhooks_need_only_their_signature(
        upstream_factory, analytics, daemon_factory):
    token = "ctl-token-5f2a9c"
    _, daemon = start(upstream_factory, analytics, daemon_factory,
                      control={"token": token, "metrics_require_token": True})

    def call(method: str, path: str, auth: str | None) -> int:
        headers = {"Authorization": auth} if auth else {}
        body = msgspec.json.encode({"id": 3, "name": f"via webhook {time.monotonic()}",
                                    "updated_at": stamp_now()})
        if path.startswith("/webhook/"):
            stamp = now_s()
            headers |= {"X-Conflux-Signature": sign(SECRETS["customers"], body, stamp), "X-Conflux-Timestamp": stamp}
        return requests.request(method, f"{daemon.url}{path}", headers=headers, data=body if method == "POST" else None,
                                timeout=10).status_code

    open_paths = [("GET", "/"), ("GET", "/health"), ("GET", "/ready"), ("POST", "/webhook/customers")]
    guarded = [("GET", "/status"), ("POST", "/sync/customers"), ("GET", "/metrics"), ("GET", "/nowhere"),
               ("GET", "/webhook/customers")]
    for auth in (None, f"Bearer {token}x", token, "Bearer "):
        assert {p: call(m, p, auth) for m, p in open_paths} == {"/": 200, "/health": 200, "/ready": 200,
                                                                 "/webhook/customers": 202}, auth
        assert {f"{m} {p}": call(m, p, auth) for m, p in guarded} == {f"{m} {p}": 401 for m, p in guarded}, auth
    assert {f"{m} {p}": call(m, p, f"Bearer {token}") for m, p in guarded} == {
        "GET /status": 200, "POST /sync/customers": 202, "GET /metrics": 200, "GET /nowhere": 404,
        "GET /webhook/customers": 405}
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_a_ready_flood_costs_the_supervisor_a_bounded_number_of_snapshots(upstream_factory, analytics,
                                                                         daemon_factory):
    _, daemon = start(upstream_factory, analytics, daemon_factory)
    before = status_requests(daemon.url)
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: requests.get(f"{daemon.url}/ready", timeout=10).status_code, range(1500)))
    elapsed_s = time.monotonic() - started
    assert answers == [200] * 1500
    asked = status_requests(daemon.url) - before
    # One snapshot a second at most (READY_MAX_AGE_S), plus one per boundary the flood straddles.
    assert 1 <= asked <= elapsed_s / 1.0 + 2, (asked, elapsed_s)
    assert daemon.stop() == 0, daemon.log()[-3000:]


def status_requests(url: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith('conflux_control_status_requests_total{endpoint="ready"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
