"""The analytics sink's body decoding and per-record checks (demo/analytics_wire.py)."""

from __future__ import annotations

import msgspec
import pytest
import xxhash
from hypothesis import example, given
from hypothesis import strategies as st

from conflux.demo.analytics_wire import (
    REASON_BAD_HASH,
    REASON_BAD_UPDATED_AT,
    REASON_EMPTY_KEY,
    REASON_NOT_OBJECT,
    REASON_REJECT_RATE,
    MalformedBody,
    WireBatch,
    check_batch,
    decode_batch,
    parse_instant,
    rejected_by_rate,
)
from conflux.demo.checksum import record_digest

REASONS = {REASON_BAD_HASH, REASON_BAD_UPDATED_AT, REASON_EMPTY_KEY, REASON_NOT_OBJECT, REASON_REJECT_RATE}
FIELDS = ("source", "key", "op", "updated_at", "hash", "data")


def record(key: str = "k", data: bytes = b"{}", **overrides) -> dict:
    fields = {"source": "s", "key": key, "op": "upsert", "updated_at": "2024-01-01T00:00:00Z",
              "hash": xxhash.xxh3_64_hexdigest(data), "data": msgspec.Raw(data)}
    return {**fields, **overrides}


def body(*records: dict, batch_id: str = "b") -> bytes:
    return msgspec.json.encode({"batch_id": batch_id, "records": list(records)})


# --- decoding -------------------------------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000


@given(st.binary(max_size=400))
@example(DEEP)
@example(b'{"batch_id": "x", "records": [{"data": %s}]}' % DEEP)
@example(b'{"batch_id": "\xff", "records": []}')
@example(b'{"batch_id": "b", "records": [{"source": "s", "key": "k", "op": "upsert", "updated_at": "",'
         b' "hash": "", "data": 1e99999}]}')
def test_arbitrary_bytes_decode_or_fail_with_a_reason(raw):
    try:
        batch = decode_batch(raw)
    except MalformedBody as exc:
        assert str(exc).startswith("malformed body: ") and len(str(exc)) > len("malformed body: ")
    else:
        assert isinstance(batch, WireBatch)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8)
field_values = st.one_of(json_values, st.sampled_from(["upsert", "delete", "2024-01-01T00:00:00Z", ""]))
record_like = st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=6)


@given(st.dictionaries(st.sampled_from(["batch_id", "records", "extra"]),
                       st.one_of(json_values, st.lists(record_like, max_size=4)), max_size=3))
def test_almost_right_shapes_decode_or_name_the_field(document):
    try:
        batch = decode_batch(msgspec.json.encode(document))
    except MalformedBody as exc:
        assert "$" in str(exc) or "field" in str(exc) or "Expected" in str(exc)
    else:
        changes, rejected = check_batch(batch, 0.0)
        assert len(changes) + len(rejected) == len(batch.records)


@pytest.mark.parametrize(("document", "named"), [
    ({"records": []}, "batch_id"),
    ({"batch_id": "", "records": []}, "batch_id"),
    ({"batch_id": "b"}, "records"),
    ({"batch_id": "b", "records": [{"source": "s"}]}, "records[0]"),
    ({"batch_id": "b", "records": [record(op="upsert_or_delete")]}, "records[0].op"),
    ({"batch_id": "b", "records": [record(), record(updated_at=5)]}, "records[1].updated_at"),
])
def test_malformed_bodies_name_the_field(document, named):
    with pytest.raises(MalformedBody, match=named.replace("[", r"\[").replace("]", r"\]")):
        decode_batch(msgspec.json.encode(document))


def test_data_keeps_its_exact_bytes():
    data = b'{ "a" :  [1,2.50 , "\\u00e9"] }'
    batch = decode_batch(body(record("k", data)))
    assert bytes(batch.records[0].data) == data


# --- timestamps -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("first", "second"), [
    ("2024-01-01T12:00:00Z", "2024-01-01T14:00:00+02:00"),
    ("2024-01-01T12:00:00Z", "2024-01-01T12:00:00.000000+00:00"),
    ("2024-01-01T12:00:00", "2024-01-01T12:00:00Z"),  # no offset means UTC
    ("2024-01-01T12:00:00.123456789Z", "2024-01-01T12:00:00.123456Z"),  # beyond microseconds dropped
    ("20240101T120000Z", "2024-01-01T12:00:00Z"),  # basic format
])
def test_equal_instants_compare_equal(first, second):
    assert parse_instant(first) == parse_instant(second)


