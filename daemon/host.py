"""The supervisor's few OS calls behind one small object: fork, kill, waitpid and the monotonic clock.

``Host`` is the real thing and the supervisor's default. Tests hand the supervisor a fake one
(made-up pids, recorded signals, queued exits, a clock they move by hand), so its state machine runs
in-process without forking or waiting.
"""

from __future__ import annotations

import os
import time


class Host:
    """Supervisor process: the OS calls its loop makes, nothing else."""

    def fork(self) -> int:
        return os.fork()

    def kill(self, pid: int, sig: int) -> None:
        """Raises ProcessLookupError when the process is already gone, as ``os.kill`` does."""
        os.kill(pid, sig)

    def waitpid(self) -> tuple[int, int] | None:
        """One exited child as (pid, wait status), or None when no child has exited (or none exist)."""
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return None
        return None if pid == 0 else (pid, status)

    def monotonic(self) -> float:
        return time.monotonic()
