"""OffsetTracker (workers/checkpoint.py): out-of-order acks, commits that only go up and stop at the
first unfinished message, disown and clear, unknown acks ignored. Examples, then a state machine."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conflux.workers.checkpoint import InFlight, OffsetTracker

TP, OTHER = ("orders", 0), ("orders", 1)
BOTH = 0b11  # waiting on mergers 0 and 1


def tracker_with(*masks: int, committed: int = 10) -> OffsetTracker:
    tracker = OffsetTracker()
    tracker.own(TP, committed)
    for offset, mask in enumerate(masks, start=committed):
        tracker.add(TP, InFlight(offset, mask, f"m{offset}"))
    return tracker


def test_out_of_order_acks_commit_only_up_to_the_first_unfinished_message() -> None:
    tracker = tracker_with(0b1, 0b1, 0b1)            # offsets 10, 11, 12
    assert tracker.in_flight == 3 and tracker.commits_due() == {}
    assert tracker.ack(TP, 12, 0).offset == 12
    assert tracker.ack(TP, 11, 0).offset == 11
    assert tracker.commits_due() == {}               # 10 is still out
    assert tracker.ack(TP, 10, 0).offset == 10
    assert tracker.commits_due() == {TP: 13}
    tracker.committed({TP: 13})
    assert tracker.positions() == {TP: 13} and tracker.in_flight == 0 and tracker.commits_due() == {}


def test_a_message_is_done_only_when_every_merger_has_acknowledged() -> None:
    tracker = tracker_with(BOTH)
    assert tracker.ack(TP, 10, 1) is None
    assert tracker.ack(TP, 10, 1) is None            # a repeated ack changes nothing
    assert tracker.commits_due() == {}
    entry = tracker.ack(TP, 10, 0)
    assert entry is not None and entry.done and tracker.commits_due() == {TP: 11}


def test_unknown_acks_are_ignored() -> None:
    tracker = tracker_with(0b1)
    assert tracker.ack(TP, 99, 0) is None            # an offset never read
    assert tracker.ack(TP, 10, 1) is None            # a merger that owes nothing for it
    assert tracker.ack(OTHER, 10, 0) is None         # a partition not owned
    assert tracker.in_flight == 1 and tracker.commits_due() == {}


def test_a_message_with_nothing_for_any_merger_is_done_at_once() -> None:
    tracker = tracker_with(0b1)
    entry = InFlight(11, 0, "m11")
    assert tracker.add(TP, entry) == [entry]
    assert tracker.in_flight == 1 and tracker.commits_due() == {}
    tracker.ack(TP, 10, 0)
    assert tracker.commits_due() == {TP: 12}


def test_a_message_sent_in_several_frames_is_done_only_with_the_last_frames_ack() -> None:
    """A message too large for one ring frame goes as pieces that the merger may flush (and acknowledge)
    in different deliveries: the first piece's ack must not let the commit pass the rest."""
    tracker = tracker_with()
    tracker.add(TP, InFlight(10, 0b1, "big", pieces=3))
    assert tracker.ack(TP, 10, 0) is None and tracker.ack(TP, 10, 0) is None
    assert tracker.commits_due() == {} and tracker.in_flight == 1
    assert tracker.ack(TP, 10, 0).message_id == "big"
    assert tracker.commits_due() == {TP: 11} and tracker.in_flight == 0


def test_commits_only_go_up() -> None:
    tracker = tracker_with(0b1)
    tracker.ack(TP, 10, 0)
    tracker.committed({TP: 11})
    tracker.committed({TP: 5})                       # a late, older commit
    assert tracker.positions() == {TP: 11} and tracker.commits_due() == {}
    tracker.committed({OTHER: 3})                    # not ours: ignored
    assert OTHER not in tracker.positions()


def test_disown_forgets_the_partition_and_its_unfinished_messages() -> None:
    tracker = tracker_with(0b1, 0b1)
    tracker.own(OTHER, 0)
    tracker.add(OTHER, InFlight(0, 0b1, "x"))
    tracker.ack(TP, 10, 0)
    tracker.disown([TP, ("never", 0)])
    assert tracker.in_flight == 1 and list(tracker.partitions) == [OTHER]
    assert tracker.ack(TP, 11, 0) is None


