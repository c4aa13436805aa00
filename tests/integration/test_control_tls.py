"""The control port over TLS (``tls_cert_file``/``tls_key_file``) with a throwaway CA made by `openssl`:
https clients that trust the CA are served, plain http is not, `conflux status` and `conflux metrics`
follow the config to https, and a certificate with the wrong key stops the boot with a config error, or
is refused by a reload while the running generation keeps serving."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess

import pytest
import requests

from conflux.errors import ExitCode
from tests.fixtures.daemon import config_settings, source, wait_converged, write_config
from tests.fixtures.tls import make_tls_files
from tests.support import REPO, conflux_argv, wait_until

COUNTS = {"customers": 100, "products": 50}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_the_control_port_serves_https_with_its_certificate(tls_files, upstream_factory, analytics, daemon_factory,
                                                             tmp_path):
    upstream = upstream_factory(**COUNTS)
    port, token = free_port(), "tls-ctl-7"
    cert, key = tmp_path / "control.pem", tmp_path / "control.key"  # copies: the test breaks and mends them
    shutil.copy(tls_files["cert"], cert)
    shutil.copy(tls_files["key"], key)
    daemon = daemon_factory(sources=[source(name, upstream.url) for name in COUNTS], sink_url=analytics.url,
                            control={"listen": f"127.0.0.1:{port}", "token": token,
                                     "tls_cert_file": str(cert), "tls_key_file": str(key)})
    assert daemon.url == f"https://127.0.0.1:{port}"  # what it announced
    wait_converged(upstream.url, analytics.url, {name: name for name in COUNTS}, timeout_s=60)
    ca = str(tls_files["ca"])
    assert requests.get(f"{daemon.url}/health", verify=ca, timeout=10).json() == {"status": "ok"}
    status = requests.get(f"{daemon.url}/status", verify=ca, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert status.status_code == 200 and status.json()["daemon"]["state"] == "running"
    with pytest.raises(requests.exceptions.SSLError):  # not trusted without the CA
        requests.get(f"{daemon.url}/health", timeout=10)
    with pytest.raises(requests.exceptions.ConnectionError):  # no plain http on the TLS port
        requests.get(f"http://127.0.0.1:{port}/health", timeout=10)

    cli = subprocess.run(conflux_argv("status", "-c", str(daemon.config_path), "--cacert", ca, "--json"),
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert cli.returncode == 0, cli.stderr
    assert set(json.loads(cli.stdout)["sources"]) == set(COUNTS)
    export = tmp_path / "metrics.json"
    scraped = subprocess.run(conflux_argv("metrics", "-c", str(daemon.config_path), "--cacert", ca,
                                          "--duration", "0", "--export", str(export)),
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    assert scraped.returncode == 0, scraped.stderr
    assert json.loads(export.read_text())["url"] == f"https://127.0.0.1:{port}/metrics"

    def state() -> dict:
        answer = requests.get(f"{daemon.url}/status", verify=ca, headers={"Authorization": f"Bearer {token}"},
                              timeout=10)
        return answer.json()["daemon"]

    def generation() -> int:
        return state()["generation"]

    # A reload whose key does not match its certificate is refused; the running generation keeps serving.
    shutil.copy(tls_files["ca_key"], key)
    daemon.send_signal(signal.SIGHUP)
    refused = wait_until(lambda: (d := state())["reloads"]["refused"] == 1 and d, timeout_s=20,
                         message="the reload to be refused")
    assert "control.tls_cert_file" in refused["reloads"]["last_refusal"]
    assert refused["generation"] == 1 and daemon.service.proc.poll() is None
    shutil.copy(tls_files["key"], key)  # mended: the next reload goes through, over TLS again
    daemon.send_signal(signal.SIGHUP)
    wait_until(lambda: generation() == 2, timeout_s=60, message="generation 2 after the mended reload")
    assert requests.get(f"{daemon.url}/health", verify=ca, timeout=10).status_code == 200
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_a_certificate_with_the_wrong_key_stops_the_boot_with_a_config_error(tls_files, tmp_path):
    mismatched = {"tls_cert_file": str(tls_files["cert"]), "tls_key_file": str(tls_files["ca_key"])}
    settings = config_settings(tmp_path, sources=[], sink_url="http://127.0.0.1:9", control=mismatched)
    config = write_config(tmp_path, settings)
    result = subprocess.run(conflux_argv("run", "-c", str(config)), capture_output=True, text=True, timeout=60,
                            cwd=REPO)
    assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr[-2000:]
    assert "control.tls_cert_file" in result.stderr and "not a usable certificate and key" in result.stderr
