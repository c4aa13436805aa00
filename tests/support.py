"""Helpers shared by the test suites: start real processes, wait for conditions with deadlines."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from conflux.demo.world import ServiceProcess, launch

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent


def conflux_argv(*args: str) -> list[str]:
    """argv that runs the `conflux` CLI with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "conflux", *args]


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
class Service(ServiceProcess):
    """A real child process that announced its URL with a 'listening on http://...' line."""

    extra: dict = field(default_factory=dict)


def start_service(argv: Sequence[str], log_path: Path, *, timeout_s: float = 30.0,
                  env: dict[str, str] | None = None, cwd: Path | None = None) -> Service:
    """Start ``argv``; return once it prints its listening URL on stdout. Stdout is also logged."""
    return launch(log_path.stem, list(argv), log_path, timeout_s=timeout_s, env=env, cwd=cwd or REPO,
                  factory=Service)


def option_flags(options: dict[str, object]) -> list[str]:
    """``{"error_rate": 0.5, "db": path}`` -> ``["--error-rate", "0.5", "--db", path]``; True is a bare flag,
    None and False leave the option out."""
    flags: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not None and value is not False:
            flags += [flag, str(value)]
    return flags