def test_clear_in_flight_rewinds_to_the_last_commit() -> None:
    tracker = tracker_with(0b1, 0b1, 0b1)
    tracker.ack(TP, 10, 0)
    tracker.committed(tracker.commits_due())
    tracker.clear_in_flight()
    assert tracker.in_flight == 0 and tracker.positions() == {TP: 11} and tracker.commits_due() == {}
    assert tracker.ack(TP, 11, 0) is None            # an ack for the abandoned read
    tracker.add(TP, InFlight(11, 0b1, "again"))      # the log re-reads from the commit
    tracker.ack(TP, 11, 0)
    assert tracker.commits_due() == {TP: 12}


class TrackerMachine(RuleBasedStateMachine):
    """Random reads, acks (known, repeated and unknown), commits, rewinds, disowns and re-owns,
    checked against a model of which offsets are done."""

    PARTITIONS = [("t", 0), ("t", 1)]

    @initialize()
    def start(self) -> None:
        self.tracker = OffsetTracker()
        self.model: dict[tuple[str, int], dict] = {}
        self.commits: dict[tuple[str, int], int] = {}

    @rule(tp=st.sampled_from(PARTITIONS), committed=st.integers(0, 5))
    def own(self, tp, committed) -> None:
        if tp in self.model:
            return
        committed = max(committed, self.commits.get(tp, 0))  # the log remembers its commits
        self.tracker.own(tp, committed)
        self.model[tp] = {"committed": committed, "read_to": committed, "waiting": {}}

    @precondition(lambda self: self.model)
    @rule(data=st.data(), mask=st.integers(0, 3))
    def read(self, data, mask) -> None:
        tp = data.draw(st.sampled_from(sorted(self.model)))
        part = self.model[tp]
        entry = InFlight(part["read_to"], mask, f"m{tp[1]}-{part['read_to']}")
        assert self.tracker.add(tp, entry) == ([entry] if mask == 0 else [])
        part["waiting"][part["read_to"]] = mask
        part["read_to"] += 1

    @rule(tp=st.sampled_from(PARTITIONS), offset=st.integers(-1, 12), merger=st.integers(0, 2))
    def ack(self, tp, offset, merger) -> None:
        part = self.model.get(tp)
        waiting = part["waiting"].get(offset) if part else None
        finished = self.tracker.ack(tp, offset, merger)
        if waiting is not None and waiting & (1 << merger):
            part["waiting"][offset] = waiting & ~(1 << merger)
            assert (finished is not None) == (part["waiting"][offset] == 0)
        else:
            assert finished is None

    @rule()
    def commit(self) -> None:
        due = self.tracker.commits_due()
        for tp, part in self.model.items():
            unfinished = [o for o, mask in part["waiting"].items() if mask and o >= part["committed"]]
            target = min(unfinished, default=part["read_to"])
            assert due.get(tp) == (target if target > part["committed"] else None)
        for tp, offset in due.items():
            assert offset > self.commits.get(tp, -1)          # commits only go up
            self.commits[tp] = offset
            self.model[tp]["committed"] = offset
        self.tracker.committed(due)

    @rule()
    def rewind(self) -> None:
        self.tracker.clear_in_flight()
        for part in self.model.values():
            part["waiting"] = {}
            part["read_to"] = part["committed"]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def disown(self, data) -> None:
        tp = data.draw(st.sampled_from(sorted(self.model)))
        self.tracker.disown([tp])
        del self.model[tp]

    @invariant()
    def bookkeeping_matches(self) -> None:
        if not hasattr(self, "tracker"):
            return
        unfinished = sum(1 for part in self.model.values() for mask in part["waiting"].values() if mask)
        assert self.tracker.in_flight == unfinished
        assert self.tracker.positions() == {tp: part["committed"] for tp, part in self.model.items()}


TrackerMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=25, derandomize=True,
                                            deadline=None)
test_tracker_state_machine = TrackerMachine.TestCase
