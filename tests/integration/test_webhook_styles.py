"""Vendor webhooks end to end: a real daemon receives the demo upstream's webhooks signed and wrapped as
Conflux, GitHub, Stripe or a generic HMAC header would send them, changes and deletes (soft and hard)
alike, and the sink converges to the upstream's checksum. Polling is an hour away, so only the
webhooks can carry the changes; the GitHub and Stripe sources set no `deleted` field, so only
`webhook_delete_when` can make their events deletes. Then the refusals, with hand-signed requests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time
from datetime import UTC, datetime

import pytest
import requests

from tests.fixtures.daemon import source, wait_converged
from tests.support import wait_until

SECRET = "whsec-vendor-1"
QUIET = {"poll_interval_s": 3600, "full_sync_interval_s": 7200}
CUSTOMERS = {"customers": "customers"}

STYLES = {
    "conflux": ({"webhook_style": "conflux"}, {"deleted": "deleted"}),
    "github": ({"webhook_style": "github", "webhook_envelope": "github"},
               {"webhook_signature": "github", "webhook_records_path": "customer",
                "webhook_delete_when": {"field": "action", "in": ["deleted"]}}),
    "stripe": ({"webhook_style": "stripe", "webhook_envelope": "stripe"},
               {"webhook_signature": "stripe", "webhook_records_path": "data.object",
                "webhook_delete_when": {"field": "type", "in": ["customer.deleted"]}}),
    "hmac": ({"webhook_style": "hmac", "webhook_hmac_header": "X-Shopify-Hmac-Sha256", "webhook_hmac_prefix": "",
              "webhook_hmac_encoding": "base64"},
             {"webhook_signature": "hmac", "webhook_signature_header": "X-Shopify-Hmac-Sha256",
              "webhook_signature_encoding": "base64", "deleted": "deleted"}),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sink_stats(analytics_url: str) -> dict:
    return requests.get(f"{analytics_url}/stats", timeout=10).json()["sources"].get("customers", {})


@pytest.mark.parametrize("style", sorted(STYLES))
def test_each_webhook_style_carries_changes_and_deletes_to_the_sink(style, upstream_factory, analytics,
                                                                     daemon_factory):
    upstream_flags, source_keys = STYLES[style]
    port = free_port()
    upstream = upstream_factory(customers=300, products=10, webhook_secret=SECRET,
                                webhook_url=f"http://127.0.0.1:{port}/webhook/{{collection}}", **upstream_flags)
    daemon = daemon_factory(sources=[source("customers", upstream.url, webhook_secret=SECRET, **QUIET, **source_keys)],
                            sink_url=analytics.url, control={"listen": f"127.0.0.1:{port}"})
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=60)
    api = f"{upstream.url}/api/customers"
    for key in range(1, 11):
        assert requests.put(f"{api}/{key}", json={"name": f"{style} {key}"}, timeout=10).status_code == 200
    for key in range(11, 21):
        assert requests.delete(f"{api}/{key}", params={"style": "soft" if key % 2 else "hard"},
                               timeout=10).status_code == 200
    assert requests.post(api, json={"name": f"new via {style}"}, timeout=10).status_code == 201
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    assert sink_stats(analytics.url)["deletes_applied"] == 10
    webhooks = wait_until(lambda: (stats := requests.get(f"{upstream.url}/stats", timeout=10).json()["webhooks"])
                          ["delivered"] >= 21 and stats, timeout_s=10, message="webhooks delivered")
    assert webhooks["failed"] == 0, webhooks
    assert daemon.stop() == 0, daemon.log()[-3000:]


# -- refusals ------------------------------------------------------------------------------------------


def stamp_now() -> str:
    return datetime.now(UTC).isoformat()


def digest(body: bytes, prefix: bytes = b"") -> bytes:
    return hmac.new(SECRET.encode(), prefix + body, hashlib.sha256).digest()


def post(url: str, name: str, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(f"{url}/webhook/{name}", data=body, timeout=30,
                         headers={"Content-Type": "application/json", **headers})


def stalled_answer(url: str, name: str, headers: dict[str, str]) -> tuple[str, float]:
    """The status line answered to a POST that announces a body and never sends it, and how long it took."""
    host, port = url.removeprefix("http://").split(":")
    lines = [f"POST /webhook/{name} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
             "Content-Length: 100000", *(f"{k}: {v}" for k, v in headers.items())]
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = sock.recv(4096).decode(errors="replace")
    return answer.split("\r\n", 1)[0], time.monotonic() - started


def test_vendor_signatures_are_refused_when_missing_wrong_stale_or_replayed(upstream_factory, analytics,
                                                                             daemon_factory):
    upstream = upstream_factory(customers=20, products=20)
    daemon = daemon_factory(sources=[
        source("github", upstream.url, path="customers", webhook_secret=SECRET, webhook_signature="github",
               webhook_records_path="customer", **QUIET),
        source("stripe", upstream.url, path="customers", webhook_secret=SECRET, webhook_signature="stripe",
               webhook_records_path="data.object", **QUIET),
        source("hmac", upstream.url, path="customers", webhook_secret=SECRET, webhook_signature="hmac",
               webhook_signature_header="X-Signature", webhook_signature_prefix="v1=", **QUIET)],
        sink_url=analytics.url)
    daemon.wait_running()
    record = {"id": 5, "name": "pushed", "updated_at": stamp_now()}

    # GitHub: the signature of the body alone; the same signed body again is a replay.
    body = json.dumps({"action": "edited", "customer": record}).encode()
    signed = {"X-Hub-Signature-256": "sha256=" + digest(body).hex()}
    assert post(daemon.url, "github", body, {}).status_code == 401
    assert post(daemon.url, "github", body, {"X-Hub-Signature-256": "sha256=" + "0" * 64}).status_code == 401
    assert post(daemon.url, "github", body + b" ", signed).status_code == 401
    assert post(daemon.url, "github", body, signed).status_code == 202
    replay = post(daemon.url, "github", body, {**signed, "X-GitHub-Delivery": "another-id"})
    assert replay.status_code == 409 and "replay" in replay.json()["error"]
    ping = json.dumps({"zen": "Design for failure."}).encode()
    refused = post(daemon.url, "github", ping, {"X-Hub-Signature-256": "sha256=" + digest(ping).hex()})
    assert refused.status_code == 400 and "webhook_records_path 'customer'" in refused.json()["error"]

    # Stripe: t and v1; outside the tolerance refused, the same header and body again a replay.
    body = json.dumps({"id": "evt_1", "type": "customer.updated", "data": {"object": record}}).encode()
    now = int(time.time())
    stripe = {"Stripe-Signature": f"t={now},v0={'1' * 64},v1={digest(body, f'{now}.'.encode()).hex()}"}
    stale = {"Stripe-Signature": f"t={now - 400},v1={digest(body, f'{now - 400}.'.encode()).hex()}"}
    assert "more than 300 s away" in post(daemon.url, "stripe", body, stale).json()["error"]
    assert post(daemon.url, "stripe", body, {"Stripe-Signature": f"t={now + 1}" + stripe["Stripe-Signature"][12:]}) \
        .status_code == 401
    assert post(daemon.url, "stripe", body, stripe).status_code == 202
    assert post(daemon.url, "stripe", body, stripe).status_code == 409

    # Generic HMAC: the configured header and prefix.
    body = json.dumps(record).encode()
    assert post(daemon.url, "hmac", body, {"X-Signature": digest(body).hex()}).status_code == 401  # no prefix
    assert post(daemon.url, "hmac", body, {"X-Signature": "v1=" + digest(body).hex()}).status_code == 202

    # Headers that can never pass are answered before the body is read (it never comes here).
    for name, headers in (("github", {}), ("stripe", {"Stripe-Signature": f"t={now - 400},v1={'a' * 64}"}),
                          ("hmac", {"X-Signature": "v1=" + base64.b64encode(b"x" * 32).decode()})):
        status, took_s = stalled_answer(daemon.url, name, headers)
        assert status.startswith("HTTP/1.1 401") and took_s < 10, (name, status, took_s)

    accepted = {name: daemon.metric("conflux_webhook_requests_total", source=name, status="202")
                for name in ("github", "stripe", "hmac")}
    assert accepted == {"github": 1, "stripe": 1, "hmac": 1}, accepted
    assert daemon.stop() == 0, daemon.log()[-3000:]
