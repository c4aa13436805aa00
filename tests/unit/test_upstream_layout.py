"""The demo upstream's record layouts (demo/record_layout.py): nested key and updated_at, epoch timestamps,
and the empty-pages fault (demo/paging_styles.py's EmptyListing), through the store and every paging style."""

from __future__ import annotations

import msgspec
import pytest

from conflux.demo import datagen
from conflux.demo.faults import EmptyListing
from conflux.demo.paging_styles import STYLES, BadParameter
from conflux.demo.record_layout import RecordLayout, layout_problem
from conflux.demo.store import Collection, StoreError
from conflux.demo.upstream_time import format_us, parse_iso_us
from tests.unit.test_upstream_paging import Body

NOW_US = parse_iso_us("2026-11-01T12:00:00.123456Z")
NESTED_MS = RecordLayout(precision="ms", timestamp_format="epoch_ms", nested=True)


def make(layout: RecordLayout, spec=datagen.CUSTOMERS, count=120, malformed_rate=0.0) -> Collection:
    generated = datagen.generate(spec, count, seed=3, precision=layout.precision, malformed_rate=malformed_rate,
                                 layout=layout)
    return Collection(spec, generated, precision=layout.precision, layout=layout)


def records(collection: Collection) -> list[dict]:
    return [msgspec.json.decode(data) for _us, _key, data in collection.entries(0, len(collection))]


def test_the_flat_iso_layout_serves_the_same_bytes_as_before_layouts_existed():
    generated = datagen.generate(datagen.PRODUCTS, 50, seed=3, precision="s")
    for sort_us, key, data in generated.items:
        record = msgspec.json.decode(data)
        assert list(record) == ["sku", "name", "price", "stock", "warehouse", "updated_at"]
        assert record["sku"] == key and record["updated_at"] == format_us(sort_us, "s")
    assert datagen.generate(datagen.PRODUCTS, 50, seed=3, precision="s", layout=RecordLayout()) == generated


@pytest.mark.parametrize(("timestamp_format", "precision", "unit_us"),
                         [("epoch_s", "s", 1_000_000), ("epoch_ms", "ms", 1_000), ("epoch_us", "us", 1)])
def test_nested_records_carry_key_and_an_epoch_updated_at_in_meta(timestamp_format, precision, unit_us):
    layout = RecordLayout(precision=precision, timestamp_format=timestamp_format, nested=True)
    collection = make(layout)
    for (sort_us, key, _data), record in zip(collection.entries(0, len(collection)), records(collection), strict=True):
        assert list(record) == ["meta", "name", "email", "tier"]
        assert record["meta"] == {"id": key, "updated_at": sort_us // unit_us}
        assert type(record["meta"]["updated_at"]) is int


def test_changes_deletes_and_restores_keep_the_layout():
    collection = make(NESTED_MS)
    changed = msgspec.json.decode(collection.update(5, {"tier": "gold"}, NOW_US))
    assert changed == {**changed, "meta": {"id": 5, "updated_at": NOW_US // 1000}, "tier": "gold"}
    deleted = msgspec.json.decode(collection.delete(6, NOW_US, hard=False))
    assert deleted["meta"] == {"id": 6, "updated_at": NOW_US // 1000, "deleted": True} and "deleted" not in deleted
    restored = msgspec.json.decode(collection.update(6, {}, NOW_US + 5_000))
    assert restored["meta"] == {"id": 6, "updated_at": (NOW_US + 5_000) // 1000}
    created = msgspec.json.decode(collection.create({"name": "New"}, NOW_US + 9_000))
    assert created == {"meta": {"id": 121, "updated_at": (NOW_US + 9_000) // 1000}, "name": "New"}
    with pytest.raises(StoreError, match=r"^meta: set by the upstream"):
        collection.update(7, {"meta": {"id": 8}}, NOW_US)


def test_malformed_nested_records_lack_the_key_in_meta_or_carry_a_bad_updated_at():
    collection = make(NESTED_MS, malformed_rate=0.1)
    by_reason: dict[str, list[dict]] = {}
    for _key, reason, data in collection.malformed():
        by_reason.setdefault(reason, []).append(msgspec.json.decode(data))
    assert all("id" not in record["meta"] and type(record["meta"]["updated_at"]) is int
               for record in by_reason[datagen.MISSING_KEY])
    assert all(type(record["meta"]["updated_at"]) is str for record in by_reason[datagen.BAD_UPDATED_AT])


def test_future_records_are_stamped_in_the_layouts_format():
    layout = RecordLayout(timestamp_format="epoch_s")
    generated = datagen.generate(datagen.CUSTOMERS, 50, seed=3, precision="s", layout=layout,
                                 hostile=datagen.HostileRecords(future=2))
    future = [msgspec.json.decode(data) for _us, key, data in generated.items
              if generated.malformed.get(key) == datagen.FUTURE_UPDATED_AT]
    assert [record["updated_at"] for record in future] == [parse_iso_us(datagen.FUTURE_STAMP) // 1_000_000] * 2


def test_updated_since_is_an_epoch_number_or_iso_text():
    collection = make(NESTED_MS)
    entries = collection.entries(0, len(collection))
    since_us = entries[60][0]
    as_number = collection.layout.iso_since({"updated_since": str(since_us // 1000), "limit": "1000"})
    assert as_number == {"updated_since": format_us(since_us, "us"), "limit": "1000"}
    as_text = {"updated_since": format_us(since_us, "ms")}
    assert collection.layout.iso_since(as_text) is as_text
    for style in ("page", "cursor", "keyset"):
        size = {"page": "size"}.get(style, "limit")
        query = collection.layout.iso_since({"updated_since": str(since_us // 1000), size: "1000"})
        body = msgspec.json.decode(STYLES[style](collection, query).body, type=Body)
        assert [bytes(raw) for raw in body.data] == [data for sort_us, _k, data in entries if sort_us >= since_us]
    with pytest.raises(BadParameter, match=r"^updated_since: must be an ISO 8601 timestamp"):
        STYLES["page"](collection, collection.layout.iso_since({"updated_since": "soon"}))
    # An ISO 8601 upstream takes no numbers: they stay as they are, and the style refuses them.
    assert RecordLayout().iso_since({"updated_since": "1767225600"}) == {"updated_since": "1767225600"}


def test_an_epoch_format_coarser_than_the_precision_is_refused():
    assert "epoch_s cannot carry timestamp precision ms" in layout_problem("ms", "epoch_s")
    assert layout_problem("s", "epoch_us") == "" and layout_problem("us", "iso8601") == ""
    with pytest.raises(ValueError, match="epoch_ms cannot carry"):
        RecordLayout(precision="us", timestamp_format="epoch_ms")


@pytest.mark.parametrize("style", sorted(STYLES))
def test_the_empty_pages_fault_answers_one_empty_last_page_in_every_style(style):
    collection = make(RecordLayout())
    query = {"updated_since": "2026-01-01T00:00:00Z"} if style == "keyset" else {}
    page = STYLES[style](EmptyListing(collection), query)
    body = msgspec.json.decode(page.body)  # an object with `data`, or (header-cursor, skip-take) the bare list
    records = body if isinstance(body, list) else body["data"]
    assert records == [] and page.next_page is None
    if isinstance(body, dict):
        assert not body.get("has_more") and body.get("next_cursor") is None
        assert not (body.get("links") or {}).get("next")
    assert not any(name.lower().startswith("x-next") for name in dict(page.headers))
    assert len(collection) == 120 and collection.lookup(5)  # the records are still there, by key
