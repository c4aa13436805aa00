"""Secrets stay out of every place a running daemon shows them (issue 13, finding 10): `conflux config
check`, the logs, /status and the dead letters, for each form: URL userinfo, `?api_key=` values, Cookie
and signature headers, Kafka keys. The rules themselves are tested form by form in tests/unit."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.fixtures.daemon import source
from tests.support import REPO, wait_until

SECRETS = ("pw-userinfo", "k-query", "c-cookie", "k-signature", "k-pem-body", "k-sasl")
KAFKA = {"producer": {"ssl.key.pem": "-----BEGIN PRIVATE KEY-----\nk-pem-body\n-----END PRIVATE KEY-----",
                      "sasl.password": "k-sasl", "linger.ms": 5}}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conflux", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def _with_secrets(url: str) -> str:
    """``http://127.0.0.1:P/api/x`` with credentials in its userinfo and its query string."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://bob:pw-userinfo@{rest}?api_key=k-query"


def test_no_secret_form_reaches_config_check_logs_status_or_dead_letters(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=200, products=0, malformed_rate=0.05)
    headers = {"Cookie": "sid=c-cookie", "X-Signature-Key": "k-signature", "X-Tenant": "acme"}
    customers = source("customers", upstream.url, headers=headers, poll_interval_s=3600)
    customers["url"] = _with_secrets(customers["url"])
    # Nothing listens on port 1: every sync fails, and the error quotes the URL.
    broken = {"name": "orders", "url": _with_secrets("http://127.0.0.1:1/api/orders"), "poll_interval_s": 3600,
              "timeout_s": 0.5}
    daemon = daemon_factory(sources=[customers, broken], sink_url=analytics.url, kafka=KAFKA,
                            retry={"base_s": 0.05, "max_s": 0.1, "max_attempts": 2})

    check = _cli("config", "check", "-c", str(daemon.config_path))
    assert check.returncode == 0, check.stderr
    _assert_clean(check.stdout, "config check")
    assert "http://***@127.0.0.1" in check.stdout and "api_key=***" in check.stdout
    assert 'X-Tenant = "acme"' in check.stdout and 'Cookie = "***"' in check.stdout  # names and plain values stay

    failed = wait_until(lambda: _failed_status(daemon), timeout_s=60, message="the orders sync to fail")
    assert "127.0.0.1:1" in failed["sources"]["orders"]["last_sync_result"]  # the error still says where
    _assert_clean(json.dumps(failed), "/status")

    letters = wait_until(lambda: _dead_letters(daemon), timeout_s=60, message="the malformed records in the DLQ")
    assert all("api_key=***" in letter["origin"] and "127.0.0.1" in letter["origin"] for letter in letters)
    _assert_clean(json.dumps(letters), "dead letters")

    assert daemon.stop() == 0
    log = daemon.log()
    assert "sync failed" in log and "api_key=***" in log  # the failure is logged with its URL, redacted
    _assert_clean(log, "the daemon's log")


def _failed_status(daemon) -> dict | None:
    status = daemon.status()
    return status if status["sources"]["orders"].get("last_sync_result", "").startswith("failed") else None


def _dead_letters(daemon) -> list[dict]:
    out = _cli("dlq", "list", "-c", str(daemon.config_path), "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _assert_clean(text: str, where: str) -> None:
    leaked = [secret for secret in SECRETS if secret in text]
    assert not leaked, f"{where} shows {leaked}"
