"""`conflux status -c F` and `conflux top -c F` against a real daemon whose config names a fixed control
port and a token: the commands find both in the config. `top` is also driven in a pseudo-terminal,
where q and Ctrl-C end it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import termios
import time

import pytest

from tests.fixtures.daemon import source, wait_converged
from tests.support import REPO, conflux_argv, wait_until

TOKEN = "cli-token-8d1e"
COUNTS = {"customers": 300, "products": 200}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def daemon(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(**COUNTS)
    daemon = daemon_factory(sources=[source(name, upstream.url) for name in COUNTS], sink_url=analytics.url,
                            control={"listen": f"127.0.0.1:{free_port()}", "token": TOKEN})
    wait_converged(upstream.url, analytics.url, {name: name for name in COUNTS}, timeout_s=60)
    wait_until(lambda: all(w["state"] == "running" for w in status_json(daemon)["workers"]), timeout_s=20,
               message="all workers running")
    return daemon


def conflux(*args: str, env: dict | None = None, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(conflux_argv(*args), capture_output=True, text=True, timeout=timeout_s, cwd=REPO,
                          env={**os.environ, **(env or {})})


def status_json(daemon) -> dict:
    result = conflux("status", "-c", str(daemon.config_path), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def section(text: str, title: str) -> list[list[str]]:
    """The rows of one table of `conflux status` output, split on runs of two or more spaces."""
    lines = text.split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in lines[1:]]


def test_status_prints_sources_workers_and_partitions(daemon):
    result = conflux("status", "-c", str(daemon.config_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("conflux running · ready · pid ")
    sources = {row[0]: row for row in section(out, "SOURCES")}
    assert set(sources) == set(COUNTS)
    for name, count in COUNTS.items():
        assert sources[name][2:5] == ["full", "ok", f"{count}"] and sources[name][-1] == "closed"
    workers = {row[0]: row for row in section(out, "WORKERS")}
    assert set(workers) == {"control-0", "fetcher-0", "consumer-0", "consumer-1", "merger-0", "merger-1"}
    assert all(row[3] == "running" for row in workers.values())
    assert "customers/0" in workers["consumer-0"][5] and "customers/1" in workers["consumer-1"][5]
    partitions = section(out, "PARTITIONS")
    assert len(partitions) == 8 and all(row[-1] == "0" for row in partitions)

    refused = conflux("status", "-c", str(daemon.config_path), env={"CONFLUX_CONTROL_TOKEN": "wrong"})
    assert refused.returncode == 1 and "refused" in refused.stderr and "token" in refused.stderr


def test_status_without_a_daemon_says_so(tmp_path):
    config = tmp_path / "conflux.toml"
    config.write_text(f'[control]\nlisten = "127.0.0.1:{free_port()}"\n')
    result = conflux("status", "-c", str(config))
    assert result.returncode == 1
    assert "cannot reach the daemon at http://127.0.0.1:" in result.stderr


def test_top_prints_the_requested_number_of_frames(daemon):
    result = conflux("top", "-c", str(daemon.config_path), "--iterations", "2", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    frames = result.stdout.split("conflux top · ")[1:]
    assert len(frames) == 2
    assert all("FETCHED/S" in frame and "customers" in frame and "merger-1" in frame for frame in frames)
    assert "\x1b[" not in result.stdout  # no terminal codes when stdout is not a terminal
    once = conflux("top", "-c", str(daemon.config_path), "--once")
    assert once.returncode == 0 and once.stdout.count("conflux top · ") == 1


def inherit(disposition: str) -> None:
    """Give this (child) process SIGINT the way a shell may hand it on: "ignored" as background jobs and
    some CI runners get it, or "blocked"; the tests then pass whatever the runner's own disposition is."""
    if disposition == "ignored":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    elif disposition == "blocked":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


class Terminal:
    """`conflux top` on a pseudo-terminal of its own (controlling tty, so Ctrl-C is a real SIGINT)."""

    def __init__(self, *args: str, sigint: str = "ignored") -> None:
        argv = conflux_argv("top", *args)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become conflux top
            os.chdir(REPO)
            inherit(sigint)
            os.execv(argv[0], argv)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.output = b""

    def read_until(self, needle: bytes, *, count: int = 1, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while self.output.count(needle) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} not shown {count} times; output so far: {self.output[-2000:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                self.output += os.read(self.fd, 65536)

    def wait(self, timeout_s: float = 10) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.05)[0]:
                with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
                    self.output += os.read(self.fd, 65536)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"conflux top did not exit; output: {self.output[-2000:]!r}")

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize(("key", "sigint"), [(b"q", "ignored"), (b"\x03", "ignored"), (b"\x03", "blocked")],
                         ids=["q", "ctrl-c-while-ignored", "ctrl-c-while-blocked"])
def test_top_in_a_terminal_redraws_until_q_or_ctrl_c(daemon, key, sigint):
    terminal = Terminal("-c", str(daemon.config_path), "--interval", "0.3", sigint=sigint)
    try:
        terminal.read_until(b"\x1b[?1049h")  # the alternate screen
        terminal.read_until(b"PARTITIONS", count=2)  # a second frame: it refreshes on its own
        os.write(terminal.fd, key)
        assert terminal.wait() == 0
        assert terminal.output.rstrip().endswith(b"\x1b[?1049l")  # the screen is given back
    finally:
        terminal.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["int", "term"])
def test_top_as_a_background_job_stops_on_int_and_term(daemon, sig):
    """No terminal and SIGINT ignored, as `conflux top -c F > log &` in a script would have it."""
    top = subprocess.Popen(conflux_argv("top", "-c", str(daemon.config_path), "--interval", "30"), cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: inherit("ignored"))
    try:
        assert top.stdout.readline().startswith("conflux top · ")  # the first frame; the next is 30 s away
        top.send_signal(sig)
        assert top.wait(timeout=20) == 0, top.stderr.read()
        assert "PARTITIONS" in top.stdout.read()  # the frame was written out whole
    finally:
        if top.poll() is None:
            top.kill()


def test_config_check_and_run_refuse_a_reachable_listen_without_a_token(tmp_path):
    config = tmp_path / "conflux.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[control]\nlisten = "0.0.0.0:{free_port()}"\n')
    for command in (("config", "check"), ("run",)):
        result = conflux(*command, "-c", str(config))
        assert result.returncode == 3, (command, result.stderr)
        assert "control: listen '0.0.0.0:" in result.stderr and "no token" in result.stderr, result.stderr
    assert conflux("config", "check", "-c", str(config), env={"CONFLUX_CONTROL_TOKEN": "t"}).returncode == 0
    waived = conflux("config", "check", "-c", str(config), env={"CONFLUX_CONTROL_ALLOW_UNAUTHENTICATED": "true"})
    assert waived.returncode == 0, waived.stderr
