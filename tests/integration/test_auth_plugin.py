"""An auth method from a plugin distribution, end to end: tests/plugins/auth_example is pip-installed
(into a directory of its own, never into the venv) and put on PYTHONPATH, so its `conflux.auth` entry
points are found the way any installed plugin's are. Its `rotating_file` method re-reads a token file
when the upstream answers 401: the daemon keeps syncing across a token rotation without a SIGHUP,
which the built-in bearer could not. Its options are validated with errors naming the field, the
generic *_file rules apply to them, and a plugin written for another API version is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conflux.config import to_toml
from conflux.errors import ExitCode
from tests.fixtures.daemon import source, wait_converged
from tests.support import REPO, wait_until

PLUGIN = REPO / "tests" / "plugins" / "auth_example"
FIRST, SECOND = "tok-first-41c9", "tok-second-7be2"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The example plugin installed by pip into a fresh directory (built from a copy, so the checkout
    stays clean); add it to PYTHONPATH to make its entry points visible."""
    scratch = tmp_path_factory.mktemp("auth-plugin")
    shutil.copytree(PLUGIN, scratch / "src")
    target = scratch / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(scratch / "src")], check=True, timeout=300)
    assert list(target.glob("conflux_auth_example-*.dist-info"))
    return str(target)


def plugin_env(plugin_path: str) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [plugin_path, os.environ.get("PYTHONPATH", "")]))}


def config_check(path: Path, plugin_path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conflux", "config", "check", "-c", str(path)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **plugin_env(plugin_path)}, timeout=120)


def test_a_plugin_auth_method_keeps_syncing_across_a_token_rotation(plugin_path, upstream_factory, analytics,
                                                                      daemon_factory, tmp_path):
    upstream = upstream_factory(customers=200, products=0, require_token=FIRST)
    token_file = tmp_path / "crm-token"
    token_file.write_text(FIRST + "\n")
    daemon = daemon_factory(sources=[source("customers", upstream.url, poll_interval_s=3600,
                                            auth={"type": "rotating_file", "token_file": str(token_file)})],
                            sink_url=analytics.url, env=plugin_env(plugin_path))
    collections = {"customers": "customers"}
    upstream_access = {"upstream_headers": {"Authorization": f"Bearer {FIRST}"}}
    wait_converged(upstream.url, analytics.url, collections, timeout_s=60, **upstream_access)

    # Another tool rotates the token: the upstream takes only the new one, and the file holds it.
    assert requests.post(f"{upstream.url}/admin/auth", json={"require_token": SECOND}, timeout=10).status_code == 200
    token_file.write_text(SECOND + "\n")
    upstream_access = {"upstream_headers": {"Authorization": f"Bearer {SECOND}"}}
    assert requests.put(f"{upstream.url}/api/customers/3", json={"name": "after the rotation"}, timeout=10,
                        **{"headers": upstream_access["upstream_headers"]}).status_code == 200
    before = daemon.status()["sources"]["customers"]["last_sync_at"]
    assert requests.post(f"{daemon.url}/sync/customers", timeout=10).status_code == 202
    report = wait_until(lambda: daemon.sync_ok("customers", after=before), timeout_s=60, message="a sync after it")
    assert report["last_sync_type"] == "incremental"
    wait_converged(upstream.url, analytics.url, collections, timeout_s=30, **upstream_access)
    auth = requests.get(f"{upstream.url}/stats", timeout=10).json()["auth"]
    assert auth["rejected"].get("invalid", 0) >= 1, auth  # the old token was refused once, then re-read
    assert FIRST not in daemon.log() and SECOND not in daemon.log()
    assert daemon.stop() == 0, daemon.log()[-3000:]


def write(tmp_path: Path, auth: dict) -> Path:
    path = tmp_path / "conflux.toml"
    path.write_text(to_toml({"sources": [{"name": "crm", "url": "http://127.0.0.1:9/api", "auth": auth}]}))
    return path


@pytest.mark.parametrize(("auth", "message"), [
    ({"type": "rotating_file", "token_file": "t", "colour": 1}, "sources[0].auth.colour: unknown key"),
    ({"type": "rotating_file"}, "sources[0].auth.token_file: missing required key"),
    ({"type": "rotating_file", "token_file": "t", "scheme": "Bearer me"},
     "sources[0].auth.scheme: 'Bearer me' must be one word"),
    ({"type": "rotating_file", "token_file": "missing-token"}, "sources[0] (crm).auth.token_file: file '{dir}/"
                                                                "missing-token' does not exist"),
    ({"type": "from_the_future"}, "sources[0].auth.type: the auth type plugin 'from_the_future' was written for "
                                  "plugin API version 2; this Conflux speaks version 1"),
    ({"type": "kerberos"}, "sources[0].auth.type: unknown auth type 'kerberos' (known: basic, bearer, "
                           "from_the_future, header, oauth2, rotating_file)"),
])
def test_plugin_options_are_validated_with_the_field_named(plugin_path, tmp_path, auth, message):
    (tmp_path / "t").write_text("x\n")
    checked = config_check(write(tmp_path, auth), plugin_path)
    assert checked.returncode == ExitCode.CONFIG_ERROR, checked.stdout + checked.stderr
    assert message.format(dir=tmp_path) in checked.stderr, checked.stderr


def test_a_plugin_file_option_is_relative_to_the_config_and_without_the_plugin_the_type_is_unknown(
        plugin_path, tmp_path):
    (tmp_path / "t").write_text("x\n")
    path = write(tmp_path, {"type": "rotating_file", "token_file": "t", "scheme": ""})
    checked = config_check(path, plugin_path)
    assert checked.returncode == 0, checked.stderr
    assert f'token_file = "{tmp_path / "t"}"' in checked.stdout and 'scheme = ""' in checked.stdout
    without = subprocess.run([sys.executable, "-m", "conflux", "config", "check", "-c", str(path)], text=True,
                             capture_output=True, cwd=REPO, timeout=120)
    assert "sources[0].auth.type: unknown auth type 'rotating_file'" in without.stderr
