"""The consumer's drain deadline lies inside the supervisor's: it stops waiting for acks early enough to make
its final commit before the supervisor's deadline would SIGKILL it (issue 13, "drain deadlines aligned")."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conflux.config import Config
from conflux.ipc.channel import Channel
from conflux.ipc.messages import Drain, SyncNow
from conflux.workers.base import WorkerSpec
from conflux.workers.consumer import COMMIT_RESERVE_S, ConsumerWorker, drain_deadline


@given(now=st.floats(0, 1e6), budget_s=st.floats(0.001, 3600))
def test_the_drain_ends_inside_the_budget_leaving_time_to_commit(now: float, budget_s: float) -> None:
    deadline = drain_deadline(now, budget_s)
    assert now + 0.75 * budget_s - 1e-6 <= deadline < now + budget_s
    assert now + budget_s - deadline == pytest.approx(min(COMMIT_RESERVE_S, budget_s / 4))


@pytest.fixture
def consumer() -> Iterator[tuple[ConsumerWorker, Channel]]:
    supervisor_end, worker_end = Channel.pair()
    config = Config()
    worker = ConsumerWorker(WorkerSpec(role="consumer", index=0, config=config, channel=worker_end))
    worker.channel = Channel(worker_end)  # what init_process does in the child
    yield worker, Channel(supervisor_end)
    supervisor_end.close()
    worker_end.close()


def test_the_supervisors_drain_message_sets_the_consumers_deadline(consumer) -> None:
    worker, supervisor = consumer
    supervisor.send(SyncNow(source="other"))  # not for a consumer: ignored
    supervisor.send(Drain(timeout_s=6.0))
    worker.draining = True  # what its TERM handler does
    before = time.monotonic()
    assert worker._drain_expired() is False
    # 6 s were left of the supervisor's deadline: the consumer gives up waiting 1.5 s before it.
    assert before + 4.5 <= worker.drain_deadline <= time.monotonic() + 4.5


def test_a_drain_message_with_no_time_left_ends_the_drain_at_once(consumer) -> None:
    worker, supervisor = consumer
    supervisor.send(Drain(timeout_s=0.0))
    worker.draining = True
    assert worker._drain_expired() is True


def test_a_term_from_elsewhere_falls_back_to_shutdown_timeout_s(consumer) -> None:
    worker, _supervisor = consumer
    worker.draining = True
    before = time.monotonic()
    assert worker._drain_expired() is False
    budget_s = worker.config.daemon.shutdown_timeout_s
    assert worker.drain_deadline >= before + budget_s - COMMIT_RESERVE_S
    assert worker.drain_deadline < time.monotonic() + budget_s


def test_no_deadline_before_the_drain(consumer) -> None:
    worker, supervisor = consumer
    supervisor.send(Drain(timeout_s=6.0))
    assert worker._drain_expired() is False and worker.drain_deadline is None
