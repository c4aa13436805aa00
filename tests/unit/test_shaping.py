"""Record shaping (workers/shaping.py): nested and composite identities, epoch timestamps, delete
markers, filters and select/drop/rename, each against a plain model or a worked example."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conflux.workers.shaping import (
    Identity,
    RecordFilter,
    Reshaper,
    Timestamps,
    composite_key,
    is_deleted,
    iso_utc,
    split_path,
)

FUZZ = settings(max_examples=200, derandomize=True, deadline=None)
parts = st.one_of(st.text(alphabet="ab|\\", max_size=4), st.integers(-5, 5))


@FUZZ
@given(st.lists(parts, min_size=1, max_size=3), st.lists(parts, min_size=1, max_size=3))
def test_composite_keys_of_distinct_tuples_never_collide(first, second):
    same_text = [str(value) for value in first] == [str(value) for value in second]
    assert (composite_key(first) == composite_key(second)) == same_text


def test_composite_key_escapes_separator_and_backslash():
    assert composite_key(["eu", 7]) == "eu|7"
    assert composite_key(["a|b", "c"]) == "a\\|b|c" != composite_key(["a", "b|c"]) == "a|b\\|c"
    assert composite_key(["a\\", "b"]) == "a\\\\|b"


def test_identity_reads_nested_and_composite_fields_in_one_decode():
    identity = Identity({"key0": split_path("attributes.sku"), "key1": split_path("region"),
                         "updated": split_path("meta.times.updated"), "deleted": split_path("meta.deleted_at")})
    page = b'''[{"attributes": {"sku": "A-1", "colour": "red"}, "region": "eu",
                 "meta": {"times": {"updated": 1700000000}, "deleted_at": null}},
                {"attributes": {"sku": "B-2"}, "region": "us", "meta": {"times": {"updated": 5},
                 "deleted_at": "2024-01-01T00:00:00Z"}}]'''
    decoded = identity.page_decoder.decode(page)
    assert identity.column(decoded, "key0") == ["A-1", "B-2"]
    assert identity.column(decoded, "key1") == ["eu", "us"]
    assert identity.column(decoded, "updated") == [1700000000, 5]
    assert [is_deleted(v) for v in identity.column(decoded, "deleted")] == [False, True]


def test_identity_reports_a_missing_object_on_the_path():
    identity = Identity({"key0": split_path("attributes.sku"), "updated": split_path("updated_at")})
    decoded = identity.page_decoder.decode(b'[{"updated_at": "x"}, {"attributes": {}, "updated_at": "y"}]')
    with pytest.raises(AttributeError):
        identity.column(decoded, "key0")
    assert identity.value(decoded[0], "key0") == (False, None)
    assert identity.value(decoded[1], "key0") == (True, None)  # the object is there, the field is not


def test_identity_fails_the_page_decode_when_a_path_runs_through_a_scalar():
    identity = Identity({"key0": split_path("attributes.sku")})
    with pytest.raises(msgspec.ValidationError):
        identity.page_decoder.decode(b'[{"attributes": "not an object"}]')


def test_field_names_that_are_not_python_names_work():
    identity = Identity({"key0": split_path("Customer ID"), "updated": split_path("modified-at")})
    (decoded,) = identity.page_decoder.decode(b'[{"Customer ID": 4, "modified-at": "t"}]')
    assert identity.value(decoded, "key0") == (True, 4) and identity.value(decoded, "updated") == (True, "t")


@pytest.mark.parametrize(("fmt", "value", "instant_us", "text"), [
    ("epoch_s", 1_700_000_000, 1_700_000_000_000_000, "2023-11-14T22:13:20Z"),
    ("epoch_ms", 1_700_000_000_123, 1_700_000_000_123_000, "2023-11-14T22:13:20.123000Z"),
    ("epoch_us", 1_700_000_000_000_001, 1_700_000_000_000_001, "2023-11-14T22:13:20.000001Z"),
    ("epoch_s", 1.5, 1_500_000, "1970-01-01T00:00:01.500000Z"),
    ("iso8601", "2024-05-01T12:00:00+02:00", 1_714_557_600_000_000, "2024-05-01T12:00:00+02:00"),
    ("iso8601", "2024-05-01T10:00:00", 1_714_557_600_000_000, "2024-05-01T10:00:00"),
])
def test_timestamps_give_instants_and_the_sink_text(fmt, value, instant_us, text):
    assert Timestamps(fmt).parse_one(value) == (instant_us, text)
    assert Timestamps(fmt).problem(value) is None


@pytest.mark.parametrize(("fmt", "value", "reason"), [
    ("epoch_ms", "1700000000000", "must be a number"),
    ("epoch_s", True, "must be a number"),
    ("epoch_s", 10**20, "not a usable epoch_s timestamp"),
    ("iso8601", 1700000000, "must be an ISO 8601 string"),
    ("iso8601", "yesterday", "not an ISO 8601 timestamp"),
])
def test_timestamps_explain_what_is_wrong(fmt, value, reason):
    assert reason in Timestamps(fmt).problem(value)


def test_iso_utc_round_trips_through_fromisoformat():
    for instant_us in (0, 1, -1, 1_700_000_000_123_456, 253_402_300_799_000_000):
        from datetime import datetime
        assert round(datetime.fromisoformat(iso_utc(instant_us)).timestamp() * 1e6) == instant_us


@pytest.mark.parametrize(("value", "deleted"), [(None, False), (False, False), ("", False), (True, True),
                                               ("2024-01-01T00:00:00Z", True), (0, True), (1, True)])
def test_delete_markers(value, deleted):
    assert is_deleted(value) is deleted


def test_filters_compare_json_values_with_their_types():
    active = RecordFilter(["active", "trial", 1], keep_listed=True)
    assert [active.passes(v) for v in ("active", "gone", 1, True, "1", None, {"a": 1})] == [
        True, False, True, False, False, False, False]
    not_gone = RecordFilter(["gone"], keep_listed=False)
    assert [not_gone.passes(v) for v in ("active", "gone", None)] == [True, False, True]


def decoded(raw: msgspec.Raw | None) -> dict:
    return msgspec.json.decode(bytes(raw))


def test_select_drop_rename_keep_values_as_sent():
    record = msgspec.Raw(b'{"id": 1, "email": "x@y", "price": 1.50, "name": "A", "tags": [1, {"b": 2}]}')
    shaped, why = Reshaper(select=["id", "price", "tags", "absent"]).reshape(record)
    assert why == "" and bytes(shaped) == b'{"id":1,"price":1.50,"tags":[1, {"b": 2}]}'
    shaped, _ = Reshaper(drop=["email", "absent"]).reshape(record)
    assert decoded(shaped) == {"id": 1, "price": 1.5, "name": "A", "tags": [1, {"b": 2}]}
    shaped, _ = Reshaper(select=["id", "name"], rename={"name": "full_name", "id": "customer_id"}).reshape(record)
    assert decoded(shaped) == {"customer_id": 1, "full_name": "A"}


def test_a_rename_onto_a_field_the_record_has_is_refused_per_record():
    shaper = Reshaper(rename={"name": "title"})
    assert shaper.reshape(msgspec.Raw(b'{"name": "A"}'))[0] is not None
    shaped, why = shaper.reshape(msgspec.Raw(b'{"name": "A", "title": "B"}'))
    assert shaped is None and "'title'" in why
    # a swap is fine: the other field moves away too
    swapped, _ = Reshaper(rename={"a": "b", "b": "a"}).reshape(msgspec.Raw(b'{"a": 1, "b": 2}'))
    assert decoded(swapped) == {"b": 1, "a": 2}


def test_a_record_that_is_not_an_object_cannot_be_reshaped():
    shaped, why = Reshaper(drop=["x"]).reshape(msgspec.Raw(b"[1, 2]"))
    assert shaped is None and "not a JSON object" in why


names = st.sampled_from(["id", "name", "tier", "meta", "a b", "é"])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                      max_size=3), max_leaves=5)


def selected_as_a_dict_would(record: bytes, select: list[str], rename: dict[str, str]) -> bytes:
    """The plain model: decode to a dict of raw values, keep the selected in select order, rename."""
    fields = msgspec.json.decode(record, type=dict[str, msgspec.Raw])
    kept = {name: fields[name] for name in dict.fromkeys(select) if name in fields}
    return msgspec.json.encode({rename.get(name, name): value for name, value in kept.items()})


@FUZZ
@given(st.dictionaries(names, json_values, max_size=6), st.lists(names, min_size=1, max_size=4),
       st.dictionaries(names, st.sampled_from(["x", "y", "z"]), max_size=2, dict_class=dict))
def test_select_with_rename_gives_the_bytes_a_dict_round_trip_gives(record, select, rename):
    if len(set(rename.values())) < len(rename):
        rename = {}  # two fields onto one name: a config error
    raw = msgspec.json.encode(record).replace(b",", b", ")  # as sent, spaces and all inside values
    shaped, why = Reshaper(select=select, rename=rename).reshape(msgspec.Raw(raw))
    assert why == "" and bytes(shaped) == selected_as_a_dict_would(raw, select, rename)


def test_select_is_refused_for_a_record_that_is_not_an_object_and_ignores_what_it_drops():
    shaped, why = Reshaper(select=["a"]).reshape(msgspec.Raw(b'"text"'))
    assert shaped is None and "not a JSON object" in why
    shaped, _ = Reshaper(select=["a", "b", "a"], drop=["b"]).reshape(msgspec.Raw(b'{"b": 1, "a": 2}'))
    assert bytes(shaped) == b'{"a":2}'
