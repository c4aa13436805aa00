"""The supervisor: forks the worker pools, keeps them at size, drains them on shutdown.

``Supervisor.run`` reads as the story of the daemon: set up, start the pools, then loop: dispatch
queued signals, read what workers report, reap the dead, abort the hung, restart the crashed.
Signal handlers only queue the signal (and wake the loop through the wake-up fd); the loop
dispatches each to a ``handle_<name>`` method.

Stopping is a drain in three phases, so nothing un-acked is committed and nothing acked is lost:
intake (fetchers, control) stops first; then consumers stop reading, ask the mergers to flush, wait
for acks and commit; then the mergers deliver what remains and exit. A second TERM (or QUIT)
stops at once; whatever was not acked is re-read at the next start.

A reload (HUP) drains the same way and then starts a new generation. It never turns into a stop:
when its deadline passes, the old workers are killed, and the new generation starts once they are
reaped (its consumers re-read whatever was not committed). Only TERM, INT or QUIT end the daemon
with exit 0.

Every OS call of the loop (fork, kill, waitpid, the monotonic clock) goes through ``self.host``
(``daemon.host``), so tests can drive the loop's steps in-process with fakes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path

import msgspec

from conflux import logs, metrics
from conflux.config import Config, load_config
from conflux.daemon.host import Host
from conflux.daemon.pool import ExitVerdict, Slot, SlotState, describe_exit
from conflux.daemon.status import DaemonFacts, build_status
from conflux.daemon.topology import Topology, build, remove_stale_ring_dirs, source_topics
from conflux.errors import ConfigError, ExitCode, LogError
from conflux.ipc.channel import Channel
from conflux.ipc.messages import (
    Drain,
    Heartbeat,
    Hello,
    LagReport,
    PartitionsOwned,
    SourceReport,
    SourcesOwned,
    StatusRequest,
    StatusSnapshot,
    SyncAccepted,
    SyncNow,
)
from conflux.log import open_log
from conflux.secrets import known_secrets
from conflux.workers.base import WorkerSpec
from conflux.workers.consumer import ConsumerWorker
from conflux.workers.control import ControlWorker
from conflux.workers.control_security import server_ssl_context
from conflux.workers.fetcher import FetcherWorker
from conflux.workers.merger import MergerWorker

logger = logging.getLogger(__name__)

WORKER_CLASSES = {"fetcher": FetcherWorker, "consumer": ConsumerWorker, "merger": MergerWorker,
                  "control": ControlWorker}
ROLES = ("control", "fetcher", "consumer", "merger")
SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit", signal.SIGHUP: "hup",
           signal.SIGCHLD: "chld"}
ABORT_GRACE_S = 5.0
LOOP_TICK_S = 0.5
PING_INTERVAL_S = 5.0
TRIM_INTERVAL_S = 30.0
# Drain phases: who is told to stop, in order.
DRAIN_PHASES = (("fetcher", "control"), ("consumer",), ("merger",))


class Supervisor:
    def __init__(self, config: Config, config_path: str | None, *, host: Host | None = None) -> None:
        self.host = host or Host()
        self.config = config
        self.config_path = config_path
        self.backend = open_log(config)
        self.signals: deque[str] = deque()
        self.slots: dict[str, Slot] = {}
        self.channels: dict[str, Channel] = {}
        self.topology: Topology | None = None
        self.listener: socket.socket | None = None
        self.generation = 0
        self.draining: int | None = None          # index into DRAIN_PHASES while draining
        self.drain_started_at = 0.0
        self.drain_deadline = 0.0
        self.killed_at_deadline = False
        self.exit_after_drain = True
        self.pending_config: Config | None = None
        self.pending_listener: socket.socket | None = None   # a reload's new control.listen, bound up front
        self.reloads = {"applied": 0, "refused": 0}
        self.last_reload_error = ""
        self.last_drain: dict | None = None
        self.exit_code = ExitCode.OK
        self.halted = False
        self.started_at = time.time()
        self.sources: dict[str, SourceReport] = {}
        self.lags: dict[tuple[str, int], tuple[str, object]] = {}
        self.log_reachable = True
        self._last_ping = self._last_trim = 0.0
        self._readiness_key: tuple | None = None
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    # -- the story --------------------------------------------------------------------------------

    def run(self) -> int:
        self.setup()
        self.start_generation()
        while not self.finished():
            self.dispatch_signals()
            self.read_channels(self.wait_timeout_s())
            self.reap()
            self.murder_stale()
            self.advance_drain()
            self.maintain_pools()
            self.periodic()
        self.teardown()
        return self.exit_code

    def setup(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, self._queue_signal)
        metrics.prepare_directory(str(Path(self.config.daemon.state_dir) / "metrics"))
        remove_stale_ring_dirs()
        self.listener = bind_listener(self.config.control.listen)
        server_ssl_context(self.config.control)  # a bad certificate or key stops the boot, not the control process
        scheme = "https" if self.config.control.tls_cert_file else "http"
        logger.info("conflux supervisor %d: %s log, control on %s://%s", os.getpid(), self.backend.name, scheme,
                    _address(self.listener))
        print(f"conflux listening on {scheme}://{_address(self.listener)}", flush=True)

    def _queue_signal(self, signum: int, frame) -> None:
        self.signals.append(SIGNALS[signum])

    def finished(self) -> bool:
        return self.halted or (self.draining is not None and self.exit_after_drain
                               and not any(slot.alive for slot in self.slots.values()))

    def wait_timeout_s(self) -> float:
        return 0.05 if self.signals else LOOP_TICK_S

    # -- generations ------------------------------------------------------------------------------

    def start_generation(self) -> None:
        """Prepare topics and rings for the current config and fork every slot."""
        config = self.config
        self.generation += 1
        self.backend = open_log(config)
        try:
            topics = self.backend.prepare(source_topics(config))
        except LogError as exc:
            logger.error("cannot prepare the log: %s", exc)
            self.halt(ExitCode.BOOT_ERROR)
            return
        self.topology = build(config, topics, self.generation, static_assignment=self.backend.name == "embedded")
        metrics.declare(roles=ROLES, sources=[source.name for source in config.sources], topics=topics)
        metrics.declare_reconciled(source.name for source in config.sources if source.reconcile)
        counts = {"control": 1, "fetcher": config.workers.fetchers, "consumer": config.workers.consumers,
                  "merger": config.workers.mergers}
        self.slots = {}
        for role in ROLES:
            for index in range(counts[role]):
                slot = Slot(role, index, max_restarts=config.workers.max_restarts,
                            restart_window_s=config.workers.restart_window_s,
                            backoff_max_s=config.workers.restart_backoff_max_s)
                self.slots[slot.name] = slot
        for slot in self.slots.values():
            self.spawn(slot)
        logger.info("generation %d started: %s", self.generation,
                    ", ".join(f"{n} {r}s" for r, n in counts.items()))

    def spec_for(self, slot: Slot, channel_end: socket.socket) -> WorkerSpec:
        topology, config = self.topology, self.config
        inbound: tuple = ()
        outbound: tuple = ()
        if slot.role == "consumer":
            inbound, outbound = topology.consumer_rings(slot.index)
        elif slot.role == "merger":
            inbound, outbound = topology.merger_rings(slot.index)
        return WorkerSpec(
            role=slot.role, index=slot.index, config=config, channel=channel_end,
            sources=tuple(topology.fetcher_sources[slot.index]) if slot.role == "fetcher" else (),
            assignment=tuple(topology.consumer_partitions[slot.index]) if slot.role == "consumer" else (),
            inbound=inbound, outbound=outbound, listener=self.listener if slot.role == "control" else None,
        )

    def spawn(self, slot: Slot) -> None:
        parent_end, child_end = Channel.pair()
        spec = self.spec_for(slot, child_end)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = self.host.fork()
        if pid == 0:  # child: never returns
            self._become_worker(spec, parent_end)
        child_end.close()
        old = self.channels.pop(slot.name, None)
        if old is not None:
            old.close()
        self.channels[slot.name] = Channel(parent_end)
        slot.started(pid, self.host.monotonic())
        logger.info("started %s (pid %d)", slot.name, pid)

    def _become_worker(self, spec: WorkerSpec, own_parent_end: socket.socket) -> None:
        code = ExitCode.CRASH
        try:
            own_parent_end.close()
            for channel in self.channels.values():
                channel.close()  # other workers' lines: holding them would hide the supervisor's death
            os.close(self._wake_r)
            os.close(self._wake_w)
            _die_with_parent()
            code = WORKER_CLASSES[spec.role](spec).run()
        except BaseException:  # the child must never return into the supervisor's loop
            logging.getLogger(__name__).exception("worker %s failed to start", spec.name)
        finally:
            logging.shutdown()
            os._exit(code)

    # -- signals ------------------------------------------------------------------------------------

    def dispatch_signals(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self.signals:
            getattr(self, f"handle_{self.signals.popleft()}")()

    def handle_term(self) -> None:
        if self.draining is not None and self.exit_after_drain:
            logger.warning("second stop signal: stopping now without draining")
            self.stop_now()
            return
        if self.draining is not None:  # a reload's drain is under way: it now ends in the stop
            logger.info("stop signal during a reload: the drain under way ends the daemon instead")
            self.exit_after_drain = True
            self._drop_pending_reload()
            return
        logger.info("stop signal: draining (deadline %.0f s)", self.config.daemon.shutdown_timeout_s)
        self.begin_drain(exit_after=True)

    handle_int = handle_term

    def handle_quit(self) -> None:
        logger.warning("QUIT: stopping now without draining")
        self.stop_now()

    def handle_chld(self) -> None:
        """Reaping happens every loop turn; the signal only wakes the loop."""

    def handle_hup(self) -> None:
        try:
            config = load_config(self.config_path)
            server_ssl_context(config.control)  # a bad new certificate would stop the new control process
        except ConfigError as exc:
            self._refuse_reload(str(exc))
            return
        if self.draining is not None:
            logger.warning("reload ignored: already draining")
            return
        try:
            listener = self._prepare_reload(config)
        except (ConfigError, LogError) as exc:
            self._refuse_reload(str(exc))
            return
        logger.info("reload: config is valid; replacing workers with a new generation")
        self.pending_config, self.pending_listener = config, listener
        self.begin_drain(exit_after=False)

    def _prepare_reload(self, config: Config) -> socket.socket | None:
        """What a reload needs that can fail, done before anything drains, so a failure leaves the old
        generation serving: bind a changed control.listen (the new socket, else None), create the topics."""
        listener = None if config.control.listen == self.config.control.listen else bind_listener(config.control.listen)
        try:
            open_log(config).prepare(source_topics(config))
        except LogError as exc:
            if listener is not None:
                listener.close()
            raise LogError(f"cannot prepare the log: {exc}") from exc
        return listener

    def _refuse_reload(self, reason: str) -> None:
        logger.error("reload refused, keeping the running config: %s", reason)
        self.reloads["refused"] += 1
        self.last_reload_error = reason
        metrics.reloads.labels("refused").inc()

    def _drop_pending_reload(self) -> None:
        self.pending_config = None
        if self.pending_listener is not None:
            self.pending_listener.close()
            self.pending_listener = None

    # -- draining ------------------------------------------------------------------------------------

    def begin_drain(self, *, exit_after: bool) -> None:
        self.exit_after_drain = exit_after
        self.killed_at_deadline = False
        self.drain_started_at = self.host.monotonic()
        self.drain_deadline = self.drain_started_at + self.config.daemon.shutdown_timeout_s
        self.draining = 0
        self._signal_phase(0)

    def _signal_phase(self, phase: int) -> None:
        # Each worker learns what is left of the deadline, so it can end its own drain (and commit) in time.
        drain = Drain(timeout_s=max(0.0, self.drain_deadline - self.host.monotonic()))
        for slot in self.slots.values():
            if slot.role in DRAIN_PHASES[phase]:
                if slot.alive:
                    slot.stopping()
                    self._send(slot, drain)
                    self._kill(slot, signal.SIGTERM)
                elif slot.state in (SlotState.BACKOFF, SlotState.STARTING):
                    slot.state = SlotState.STOPPED

    def advance_drain(self) -> None:
        if self.draining is None:
            return
        if self.host.monotonic() >= self.drain_deadline and not self.killed_at_deadline:
            self._drain_deadline_passed()
        while self.draining is not None and not any(
                slot.alive for slot in self.slots.values() if slot.role in DRAIN_PHASES[self.draining]):
            if self.draining + 1 < len(DRAIN_PHASES):
                self.draining += 1
                self._signal_phase(self.draining)
            elif self.exit_after_drain:
                return
            else:
                self._next_generation()

    def _drain_deadline_passed(self) -> None:
        """Kill what is left. A stop then exits; a reload goes on to its new generation once they are reaped."""
        alive = [slot.name for slot in self.slots.values() if slot.alive]
        if not alive:
            return
        self.killed_at_deadline = True
        then = "at the next start" if self.exit_after_drain else "by the new generation"
        logger.warning("drain deadline passed; killing %s (un-acked work is re-read %s)", ", ".join(alive), then)
        self._kill_all()

    def _next_generation(self) -> None:
        self.last_drain = self._drain_summary()
        self.draining = None
        self.topology.destroy()
        self.config = self.pending_config or self.config
        self.pending_config = None
        # A reload may rotate secrets (a new token file): the redactor must know the new values too.
        daemon = self.config.daemon
        logs.setup("supervisor", fmt=daemon.log_format, level=daemon.log_level, secrets=known_secrets(self.config))
        if self.pending_listener is not None:
            self.listener.close()
            self.listener, self.pending_listener = self.pending_listener, None
        self.reloads["applied"] += 1
        metrics.reloads.labels("applied").inc()
        self.start_generation()

    def _drain_summary(self) -> dict:
        """How the last drain went, for /status: how long, whether the deadline cut it, how each worker left."""
        return {
            "generation": self.generation,
            "reason": "stop" if self.exit_after_drain else "reload",
            "duration_s": round(self.host.monotonic() - self.drain_started_at, 3),
            "deadline_passed": self.killed_at_deadline,
            "workers": {slot.name: slot.last_exit for slot in self.slots.values()},
        }

    def stop_now(self) -> None:
        """An operator asked to stop at once (QUIT, or a second TERM): kill everything, exit 0."""
        self.exit_after_drain = True
        self._drop_pending_reload()
        if self.draining is None:
            self.draining = len(DRAIN_PHASES) - 1
        self._kill_all()

    def _kill_all(self) -> None:
        for slot in self.slots.values():
            if slot.alive:
                slot.stopping()
                self._kill(slot, signal.SIGKILL)
            else:
                slot.state = SlotState.STOPPED

    def halt(self, code: int) -> None:
        self.exit_code = code
        self.halted = True
        for slot in self.slots.values():
            if slot.alive:
                slot.stopping()
                self._kill(slot, signal.SIGTERM)

    # -- workers' reports -----------------------------------------------------------------------------

    def read_channels(self, timeout_s: float) -> None:
        fds = {channel.fileno(): name for name, channel in self.channels.items()}
        try:
            readable, _, _ = select.select([self._wake_r, *fds], [], [], timeout_s)
        except InterruptedError:
            return
        for fd in readable:
            name = fds.get(fd)
            if name is None or name not in self.channels:
                continue
            messages, _closed = self.channels[name].receive()
            for message in messages:
                self.on_message(self.slots[name], message)

    def on_message(self, slot: Slot, message: object) -> None:
        now = self.host.monotonic()
        if isinstance(message, Hello):
            slot.greeted(now)
        elif isinstance(message, Heartbeat):
            slot.beat(now)
            slot.stats = message.stats
        elif isinstance(message, PartitionsOwned):
            slot.partitions = [tuple(tp) for tp in message.partitions]
        elif isinstance(message, SourcesOwned):
            slot.sources = list(message.sources)
        elif isinstance(message, SourceReport):
            self.sources[message.source] = message
        elif isinstance(message, LagReport):
            for lag in message.lags:
                self.lags[(lag.topic, lag.partition)] = (slot.name, lag)
        elif isinstance(message, StatusRequest):
            self._send(slot, StatusSnapshot(body=msgspec.json.encode(build_status(self.facts()))))
        elif isinstance(message, SyncNow):
            self._route_sync(slot, message)

    def facts(self) -> DaemonFacts:
        state = "running" if self.draining is None else ("draining" if self.exit_after_drain else "reloading")
        return DaemonFacts(
            config=self.config, config_path=self.config_path or "", started_at=self.started_at,
            generation=self.generation, backend=self.backend.name, state=state, log_reachable=self.log_reachable,
            slots=list(self.slots.values()), sources=dict(self.sources), lags=dict(self.lags),
            monotonic_now=self.host.monotonic(),
            reloads={**self.reloads, "last_refusal": self.last_reload_error, "last_drain": self.last_drain})

    def _route_sync(self, requester: Slot, request: SyncNow) -> None:
        owner = next((slot for slot in self.slots.values()
                      if slot.role == "fetcher" and request.source in slot.sources and slot.alive), None)
        if owner is None or self.draining is not None:
            detail = "draining" if self.draining is not None else "no running fetcher owns this source here"
            self._send(requester, SyncAccepted(source=request.source, accepted=False, detail=detail))
            return
        self._send(owner, request)
        self._send(requester, SyncAccepted(source=request.source, accepted=True, detail=owner.name))

    def _send(self, slot: Slot, message: object) -> None:
        channel = self.channels.get(slot.name)
        if channel is not None:
            channel.send(message)

    # -- reaping, hung workers, restarts --------------------------------------------------------------

    def reap(self) -> None:
        while (exited := self.host.waitpid()) is not None:
            pid, status = exited
            slot = next((s for s in self.slots.values() if s.pid == pid), None)
            metrics.mark_dead(pid)
            if slot is not None:
                self._on_exit(slot, status)

    def _on_exit(self, slot: Slot, status: int) -> None:
        text, code = describe_exit(status)
        if self.draining is not None and self.exit_after_drain:
            slot.stopping()  # it left before its phase (a signal to the whole group): not a crash
        verdict = slot.exited(text, code, self.host.monotonic())
        level = logging.INFO if verdict == ExitVerdict.STOPPED else logging.WARNING
        logger.log(level, "%s (pid gone) %s: %s", slot.name, text, verdict.value)
        if verdict == ExitVerdict.RESTART:
            metrics.worker_restarts.labels(slot.role).inc()
        elif verdict == ExitVerdict.FATAL:
            logger.error("%s crashed %d times within %.0f s; it is FATAL and will not be restarted",
                         slot.name, len(slot.crashes), slot.restart_window_s)
        elif verdict == ExitVerdict.HALT:
            logger.error("%s could not boot (%s); stopping the daemon", slot.name, text)
            self.halt(code)
        for tp in [tp for tp, (owner, _) in self.lags.items() if owner == slot.name]:
            del self.lags[tp]

    def murder_stale(self) -> None:
        """A worker whose loop stopped heartbeating gets SIGABRT, and SIGKILL if that does not end it."""
        now = self.host.monotonic()
        timeout_s = self.config.workers.heartbeat_timeout_s
        for slot in self.slots.values():
            if slot.abort_sent_at is not None and slot.alive and now - slot.abort_sent_at > ABORT_GRACE_S:
                logger.error("%s ignored SIGABRT; sending SIGKILL", slot.name)
                self._kill(slot, signal.SIGKILL)
                slot.abort_sent_at = now
            elif slot.abort_sent_at is None and slot.heartbeat_overdue(now, timeout_s):
                logger.error("%s sent no heartbeat for %.0f s; sending SIGABRT", slot.name, now - slot.last_heartbeat)
                self._kill(slot, signal.SIGABRT)
                slot.abort_sent_at = now

    def maintain_pools(self) -> None:
        if self.draining is not None or self.halted:
            return
        now = self.host.monotonic()
        for slot in self.slots.values():
            if slot.due_to_start(now):
                self.spawn(slot)

    def _kill(self, slot: Slot, sig: int) -> None:
        if slot.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.host.kill(slot.pid, sig)

    # -- periodic chores ---------------------------------------------------------------------------------

    def periodic(self) -> None:
        now = self.host.monotonic()
        states: dict[tuple[str, str], int] = {}
        for slot in self.slots.values():
            states[(slot.role, slot.state.value)] = states.get((slot.role, slot.state.value), 0) + 1
        for role in ROLES:
            for state in SlotState:
                metrics.workers.labels(role, state.value).set(states.get((role, state.value), 0))
        if now - self._last_ping >= PING_INTERVAL_S:
            self._last_ping = now
            self.log_reachable = self.backend.ping(1.0)
        if self.backend.name == "embedded" and now - self._last_trim >= TRIM_INTERVAL_S and self.draining is None:
            self._last_trim = now
            try:
                removed = self.backend.trim()
            except LogError as exc:
                logger.warning("log trim failed: %s", exc)
            else:
                if removed:
                    logger.info("trimmed %d committed messages older than retention", removed)
        self.announce_readiness()

    def announce_readiness(self) -> None:
        """When what /ready depends on changes, push a snapshot to the control process: it answers /ready
        from that, so probes (however many) never wait on this loop and never miss a short outage."""
        key = (self.log_reachable, self.draining, tuple(slot.state for slot in self.slots.values()))
        if key == self._readiness_key:
            return
        self._readiness_key = key
        control = next((slot for slot in self.slots.values() if slot.role == "control" and slot.alive), None)
        if control is not None:
            self._send(control, StatusSnapshot(body=msgspec.json.encode(build_status(self.facts()))))

    def teardown(self) -> None:
        for slot in self.slots.values():
            self._kill(slot, signal.SIGKILL)
        self.reap()
        for channel in self.channels.values():
            channel.close()
        if self.topology is not None:
            self.topology.destroy()
        if self.listener is not None:
            self.listener.close()
        self._drop_pending_reload()
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        logger.info("supervisor stopped (exit %d)", self.exit_code)


def bind_listener(listen: str) -> socket.socket:
    """Bound and listening before any worker exists, so a busy port fails the boot, not a worker."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        reason = "address in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"control.listen: cannot listen on {listen}: {reason}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _die_with_parent() -> None:
    """Linux: the kernel sends us SIGTERM if the supervisor dies, so no worker outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass

