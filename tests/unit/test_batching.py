"""Pages and webhook bodies into columns, dead letters and per-partition batches (workers/batching.py),
with hypothesis fuzzing of the page parser: nothing crashes it, and every rejection is explained."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from xxhash import xxh3_64_hexdigest, xxh3_64_intdigest

from conflux.config import MAX_TOPIC_CHARS, MIN_RING_BYTES, PaginationConfig, SourceConfig
from conflux.errors import PageFormatError
from conflux.ipc.codec import batch_header_bytes, batch_room_bytes, encode_batch, row_bytes_bound
from conflux.workers.batching import (
    SAFE_BATCH_BYTES,
    TOO_DEEP,
    PageMeta,
    RecordSchema,
    dead_letter_id,
    dead_letters,
    fit_batch,
    parse_timestamp_us,
    row_bytes,
    set_aside_oversized,
    split_by_partition,
)

FUZZ = settings(max_examples=80, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = "2024-05-01T10:00:00Z"


def schema(**options: Any) -> RecordSchema:
    key, updated = options.pop("key", "id"), options.pop("updated", "updated_at")
    return RecordSchema(SourceConfig(name="crm", url="http://upstream/api", key=key, updated=updated,
                                     pagination_options=PaginationConfig(**options)))


def page(records: list[Any], **fields: Any) -> bytes:
    return msgspec.json.encode({"data": records, **fields})


def parse(s: RecordSchema, body: bytes):
    records, fields, meta = s.page_records(body)
    return s.columns(records, fields), meta


# -- page shapes ------------------------------------------------------------------------------------


def test_records_stay_the_bytes_the_upstream_sent_and_meta_fields_are_read() -> None:
    body = b'{"total": 7, "data": [ {"id": 1, "updated_at": "%s",  "x": [1, 2]} ,{"id":2,"updated_at":"%s"}],' \
           b' "has_more": true, "next_cursor": "abc"}' % (T0.encode(), T0.encode())
    records, fields, meta = schema().page_records(body)
    assert [bytes(r) for r in records] == [b'{"id": 1, "updated_at": "%s",  "x": [1, 2]}' % T0.encode(),
                                           b'{"id":2,"updated_at":"%s"}' % T0.encode()]
    identity = schema().shape.identity
    assert [(identity.value(f, "key0")[1], identity.value(f, "updated")[1]) for f in fields] == [(1, T0), (2, T0)]
    assert meta == PageMeta(has_more=True, total=7, next_cursor="abc")


def test_nested_records_path_and_renamed_meta_fields() -> None:
    s = schema(records_path="result.items", has_more_field="more", total_field="count",
               next_cursor_field="next", key="sku", updated="modified")
    body = msgspec.json.encode({"result": {"items": [{"sku": "A-1", "modified": T0}], "more": True},
                                "more": False, "count": 1, "next": None, "data": "ignored"})
    columns, meta = parse(s, body)
    assert columns.keys == ["A-1"] and meta == PageMeta(has_more=False, total=1, next_cursor=None)


def test_an_empty_records_path_means_the_body_is_the_list() -> None:
    columns, meta = parse(schema(records_path=""), msgspec.json.encode([{"id": "a", "updated_at": T0}]))
    assert columns.keys == ["a"] and meta == PageMeta()


def test_paging_fields_may_be_dotted_paths_beside_or_inside_the_records_envelope() -> None:
    s = schema(records_path="result.items", has_more_field="result.more", total_field="meta.paging.total",
               next_cursor_field="response_metadata.next_cursor", next_url_path="links.next.href")
    body = msgspec.json.encode({"result": {"items": [{"id": "a", "updated_at": T0}], "more": True},
                                "meta": {"paging": {"total": 9}}, "response_metadata": {"next_cursor": "c1"},
                                "links": {"next": {"href": "/api?page=2"}}})
    columns, meta = parse(s, body)
    assert columns.keys == ["a"]
    assert meta == PageMeta(has_more=True, total=9, next_cursor="c1", next_url="/api?page=2")
    # Missing or null objects on a paging field's path just mean "not sent".
    _columns, meta = parse(s, msgspec.json.encode({"result": {"items": []}, "links": None}))
    assert meta == PageMeta()


def test_dotted_paging_fields_are_read_on_the_slow_path_too() -> None:
    s = schema(records_path="result.items", next_url_path="links.next.href", has_more_field="result.more")
    body = b'{"links": {"next": {"href": "?p=2"}}, "result": {"more": true, "items": [' \
           b'{"id": "a", "updated_at": "%s", "x": %s}, {"id": "b", "updated_at": "%s"}]}}' % (
               T0.encode(), deep(3000), T0.encode())
    columns, meta = parse(s, body)
    assert columns.keys == ["b"] and meta == PageMeta(has_more=True, next_url="?p=2")


def test_the_source_level_records_path_wins_and_empty_means_the_body_is_the_list() -> None:
    def parsed(**keys: Any) -> list[str]:
        source = SourceConfig(name="crm", url="http://upstream/api", **keys)
        bodies = {"": [{"id": "x", "updated_at": T0}], "items.items": {"items": {"items": [{"id": "y",
                                                                                            "updated_at": T0}]}}}
        return parse(RecordSchema(source), msgspec.json.encode(bodies[source.effective_records_path]))[0].keys

    assert parsed(records_path="") == ["x"]
    assert parsed(records_path="items.items") == ["y"]
    with pytest.raises(PageFormatError, match="at 'the body'"):
        RecordSchema(SourceConfig(name="crm", url="http://u/api", records_path="")).page_records(b'{"data": []}')


@pytest.mark.parametrize("body", [
    b"", b"not json", b"[]", b'{"data": {}}', b'{"data": "x"}', b'{"records": []}', b'{"data": [1,', b"\xff\xfe",
    b'{"data": null}',
])
def test_a_page_of_the_wrong_shape_is_a_page_format_error_naming_the_path(body: bytes) -> None:
    with pytest.raises(PageFormatError, match="'data'"):
        schema().page_records(body)


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def test_a_record_too_deep_to_decode_is_a_dead_letter_and_the_rest_of_its_page_is_delivered() -> None:
    """Regression: one record nested about 1,000 levels deep (msgspec's recursion limit) failed the
    decode of its whole page, so the sync failed every time and the watermark never moved."""
    body = b'{"total": 3, "data": [{"id": 1, "updated_at": "%s"}, {"id": 2, "updated_at": "%s", "x": %s},' \
           b' {"id": 3, "updated_at": "%s"}, %s], "has_more": true, "next_cursor": "c2"}' % (
               T0.encode(), T0.encode(), deep(3000), T0.encode(), deep(1000))
    columns, meta = parse(schema(), body)
    assert columns.keys == ["1", "3"] and meta == PageMeta(has_more=True, total=3, next_cursor="c2")
    assert [(key, reason) for _record, key, reason in columns.dead] == [
        ("2", TOO_DEEP), ("", "record is not a JSON object")]
    assert bytes(columns.dead[0][0]) == b'{"id": 2, "updated_at": "%s", "x": %s}' % (T0.encode(), deep(3000))
    [entry] = dead_letters(msgspec.structs.replace(columns, dead=columns.dead[:1]), "crm", "fetch", "page 1")
    assert entry.reason == TOO_DEEP and entry.key == "2" and bytes(entry.record).endswith(b"]]]}")


def test_a_deep_record_under_a_nested_records_path_keeps_the_page_fields() -> None:
    s = schema(records_path="result.items", has_more_field="more", key="sku")
    body = b'{"more": false, "result": {"items": [{"sku": "A", "updated_at": "%s", "deep": %s},' \
           b' {"sku": "B", "updated_at": "%s"}]}}' % (T0.encode(), deep(2000), T0.encode())
    columns, meta = parse(s, body)
    assert columns.keys == ["B"] and [key for _r, key, _why in columns.dead] == ["A"]
    assert meta.has_more is False


@pytest.mark.parametrize("body", [
    deep(5000),                                                   # no records path at all
    b'{"data": {"x": %s}}' % deep(3000),                          # not a list at the path
    b'{"data": [%s, 1 2]}' % deep(3000),                          # not JSON
    b'{"data": [%s]' % deep(3000),                                # cut short
    b'{"data": [%s], "has_more": %s}' % (deep(3000), deep(3000)),  # a paging field nobody can read
])
def test_a_deep_page_that_is_not_a_list_of_records_still_fails_as_a_page(body: bytes) -> None:
    with pytest.raises(PageFormatError):
        parse(schema(), body)


def test_webhook_bodies_with_a_record_too_deep_keep_the_others() -> None:
    s = schema()
    good = b'{"id": 5, "updated_at": "%s"}' % T0.encode()
    bad = b'{"id": 6, "updated_at": "%s", "x": %s}' % (T0.encode(), deep(3000))
    records, fields = s.body_records(b"[%s, %s]" % (bad, good))
    columns = s.columns(records, fields)
    assert columns.keys == ["5"] and [(bytes(r), k, why) for r, k, why in columns.dead] == [(bad, "6", TOO_DEEP)]
    records, fields = s.body_records(b"  " + bad + b"\n")
    columns = s.columns(records, fields)
    assert len(columns) == 0 and [k for _r, k, _why in columns.dead] == ["6"]
    for wrong in (bad + b", " + good, b"[%s" % bad):
        with pytest.raises(PageFormatError):
            s.body_records(wrong)


def test_a_record_stamped_beyond_the_allowed_clock_skew_is_a_dead_letter() -> None:
    """Regression: an updated_at in 2999 became the watermark, so every later incremental sync asked
    for updated_since=2999 and real updates were refused as older."""
    now = time.time()
    soon = datetime.fromtimestamp(now + 200, UTC).isoformat()
    later = datetime.fromtimestamp(now + 400, UTC).isoformat()
    records = [{"id": 1, "updated_at": T0}, {"id": 2, "updated_at": "2999-01-01T00:00:00Z"},
               {"id": 3, "updated_at": soon}, {"id": 4, "updated_at": later}]
    columns, _meta = parse(schema(), page(records))
    assert columns.keys == ["1", "3"]
    assert [(key, reason) for _r, key, reason in columns.dead] == [
        ("2", "'updated_at' is '2999-01-01T00:00:00Z', more than max_clock_skew_s = 300 s in the future"),
        ("4", f"'updated_at' is {later!r}, more than max_clock_skew_s = 300 s in the future")]
    assert columns.max_updated()[1] == soon
    strict = RecordSchema(SourceConfig(name="crm", url="http://upstream/api", max_clock_skew_s=0))
    columns = strict.columns(*strict.body_records(msgspec.json.encode(records)))
    assert columns.keys == ["1"]


# -- columns and dead letters -------------------------------------------------------------------


def test_columns_of_a_good_page() -> None:
    body = page([{"id": 7, "updated_at": T0}, {"id": 8, "updated_at": "2024-05-01T12:00:00+02:00"}])
    records, fields, _ = schema().page_records(body)
    columns = schema().columns(records, fields)
    assert columns.keys == ["7", "8"]
    assert columns.updated == [T0, "2024-05-01T12:00:00+02:00"]
    assert columns.updated_us == [parse_timestamp_us(T0)] * 2
    assert columns.hashes == [xxh3_64_hexdigest(bytes(r)) for r in records]
    assert columns.key_hashes == [xxh3_64_intdigest(b"7"), xxh3_64_intdigest(b"8")]
    assert columns.dead == [] and len(columns) == 2
    assert columns.max_updated() == (parse_timestamp_us(T0), T0)


@pytest.mark.parametrize(("record", "reason"), [
    (5, "record is not a JSON object"),
    ([{"id": 1}], "record is not a JSON object"),
    ({"updated_at": T0}, "missing key field 'id'"),
    ({"id": None, "updated_at": T0}, "missing key field 'id'"),
    ({"id": "", "updated_at": T0}, "key field 'id' must be a non-empty string or an integer, got ''"),
    ({"id": True, "updated_at": T0}, "key field 'id' must be a non-empty string or an integer, got True"),
    ({"id": 1.5, "updated_at": T0}, "key field 'id' must be a non-empty string or an integer, got 1.5"),
    ({"id": {"a": 1}, "updated_at": T0}, "key field 'id' must be a non-empty string or an integer"),
    ({"id": 1}, "missing updated field 'updated_at'"),
    ({"id": 1, "updated_at": 1714557600}, "'updated_at' must be an ISO 8601 string, got 1714557600"),
    ({"id": 1, "updated_at": "yesterday"}, "'updated_at' is not an ISO 8601 timestamp: 'yesterday'"),
    ({"id": 1, "updated_at": "2024-13-01T00:00:00Z"}, "'updated_at' is not an ISO 8601 timestamp"),
])
def test_a_malformed_record_becomes_a_dead_letter_with_its_reason(record: Any, reason: str) -> None:
    good = {"id": "ok", "updated_at": T0}
    columns, _ = parse(schema(), page([good, record, good]))
    assert columns.keys == ["ok", "ok"]  # the rest still flows
    [(raw, key, why)] = columns.dead
    assert msgspec.json.decode(bytes(raw)) == record and why.startswith(reason)
    letters = dead_letters(columns, "crm", "fetch", "http://upstream/api?page=3")
    assert [(d.reason, d.stage, d.origin, bytes(d.record)) for d in letters] == [
        (why, "fetch", "http://upstream/api?page=3", bytes(raw))]
    expected_key = "" if not isinstance(record, dict) or record.get("id") is None else \
        (record["id"] if isinstance(record["id"], str) else msgspec.json.encode(record["id"]).decode())
    assert key == letters[0].key == expected_key


def test_dead_letter_ids_are_stable_for_the_same_record_source_and_stage() -> None:
    assert dead_letter_id("crm", "fetch", b"{}") == dead_letter_id("crm", "fetch", msgspec.Raw(b"{}"))
    assert len({dead_letter_id(*args) for args in [("crm", "fetch", b"{}"), ("crm", "sink", b"{}"),
                                                     ("erp", "fetch", b"{}"), ("crm", "fetch", b"[]")]}) == 4


@pytest.mark.parametrize(("text", "expected_us"), [
    ("1970-01-01T00:00:00Z", 0),
    ("1970-01-01T00:00:01", 1_000_000),                # no offset: UTC
    ("1970-01-01T01:00:01+01:00", 1_000_000),
    ("1970-01-01T00:00:00.000001Z", 1),
    ("1969-12-31T23:59:59Z", -1_000_000),
])
def test_parse_timestamp_us(text: str, expected_us: int) -> None:
    assert parse_timestamp_us(text) == expected_us


stamps_st = st.sampled_from([T0, "2024-05-01T10:00:00.123456+00:00", "2024-05-01 10:00:00", "2024-05-01",
                             "1969-07-20T20:17:40Z", "2024-05-01T12:00:00+02:00", "1970-01-01T00:00:00Z"])
keys_st = st.one_of(st.integers(-10**12, 10**12), st.text(min_size=1, max_size=8))
good_records_st = st.lists(st.fixed_dictionaries({"id": keys_st, "updated_at": stamps_st,
                                                  "v": st.integers()}), max_size=30)


def column_rows(columns) -> list[tuple]:
    return list(zip(columns.keys, columns.updated, columns.updated_us, columns.hashes, columns.key_hashes,
                    [bytes(r) for r in columns.records]))


@FUZZ
@given(records=good_records_st, bad_at=st.integers(0, 30))
def test_the_fast_path_and_the_one_by_one_path_give_the_same_columns(records: list, bad_at: int) -> None:
    """A page of good records (fast path) equals the good part of the same page with a bad record
    slipped in (which takes the one-by-one path)."""
    s = schema()
    fast, _ = parse(s, page(records))
    spoiled = [*records[:bad_at], {"id": "bad", "updated_at": "never"}, *records[bad_at:]]
    slow, _ = parse(s, page(spoiled))
    assert column_rows(fast) == column_rows(slow)
    assert len(fast) == len(records) and len(slow.dead) == 1


# -- partitions ------------------------------------------------------------------------------------


@FUZZ
@given(records=good_records_st, partitions=st.integers(1, 9))
def test_split_by_partition_keeps_every_record_once_in_its_partition_and_order(records: list,
                                                                                partitions: int) -> None:
    columns, _ = parse(schema(), page(records))
    batches = split_by_partition(columns, "crm", "full", partitions)
    seen = []
    for partition, batch in batches:
        assert batch.source == "crm" and batch.sync == "full" and batch.count > 0
        assert all(key_hash % partitions == partition for key_hash in batch.key_hashes)
        rows = list(zip(batch.keys, batch.updated, batch.updated_us, batch.hashes, batch.key_hashes,
                        [bytes(r) for r in batch.records]))
        in_page_order = [row for row in column_rows(columns) if row[4] % partitions == partition]
        assert rows == in_page_order
        seen += rows
    assert Counter(seen) == Counter(column_rows(columns))
    assert [p for p, _ in batches] == sorted({p for p, _ in batches})
    assert len({batch.message_id for _, batch in batches}) == len(batches)


def test_split_of_an_empty_page_is_nothing() -> None:
    columns, _ = parse(schema(), page([]))
    assert split_by_partition(columns, "crm", "full", 4) == []


# -- batch sizes: no batch larger than a ring frame ------------------------------------------------


padded_records_st = st.lists(st.fixed_dictionaries({"id": keys_st, "updated_at": stamps_st,
                                                   "pad": st.text(max_size=300)}), max_size=40)


@FUZZ
@given(records=padded_records_st, partitions=st.integers(1, 5), max_batch_bytes=st.integers(300, 4000))
def test_split_cuts_a_partition_share_into_batches_that_fit_keeping_every_record_once_in_order(
        records: list, partitions: int, max_batch_bytes: int) -> None:
    columns, _ = parse(schema(), page(records))
    batches = split_by_partition(columns, "crm", "full", partitions, max_batch_bytes=max_batch_bytes)
    for partition in range(partitions):
        rows = [row for p, batch in batches if p == partition for row in batch_rows(batch)]
        assert rows == [row for row in column_rows(columns) if row[4] % partitions == partition]
    for _, batch in batches:
        # A record too large even alone travels alone (the fetcher sets those aside first, the consumer
        # dead-letters them); every other batch fits.
        assert batch.count == 1 or len(encode_batch(batch)) <= max_batch_bytes
    assert len({batch.message_id for _, batch in batches}) == len(batches)  # each piece is its own message
    assert sum(batch.count for _, batch in batches) == len(columns)


def test_split_keeps_one_batch_per_partition_while_the_share_fits() -> None:
    columns, _ = parse(schema(), page([{"id": n, "updated_at": T0, "pad": "x" * 100} for n in range(200)]))
    assert len(split_by_partition(columns, "crm", "full", 4, max_batch_bytes=1 << 20)) == 4
    pieces = split_by_partition(columns, "crm", "full", 4, max_batch_bytes=4096)
    assert len(pieces) > 8 and all(len(encode_batch(batch)) <= 4096 for _, batch in pieces)


def test_the_default_limit_is_what_the_smallest_ring_carries() -> None:
    """Callers that do not know the ring (the control process's webhooks, `dlq replay`) get batches that
    fit any ring: 200 records of 500 bytes would be one 110 KB batch per partition otherwise."""
    columns, _ = parse(schema(), page([{"id": n, "updated_at": T0, "pad": "x" * 500} for n in range(200)]))
    batches = split_by_partition(columns, "crm", "webhook", 1)
    assert len(batches) > 1 and all(len(encode_batch(batch)) <= SAFE_BATCH_BYTES for _, batch in batches)
    assert batch_room_bytes(MIN_RING_BYTES, "a" * MAX_TOPIC_CHARS) >= SAFE_BATCH_BYTES


@FUZZ
@given(records=padded_records_st)
def test_row_bytes_are_exact_and_within_the_bound_used_to_skip_measuring(records: list) -> None:
    columns, _ = parse(schema(), page(records))
    if not len(columns):
        return
    [(_, batch)] = split_by_partition(columns, "crm", "full", 1, max_batch_bytes=1 << 30)
    sizes = row_bytes(batch)
    encoded = len(encode_batch(batch))
    assert encoded <= batch_header_bytes("crm", "full") + sum(sizes) <= encoded + 6 + 32
    assert all(size <= row_bytes_bound(len(record)) for size, record in zip(sizes, batch.records, strict=True))


def test_set_aside_oversized_dead_letters_a_record_too_large_for_any_batch() -> None:
    records = [{"id": 1, "updated_at": T0}, {"id": 2, "updated_at": T0, "pad": "x" * 5000}, {"id": 3, "updated_at": T0}]
    columns, _ = parse(schema(), page(records))
    kept = set_aside_oversized(columns, "crm", "full", 4096)
    assert kept.keys == ["1", "3"] and [bytes(r) for r in kept.records] == [bytes(columns.records[i]) for i in (0, 2)]
    [(record, key, reason)] = kept.dead
    assert key == "2" and bytes(record) == bytes(columns.records[1])
    assert reason.startswith(f"record of {len(columns.records[1])} bytes is too large") and "ring_bytes" in reason
    assert set_aside_oversized(columns, "crm", "full", 1 << 20) is columns  # the usual case: untouched


@FUZZ
@given(records=padded_records_st, max_batch_bytes=st.integers(250, 3000))
def test_fit_batch_cuts_a_message_into_subsets_that_fit_and_names_the_records_that_cannot(
        records: list, max_batch_bytes: int) -> None:
    columns, _ = parse(schema(), page(records))
    if not len(columns):
        return
    [(_, batch)] = split_by_partition(columns, "crm", "full", 1, max_batch_bytes=1 << 30)
    pieces, too_large = fit_batch(batch, max_batch_bytes)
    assert all(piece.message_id == batch.message_id and len(encode_batch(piece)) <= max_batch_bytes
               for piece in pieces)
    alone = {index for index in range(batch.count)
             if len(encode_batch(batch.subset([index]))) > max_batch_bytes - 32}  # 32: a longer message id
    assert set(too_large) <= alone and all("too large" in reason for reason in too_large.values())
    kept = [index for index in range(batch.count) if index not in too_large]
    assert [row for piece in pieces for row in batch_rows(piece)] == [batch_rows(batch)[i] for i in kept]


def batch_rows(batch) -> list[tuple]:
    return list(zip(batch.keys, batch.updated, batch.updated_us, batch.hashes, batch.key_hashes,
                    [bytes(r) for r in batch.records]))


def test_dead_letter_origins_lose_their_secrets() -> None:
    columns, _ = parse(schema(), page([{"updated_at": T0}]))
    [letter] = dead_letters(columns, "crm", "fetch", "https://bob:pw-1@upstream/api?api_key=k-1&page=3&sig=s-1")
    assert letter.origin == "https://***@upstream/api?api_key=***&page=3&sig=***"


# -- webhook bodies --------------------------------------------------------------------------------


def test_body_records_takes_one_object_or_a_list() -> None:
    s = schema()
    records, fields = s.body_records(b' {"id": 1, "updated_at": "%s"}' % T0.encode())
    assert [bytes(r) for r in records] == [b'{"id": 1, "updated_at": "%s"}' % T0.encode()]
    records, fields = s.body_records(b'[{"id": 1, "updated_at": "x"}, 3]')
    assert len(records) == 2 and fields[1] is None
    assert s.columns(records, fields).dead[1][2] == "record is not a JSON object"


@pytest.mark.parametrize("body", [b"", b"3", b'"x"', b"{", b'{"id": 1} x', b'{"id": 1}, {"id": 2}', b'{"a": 1}]',
                                  b"[1, 2"])
def test_a_body_that_is_not_one_object_or_one_list_is_refused(body: bytes) -> None:
    """Regression for `{...}, {...}`: wrapping the body in [ ] accepted two objects and silently
    kept only the first."""
    with pytest.raises(PageFormatError):
        schema().body_records(body)


# -- fuzzing ----------------------------------------------------------------------------------------


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=10), stamps_st, st.sampled_from(["", "2024-02-30T00:00:00Z", "9999-12-31"]))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(["id", "updated_at", "data", "has_more"]), st.text(max_size=5)),
                    inner, max_size=4)), max_leaves=20)


def check_explained(s: RecordSchema, body: bytes) -> None:
    """The parser's contract: PageFormatError, or every record either in the columns or dead with a reason."""
    try:
        columns, _ = parse(s, body)
    except PageFormatError as exc:
        assert str(exc)
        return
    records = s.page_records(body)[0]
    assert len(columns) + len(columns.dead) == len(records)
    assert all(isinstance(reason, str) and reason for _, _, reason in columns.dead)
    assert all(isinstance(key, str) and key for key in columns.keys)
    assert len({len(column) for column in (columns.keys, columns.updated, columns.updated_us, columns.hashes,
                                            columns.key_hashes, columns.records)}) == 1


@FUZZ
@given(body=st.binary(max_size=200))
@example(body=b'{"data": [{"id": 1, "updated_at": "2024-01-01"}], "data": [{"id": 2}, {"id": 3}]}')
@example(body=b'{"data": [{"id": 1, "updated_at": "0001-01-01T00:00:00+01:00"}]}')
@example(body=b'{"data": [{"id": 1e400, "updated_at": "2024-01-01"}]}')
@example(body=b'{"data": [{"id": 1%s, "updated_at": "2024-01-01"}]}' % (b"0" * 5000))
def test_arbitrary_bytes_never_crash_the_page_parser(body: bytes) -> None:
    check_explained(schema(), body)
    check_explained(schema(records_path=""), body)


@FUZZ
@given(records=st.lists(json_value, max_size=8), meta=st.dictionaries(st.sampled_from(["has_more", "total"]),
                                                                      json_leaf))
def test_arbitrary_json_records_are_columns_or_explained_dead_letters(records: list, meta: dict) -> None:
    check_explained(schema(), page(records, **meta))
    check_explained(schema(records_path="a.b"), msgspec.json.encode({"a": {"b": records}}))


@FUZZ
@given(value=json_value)
def test_arbitrary_json_pages_and_bodies_never_crash(value: Any) -> None:
    body = msgspec.json.encode(value)
    check_explained(schema(), body)
    check_explained(schema(records_path="data.data"), body)
    try:
        records, fields = schema().body_records(body)
    except PageFormatError:
        return
    columns = schema().columns(records, fields)
    assert len(columns) + len(columns.dead) == len(records)
