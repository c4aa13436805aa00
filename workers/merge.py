"""The merge state of one merger: the latest version of every key, and what is waiting for the sink.

Pure data structure, driven by the merger process. Versions of a key are ordered by (updated_at, log
offset): of two versions with the same instant (second-precision timestamps make that common), the
one at the greater offset is the later observation and wins, whatever order they arrive in (a key
always lives in one partition, so its offsets are comparable). A record replaces the pending one for
its key unless it is older in that order; a record older than the version already handed to the
sink is dropped, so a late, old version never overwrites a newer one. A copy at the *same* position
is not older: it is a re-read of the same message (after a consumer restart, say) whose delivery may
still be owed, and it is delivered again. The offset goes to the sink as each record's ``seq``, so the
sink breaks ties the same way.

Hot path: a frame whose keys are all new (the usual case during a sync) is merged with two C-level
set checks and one ``dict.update``; only frames that touch known keys go record by record.
"""

from __future__ import annotations

import time
from itertools import repeat
from operator import add, attrgetter, itemgetter, mul
from typing import NamedTuple

from conflux.ipc.messages import Batch, Position

# A pending record is a plain tuple (fast to build): (updated_us, hash, record, updated text, position,
# is a delete). A delete is a version like any other: ordered, deduplicated and merged the same way.
UPDATED_US, HASH, RECORD, UPDATED, POSITION, DELETED = range(6)
# A version's place in the order as one int: updated_us, then the log offset (< 2**63, Kafka's int64).
OFFSET_SPAN = 1 << 63
_updated_us_of = itemgetter(UPDATED_US)
_offset_of = attrgetter("offset")
_position_of = itemgetter(POSITION)


class Token(NamedTuple):
    """What to acknowledge to whom once a flush is delivered."""

    consumer: int
    generation: int
    position: Position


class FlushUnit(NamedTuple):
    """Everything pending for one source, taken at once: delivered to each of its sinks, then its tokens
    are acknowledged."""

    source: str
    keys: list[str]
    values: list[tuple]
    tokens: list[Token]

    @property
    def records(self) -> int:
        return len(self.keys)


class SourceState:
    """One source's part of a merger: what is pending, what was handed over, and the tokens to acknowledge."""

    __slots__ = ("latest", "oldest_at", "pending", "tokens")

    def __init__(self) -> None:
        self.latest: dict[str, int] = {}       # key -> order() of the newest version handed to the sinks
        self.pending: dict[str, tuple] = {}
        self.tokens: list[Token] = []
        self.oldest_at: float | None = None

    def age_s(self) -> float:
        return 0.0 if self.oldest_at is None else time.monotonic() - self.oldest_at


class MergeState:
    """Per source: sources merge independently, so one whose sink is down never holds up another."""

    def __init__(self) -> None:
        self.sources: dict[str, SourceState] = {}
        self.pending_count = 0

    def source(self, name: str) -> SourceState:
        state = self.sources.get(name)
        if state is None:
            state = self.sources[name] = SourceState()
        return state

    def add(self, frame: Batch, token: Token) -> int:
        """Merge a log batch's records, acknowledged with ``token`` once delivered; returns how many were stale."""
        state = self.source(frame.source)
        latest, pending = state.latest, state.pending
        keys = frame.keys
        before = len(pending)
        if latest.keys().isdisjoint(keys) and pending.keys().isdisjoint(keys) and len(set(keys)) == len(keys):
            pending.update(zip(keys, zip(frame.updated_us, frame.hashes, frame.records, frame.updated,
                                         repeat(token.position), frame.deleted or repeat(False))))
            stale = 0
        else:
            stale = self._add_one_by_one(frame, latest, pending, token.position)
        self.pending_count += len(pending) - before
        state.tokens.append(token)
        if state.oldest_at is None:
            state.oldest_at = time.monotonic()
        return stale

    def _add_one_by_one(self, frame: Batch, latest: dict[str, int], pending: dict[str, tuple],
                        position: Position) -> int:
        stale = 0
        offset = position.offset
        for key, updated_us, content_hash, record, updated, deleted in zip(
                frame.keys, frame.updated_us, frame.hashes, frame.records, frame.updated,
                frame.deleted or repeat(False, len(frame.keys)), strict=True):
            rank = updated_us * OFFSET_SPAN + offset
            handed = latest.get(key)  # not a -1 default: instants before 1970 are negative
            if handed is not None and rank < handed:
                stale += 1
                continue
            current = pending.get(key)
            if current is not None and rank < order(current):  # equal: the same message, a later record wins
                stale += 1
                continue
            pending[key] = (updated_us, content_hash, record, updated, position, deleted)
        return stale

    def take_idle_tokens(self) -> list[Token]:
        """Tokens of frames that left nothing pending in their source (every record was stale): there is
        nothing to deliver for them, so they can be acknowledged at once. Safe for commits: whatever made
        them stale came from an earlier offset of the same partition, which is still unacknowledged."""
        idle: list[Token] = []
        for state in self.sources.values():
            if state.tokens and not state.pending:
                idle.extend(state.tokens)
                state.tokens, state.oldest_at = [], None
        return idle

    def take(self, source: str) -> FlushUnit:
        """Everything pending for ``source``, with the tokens to acknowledge once every sink has it.

        From here on these versions count as handed to the sinks: the merger retries them until each
        sink takes them or refuses them for good, so an older version arriving later is stale.
        """
        state = self.sources[source]
        keys, values = list(state.pending), list(state.pending.values())
        # order() of every value, without a Python call per record
        ranks = map(add, map(mul, map(_updated_us_of, values), repeat(OFFSET_SPAN)),
                    map(_offset_of, map(_position_of, values)))
        state.latest.update(zip(keys, ranks))
        unit = FlushUnit(source, keys, values, state.tokens)
        self.pending_count -= len(keys)
        state.pending, state.tokens, state.oldest_at = {}, [], None
        return unit

    @property
    def keys_known(self) -> int:
        return sum(len(state.latest) for state in self.sources.values())


def order(value: tuple) -> int:
    """A pending value's place among the versions of its key: (updated_us, log offset) as one int."""
    return value[UPDATED_US] * OFFSET_SPAN + value[POSITION].offset
