"""The worker lifecycle shared by every role: built before fork, brought to life after it.

``Worker.__init__`` runs in the supervisor and only stores the spec. ``Worker.run`` runs in the
child right after fork: it resets the signal state inherited from the supervisor, sets up logging
with the child's own role and pid, and only then lets the role open clients, loops and mappings
(librdkafka threads and event loops do not survive fork). The return value of ``run`` is the
process's exit code (see ``daemon.errors.ExitCode``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import time
from dataclasses import dataclass

from conflux import logs
from conflux.config import Config
from conflux.errors import ConfigError, ExitCode, LogError
from conflux.ipc.channel import Channel
from conflux.ipc.messages import Heartbeat, Hello
from conflux.ipc.shm import RingSpec
from conflux.log.base import TopicPartition
from conflux.secrets import known_secrets
from conflux.workers import batching

logger = logging.getLogger(__name__)

INHERITED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
                     signal.SIGUSR1, signal.SIGUSR2)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker slot needs, made by the supervisor before fork. Inert: plain data and fds."""

    role: str
    index: int
    config: Config
    channel: socket.socket
    sources: tuple[str, ...] = ()
    assignment: tuple[TopicPartition, ...] = ()
    inbound: tuple[RingSpec, ...] = ()
    outbound: tuple[RingSpec, ...] = ()
    listener: socket.socket | None = None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


class Worker:
    """Base of every role. Subclasses implement ``main`` (sync) or use ``AsyncWorker``."""

    role = "worker"

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.config = spec.config
        self.channel: Channel | None = None
        self._last_heartbeat = 0.0

    def run(self) -> int:
        """Child side entry point; returns the exit code."""
        try:
            self.init_process()
            profile_dir = os.environ.get("CONFLUX_PROFILE_DIR")
            return self._profiled(profile_dir) if profile_dir else self.main()
        except ConfigError as exc:
            logger.error("configuration error: %s", exc)
            return ExitCode.CONFIG_ERROR
        except LogError as exc:
            logger.error("log error: %s", exc)
            return ExitCode.CRASH
        except Exception:
            logger.exception("%s crashed", self.spec.name)
            return ExitCode.CRASH

    def _profiled(self, directory: str) -> int:
        """Development aid: run the worker under cProfile and leave the stats in ``directory``."""
        import cProfile

        profile = cProfile.Profile(time.process_time)  # CPU time: wall time is noise on a shared machine
        try:
            return profile.runcall(self.main)
        finally:
            profile.dump_stats(os.path.join(directory, f"{self.spec.name}-{os.getpid()}.prof"))

    def init_process(self) -> None:
        for sig in INHERITED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        random.seed()
        batching.reseed_message_ids()
        daemon = self.config.daemon
        logs.setup(self.spec.name, fmt=daemon.log_format, level=daemon.log_level,
                   secrets=known_secrets(self.config))
        self.channel = Channel(self.spec.channel)
        self.channel.send(Hello(role=self.role, index=self.spec.index, pid=os.getpid()))

    def main(self) -> int:
        raise NotImplementedError

    def heartbeat(self, **stats: float) -> None:
        """Called from the main loop; rate-limited to the configured interval."""
        now = time.monotonic()
        if now - self._last_heartbeat >= self.config.workers.heartbeat_interval_s:
            self._last_heartbeat = now
            self.channel.send(Heartbeat(sent_at=time.time(), stats=stats))


class AsyncWorker(Worker):
    """A worker whose main loop is asyncio on uvloop; signals arrive through ``add_signal_handler``."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self.stopping: asyncio.Event | None = None
        self.stop_quickly = False

    def main(self) -> int:
        import uvloop

        return uvloop.run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGQUIT, self._quit)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor handles reloads
        loop.add_reader(self.channel.fileno(), self._on_channel)
        heartbeats = asyncio.create_task(self._heartbeats(), name="heartbeats")
        try:
            return await self.main_async()
        finally:
            heartbeats.cancel()
            loop.remove_reader(self.channel.fileno())

    def _quit(self) -> None:
        self.stop_quickly = True
        self.stopping.set()

    async def _heartbeats(self) -> None:
        interval_s = self.config.workers.heartbeat_interval_s
        while True:
            self.heartbeat(**self.stats())
            await asyncio.sleep(interval_s)

    def _on_channel(self) -> None:
        messages, closed = self.channel.receive()
        for message in messages:
            self.on_control(message)
        if closed:  # the supervisor is gone: nobody will read our reports or kill us at a drain deadline
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
            logger.warning("the supervisor is gone; stopping at once (the log keeps what was not committed)")
            self._quit()

    def on_control(self, message: object) -> None:
        """Supervisor -> worker messages; roles override what they understand."""

    def stats(self) -> dict[str, float]:
        return {}

    async def main_async(self) -> int:
        raise NotImplementedError
