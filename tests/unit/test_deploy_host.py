"""The host install files: deploy/conflux.toml, deploy/supervisord.conf and
deploy/systemd/conflux.service agree with each other and with the daemon's own contract (the drain
deadline, the config-error exit code, the signals), and systemd-analyze accepts the unit."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conflux.config import DaemonConfig, load_config
from conflux.errors import ExitCode
from tests.support import REPO

HOST_CONFIG = REPO / "deploy" / "conflux.toml"
SUPERVISORD_CONF = REPO / "deploy" / "supervisord.conf"
UNIT = REPO / "deploy" / "systemd" / "conflux.service"
CONFLUX_BIN = Path(sys.executable).parent / "conflux"
INSTALLED_CONFLUX = "/opt/conflux/bin/conflux"
RUN_COMMAND = f"{INSTALLED_CONFLUX} run -c /etc/conflux/conflux.toml"
# The secrets deploy/conflux.toml names (*_env); systemd's EnvironmentFile or supervisord provides them.
HOST_SECRETS = {"CONTROL_TOKEN": "t" * 16, "SINK_TOKEN": "s" * 16, "WEBHOOK_SECRET": "w" * 16}


def host_config():
    return load_config(HOST_CONFIG, environ=HOST_SECRETS)


def drain_deadlines_s() -> list[float]:
    """Every drain deadline these files may run with: the shipped config's and the built-in default."""
    return [host_config().daemon.shutdown_timeout_s, DaemonConfig().shutdown_timeout_s]


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values in order]}} (a key may repeat, e.g. ExecReload)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    """systemd time spans as used here: '45', '45s', '2min'."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value)
    assert match, f"unsupported time span {value!r}"
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


@pytest.fixture(scope="module")
def program() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.read_string(SUPERVISORD_CONF.read_text())
    return parser["program:conflux"]


def test_the_host_config_is_valid_and_keeps_its_state_under_var_lib_conflux():
    config = host_config()
    assert config.daemon.state_dir == "/var/lib/conflux"
    assert Path(config.log.path).parent == Path("/var/lib/conflux")
    assert config.control.listen.startswith("127.0.0.1:"), "a host install listens on loopback only"
    assert not [name for name in HOST_SECRETS if name.startswith("CONFLUX_")], \
        "CONFLUX_<SECTION>_<KEY> variables are config overrides, not secret holders"


# -- supervisord -------------------------------------------------------------------------------


def test_supervisord_stops_with_term_and_waits_longer_than_the_drain(program):
    assert program["command"] == RUN_COMMAND
    assert program["stopsignal"] == "TERM"
    assert all(int(program["stopwaitsecs"]) >= deadline + 10 for deadline in drain_deadlines_s())
    # TERM to the supervisor alone (it stops its workers in order); SIGKILL, if it comes, to all.
    assert program["stopasgroup"] == "false" and program["killasgroup"] == "true"


def test_supervisord_restarts_crashes_but_not_a_clean_stop_or_a_config_error(program):
    assert program["autostart"] == "true" and program["autorestart"] == "unexpected"
    assert {int(code) for code in program["exitcodes"].split(",")} == {ExitCode.OK, ExitCode.CONFIG_ERROR}
    assert int(program["startsecs"]) > 0 and int(program["startretries"]) > 0


def test_supervisord_logs_to_files_and_runs_as_the_service_user(program):
    assert program["redirect_stderr"] == "true"
    assert program["stdout_logfile"].startswith("/var/log/conflux/")
    assert program["user"] == "conflux" and program["directory"] == "/var/lib/conflux"


# -- systemd ------------------------------------------------------------------------------------


def test_systemd_runs_the_daemon_and_reloads_with_hup(service):
    assert service["ExecStart"] == [RUN_COMMAND]
    assert service["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    # Validation first, so `systemctl reload` of a broken file fails instead of only logging.
    assert service["ExecReload"][0].startswith(f"{INSTALLED_CONFLUX} config check -c /etc/conflux/conflux.toml")
    assert service["User"] == ["conflux"] and service["Type"] == ["exec"]


def test_systemd_stop_is_one_term_to_the_supervisor_with_time_for_the_drain(service):
    assert service["KillSignal"] == ["SIGTERM"]
    # control-group (the default) would TERM every worker at once and skip the ordered drain.
    assert service["KillMode"] == ["mixed"]
    assert all(seconds(service["TimeoutStopSec"][0]) >= deadline + 10 for deadline in drain_deadlines_s())


def test_systemd_restarts_on_failure_but_not_after_a_config_error(service):
    assert service["Restart"] == ["on-failure"]
    assert str(ExitCode.CONFIG_ERROR) in service["RestartPreventExitStatus"][0].split()


def test_systemd_hardening_leaves_only_the_state_dir_writable(service):
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": ""}.items():
        assert service.get(key) == [value], key
    config = host_config()
    writable = [Path(path) for path in service["ReadWritePaths"][0].split()]
    writable.append(Path("/var/lib") / service["StateDirectory"][0])
    for needed in (Path(config.daemon.state_dir), Path(config.log.path).parent):
        assert any(needed == path or path in needed.parents for path in writable), needed


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is not installed (Debian package: systemd); the unit cannot be verified"
    return tool


def _rendered_unit(directory: Path) -> Path:
    """systemd-analyze checks that ExecStart= exists, so point it at this venv's conflux."""
    assert CONFLUX_BIN.exists(), f"{CONFLUX_BIN} is missing: install the package into the venv (make test does)"
    rendered = directory / "conflux.service"
    rendered.write_text(UNIT.read_text().replace(INSTALLED_CONFLUX, str(CONFLUX_BIN)))
    return rendered


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    rendered = _rendered_unit(tmp_path)
    proc = subprocess.run([_systemd_analyze(), "verify", str(rendered)], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    # verify exits 0 even for unknown keys or bad values; it only prints them.
    about_ours = [line for line in (proc.stdout + proc.stderr).splitlines() if rendered.name in line]
    assert proc.returncode == 0 and not about_ours, proc.stdout + proc.stderr


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path):
    rendered = _rendered_unit(tmp_path)
    proc = subprocess.run([_systemd_analyze(), "security", "--offline=true", "--threshold=20", str(rendered)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
