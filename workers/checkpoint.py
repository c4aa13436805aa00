"""Offset bookkeeping for a consumer: which log messages are done, and how far it is safe to commit.

A message is done when every merger that got a part of it has acknowledged that the sink took
that part. Messages finish out of order (two mergers, two sinks requests), so the committable
offset of a partition is the first message that is not done yet; commits only go up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from conflux.log.base import TopicPartition


@dataclass(slots=True)
class InFlight:
    """One log message on its way to the sink."""

    offset: int
    waiting_on: int                 # bitmask of mergers that still owe an ack
    message_id: str
    key_hashes: list[int] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    records: int = 0
    source: str = ""
    # Frames the message went in: more than one when it was too large for a ring frame. They all go to one
    # merger, which acknowledges each; the message is done with the last.
    pieces: int = 1
    sent_at: float = 0.0            # time.monotonic() when it went to the mergers
    overdue: bool = False           # already reported as waiting longer than the ack timeout

    @property
    def done(self) -> bool:
        return self.waiting_on == 0


class PartitionTrack:
    """The in-flight messages of one partition, oldest first."""

    __slots__ = ("committed", "pending", "read_to")

    def __init__(self, committed: int) -> None:
        self.committed = committed     # last offset committed to the log (next to read)
        self.read_to = committed       # one past the newest message handed out
        self.pending: dict[int, InFlight] = {}

    def add(self, entry: InFlight) -> None:
        self.pending[entry.offset] = entry
        self.read_to = entry.offset + 1

    def committable(self) -> int:
        for offset, entry in self.pending.items():
            if not entry.done:
                return offset
        return self.read_to


class OffsetTracker:
    """All partitions a consumer owns. Finished messages are handed back for dedup bookkeeping."""

    def __init__(self) -> None:
        self.partitions: dict[TopicPartition, PartitionTrack] = {}
        self.in_flight = 0
        self.by_topic: dict[str, int] = {}   # messages in flight per topic (a source's sinks may be down)

    def topics_at(self, limit: int) -> set[str]:
        """The topics with ``limit`` messages or more in flight."""
        return {topic for topic, count in self.by_topic.items() if count >= limit}

    def _count(self, topic: str, delta: int) -> None:
        self.in_flight += delta
        self.by_topic[topic] = self.by_topic.get(topic, 0) + delta

    def own(self, tp: TopicPartition, committed: int) -> None:
        self.partitions[tp] = PartitionTrack(committed)

    def disown(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            track = self.partitions.pop(tp, None)
            if track is not None:
                self._count(tp[0], -sum(1 for entry in track.pending.values() if not entry.done))

    def clear_in_flight(self) -> None:
        """Forget every message not yet done; the caller rewinds the log to the committed offsets."""
        for track in self.partitions.values():
            track.pending.clear()
            track.read_to = track.committed
        self.in_flight = 0
        self.by_topic.clear()

    def add(self, tp: TopicPartition, entry: InFlight) -> list[InFlight]:
        """Track a message; returns [entry] if it is already done (nothing went to any merger)."""
        track = self.partitions[tp]
        track.add(entry)
        if entry.done:
            return [entry]
        self._count(tp[0], 1)
        return []

    def ack(self, tp: TopicPartition, offset: int, merger: int) -> InFlight | None:
        """A merger acknowledged its part; returns the entry if that finished it. Unknown acks are ignored."""
        track = self.partitions.get(tp)
        entry = track.pending.get(offset) if track else None
        if entry is None or not entry.waiting_on & (1 << merger):
            return None
        entry.pieces -= 1
        if entry.pieces > 0:
            return None
        entry.waiting_on &= ~(1 << merger)
        if entry.done:
            self._count(tp[0], -1)
            return entry
        return None

    def commits_due(self) -> dict[TopicPartition, int]:
        """Partitions whose committable offset moved past the last commit, and where to."""
        due = {}
        for tp, track in self.partitions.items():
            target = track.committable()
            if target > track.committed:
                due[tp] = target
        return due

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """The log took these commits: drop the finished entries below them."""
        for tp, offset in offsets.items():
            track = self.partitions.get(tp)
            if track is None:
                continue
            track.committed = max(track.committed, offset)
            for old in [o for o in track.pending if o < track.committed]:
                del track.pending[old]

    def overdue(self, now: float, timeout_s: float) -> tuple[float, int, list[tuple[TopicPartition, InFlight]]]:
        """(age of the oldest unacknowledged message, how many are older than ``timeout_s``, and those that
        crossed it since the last call). Within a partition messages go out in offset order, so the
        walk stops at the first one younger than the timeout."""
        oldest_s, count, crossed = 0.0, 0, []
        for tp, track in self.partitions.items():
            first = True
            for entry in track.pending.values():
                if entry.done:
                    continue
                age_s = now - entry.sent_at
                if first:
                    oldest_s, first = max(oldest_s, age_s), False
                if age_s < timeout_s:
                    break
                count += 1
                if not entry.overdue:
                    entry.overdue = True
                    crossed.append((tp, entry))
        return oldest_s, count, crossed

    def positions(self) -> dict[TopicPartition, int]:
        return {tp: track.committed for tp, track in self.partitions.items()}
