"""MergeState (workers/merge.py): latest wins per (source, key) by (updated_at, log offset), stale
versions are dropped, a re-read at the same offset is not stale, the fast path and the one-by-one path
agree, and take() cuts stable, content-addressed sink requests that carry each record's offset as seq."""

from __future__ import annotations

from itertools import count

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from conflux.ipc.messages import Batch, Position
from conflux.workers.merge import HASH, OFFSET_SPAN, UPDATED_US, MergeState, Token
from conflux.workers.sinks.base import Chunk

FUZZ = settings(max_examples=100, derandomize=True, deadline=None)
_offsets = count()


def frame(source: str, records: list[tuple[str, int, str]], *, consumer: int = 0, generation: int = 1,
          offset: int | None = None) -> tuple[Batch, Token]:
    """A log batch and its token; records: (key, updated_us, content), the record's JSON carries all three."""
    raws = [msgspec.Raw(msgspec.json.encode({"k": key, "u": updated_us, "c": content}))
            for key, updated_us, content in records]
    batch = Batch(
        message_id=f"m{next(_offsets)}", source=source, sync="full", created_us=0,
        keys=[key for key, _, _ in records], updated=[f"u{updated_us}" for _, updated_us, _ in records],
        updated_us=[updated_us for _, updated_us, _ in records],
        hashes=[f"h-{content}" for _, _, content in records], key_hashes=[hash(key) for key, _, _ in records],
        records=raws)
    position = Position(f"t-{source}", 0, next(_offsets) if offset is None else offset)
    return batch, Token(consumer, generation, position)


def take_all(state: MergeState, batch_size: int = 1000) -> list[Chunk]:
    """Every source's pending records, each source's cut into sink requests of at most ``batch_size``."""
    return [chunk for source in list(state.sources) if state.sources[source].pending
            for unit in [state.take(source)] for chunk in Chunk(source, unit.keys, unit.values).cut(batch_size)]


def flushed(state: MergeState, batch_size: int = 1000) -> list[tuple[str, list[tuple[str, int, str]]]]:
    """take() as plain data: per chunk, its source and (key, updated_us, hash) of each record."""
    return [(chunk.source, [(key, value[UPDATED_US], value[HASH]) for key, value in zip(chunk.keys, chunk.values)])
            for chunk in take_all(state, batch_size)]


class Model:
    """The rule, written as plainly as possible: versions are ordered by (updated_us, offset), and only a
    strictly older one is stale; within one frame (one offset) a later record beats an earlier one."""

    def __init__(self) -> None:
        self.handed: dict[tuple[str, str], tuple[int, int]] = {}
        self.pending: dict[str, dict[str, tuple[int, int, str]]] = {}

    def add(self, source: str, records: list[tuple[str, int, str]], offset: int) -> int:
        stale = 0
        pending = self.pending.setdefault(source, {})
        for key, updated_us, content in records:
            version = (updated_us, offset)
            handed = self.handed.get((source, key))
            current = pending.get(key)
            if (handed is not None and version < handed) or (current is not None and version < current[:2]):
                stale += 1
            else:
                pending[key] = (updated_us, offset, f"h-{content}")
        return stale

    def take(self, batch_size: int) -> list[tuple[str, list[tuple[str, int, str]]]]:
        chunks = []
        for source, records in self.pending.items():
            rows = [(key, updated_us, content_hash) for key, (updated_us, _, content_hash) in records.items()]
            self.handed.update(((source, key), version[:2]) for key, version in records.items())
            chunks += [(source, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
        self.pending = {}
        return chunks


records_st = st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(-3, 3), st.sampled_from("xyz")), max_size=8)
# Few timestamps and few offsets: ties on both, re-reads of one offset, offsets that go back (a rewind).
steps_st = st.lists(st.one_of(st.tuples(st.sampled_from(["s1", "s2"]), records_st, st.integers(0, 4)),
                              st.integers(1, 4)), max_size=25)


@FUZZ
@given(steps=steps_st)
def test_merge_state_follows_the_latest_wins_rule(steps: list) -> None:
    """Frames and flushes in any order (timestamps before 1970, equal instants, repeated and earlier
    offsets included) match the plain model."""
    state, model = MergeState(), Model()
    for step in steps:
        if isinstance(step, int):
            assert sorted(flushed(state, step)) == sorted(model.take(step))
        else:
            source, records, offset = step
            assert state.add(*frame(source, records, offset=offset)) == model.add(source, records, offset)
            assert state.pending_count == sum(len(keys) for keys in model.pending.values())
    assert sorted(flushed(state, 3)) == sorted(model.take(3))


@FUZZ
@given(records=records_st, known=st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(-3, 3),
                                                   st.integers(0, 4)), max_size=4))
