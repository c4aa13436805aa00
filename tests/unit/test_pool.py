"""The worker slot state machine (daemon/pool.py): restarts with growing backoff, FATAL after too
many crashes in the window, HALT on the boot/config exit codes, stopping -> STOPPED. No OS calls."""

from __future__ import annotations

import os
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conflux.daemon.pool import ExitVerdict, Slot, SlotState, describe_exit
from conflux.errors import ExitCode


def running_slot(now: float = 0.0, **kwargs) -> Slot:
    slot = Slot("consumer", 1, **kwargs)
    slot.started(4242, now)
    slot.greeted(now)
    return slot


def crash(slot: Slot, now: float, code: int = 1) -> ExitVerdict:
    verdict = slot.exited("exited with 1", code, now)
    if verdict == ExitVerdict.RESTART:
        assert not slot.due_to_start(slot.next_start_at - 0.001)
        assert slot.due_to_start(slot.next_start_at)
        slot.started(slot.pid or 1000, slot.next_start_at)
        slot.greeted(slot.next_start_at)
    return verdict


def test_life_cycle_states_and_name() -> None:
    slot = Slot("merger", 2)
    assert slot.name == "merger-2" and slot.state == SlotState.STOPPED and not slot.alive
    slot.started(10, 5.0)
    assert slot.state == SlotState.STARTING and slot.alive and slot.pid == 10
    slot.greeted(6.0)
    assert slot.state == SlotState.RUNNING and slot.last_heartbeat == 6.0
    slot.beat(9.0)
    assert slot.last_heartbeat == 9.0 and slot.last_heartbeat_wall > 0


def test_a_crash_restarts_after_a_backoff_that_doubles_up_to_the_cap() -> None:
    slot = running_slot(max_restarts=100, restart_window_s=1000.0, backoff_max_s=3.0)
    delays = []
    now = 0.0
    for _ in range(5):
        now += 0.01
        assert crash(slot, now) == ExitVerdict.RESTART
        delays.append(slot.next_start_at - now)
        now = slot.next_start_at
    assert delays == pytest.approx([0.5, 1.0, 2.0, 3.0, 3.0])
    assert slot.restarts == 5 and slot.state == SlotState.RUNNING


def test_exited_clears_the_process_and_what_it_owned() -> None:
    slot = running_slot()
    slot.partitions, slot.sources = [("t", 0)], ["crm"]
    slot.exited("killed by SIGKILL", 137, 1.0)
    assert slot.pid is None and slot.partitions == [] and slot.sources == []
    assert slot.last_exit == "killed by SIGKILL" and slot.state == SlotState.BACKOFF


def test_too_many_crashes_within_the_window_make_the_slot_fatal() -> None:
    slot = running_slot(max_restarts=3, restart_window_s=60.0)
    assert crash(slot, 1.0) == ExitVerdict.RESTART
    assert crash(slot, 2.0) == ExitVerdict.RESTART
    assert crash(slot, 5.0) == ExitVerdict.FATAL
    assert slot.state == SlotState.FATAL and not slot.due_to_start(1e9)


def test_crashes_spread_wider_than_the_window_never_go_fatal() -> None:
    slot = running_slot(max_restarts=3, restart_window_s=60.0)
    for minute in range(1, 20):
        assert crash(slot, minute * 61.0) == ExitVerdict.RESTART
        assert slot.backoff_s() == 0.5  # the old crashes left the window
    assert slot.restarts == 19


@pytest.mark.parametrize("code", sorted(ExitCode.HALTING))
def test_boot_and_config_errors_halt_the_daemon(code: int) -> None:
    assert code in (3, 4)
    slot = running_slot()
    assert slot.exited(f"exited with {code}", code, 1.0) == ExitVerdict.HALT
    assert slot.state == SlotState.FATAL and slot.crashes == type(slot.crashes)()


@pytest.mark.parametrize("code", [0, 1, 3, 4, 137])
def test_a_stopping_slot_ends_stopped_whatever_the_exit_code(code: int) -> None:
    slot = running_slot()
    slot.stopping()
    assert slot.state == SlotState.STOPPING
    assert slot.exited("exited", code, 1.0) == ExitVerdict.STOPPED
    assert slot.state == SlotState.STOPPED and not slot.crashes and not slot.due_to_start(1e9)


def test_stopping_a_slot_without_a_process_changes_nothing() -> None:
    slot = running_slot()
    crash(slot, 1.0)
    slot.exited("exited with 1", 1, 2.0)
    assert slot.state == SlotState.BACKOFF
    slot.stopping()
    assert slot.state == SlotState.BACKOFF  # the supervisor marks it STOPPED itself when draining


def test_heartbeat_overdue_only_for_a_live_starting_or_running_process() -> None:
    slot = Slot("fetcher", 0)
    slot.started(1, 0.0)
    assert not slot.heartbeat_overdue(30.0, 30.0) and slot.heartbeat_overdue(30.1, 30.0)
    slot.greeted(10.0)
    assert not slot.heartbeat_overdue(40.0, 30.0) and slot.heartbeat_overdue(40.5, 30.0)
    slot.stopping()
    assert not slot.heartbeat_overdue(1000.0, 30.0)
    slot.exited("exited with 0", 0, 50.0)
    assert not slot.heartbeat_overdue(1000.0, 30.0)


def test_reset_forgets_the_crash_history() -> None:
    slot = running_slot(max_restarts=2)
    crash(slot, 1.0)
    slot.reset()
    assert slot.state == SlotState.STOPPED and not slot.crashes
    slot.started(2, 3.0)
    assert crash(slot, 4.0) == ExitVerdict.RESTART


@settings(max_examples=150, derandomize=True, deadline=None)
@given(gaps=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30), max_restarts=st.integers(1, 6),
       window_s=st.floats(1.0, 120.0), backoff_max_s=st.floats(0.5, 60.0))
def test_verdicts_follow_the_sliding_window(gaps: list[float], max_restarts: int, window_s: float,
                                            backoff_max_s: float) -> None:
    slot = running_slot(max_restarts=max_restarts, restart_window_s=window_s, backoff_max_s=backoff_max_s)
    crashes: list[float] = []
    now = 0.0
    for gap in gaps:
        now = max(now, slot.next_start_at) + gap
        crashes.append(now)
        in_window = [at for at in crashes if now - at <= window_s]
        verdict = crash(slot, now)
        if len(in_window) >= max_restarts:
            assert verdict == ExitVerdict.FATAL and slot.state == SlotState.FATAL
            return
        assert verdict == ExitVerdict.RESTART
        assert slot.next_start_at - now == pytest.approx(min(backoff_max_s, 0.5 * 2 ** (len(in_window) - 1)))


def test_describe_exit_reads_real_wait_statuses() -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(ExitCode.CONFIG_ERROR)
    assert describe_exit(os.waitpid(pid, 0)[1]) == ("exited with 3", 3)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.kill(os.getpid(), signal.SIGKILL)
    assert describe_exit(os.waitpid(pid, 0)[1]) == ("killed by SIGKILL", 128 + signal.SIGKILL)
