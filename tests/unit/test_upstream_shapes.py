"""The demo upstream's API shapes (demo/upstream_shapes.py, demo/paging_styles.py): where records sit in a
body, POST search parameters, updated_since in epoch units, and parent -> child listings with their checksum."""

from __future__ import annotations

import msgspec
import pytest

from conflux.demo import datagen
from conflux.demo.paging_styles import STYLES, BadParameter, envelope
from conflux.demo.store import Collection
from conflux.demo.upstream_shapes import Children, normalized_since, search_query
from conflux.demo.upstream_time import format_us


def make(spec, count: int) -> Collection:
    return Collection(spec, datagen.generate(spec, count, seed=3, precision="s"), precision="s")


@pytest.mark.parametrize(("path", "expected"), [
    (("data",), {"data": [1, 2], "has_more": True}),
    (("result", "items"), {"result": {"items": [1, 2]}, "has_more": True}),
    ((), [1, 2]),
])
def test_the_records_go_where_the_records_path_says(path: tuple, expected: object) -> None:
    assert msgspec.json.decode(envelope(b"[1,2]", b'"has_more":true', path)) == expected


def test_every_enveloped_style_honours_the_records_path() -> None:
    customers = make(datagen.CUSTOMERS, 30)
    for name in ("page", "offset", "cursor", "link", "keyset", "next"):
        body = msgspec.json.decode(STYLES[name](customers, {"limit": "5", "size": "5"},
                                                records_path=("result", "items")).body)
        assert len(body["result"]["items"]) == 5, name


def test_search_parameters_come_from_the_body_members_by_name_and_win_over_the_query() -> None:
    query = search_query({"limit": "5", "x": "1"}, {"limit": 10, "page": {"cursor": "c", "size": None},
                                                    "flag": True, "list": [1]})
    assert dict(query) == {"limit": "10", "x": "1", "cursor": "c", "flag": "true"}


@pytest.mark.parametrize(("form", "text"), [("epoch_s", "1767225600"), ("epoch_ms", "1767225600000")])
def test_updated_since_in_epoch_units_reads_as_the_same_instant(form: str, text: str) -> None:
    assert normalized_since({"updated_since": text}, form)["updated_since"] == "2026-01-01T00:00:00.000000Z"
    with pytest.raises(BadParameter, match="updated_since: must be a number"):
        normalized_since({"updated_since": "2026-01-01T00:00:00Z"}, form)
    assert normalized_since({"updated_since": "x"}, "iso8601") == {"updated_since": "x"}


def world() -> tuple[Collection, Collection, Children]:
    customers, orders = make(datagen.CUSTOMERS, 40), make(datagen.SYSTEMS[0], 3000)
    return customers, orders, Children({"customers": customers, "orders": orders})


def busy_parents(orders: Collection, at_least: int = 2) -> list[int]:
    """Customers (of the first 40) with at least that many orders."""
    counts: dict[int, int] = {}
    for _us, _key, data in orders.entries(0, len(orders)):
        ref = msgspec.json.decode(data)["customer_id"]
        counts[ref] = counts.get(ref, 0) + 1
    return sorted(key for key, count in counts.items() if key <= 40 and count >= at_least)


def test_a_child_listing_holds_the_childs_records_of_that_parent_in_order() -> None:
    customers, orders, children = world()
    everything = [msgspec.json.decode(data) for _us, _key, data in orders.entries(0, len(orders))]
    parents = busy_parents(orders)
    assert len(parents) >= 5
    for key in parents:
        view = children.view(customers, key, "orders")
        expected = [record for record in everything if record["customer_id"] == key]
        listed = [msgspec.json.decode(data) for _us, _key, data in view.entries(0, len(view))]
        assert listed == expected
        # Every style pages the view as it pages a collection.
        body = msgspec.json.decode(STYLES["page"](view, {"page": "1", "size": "1000"}).body)
        assert body["data"] == expected and body["total"] == len(expected)
    with pytest.raises(BadParameter, match="customers has no children 'products'"):
        children.view(customers, 1, "products")


def test_a_view_is_rebuilt_after_the_child_collection_changes() -> None:
    customers, orders, children = world()
    key = busy_parents(orders)[0]
    before = len(children.view(customers, key, "orders"))
    orders.create({"customer_id": key, "status": "paid"}, datagen.RANGE_START_US + 10**14)
    assert len(children.view(customers, key, "orders")) == before + 1


def test_the_child_checksum_counts_live_children_of_live_parents_and_can_stamp_them() -> None:
    customers, orders, children = world()
    everything = [msgspec.json.decode(data) for _us, _key, data in orders.entries(0, len(orders))]
    of_live_parents = [r for r in everything if r["customer_id"] <= 40]
    assert children.checksum(customers, "orders")["count"] == len(of_live_parents)
    key = busy_parents(orders)[0]
    customers.delete(key, datagen.RANGE_START_US + 10**14, hard=False)
    gone = sum(r["customer_id"] == key for r in everything)
    assert gone >= 2
    assert children.checksum(customers, "orders")["count"] == len(of_live_parents) - gone
    plain, stamped = children.checksum(customers, "orders"), children.checksum(customers, "orders", "parent_key")
    assert plain["count"] == stamped["count"] and plain["checksum"] != stamped["checksum"]
    # Stamping a field the records have already changes nothing (the upstream's own value wins).
    assert children.checksum(customers, "orders", "customer_id") == plain


def test_timestamps_in_the_view_are_the_collections() -> None:
    customers, orders, children = world()
    view = children.view(customers, busy_parents(orders)[0], "orders")
    since = view.entries(0, len(view))[-1][0]
    body = msgspec.json.decode(STYLES["page"](view, {"updated_since": format_us(since, "s")}).body)
    assert [r["updated_at"] for r in body["data"]] == [format_us(since, "s")] * len(body["data"])