def test_fast_path_and_one_by_one_path_agree(records: list, known: list) -> None:
    fast, slow = MergeState(), MergeState()
    for state in (fast, slow):  # the same history of versions already handed to the sink
        state.source("s").latest = {key: updated_us * OFFSET_SPAN + offset for key, updated_us, offset in known}
    one = frame("s", records, offset=2)
    stale_fast = fast.add(*one)
    slow_source = slow.source("s")
    stale_slow = slow._add_one_by_one(one[0], slow_source.latest, slow_source.pending, one[1].position)
    assert stale_fast == stale_slow
    assert fast.pending_count == len(fast.source("s").pending) == len(slow_source.pending)
    assert fast.source("s").pending == slow_source.pending


def test_newer_wins_and_an_older_version_arriving_late_is_dropped() -> None:
    state = MergeState()
    assert state.add(*frame("s", [("k", 20, "new")])) == 0
    assert state.add(*frame("s", [("k", 10, "old")])) == 1  # late and older: stale
    assert flushed(state) == [("s", [("k", 20, "h-new")])]
    assert state.add(*frame("s", [("k", 15, "older-than-handed")])) == 1
    assert state.pending_count == 0 and flushed(state) == []
    assert state.add(*frame("s", [("k", 30, "newer")])) == 0
    assert flushed(state) == [("s", [("k", 30, "h-newer")])]


def test_equal_timestamps_the_greater_offset_wins_in_whatever_order_they_arrive() -> None:
    state = MergeState()
    state.add(*frame("s", [("k", 5, "first"), ("k", 5, "second")], offset=10))
    assert state.add(*frame("s", [("k", 5, "at-9")], offset=9)) == 1  # an earlier observation: stale
    state.add(*frame("s", [("k", 5, "at-11")], offset=11))
    assert flushed(state) == [("s", [("k", 5, "h-at-11")])]
    assert state.add(*frame("s", [("k", 5, "at-10")], offset=10)) == 1  # older than the handed version
    assert state.pending_count == 0
    assert state.add(*frame("s", [("k", 5, "at-12")], offset=12)) == 0
    assert flushed(state) == [("s", [("k", 5, "h-at-12")])]
    assert state.add(*frame("s", [("k", 4, "older-instant")], offset=99)) == 1  # the instant decides first


def test_within_one_message_the_later_record_of_a_key_wins() -> None:
    state = MergeState()
    state.add(*frame("s", [("k", 5, "first"), ("k", 5, "second")], offset=3))
    assert flushed(state) == [("s", [("k", 5, "h-second")])]


def test_a_re_read_at_the_same_offset_is_delivered_again_not_stale() -> None:
    """After a consumer restart the same message comes back at the same offset; its acknowledgement is
    still owed, so it must be delivered (and acknowledged) again, not dropped as stale."""
    state = MergeState()
    first = frame("s", [("k", 5, "v"), ("j", 7, "w")], offset=4, generation=1)
    state.add(*first)
    assert flushed(state) == [("s", [("k", 5, "h-v"), ("j", 7, "h-w")])]
    again = frame("s", [("k", 5, "v"), ("j", 7, "w")], offset=4, generation=2)
    assert state.add(*again) == 0 and state.take_idle_tokens() == []
    unit = state.take("s")
    assert unit.tokens == [again[1]] and unit.keys == ["k", "j"]


def test_records_before_1970_are_not_mistaken_for_stale() -> None:
    """Regression: the one-by-one path compared against -1 for unknown keys, so negative instants
    (legacy 1900-01-01 style stamps) were silently dropped when a frame had a repeated key."""
    state = MergeState()
    assert state.add(*frame("s", [("k", -2_208_988_800_000_000, "a"), ("k", -2_208_988_800_000_000, "b")])) == 0
    assert flushed(state) == [("s", [("k", -2_208_988_800_000_000, "h-b")])]


def test_sources_are_separate_key_spaces() -> None:
    state = MergeState()
    state.add(*frame("a", [("k", 10, "x")]))
    state.add(*frame("b", [("k", 1, "y")]))  # same key, other source: not stale
    assert flushed(state) == [("a", [("k", 10, "h-x")]), ("b", [("k", 1, "h-y")])]


def test_take_cuts_per_source_chunks_of_at_most_batch_size() -> None:
    state = MergeState()
    state.add(*frame("a", [(f"k{i}", i, "x") for i in range(7)]))
    state.add(*frame("b", [(f"k{i}", i, "x") for i in range(3)]))
    chunks = take_all(state, 3)
    assert [(chunk.source, len(chunk.keys)) for chunk in chunks] == [("a", 3), ("a", 3), ("a", 1), ("b", 3)]
    assert [chunk.keys for chunk in chunks][:3] == [["k0", "k1", "k2"], ["k3", "k4", "k5"], ["k6"]]
    assert state.pending_count == 0 and take_all(state, 3) == []
    assert state.keys_known == 10


