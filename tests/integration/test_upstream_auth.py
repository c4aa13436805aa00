"""Every `[sources.auth]` type against the real demo upstream with `--require-token` and `/oauth/token`:
bearer (from an environment variable, and from a file rotated with SIGHUP), header, basic, and
OAuth2 client credentials (renewed before expiry, renewed once on a 401). A missing secret is a
config error; secrets never show in logs, /status, /metrics, `conflux config check` or the DLQ."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from conflux.errors import ExitCode
from tests.fixtures.daemon import config_settings, source, wait_converged, write_config
from tests.support import REPO, wait_until

TOKEN = "tok-3f9a1c7e5b2d"
CLIENT_SECRET = "cs-8e41b07d29fa"
WEBHOOK_SECRET = "wh-5c0d93aa17e2"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conflux", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=120)


def _auth_stats(upstream) -> dict:
    return requests.get(f"{upstream.url}/stats", timeout=10).json()["auth"]


def _touch(upstream, collection: str, key: str, headers: dict[str, str]) -> None:
    """An upstream change, so the next incremental sync has something to carry."""
    response = requests.put(f"{upstream.url}/api/{collection}/{key}", json={"touched": time.time()},
                            headers=headers, timeout=10)
    response.raise_for_status()


def assert_secrets_hidden(daemon, secrets: list[str], env: dict[str, str]) -> None:
    """Grep everything the daemon shows an operator for the secret values."""
    config = str(daemon.config_path)
    check, check_json = _cli("config", "check", "-c", config, env=env), _cli("config", "check", "-c", config,
                                                                            "--json", env=env)
    dlq = _cli("dlq", "list", "-c", config, "--json", env=env)
    assert check.returncode == 0 and dlq.returncode == 0, check.stderr + dlq.stderr
    assert "***" in check.stdout and "***" in check_json.stdout  # the literal webhook secret, masked
    assert dlq.stdout.count("\n") >= 1, "the upstream's malformed records should be in the DLQ"
    outputs = {
        "daemon log": daemon.log(),
        "/status": requests.get(f"{daemon.url}/status", timeout=10).text,
        "/metrics": requests.get(f"{daemon.url}/metrics", timeout=10).text,
        "config check": check.stdout + check.stderr,
        "config check --json": check_json.stdout + check_json.stderr,
        "dlq list": dlq.stdout + dlq.stderr,
    }
    for where, text in outputs.items():
        for secret in secrets:
            assert secret not in text, f"{where} shows the secret {secret!r}"


def test_the_demo_upstream_checks_every_kind_of_credential(upstream_factory):
    upstream = upstream_factory(customers=20, products=0, require_token=TOKEN, basic_user="sync",
                                client_id="conflux", client_secret=CLIENT_SECRET, token_ttl_s=1)
    page = f"{upstream.url}/api/customers"
    basic = "Basic " + base64.b64encode(f"sync:{TOKEN}".encode()).decode()
    for headers in (BEARER, {"X-API-Key": TOKEN}, {"Authorization": basic}):
        assert requests.get(page, headers=headers, timeout=10).status_code == 200, headers
    for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "nope"},
                    {"Authorization": "Basic " + base64.b64encode(f"root:{TOKEN}".encode()).decode()}):
        refused = requests.get(page, headers=headers, timeout=10)
        assert refused.status_code == 401 and "realm=" in refused.headers["WWW-Authenticate"], headers
    wrong = requests.post(f"{upstream.url}/oauth/token", data={"grant_type": "client_credentials",
                                                               "client_id": "conflux", "client_secret": "nope"})
    assert wrong.status_code == 401 and wrong.json() == {"error": "invalid_client"}
    issued = requests.post(f"{upstream.url}/oauth/token", timeout=10, data={
        "grant_type": "client_credentials", "client_id": "conflux", "client_secret": CLIENT_SECRET,
        "scope": "read:customers"}).json()
    assert issued["token_type"] == "Bearer" and issued["expires_in"] == 1 and issued["scope"] == "read:customers"
    with_token = {"Authorization": f"Bearer {issued['access_token']}"}
    assert requests.get(page, headers=with_token, timeout=10).status_code == 200
    challenge = wait_until(lambda: (r := requests.get(page, headers=with_token, timeout=10)).status_code == 401
                           and r.headers["WWW-Authenticate"], timeout_s=10, message="the issued token to expire")
    assert 'error="invalid_token"' in challenge and "expired" in challenge
    stats = _auth_stats(upstream)
    assert stats["token_requests"] == 2 and stats["tokens_issued"] == 1 and stats["token_refused"] == 1
    accepted = stats["accepted"]
    assert (accepted["api_key"], accepted["basic"], accepted["bearer"]) == (1, 1, 1) and accepted["oauth2"] >= 1
    assert stats["rejected"]["expired"] >= 1 and stats["rejected"]["missing"] == 1
    assert TOKEN not in str(stats) and CLIENT_SECRET not in str(stats)


def test_bearer_header_and_basic_sources_sync_and_no_output_shows_a_secret(upstream_factory, analytics,
                                                                           daemon_factory):
    upstream = upstream_factory(customers=1500, products=1000, systems=1, records_per_system=800,
                                malformed_rate=0.01, require_token=TOKEN, basic_user="sync")
    env = {"CRM_TOKEN": TOKEN, "INVENTORY_KEY": TOKEN, "ERP_PASSWORD": TOKEN}
    daemon = daemon_factory(sources=[
        source("customers", upstream.url, auth={"type": "bearer", "token_env": "CRM_TOKEN"},
               webhook_secret=WEBHOOK_SECRET),
        source("products", upstream.url, auth={"type": "header", "header": "X-API-Key", "value_env": "INVENTORY_KEY"}),
        source("orders", upstream.url, auth={"type": "basic", "username": "sync", "password_env": "ERP_PASSWORD"}),
    ], sink_url=analytics.url, env=env)
    wait_converged(upstream.url, analytics.url, {name: name for name in ("customers", "products", "orders")},
                   timeout_s=90, upstream_headers=BEARER)
    stats = _auth_stats(upstream)
    assert stats["accepted"]["bearer"] > 0 and stats["accepted"]["api_key"] > 0 and stats["accepted"]["basic"] > 0
    assert stats["rejected"] == {}, "every request carried valid credentials"
    assert_secrets_hidden(daemon, [TOKEN, WEBHOOK_SECRET], env)


def test_a_rotated_token_file_takes_effect_on_sighup(upstream_factory, analytics, daemon_factory, tmp_path):
    old, new = "file-token-0a1b2c3d", "file-token-4e5f6a7b"
    upstream = upstream_factory(customers=800, products=0, require_token=old)
    token_file = tmp_path / "crm.token"
    token_file.write_text(old + "\n")
    daemon = daemon_factory(sources=[source("customers", upstream.url, poll_interval_s=0.3,
                                            auth={"type": "bearer", "token_file": str(token_file)})],
                            sink_url=analytics.url)
    customers = {"customers": "customers"}
    wait_converged(upstream.url, analytics.url, customers, timeout_s=60,
                   upstream_headers={"Authorization": f"Bearer {old}"})
    generation = daemon.status()["daemon"]["generation"]
    headers = {"Authorization": f"Bearer {new}"}
    requests.post(f"{upstream.url}/admin/auth", json={"require_token": new}, timeout=10).raise_for_status()
    _touch(upstream, "customers", "7", headers)
    wait_until(lambda: daemon.status()["sources"]["customers"]["last_sync_result"].startswith("failed"),
               timeout_s=30, message="the old token to be refused")
    token_file.write_text(new + "\n")
    daemon.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.status()["daemon"]["generation"] == generation + 1, timeout_s=60,
               message="a new generation")
    wait_converged(upstream.url, analytics.url, customers, timeout_s=60, upstream_headers=headers)
    assert old not in daemon.log() and new not in daemon.log()
    assert daemon.stop() == 0


@pytest.mark.parametrize("auth, missing", [
    ({"type": "bearer", "token_env": "CONFLUX_TEST_UNSET_TOKEN"}, "CONFLUX_TEST_UNSET_TOKEN"),
    ({"type": "oauth2", "token_url": "http://127.0.0.1:9/oauth/token", "client_id": "conflux",
      "client_secret_env": "CONFLUX_TEST_UNSET_SECRET"}, "CONFLUX_TEST_UNSET_SECRET"),
    ({"type": "basic", "username": "sync", "password_file": "/nonexistent/erp.password"}, "/nonexistent/erp.password"),
])
def test_a_missing_secret_is_a_config_error_naming_source_and_variable(tmp_path, auth, missing):
    settings = config_settings(tmp_path, sink_url="http://127.0.0.1:9", sources=[
        source("crm", "http://127.0.0.1:9", auth=auth)])
    config = str(write_config(tmp_path, settings))
    env = {name: value for name, value in os.environ.items() if not name.startswith("CONFLUX_TEST_UNSET")}
    check = subprocess.run([sys.executable, "-m", "conflux", "config", "check", "-c", config],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    run = subprocess.run([sys.executable, "-m", "conflux", "run", "-c", config],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    for result in (check, run):
        assert result.returncode == ExitCode.CONFIG_ERROR, result.stdout + result.stderr
        assert "(crm).auth." in result.stderr and missing in result.stderr, result.stderr


def test_oauth2_tokens_are_renewed_before_expiry_and_once_after_a_401(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=1200, products=0, malformed_rate=0.01, require_token=TOKEN,
                                client_id="conflux", client_secret=CLIENT_SECRET, token_ttl_s=1.5)
    env = {"CRM_CLIENT_SECRET": CLIENT_SECRET}
    daemon = daemon_factory(sources=[source(
        "customers", upstream.url, poll_interval_s=0.2, webhook_secret=WEBHOOK_SECRET,
        auth={"type": "oauth2", "token_url": f"{upstream.url}/oauth/token", "client_id": "conflux",
              "client_secret_env": "CRM_CLIENT_SECRET", "scope": "read:customers"})],
        sink_url=analytics.url, env=env)
    customers = {"customers": "customers"}
    wait_converged(upstream.url, analytics.url, customers, timeout_s=60, upstream_headers=BEARER)
    # Renewed half-way through each 1.5 s lifetime: several tokens, and not one request refused.
    wait_until(lambda: _auth_stats(upstream)["tokens_issued"] >= 4, timeout_s=30, message="4 tokens issued")
    stats = _auth_stats(upstream)
    assert stats["rejected"] == {} and stats["accepted"]["oauth2"] > 0 and stats["token_refused"] == 0

    # Long-lived tokens from now on; then revoke them all: the next page gets a 401 and one renewal.
    _set_auth(upstream, token_ttl_s=3600)
    issued = _auth_stats(upstream)["tokens_issued"]
    wait_until(lambda: _auth_stats(upstream)["tokens_issued"] > issued, timeout_s=10, message="a long-lived token")
    before = _auth_stats(upstream)
    _set_auth(upstream, revoke_tokens=True)
    _touch(upstream, "customers", "3", BEARER)
    wait_converged(upstream.url, analytics.url, customers, timeout_s=30, upstream_headers=BEARER)
    after = _auth_stats(upstream)
    assert after["rejected"].get("invalid", 0) >= 1
    assert after["token_requests"] - before["token_requests"] == 1

    # A renewal that fails (the secret was rotated upstream) fails the request at once: one token
    # request per 401, no retry loop.
    _set_auth(upstream, client_secret="rotated-elsewhere", revoke_tokens=True)
    report = wait_until(lambda: (r := daemon.status()["sources"]["customers"])["last_sync_result"].startswith(
        "failed") and r, timeout_s=30, message="a failed sync")
    assert "invalid_client" in report["last_sync_result"]
    wait_until(lambda: (s := _auth_stats(upstream))["token_refused"] == s["rejected"]["invalid"]
               - after["rejected"]["invalid"] >= 1, timeout_s=10, message="one refused renewal per 401")
    _set_auth(upstream, client_secret=CLIENT_SECRET)
    _touch(upstream, "customers", "4", BEARER)
    wait_converged(upstream.url, analytics.url, customers, timeout_s=30, upstream_headers=BEARER)
    assert_secrets_hidden(daemon, [CLIENT_SECRET, WEBHOOK_SECRET], env)


def _set_auth(upstream, **changes: object) -> None:
    requests.post(f"{upstream.url}/admin/auth", json=changes, timeout=10).raise_for_status()
