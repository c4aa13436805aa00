"""deploy/supervisord.conf for real: supervisord (from PyPI, the `test` extra) runs `conflux run`
against the demo world; `supervisorctl stop` drains the daemon to exit 0 and a `start` resumes from
the checkpoint with nothing lost.

The committed file is written for a host install (/opt/conflux, /etc/conflux, /var/lib/conflux,
/var/log/conflux, /run/conflux); the test renders a copy that points those at a temp dir, drops
`user=conflux` (there is no such account to switch to here) and changes nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.fixtures.daemon import both_sources, config_settings, wait_converged, write_config
from tests.support import REPO, wait_until

COMMITTED = REPO / "deploy" / "supervisord.conf"
CONFLUX_BIN = Path(sys.executable).parent / "conflux"
BOTH = {"customers": "customers", "products": "products"}
DROPPED_LINES = frozenset({"user=conflux"})


def render(directory: Path, run_dir: Path, config_path: Path) -> Path:
    """The committed file with the host paths pointed into ``directory``; nothing else changes."""
    replacements = {
        "/opt/conflux/bin/conflux": str(CONFLUX_BIN),
        "/etc/conflux/conflux.toml": str(config_path),
        "/var/lib/conflux": str(directory / "state"),
        "/var/log/conflux": str(directory / "log"),
        "/run/conflux": str(run_dir),
    }
    lines = []
    for line in COMMITTED.read_text().splitlines():
        if line.strip() in DROPPED_LINES:
            continue
        for old, new in replacements.items():
            line = line.replace(old, new)
        lines.append(line)
    for sub in ("state", "log"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    rendered = directory / "supervisord.conf"
    rendered.write_text("\n".join(lines) + "\n")
    return rendered


@dataclass
class Supervisord:
    conf: Path
    proc: subprocess.Popen
    log_dir: Path
    conflux_pids: set[int] = field(default_factory=set)

    def ctl(self, *args: str, timeout_s: float = 90.0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)

    def state(self, program: str = "conflux") -> str:
        words = self.ctl("status", program).stdout.split()
        return words[1] if len(words) > 1 and words[0] == program else ""

    def pid(self, program: str = "conflux") -> int:
        pid = int(self.ctl("pid", program).stdout.strip() or 0)
        if pid:
            self.conflux_pids.add(pid)
        return pid

    def supervisord_log(self) -> str:
        return _read(self.log_dir / "supervisord.log")

    def conflux_log(self) -> str:
        return _read(self.log_dir / "conflux.log")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def running_supervisord(conf: Path, log_dir: Path) -> Iterator[Supervisord]:
    """supervisord in the foreground (-n); shut down at the end whatever happened, then killed if
    it lingers, along with any conflux process it had started."""
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    supervisord = Supervisord(conf, proc, log_dir)
    try:
        wait_until(lambda: proc.poll() is None and supervisord.ctl("pid").stdout.strip().isdigit(),
                   timeout_s=30, message="supervisord to answer supervisorctl")
        yield supervisord
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            supervisord.ctl("shutdown", timeout_s=60)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for pid in supervisord.conflux_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """For the unix socket, whose path must stay under ~100 bytes; pytest's tmp_path can be longer."""
    directory = Path(tempfile.mkdtemp(prefix="conflux-sv-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _touch(upstream_url: str, collection: str, key: str, **fields) -> None:
    requests.put(f"{upstream_url}/api/{collection}/{key}", json=fields, timeout=10).raise_for_status()


@pytest.mark.slow
def test_supervisord_runs_conflux_and_stop_drains_to_exit_0_losing_nothing(upstream_factory, analytics, tmp_path,
                                                                           run_dir):
    upstream = upstream_factory(customers=2000, products=2000)
    settings = config_settings(tmp_path / "conflux", sink_url=analytics.url,
                               sources=both_sources(upstream.url, poll_interval_s=0.5, page_size=100),
                               daemon={"shutdown_timeout_s": 20.0})
    (tmp_path / "conflux").mkdir()
    config_path = write_config(tmp_path / "conflux", settings)
    conf = render(tmp_path, run_dir, config_path)
    with running_supervisord(conf, tmp_path / "log") as supervisord:
        wait_until(lambda: supervisord.state() == "RUNNING", timeout_s=30, message="conflux RUNNING")
        first_pid = supervisord.pid()
        wait_converged(upstream.url, analytics.url, BOTH, timeout_s=90)

        # Work in flight when the stop comes: a slowed upstream and fresh changes to sync.
        requests.post(f"{upstream.url}/admin/faults", json={"latency_ms": 40}, timeout=10).raise_for_status()
        for key in range(1, 201):
            _touch(upstream.url, "customers", str(key), tier="before-stop")
        stopped = supervisord.ctl("stop", "conflux")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped
        assert supervisord.state() == "STOPPED"
        assert "stopped: conflux (exit status 0)" in supervisord.supervisord_log(), supervisord.supervisord_log()
        first_run = supervisord.conflux_log()
        assert "draining" in first_run and "supervisor stopped (exit 0)" in first_run, first_run[-3000:]

        requests.post(f"{upstream.url}/admin/faults", json={"latency_ms": 0}, timeout=10).raise_for_status()
        for key in range(201, 221):  # changed while it was down
            _touch(upstream.url, "customers", str(key), tier="while-down")
        started = supervisord.ctl("start", "conflux")
        assert started.returncode == 0 and supervisord.state() == "RUNNING", started
        assert supervisord.pid() != first_pid
        wait_converged(upstream.url, analytics.url, BOTH, timeout_s=90)
        second_run = supervisord.conflux_log()[len(first_run):]
        assert "incremental sync ok" in second_run and "full sync" not in second_run, second_run[-3000:]
