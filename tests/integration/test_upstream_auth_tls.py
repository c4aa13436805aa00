"""https sources against the demo upstream serving TLS with a throwaway CA made by the `openssl` CLI:
`ca_file` trusts it (for pages and for OAuth2 token requests alike), the default `verify_tls = true`
refuses it without retrying, and `verify_tls = false` skips the check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conflux.errors import ExitCode
from tests.fixtures.daemon import config_settings, source, wait_converged, write_config
from tests.fixtures.tls import make_tls_files
from tests.support import REPO, wait_until

TOKEN = "tls-tok-91c2d4e6"
CLIENT_SECRET = "tls-cs-0b7e5a13"
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a server certificate for IP 127.0.0.1 signed by it, valid for a day."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_https_sources_verify_with_ca_file_refuse_unknown_cas_and_may_skip_checks(
        tls_files, upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=600, products=300, systems=1, records_per_system=400,
                                tls_cert=tls_files["cert"], tls_key=tls_files["key"], require_token=TOKEN,
                                client_secret=CLIENT_SECRET)
    assert upstream.url.startswith("https://127.0.0.1:")
    ca_file = str(tls_files["ca"])
    oauth2 = {"type": "oauth2", "token_url": f"{upstream.url}/oauth/token", "client_id": "conflux",
              "client_secret_env": "CRM_CLIENT_SECRET"}
    bearer = {"type": "bearer", "token_env": "CRM_TOKEN"}
    daemon = daemon_factory(sources=[
        source("customers", upstream.url, ca_file=ca_file, auth=oauth2),
        source("orders", upstream.url, verify_tls=False, auth=bearer),
        source("products", upstream.url, auth=bearer),  # verify_tls defaults to true: the system CAs
    ], sink_url=analytics.url, env={"CRM_CLIENT_SECRET": CLIENT_SECRET, "CRM_TOKEN": TOKEN},
        retry={"max_attempts": 3, "base_s": 0.05, "max_s": 0.1})
    wait_converged(upstream.url, analytics.url, {"customers": "customers", "orders": "orders"}, timeout_s=60,
                   upstream_headers={"Authorization": f"Bearer {TOKEN}"}, verify=ca_file)
    report = wait_until(lambda: (r := daemon.status()["sources"]["products"]).get("syncs_failed") and r,
                        timeout_s=30, message="the unverifiable source to fail")
    assert "certificate verify failed" in report["last_sync_result"], report
    assert (daemon.metric("conflux_upstream_retries_total", source="products", reason="tls") or 0.0) == 0
    stats = requests.get(f"{upstream.url}/stats", verify=ca_file, timeout=10).json()
    assert stats["collections"]["products"]["requests"] == {}  # no request got past the handshake
    assert stats["auth"]["tokens_issued"] >= 1 and stats["auth"]["accepted"]["oauth2"] >= 1
    assert daemon.stop() == 0


def test_a_missing_ca_file_is_a_config_error(tmp_path):
    settings = config_settings(tmp_path, sink_url="http://127.0.0.1:9", sources=[
        source("crm", "https://127.0.0.1:9", ca_file=str(tmp_path / "missing-ca.pem"))])
    check = subprocess.run([sys.executable, "-m", "conflux", "config", "check", "-c",
                            str(write_config(tmp_path, settings))], capture_output=True, text=True, cwd=REPO,
                           env=dict(os.environ), timeout=60)
    assert check.returncode == ExitCode.CONFIG_ERROR
    assert "(crm).ca_file" in check.stderr and "missing-ca.pem" in check.stderr, check.stderr