def test_instants_order_across_offsets():
    assert parse_instant("2024-01-01T12:00:00.000001Z") > parse_instant("2024-01-01T13:00:00+01:00")


@pytest.mark.parametrize("text", ["", "yesterday", "2024-13-01T00:00:00Z", "2024-01-01T25:00:00Z", "1704067200"])
def test_non_iso_timestamps_are_refused(text):
    assert parse_instant(text) is None


@given(st.text(max_size=40))
def test_parse_instant_never_raises(text):
    parsed = parse_instant(text)
    assert parsed is None or parsed.tzinfo is not None


# --- per-record checks ----------------------------------------------------------------------------

def test_each_problem_has_its_reason_and_index():
    batch = decode_batch(body(
        record("ok"),
        record("", b"{}"),
        record("t", updated_at="soon"),
        record("h", hash="0" * 16),
        record("list", b"[1]"),
        record("str", b'"x"'),
        record("gone", b"null", op="delete"),  # a delete need not carry an object
    ))
    changes, rejected = check_batch(batch, 0.0)
    assert [c.record.key for c in changes] == ["ok", "gone"]
    assert [(r.index, r.reason) for r in rejected] == [
        (1, REASON_EMPTY_KEY), (2, REASON_BAD_UPDATED_AT), (3, REASON_BAD_HASH), (4, REASON_NOT_OBJECT),
        (5, REASON_NOT_OBJECT)]


def test_changes_carry_the_checksum_digest_of_the_exact_bytes():
    data = b'{"x": 1 }'
    (change,), _ = check_batch(decode_batch(body(record("k", data))), 0.0)
    assert change.digest == record_digest("k", data)
    assert change.updated == parse_instant("2024-01-01T00:00:00Z")


def test_an_uppercase_hash_does_not_match():
    data = b'{"x":1}'
    batch = decode_batch(body(record("k", data, hash=xxhash.xxh3_64_hexdigest(data).upper())))
    assert check_batch(batch, 0.0)[1][0].reason == REASON_BAD_HASH


@st.composite
def wire_records(draw) -> dict:
    data = draw(st.sampled_from([b"{}", b'{"a":1}', b"[]", b"3", b"null"]))
    right_hash = draw(st.booleans())
    return record(draw(st.text(max_size=6)), data,
                  op=draw(st.sampled_from(["upsert", "delete"])),
                  updated_at=draw(st.sampled_from(["2024-01-01T00:00:00Z", "2024-01-01", "never", ""])),
                  hash=xxhash.xxh3_64_hexdigest(data) if right_hash else "0123456789abcdef")


@given(st.lists(wire_records(), max_size=12), st.sampled_from([0.0, 0.5, 1.0]))
def test_every_record_is_either_a_change_or_a_rejection_with_a_reason(records, reject_rate):
    batch = decode_batch(body(*records))
    changes, rejected = check_batch(batch, reject_rate)
    assert len(changes) + len(rejected) == len(records)
    assert all(r.reason in REASONS for r in rejected)
    assert [r.index for r in rejected] == sorted({r.index for r in rejected})
    # Deterministic: the same batch is split the same way every time.
    again = check_batch(decode_batch(body(*records)), reject_rate)
    assert [(r.index, r.reason) for r in again[1]] == [(r.index, r.reason) for r in rejected]


# --- --reject-rate --------------------------------------------------------------------------------

def test_reject_rate_extremes():
    keys = [f"k{i}" for i in range(500)]
    assert not any(rejected_by_rate("s", key, 0.0) for key in keys)
    assert all(rejected_by_rate("s", key, 1.0) for key in keys)


def test_reject_rate_picks_about_that_fraction_and_grows_monotonically():
    keys = [f"k{i}" for i in range(5000)]
    at_10 = {key for key in keys if rejected_by_rate("s", key, 0.1)}
    at_30 = {key for key in keys if rejected_by_rate("s", key, 0.3)}
    assert 350 < len(at_10) < 650 and 1300 < len(at_30) < 1700
    assert at_10 <= at_30


def test_reject_rate_rejections_are_reported_after_other_problems():
    batch = decode_batch(body(record("k"), record("", b"{}")))
    _, rejected = check_batch(batch, 1.0)
    assert [(r.index, r.reason) for r in rejected] == [(0, REASON_REJECT_RATE), (1, REASON_EMPTY_KEY)]