def test_take_hands_back_every_token_in_arrival_order_and_resets_the_age() -> None:
    state = MergeState()
    assert state.source("a").age_s() == 0.0
    first = frame("a", [("k", 1, "x")], consumer=0, generation=3, offset=7)
    second = frame("a", [("k", 0, "y")], consumer=1, generation=4, offset=9)  # stale, still acknowledged
    state.add(*first)
    state.add(*second)
    source = state.source("a")
    assert source.age_s() >= 0.0 and source.oldest_at is not None
    unit = state.take("a")
    assert unit.tokens == [first[1], second[1]]
    assert source.tokens == [] and source.oldest_at is None and source.age_s() == 0.0


def test_chunk_body_is_the_sink_contract() -> None:
    state = MergeState()
    state.add(*frame("s", [("k1", 1, "x"), ("k2", 2, "y")], offset=7))
    (chunk,) = take_all(state)
    body = msgspec.json.decode(chunk.body)
    assert body["batch_id"] == chunk.batch_id
    assert body["records"] == [
        {"source": "s", "key": "k1", "op": "upsert", "updated_at": "u1", "hash": "h-x",
         "data": {"k": "k1", "u": 1, "c": "x"}, "seq": 7},
        {"source": "s", "key": "k2", "op": "upsert", "updated_at": "u2", "hash": "h-y",
         "data": {"k": "k2", "u": 2, "c": "y"}, "seq": 7},
    ]


def test_batch_id_is_derived_from_content_and_offsets_only() -> None:
    def chunk_for(records: list, offset: int, *, consumer: int = 0, generation: int = 1):
        state = MergeState()
        state.add(*frame("s", records, consumer=consumer, generation=generation, offset=offset))
        return take_all(state)[0]

    same = [chunk_for([("k1", 1, "x"), ("k2", 2, "y")], 5, consumer=n, generation=n) for n in (1, 2)]
    assert same[0].batch_id == same[1].batch_id and same[0].body == same[1].body  # who read it does not matter
    assert chunk_for([("k1", 1, "x"), ("k2", 2, "z")], 5).batch_id != same[0].batch_id
    assert chunk_for([("k2", 2, "y"), ("k1", 1, "x")], 5).batch_id != same[0].batch_id  # another request
    assert chunk_for([("k1", 1, "x"), ("k2", 2, "y")], 6).batch_id != same[0].batch_id  # another seq
    rebuilt = Chunk("s", same[0].keys, same[0].values)  # a retry rebuilds the same request
    assert rebuilt.batch_id == same[0].batch_id and rebuilt.body == same[0].body


def test_a_frame_of_only_stale_records_is_acknowledged_without_a_delivery():
    """Nothing to deliver must not mean nothing to acknowledge: the consumer would wait forever."""
    state = MergeState()
    state.add(*frame("crm", [("k", 200, "new")]))
    unit = state.take("crm")
    assert state.take_idle_tokens() == []
    stale = frame("crm", [("k", 100, "old")])
    assert state.add(*stale) == 1 and state.pending_count == 0
    assert [token.position for token in state.take_idle_tokens()] == [stale[1].position]
    assert state.source("crm").tokens == [] and unit.records == 1
    state.add(*frame("crm", [("j", 300, "x")]))
    assert state.take_idle_tokens() == []  # something pending: its tokens go with the delivery


def test_halves_split_a_request_into_two_with_their_own_ids() -> None:
    state = MergeState()
    state.add(*frame("s", [(f"k{i}", i, "x") for i in range(5)]))
    (whole,) = take_all(state)
    first, second = whole.halves()
    assert (first.keys, second.keys) == (["k0", "k1"], ["k2", "k3", "k4"])
    assert first.values + second.values == whole.values and first.source == second.source == "s"
    assert len({whole.batch_id, first.batch_id, second.batch_id}) == 3
    rebuilt = Chunk("s", whole.keys[:2], whole.values[:2])  # a retry rebuilds the same halves
    assert (rebuilt.batch_id, rebuilt.body) == (first.batch_id, first.body)
    one, rest = second.halves()
    assert (one.keys, rest.keys) == (["k2"], ["k3", "k4"])


def test_ack_frames_fit_the_ack_ring_whatever_the_topic_names():
    from conflux.ipc.codec import encode_ack_frame
    from conflux.ipc.messages import Acks
    from conflux.workers.merger import acks_per_frame

    for topic in ("t", "a-rather-long-topic-name.with.a.prefix" * 3):
        positions = [Position(topic, 2**31 - 1, 2**63 - 1)] * 5000
        for max_frame_bytes in (2_000, 4_088, 1 << 20):
            per = acks_per_frame(positions, max_frame_bytes)
            assert len(encode_ack_frame(Acks(generation=2**62, positions=positions[:per]))) <= max_frame_bytes
            assert 1 <= per <= 1000
