"""Worker slots and their life cycle: the supervisor's bookkeeping, free of any OS call.

A slot is one position in a pool (``consumer-1``). Its process comes and goes; the slot remembers
how often it crashed. A crash schedules a restart with exponential backoff; too many crashes inside
``restart_window_s`` make the slot FATAL: it is reported in status and metrics and no longer
restarted, while the rest of the daemon keeps serving (and /ready says not ready). A boot or config
error (see ``ExitCode``) halts the daemon instead, because restarting cannot fix it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from conflux.errors import ExitCode


class SlotState(StrEnum):
    STARTING = "starting"   # forked, no Hello yet
    RUNNING = "running"
    BACKOFF = "backoff"     # crashed, waiting to be restarted
    FATAL = "fatal"         # crashed too often; not restarted
    STOPPING = "stopping"   # asked to stop, not reaped yet
    STOPPED = "stopped"


class ExitVerdict(StrEnum):
    STOPPED = "stopped"     # it was asked to stop
    RESTART = "restart"     # crashed; restart after the backoff
    FATAL = "fatal"         # crashed too often
    HALT = "halt"           # boot/config error: the daemon must stop


@dataclass
class Slot:
    role: str
    index: int
    max_restarts: int = 5
    restart_window_s: float = 60.0
    backoff_max_s: float = 30.0
    pid: int | None = None
    state: SlotState = SlotState.STOPPED
    restarts: int = 0
    started_at: float = 0.0
    last_heartbeat: float = 0.0        # monotonic
    last_heartbeat_wall: float = 0.0
    next_start_at: float = 0.0
    abort_sent_at: float | None = None
    last_exit: str = ""
    crashes: deque = field(default_factory=deque)
    partitions: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def started(self, pid: int, now: float) -> None:
        self.pid = pid
        self.state = SlotState.STARTING
        self.started_at = self.last_heartbeat = now
        self.abort_sent_at = None

    def greeted(self, now: float) -> None:
        if self.state == SlotState.STARTING:
            self.state = SlotState.RUNNING
        self.beat(now)

    def beat(self, now: float) -> None:
        self.last_heartbeat = now
        self.last_heartbeat_wall = time.time()

    def stopping(self) -> None:
        if self.alive:
            self.state = SlotState.STOPPING

    def exited(self, status: str, code: int, now: float) -> ExitVerdict:
        """Record the death of our process and decide what happens to the slot."""
        was_stopping = self.state == SlotState.STOPPING
        self.pid = None
        self.last_exit = status
        self.partitions, self.sources = [], []
        if was_stopping:
            self.state = SlotState.STOPPED
            return ExitVerdict.STOPPED
        if code in ExitCode.HALTING:
            self.state = SlotState.FATAL
            return ExitVerdict.HALT
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > self.restart_window_s:
            self.crashes.popleft()
        if len(self.crashes) >= self.max_restarts:
            self.state = SlotState.FATAL
            return ExitVerdict.FATAL
        self.restarts += 1
        self.state = SlotState.BACKOFF
        self.next_start_at = now + self.backoff_s()
        return ExitVerdict.RESTART

    def backoff_s(self) -> float:
        """0.5 s after the first crash in the window, doubling with each further one."""
        return min(self.backoff_max_s, 0.5 * 2 ** max(0, len(self.crashes) - 1))

    def due_to_start(self, now: float) -> bool:
        return self.state == SlotState.BACKOFF and now >= self.next_start_at

    def heartbeat_overdue(self, now: float, timeout_s: float) -> bool:
        return self.alive and self.state in (SlotState.STARTING, SlotState.RUNNING) and \
            now - self.last_heartbeat > timeout_s

    def reset(self) -> None:
        """A new generation: the slot starts over, crash history forgotten."""
        self.crashes.clear()
        self.state = SlotState.STOPPED


def describe_exit(status: int) -> tuple[str, int]:
    """A waitpid status as text and as an exit code (128 + signal for a killed process)."""
    import os
    import signal

    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name}", 128 + sig
    code = os.WEXITSTATUS(status)
    return f"exited with {code}", code
