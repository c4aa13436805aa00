"""Shaped sources end to end through RecordSchema (workers/columns.py): nested and composite keys, epoch
timestamps, delete markers, filters, select/drop/rename, and the dead letter of each bad input. The fast
path (all C-level maps) and the one-by-one path must agree on every page."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xxhash import xxh3_64_hexdigest

from conflux.config import FieldsConfig, FilterConfig, SourceConfig
from conflux.workers.batching import RecordSchema, split_by_partition
from conflux.workers.columns import _one_by_one

FUZZ = settings(max_examples=120, derandomize=True, deadline=None)
T0 = "2024-05-01T10:00:00Z"


def schema(**options: Any) -> RecordSchema:
    return RecordSchema(SourceConfig(name="crm", url="http://upstream/api", **options))


def columns(s: RecordSchema, records: list[Any]):
    raws, fields, _meta = s.page_records(msgspec.json.encode({"data": records}))
    return s.columns(raws, fields)


def slow(s: RecordSchema, records: list[Any]):
    raws, fields, _meta = s.page_records(msgspec.json.encode({"data": records}))
    return _one_by_one(s.shape, raws, fields, s._latest_us())


def test_a_nested_key_and_timestamp_are_found_and_the_record_stays_whole():
    s = schema(key="attributes.sku", updated="meta.updated_at")
    record = {"attributes": {"sku": "A-1"}, "meta": {"updated_at": T0}, "price": 3}
    out = columns(s, [record])
    assert (out.keys, out.updated, out.dead) == (["A-1"], [T0], [])
    assert msgspec.json.decode(bytes(out.records[0])) == record


def test_composite_keys_join_their_parts_and_escape_the_separator():
    s = schema(key=["region", "id"])
    out = columns(s, [{"region": "eu", "id": 7, "updated_at": T0}, {"region": "a|b", "id": "c", "updated_at": T0},
                      {"region": "a", "id": "b|c", "updated_at": T0}])
    assert out.keys == ["eu|7", "a\\|b|c", "a|b\\|c"]
    assert len(set(out.key_hashes)) == 3


@pytest.mark.parametrize(("fmt", "value", "text", "native"), [
    ("epoch_s", 1_700_000_000, "2023-11-14T22:13:20Z", "1700000000"),
    ("epoch_ms", 1_700_000_000_123, "2023-11-14T22:13:20.123000Z", "1700000000123"),
    ("epoch_us", 1_700_000_000_000_001, "2023-11-14T22:13:20.000001Z", "1700000000000001"),
])
def test_epoch_timestamps_reach_the_sink_as_iso_and_the_watermark_keeps_the_number(fmt, value, text, native):
    s = schema(updated="modified", updated_format=fmt)
    out = columns(s, [{"id": 1, "modified": value}])
    assert out.updated == [text] and out.native == [native]
    assert out.max_updated()[1] == native and out.native_text(-1) == native
    assert b'"modified":%d' % value in bytes(out.records[0]).replace(b" ", b"")  # the record keeps its number


def test_delete_markers_make_delete_versions():
    s = schema(deleted="deleted_at")
    out = columns(s, [{"id": 1, "updated_at": T0, "deleted_at": None}, {"id": 2, "updated_at": T0,
                                                                          "deleted_at": "2024-05-01T09:00:00Z"},
                      {"id": 3, "updated_at": T0}])
    assert out.deleted == [False, True, False]
    assert columns(s, [{"id": 1, "updated_at": T0}]).deleted == []  # no delete: the column stays empty


def test_records_outside_the_filter_become_deletes():
    s = schema(filter=FilterConfig(field="status", in_=["active", "trial"]))
    out = columns(s, [{"id": 1, "updated_at": T0, "status": "active"}, {"id": 2, "updated_at": T0, "status": "gone"},
                      {"id": 3, "updated_at": T0}])
    assert out.keys == ["1", "2", "3"] and out.deleted == [False, True, True]
    both = schema(deleted="deleted", filter=FilterConfig(field="status", not_in=["gone"]))
    out = columns(both, [{"id": 1, "updated_at": T0, "status": "ok", "deleted": True},
                         {"id": 2, "updated_at": T0, "status": "gone"}, {"id": 3, "updated_at": T0, "status": "ok"}])
    assert out.deleted == [True, True, False]


def test_select_drop_and_rename_shape_what_the_sink_gets_after_the_key_is_read():
    s = schema(key="id", fields=FieldsConfig(select=["id", "name", "email"], rename={"id": "customer_id"}))
    out = columns(s, [{"id": 5, "name": "A", "email": "a@b", "ssn": "secret", "updated_at": T0}])
    assert out.keys == ["5"] and out.updated == [T0]   # updated_at was selected away, and still read
    assert msgspec.json.decode(bytes(out.records[0])) == {"customer_id": 5, "name": "A", "email": "a@b"}
    assert out.hashes == [xxh3_64_hexdigest(bytes(out.records[0]))]   # the hash covers what the sink gets
    dropped = columns(schema(fields=FieldsConfig(drop=["email", "ssn"])),
                      [{"id": 5, "name": "A", "email": "a@b", "ssn": "x", "updated_at": T0}])
    assert msgspec.json.decode(bytes(dropped.records[0])) == {"id": 5, "name": "A", "updated_at": T0}


@pytest.mark.parametrize(("options", "record", "reason"), [
    ({"key": "attributes.sku"}, {"updated_at": T0}, "missing key field 'attributes.sku'"),
    ({"key": "attributes.sku"}, {"attributes": {}, "updated_at": T0}, "missing key field 'attributes.sku'"),
    ({"key": ["region", "id"]}, {"id": 1, "updated_at": T0}, "missing key field 'region'"),
    ({"key": ["region", "id"]}, {"id": 1, "region": [1], "updated_at": T0}, "key field 'region' must be"),
    ({"updated": "meta.at"}, {"id": 1, "meta": {}}, "missing updated field 'meta.at'"),
    ({"updated_format": "epoch_ms"}, {"id": 1, "updated_at": T0}, "'updated_at' must be a number (epoch_ms)"),
    ({"updated_format": "epoch_s"}, {"id": 1, "updated_at": 10**15}, "not a usable epoch_s timestamp"),
    ({"updated_format": "epoch_s"}, {"id": 1, "updated_at": 4_000_000_000}, "in the future"),
    ({}, {"id": 1, "updated_at": "yesterday"}, "'updated_at' is not an ISO 8601 timestamp"),
    ({"fields": FieldsConfig(rename={"name": "title"})}, {"id": 1, "updated_at": T0, "name": "a", "title": "b"},
     "rename onto 'title'"),
])
def test_each_bad_input_goes_aside_with_its_reason_and_the_rest_of_the_page_stays(options, record, reason):
    s = schema(**options)
    good = {"id": 2, "region": "eu", "attributes": {"sku": "S"}, "meta": {"at": T0},
            "updated_at": 1_700_000_000 if options.get("updated_format") else T0}
    out = columns(s, [record, good])
    assert len(out) == 1 and len(out.dead) == 1 and reason in out.dead[0][2], out.dead


def test_a_path_through_a_scalar_is_a_dead_letter_not_a_failed_page():
    out = columns(schema(key="attributes.sku"), [{"attributes": "x", "updated_at": T0},
                                                 {"attributes": {"sku": "k"}, "updated_at": T0}])
    assert out.keys == ["k"] and len(out.dead) == 1


def test_the_dead_letter_names_the_key_when_it_can_be_read():
    out = columns(schema(key=["region", "id"]), [{"region": "eu", "id": 1, "updated_at": "never"}])
    assert out.dead[0][1] == "eu|1"


records_st = st.lists(st.fixed_dictionaries({
    "id": st.one_of(st.integers(0, 30), st.sampled_from(["a", "b|c", "", "d\\"])),
    "region": st.sampled_from(["eu", "us", "a|b"]),
    "updated_at": st.one_of(st.integers(1_600_000_000, 1_700_000_000), st.just("x")),
    "status": st.sampled_from(["active", "gone", None]),
    "gone": st.one_of(st.none(), st.booleans()),
    "email": st.just("e@x"),
}), max_size=12)


@FUZZ
@given(records=records_st)
def test_the_fast_path_and_the_one_by_one_path_agree(records):
    s = schema(key=["region", "id"], updated_format="epoch_s", deleted="gone",
               filter=FilterConfig(field="status", not_in=["gone"]), fields=FieldsConfig(drop=["email"]))
    fast, one_by_one = columns(s, records), slow(s, records)
    assert fast.keys == one_by_one.keys and fast.updated == one_by_one.updated
    assert fast.updated_us == one_by_one.updated_us and fast.hashes == one_by_one.hashes
    assert [bytes(r) for r in fast.records] == [bytes(r) for r in one_by_one.records]
    assert (fast.deleted or [False] * len(fast)) == (one_by_one.deleted or [False] * len(one_by_one))
    assert [(bytes(r), k, why) for r, k, why in fast.dead] == [(bytes(r), k, why) for r, k, why in one_by_one.dead]


def test_the_delete_column_survives_partitioning():
    s = schema(deleted="gone")
    out = columns(s, [{"id": i, "updated_at": T0, "gone": i % 3 == 0} for i in range(30)])
    batches = split_by_partition(out, "crm", "full", 4)
    seen = {key: flag for _p, batch in batches for key, flag in zip(batch.keys, batch.deleted or
                                                                    [False] * batch.count, strict=True)}
    assert seen == {str(i): i % 3 == 0 for i in range(30)}


def test_a_marker_or_filter_inside_an_object_live_records_leave_out_keeps_the_fast_path():
    """Regression: `deleted = "deletion.at"` sent every page without a `deletion` object down the slow path."""
    from conflux.workers.columns import _fast

    s = schema(deleted="deletion.at", filter=FilterConfig(field="plan.tier", in_=["gold"]))
    records = [{"id": 1, "updated_at": T0, "plan": {"tier": "gold"}},
               {"id": 2, "updated_at": T0, "deletion": {"at": T0}, "plan": {"tier": "gold"}},
               {"id": 3, "updated_at": T0, "deletion": None}]
    raws, fields, _meta = s.page_records(msgspec.json.encode({"data": records}))
    fast = _fast(s.shape, raws, fields, s._latest_us())
    assert fast is not None and fast.deleted == [False, True, True]   # 3 is outside the filter
    assert fast == slow(s, records)
