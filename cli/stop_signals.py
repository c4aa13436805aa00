"""Ctrl-C and TERM for the long-running commands (`conflux top`, `conflux metrics`), whatever the shell
left them.

Runs in the operator's shell process. A shell that starts a command in the background, or a CI runner,
may hand it SIGINT ignored (or blocked); Python then installs no KeyboardInterrupt handler and Ctrl-C
does nothing. So these commands install their own handlers, which only record the signal; the
handler's wake-up byte ends whatever ``wait`` is sleeping in, and the command stops at that point.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Sequence

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """A context manager: while inside, SIGINT and SIGTERM are recorded in ``received``."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}
        self._old_wakeup_fd = -1
        self._read_fd = self._write_fd = -1

    @property
    def stopped(self) -> bool:
        return bool(self.received)

    def __enter__(self) -> StopSignals:
        self._read_fd, self._write_fd = os.pipe()
        for fd in (self._read_fd, self._write_fd):
            os.set_blocking(fd, False)
        self._old_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a blocked signal would never arrive
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._old_wakeup_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)

    def _record(self, signum: int, frame) -> None:
        self.received.append(signum)

    def wait(self, timeout_s: float, fds: Sequence[int] = ()) -> list[int]:
        """Sleep up to ``timeout_s``; return early, with the readable ones, once one of ``fds`` can be
        read, or with [] once a stop signal has come."""
        deadline = time.monotonic() + timeout_s
        while not self.stopped and (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self._read_fd, *fds], [], [], left)
            if self._read_fd in readable:
                self._drain()
            ready = [fd for fd in readable if fd != self._read_fd]
            if ready:
                return ready
        return []

    def _drain(self) -> None:
        try:
            while os.read(self._read_fd, 512):
                pass
        except BlockingIOError:
            pass
