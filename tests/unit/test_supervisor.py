"""The supervisor's state machine in-process: a fake host (made-up pids, recorded signals, queued exits, a
clock moved by hand) drives the loop's steps one turn at a time. Real parts stay small and real: the
config file and embedded log in tmp_path, the rings topology makes in /dev/shm (destroyed at teardown),
the control channels (socketpairs) and, for the reload tests, listening sockets on 127.0.0.1."""

from __future__ import annotations

import itertools
import logging
import signal
import socket
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from conflux.config import load_config, to_toml
from conflux.daemon.pool import SlotState
from conflux.daemon.supervisor import ABORT_GRACE_S, Supervisor, bind_listener
from conflux.errors import ExitCode
from conflux.ipc.channel import Channel
from conflux.ipc.messages import Drain, Heartbeat, Hello

SHUTDOWN_TIMEOUT_S = 10.0


class FakeHost:
    """fork hands out made-up pids (never 0: the supervisor is never the child); kill records each signal
    and, for the signals in ``fatal``, queues the exit that waitpid reports; the clock moves when told."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._pids = itertools.count(40_001)
        self.running: set[int] = set()
        self.signals: list[tuple[int, int]] = []
        self.exits: deque[tuple[int, int]] = deque()
        self.fatal = {signal.SIGKILL}

    def fork(self) -> int:
        pid = next(self._pids)
        self.running.add(pid)
        return pid

    def kill(self, pid: int, sig: int) -> None:
        if pid not in self.running:
            raise ProcessLookupError(pid)
        self.signals.append((pid, sig))
        if sig in self.fatal:
            self._end(pid, sig)  # a wait status of a process killed by ``sig`` is ``sig``

    def exit(self, pid: int, code: int = 0) -> None:
        self._end(pid, code << 8)

    def _end(self, pid: int, status: int) -> None:
        self.running.discard(pid)
        self.exits.append((pid, status))

    def waitpid(self) -> tuple[int, int] | None:
        return self.exits.popleft() if self.exits else None

    def monotonic(self) -> float:
        return self.now

    def sent_to(self, pid: int) -> list[int]:
        return [sig for target, sig in self.signals if target == pid]


class Harness(Supervisor):
    """The real supervisor; it only keeps a duplicate of each worker's end of its channel, so a test can
    read what the supervisor told the worker (the fake fork has no child to hold that end)."""

    def spec_for(self, slot, channel_end):
        self.worker_ends[slot.name] = Channel(channel_end.dup())
        return super().spec_for(slot, channel_end)

    def told(self, name: str) -> list[object]:
        return self.worker_ends[name].receive()[0]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return tmp_path / "conflux.toml"


def write_config(path: Path, **sections: dict) -> Path:
    var = path.parent / "var"
    settings: dict = {
        "log": {"path": str(var / "conflux.db"), "partitions": 2},
        "workers": {"fetchers": 1, "consumers": 2, "mergers": 2, "ring_bytes": 1 << 16,
                    "heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 5.0,
                    "max_restarts": 3, "restart_window_s": 60.0, "restart_backoff_max_s": 4.0},
        "control": {"listen": "127.0.0.1:0"},
        "daemon": {"state_dir": str(var), "shutdown_timeout_s": SHUTDOWN_TIMEOUT_S},
        "sources": [{"name": "customers", "url": "http://127.0.0.1:9/api/customers", "key": "id"}],
    }
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    path.write_text(to_toml(settings))
    return path


@pytest.fixture
def supervisor(config_file: Path) -> Iterator[Harness]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # a reload sets up the supervisor's own logging
    write_config(config_file)
    sup = Harness(load_config(config_file), str(config_file), host=FakeHost())
    sup.worker_ends = {}
    sup.listener = bind_listener(sup.config.control.listen)
    sup.start_generation()
    greet_all(sup)
    yield sup
    sup.teardown()
    for end in sup.worker_ends.values():
        end.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def greet_all(sup: Supervisor) -> None:
    for slot in sup.slots.values():
        if slot.alive:
            sup.on_message(slot, Hello(role=slot.role, index=slot.index, pid=slot.pid))


def turn(sup: Supervisor) -> None:
    """One turn of ``Supervisor.run``'s loop, minus the wait for the workers' messages."""
    sup.dispatch_signals()
    sup.reap()
    sup.murder_stale()
    sup.advance_drain()
    sup.maintain_pools()


def signal_supervisor(sup: Supervisor, name: str) -> None:
    sup.signals.append(name)  # what the handler does; the loop dispatches it
    turn(sup)


def pids(sup: Supervisor, *roles: str) -> list[int]:
    return [slot.pid for slot in sup.slots.values() if slot.role in roles and slot.alive]


def signalled(sup: Supervisor, sig: int) -> set[str]:
    host = sup.host
    return {slot.name for slot in sup.slots.values() if slot.alive and sig in host.sent_to(slot.pid)}


def finish(sup: Supervisor, *roles: str, code: int = 0) -> None:
    for pid in pids(sup, *roles):
        sup.host.exit(pid, code)
    turn(sup)


def restarts(role: str) -> float:
    return REGISTRY.get_sample_value("conflux_worker_restarts_total", {"role": role}) or 0.0


def reloads(result: str) -> float:
    return REGISTRY.get_sample_value("conflux_reloads_total", {"result": result}) or 0.0


# -- draining ---------------------------------------------------------------------------------------------


def test_term_drains_intake_then_consumers_then_mergers_and_exits_0(supervisor) -> None:
    sup = supervisor
    signal_supervisor(sup, "term")
    assert signalled(sup, signal.SIGTERM) == {"fetcher-0", "control-0"}
    assert sup.facts().state == "draining" and not sup.finished()

    sup.host.now += 3.0
    finish(sup, "fetcher", "control")
    assert signalled(sup, signal.SIGTERM) == {"consumer-0", "consumer-1"}
    # Each consumer was told what is left of the deadline before its TERM, to commit in time.
    assert [m.timeout_s for m in sup.told("consumer-0") if isinstance(m, Drain)] == [SHUTDOWN_TIMEOUT_S - 3.0]
    assert not sup.finished()

    finish(sup, "consumer")
    assert signalled(sup, signal.SIGTERM) == {"merger-0", "merger-1"}
    finish(sup, "merger")
    assert sup.finished() and sup.exit_code == ExitCode.OK
    assert {slot.state for slot in sup.slots.values()} == {SlotState.STOPPED}
    assert not any(sig == signal.SIGKILL for _, sig in sup.host.signals)


def test_a_worker_that_leaves_before_its_phase_during_a_stop_is_not_a_crash(supervisor) -> None:
    sup = supervisor
    before = restarts("merger")
    signal_supervisor(sup, "term")
    finish(sup, "merger")  # e.g. a TERM sent to the whole process group
    assert {sup.slots[name].state for name in ("merger-0", "merger-1")} == {SlotState.STOPPED}
    assert restarts("merger") == before
    finish(sup, "fetcher", "control")
    finish(sup, "consumer")
    assert sup.finished() and sup.exit_code == ExitCode.OK


def test_the_stop_drain_deadline_kills_what_is_left_and_exits_0(supervisor) -> None:
    sup = supervisor
    signal_supervisor(sup, "term")
    finish(sup, "fetcher", "control")
    sup.host.now += SHUTDOWN_TIMEOUT_S - 0.01
    turn(sup)
    assert signalled(sup, signal.SIGKILL) == set()
    sup.host.now += 0.02
    turn(sup)  # SIGKILL to the consumers and mergers (the fake host ends them at once)
    turn(sup)
    assert sup.finished() and sup.exit_code == ExitCode.OK
    killed = {name for name, slot in sup.slots.items() if slot.last_exit == "killed by SIGKILL"}
    assert killed == {"consumer-0", "consumer-1", "merger-0", "merger-1"}


def test_a_second_term_and_quit_stop_at_once(supervisor) -> None:
    sup = supervisor
    signal_supervisor(sup, "term")
    signal_supervisor(sup, "term")
    assert signalled(sup, signal.SIGKILL) == set()  # every one was killed and reaped in that turn
    assert sup.finished() and sup.exit_code == ExitCode.OK
    assert {slot.last_exit for slot in sup.slots.values()} == {"killed by SIGKILL"}


def test_quit_stops_at_once(supervisor) -> None:
    sup = supervisor
    signal_supervisor(sup, "quit")
    turn(sup)
    assert sup.finished() and sup.exit_code == ExitCode.OK
    assert {slot.last_exit for slot in sup.slots.values()} == {"killed by SIGKILL"}


# -- reaping, restarts, FATAL, hung workers ----------------------------------------------------------


def test_a_crash_is_reaped_and_restarted_after_a_backoff_that_grows(supervisor) -> None:
    sup = supervisor
    slot = sup.slots["consumer-1"]
    before = restarts("consumer")
    first_pid = slot.pid
    sup.host.exit(first_pid, 1)
    turn(sup)
    assert slot.state == SlotState.BACKOFF and slot.pid is None and slot.last_exit == "exited with 1"
    assert restarts("consumer") == before + 1
    sup.host.now += 0.49
    turn(sup)
    assert slot.state == SlotState.BACKOFF  # not yet: the first backoff is 0.5 s
    sup.host.now += 0.02
    turn(sup)
    assert slot.state == SlotState.STARTING and slot.pid not in (None, first_pid)
    sup.on_message(slot, Hello(role="consumer", index=1, pid=slot.pid))
    assert slot.state == SlotState.RUNNING

    sup.host.exit(slot.pid, 1)
    turn(sup)
    sup.host.now += 0.99
    turn(sup)
    assert slot.state == SlotState.BACKOFF  # the second crash in the window waits 1 s
    sup.host.now += 0.02
    turn(sup)
    assert slot.state == SlotState.STARTING and slot.restarts == 2


def test_a_slot_that_keeps_crashing_goes_fatal_and_the_rest_keeps_running(supervisor) -> None:
    sup = supervisor
    slot = sup.slots["fetcher-0"]
    for _ in range(3):  # max_restarts = 3 within the 60 s window
        sup.host.exit(slot.pid, 1)
        turn(sup)
        sup.host.now += slot.backoff_s() + 0.01
        turn(sup)
    assert slot.state == SlotState.FATAL and slot.pid is None
    forks = len(sup.host.running)
    sup.host.now += 30.0
    turn(sup)
    assert slot.state == SlotState.FATAL and len(sup.host.running) == forks
    assert all(s.state == SlotState.RUNNING for s in sup.slots.values() if s is not slot)
    assert not sup.finished()


def test_a_boot_error_halts_the_daemon_with_its_code(supervisor) -> None:
    sup = supervisor
    sup.host.exit(sup.slots["merger-0"].pid, ExitCode.CONFIG_ERROR)
    turn(sup)
    assert sup.finished() and sup.exit_code == ExitCode.CONFIG_ERROR


def test_a_silent_worker_gets_sigabrt_then_sigkill_after_the_grace(supervisor) -> None:
    sup = supervisor
    sup.host.fatal = {signal.SIGKILL}  # it ignores SIGABRT (stopped, or stuck in a C call)
    victim = sup.slots["consumer-0"]
    pid = victim.pid

    def one_second_passes():  # everybody but consumer-0 keeps heartbeating
        sup.host.now += 1.0
        for slot in sup.slots.values():
            if slot is not victim:
                sup.on_message(slot, Heartbeat(sent_at=0.0))
        turn(sup)

    for _ in range(5):  # heartbeat_timeout_s = 5: not overdue yet
        one_second_passes()
    assert sup.host.sent_to(pid) == []
    one_second_passes()
    assert sup.host.sent_to(pid) == [signal.SIGABRT]
    for _ in range(int(ABORT_GRACE_S)):
        one_second_passes()
    assert sup.host.sent_to(pid) == [signal.SIGABRT]
    one_second_passes()
    assert sup.host.sent_to(pid) == [signal.SIGABRT, signal.SIGKILL]
    turn(sup)
    assert victim.state == SlotState.BACKOFF and victim.last_exit == "killed by SIGKILL"
    assert [(p, s) for p, s in sup.host.signals if p != pid] == []


# -- reloads ---------------------------------------------------------------------------------------------


def test_hup_replaces_the_generation_with_the_new_config(supervisor, config_file) -> None:
    sup = supervisor
    old_pids, old_rings = set(pids(sup, *sup.slots)), sup.topology.ring_dir
    applied = reloads("applied")
    write_config(config_file, workers={"consumers": 1})
    signal_supervisor(sup, "hup")
    assert sup.facts().state == "reloading"
    finish(sup, "fetcher", "control")
    finish(sup, "consumer")
    finish(sup, "merger")
    assert sup.generation == 2 and sup.draining is None and not sup.finished()
    assert sorted(sup.slots) == ["consumer-0", "control-0", "fetcher-0", "merger-0", "merger-1"]
    assert {slot.state for slot in sup.slots.values()} == {SlotState.STARTING}
    assert not old_pids & set(pids(sup, *sup.slots))
    assert not old_rings.exists() and sup.topology.ring_dir.exists()
    assert reloads("applied") == applied + 1
    last_drain = sup.facts().reloads["last_drain"]
    assert last_drain["reason"] == "reload" and not last_drain["deadline_passed"]


def test_a_reload_whose_deadline_passes_kills_the_old_workers_and_starts_the_new_generation(supervisor) -> None:
    sup = supervisor
    signal_supervisor(sup, "hup")
    finish(sup, "fetcher", "control")  # the consumers never get their acks (a sink outage)
    sup.host.now += SHUTDOWN_TIMEOUT_S
    turn(sup)  # deadline: SIGKILL to what is left
    turn(sup)  # reaped: the new generation starts
    assert sup.generation == 2 and not sup.finished()
    assert sup.draining is None and sup.facts().state == "running"
    assert {slot.state for slot in sup.slots.values()} == {SlotState.STARTING}
    last_drain = sup.facts().reloads["last_drain"]
    assert last_drain["deadline_passed"] and last_drain["workers"]["consumer-0"] == "killed by SIGKILL"
    greet_all(sup)
    # The new generation is a running daemon: it still drains and stops on TERM.
    signal_supervisor(sup, "term")
    finish(sup, "fetcher", "control")
    finish(sup, "consumer")
    finish(sup, "merger")
    assert sup.finished() and sup.exit_code == ExitCode.OK


def test_term_during_a_reload_turns_the_drain_into_the_stop(supervisor) -> None:
    sup = supervisor
    signal_supervisor(sup, "hup")
    finish(sup, "fetcher", "control")
    signal_supervisor(sup, "term")
    assert sup.facts().state == "draining" and sup.pending_config is None
    finish(sup, "consumer")
    finish(sup, "merger")
    assert sup.finished() and sup.exit_code == ExitCode.OK and sup.generation == 1


def test_an_invalid_config_refuses_the_reload_and_keeps_the_generation(supervisor, config_file) -> None:
    sup = supervisor
    refused = reloads("refused")
    config_file.write_text(config_file.read_text().replace("[control]", "[control]\nbogus_key = 1", 1))
    signal_supervisor(sup, "hup")
    assert sup.draining is None and sup.host.signals == [] and sup.generation == 1
    assert reloads("refused") == refused + 1
    assert "control.bogus_key" in sup.facts().reloads["last_refusal"]


def test_a_reload_to_a_taken_port_is_refused_before_anything_drains(supervisor, config_file) -> None:
    sup = supervisor
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_config(config_file, control={"listen": f"127.0.0.1:{port}"})
        old_listener = sup.listener
        signal_supervisor(sup, "hup")
        assert sup.draining is None and sup.host.signals == []
        assert sup.listener is old_listener and old_listener.fileno() != -1
        assert sup.facts().reloads["last_refusal"].startswith("control.listen:")
        assert {slot.state for slot in sup.slots.values()} == {SlotState.RUNNING}


def test_a_reload_binds_its_new_port_before_draining_and_serves_there_after(supervisor, config_file) -> None:
    sup = supervisor
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    write_config(config_file, control={"listen": f"127.0.0.1:{port}"})
    old_listener = sup.listener
    signal_supervisor(sup, "hup")
    assert sup.draining == 0
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # already listening while the old generation drains
    finish(sup, "fetcher", "control")
    finish(sup, "consumer")
    finish(sup, "merger")
    assert sup.generation == 2 and sup.listener.getsockname()[1] == port
    assert old_listener.fileno() == -1


def test_a_reload_whose_log_cannot_be_prepared_is_refused_before_anything_drains(supervisor, config_file) -> None:
    sup = supervisor
    blocker = config_file.parent / "not-a-directory"
    blocker.write_text("")
    write_config(config_file, log={"path": str(blocker / "conflux.db")})
    signal_supervisor(sup, "hup")
    assert sup.draining is None and sup.host.signals == [] and sup.generation == 1
    assert sup.facts().reloads["last_refusal"].startswith("cannot prepare the log: cannot open embedded log")
