"""Helpers shared by the test suites: start real processes, wait for conditions with deadlines."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
LISTEN_LINE = re.compile(r"listening on (https?://\S+)")


def conflux_argv(*args: str) -> list[str]:
    """argv that runs the `conflux` CLI with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "daemon.cli", *args]


def wait_until(predicate: Callable[[], T], *, timeout_s: float = 30.0, interval_s: float = 0.05,
               message: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # a predicate that raises is "not yet"; keep the last reason
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message}{detail}")
        time.sleep(interval_s)


@dataclass
class Service:
    """A real child process that announced its URL with a 'listening on http://...' line."""

    proc: subprocess.Popen
    url: str
    log_path: Path
    extra: dict = field(default_factory=dict)
    pump: threading.Thread | None = None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode

    def log_text(self) -> str:
        if self.pump is not None and self.proc.poll() is not None:
            self.pump.join(timeout=10)  # exited: its last lines may still be in the pipe, not yet in the file
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_service(argv: Sequence[str], log_path: Path, *, timeout_s: float = 30.0,
                  env: dict[str, str] | None = None, cwd: Path | None = None) -> Service:
    """Start ``argv``; return once it prints its listening URL on stdout. Stdout is also logged."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=full_env, cwd=cwd or REPO, start_new_session=True)
    log = log_path.open("wb")
    url = _read_until_listening(proc, log, timeout_s)
    pump = _forward_output(proc, log)
    return Service(proc=proc, url=url, log_path=log_path, pump=pump)


def _read_until_listening(proc: subprocess.Popen, log, timeout_s: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buffered = b""
    while time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        log.write(chunk)
        log.flush()
        buffered += chunk
        match = LISTEN_LINE.search(buffered.decode(errors="replace"))
        if match:
            sel.close()
            return match.group(1).rstrip("/")
    sel.close()
    proc.kill()
    proc.wait(timeout=5)
    raise AssertionError(f"{proc.args!r} did not announce its URL; output:\n{buffered.decode(errors='replace')}")


def _forward_output(proc: subprocess.Popen, log) -> threading.Thread:
    """Copy the rest of the child's output to its log file from a daemon thread."""

    def pump() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            log.write(line)
            log.flush()
        log.close()

    thread = threading.Thread(target=pump, name=f"log-{proc.pid}", daemon=True)
    thread.start()
    return thread
