"""The demo upstream's pagination styles (demo/paging_styles.py) as pure functions over a collection."""

from __future__ import annotations

import base64

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conflux.demo import datagen
from conflux.demo.paging_styles import (
    STYLES,
    BadParameter,
    decode_cursor,
    encode_cursor,
    int_param,
    since_param,
)
from conflux.demo.store import Collection
from conflux.demo.upstream_time import format_us, parse_iso_us


class Body(msgspec.Struct):
    data: list[msgspec.Raw]
    next_cursor: str | None = None
    has_more: bool = False
    total: int | None = None


def make(spec=datagen.CUSTOMERS, count=350) -> Collection:
    return Collection(spec, datagen.generate(spec, count, seed=2, precision="s"), precision="s")


def walk(collection: Collection, style: str, **query: str) -> list[bytes]:
    """Every record of a full pass, following each style's own way to the next page."""
    records: list[bytes] = []
    query = {"page": "1", "offset": "0", **query} if style in ("page", "link", "offset") else dict(query)
    size = query.setdefault("size" if style in ("page", "link") else "limit", "40")
    while True:
        page = STYLES[style](collection, query)
        body = msgspec.json.decode(page.body, type=Body)
        records += [bytes(raw) for raw in body.data]
        if style == "cursor" and body.next_cursor:
            query["cursor"] = body.next_cursor
        elif style == "link" and page.next_page:
            query["page"] = str(page.next_page)
        elif style in ("page", "offset", "keyset") and body.has_more:
            _advance(collection, style, query, body, int(size))
        else:
            return records


def _advance(collection: Collection, style: str, query: dict, body: Body, size: int) -> None:
    if style == "page":
        query["page"] = str(int(query["page"]) + 1)
    elif style == "offset":
        query["offset"] = str(int(query["offset"]) + size)
    else:
        last = msgspec.json.decode(body.data[-1])
        query.update(updated_since=last["updated_at"], after_key=str(last[collection.spec.key_field]))


@pytest.mark.parametrize("spec", [datagen.CUSTOMERS, datagen.PRODUCTS])
@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_style_walks_every_record_once_in_order(style, spec):
    collection = make(spec)
    expected = [data for _us, _key, data in collection.entries(0, len(collection))]
    assert walk(collection, style) == expected


@pytest.mark.parametrize("style", sorted(STYLES))
def test_updated_since_includes_its_own_second(style):
    collection = make()
    entries = collection.entries(0, len(collection))
    since_us = entries[200][0]
    expected = [data for sort_us, _key, data in entries if sort_us >= since_us]
    assert walk(collection, style, updated_since=format_us(since_us, "s")) == expected


def test_totals_and_the_last_page():
    collection = make(count=95)
    body = msgspec.json.decode(STYLES["page"](collection, {"page": "3", "size": "40"}).body, type=Body)
    assert (len(body.data), body.total, body.has_more) == (15, 95, False)
    assert STYLES["link"](collection, {"page": "3", "size": "40"}).next_page is None
    assert STYLES["link"](collection, {"page": "2", "size": "40"}).next_page == 3
    beyond = msgspec.json.decode(STYLES["offset"](collection, {"offset": "500"}).body, type=Body)
    assert beyond.data == [] and not beyond.has_more


def test_keyset_after_key_is_strictly_after_the_pair():
    collection = make()
    entries = collection.entries(0, len(collection))
    sort_us, key, _data = entries[100]
    page = STYLES["keyset"](collection, {"updated_since": format_us(sort_us, "s"), "after_key": str(key),
                                         "limit": "3"})
    body = msgspec.json.decode(page.body, type=Body)
    assert [bytes(raw) for raw in body.data] == [data for _us, _key, data in entries[101:104]]


@given(st.integers(min_value=0, max_value=2**62), st.one_of(st.integers(min_value=-2**62, max_value=2**62),
                                                             st.text(min_size=1)))
def test_cursor_round_trip(sort_us, key):
    spec = datagen.CUSTOMERS if isinstance(key, int) else datagen.PRODUCTS
    collection = Collection(spec, datagen.generate(spec, 0, seed=1, precision="s"), precision="s")
    cursor = encode_cursor(spec.name, sort_us, key)
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_cursor(collection, cursor) == (sort_us, key)


@pytest.mark.parametrize("cursor", [
    "",
    "not base64!",
    base64.urlsafe_b64encode(b"[1, 2]").decode(),
    base64.urlsafe_b64encode(b'{"c":"customers","t":1}').decode(),
    encode_cursor("products", 1, 5),
    encode_cursor("customers", 1, "SKU-000001"),
])
def test_bad_cursors_are_rejected(cursor):
    with pytest.raises(BadParameter) as raised:
        decode_cursor(make(count=1), cursor)
    assert raised.value.name == "cursor"


def test_a_cursor_survives_the_record_it_names_being_changed():
    collection = make()
    first = msgspec.json.decode(STYLES["cursor"](collection, {"limit": "10"}).body, type=Body)
    tenth_key = msgspec.json.decode(first.data[-1])["id"]
    collection.update(tenth_key, {"tier": "gold"}, parse_iso_us("2026-11-01T00:00:00Z"))
    second = msgspec.json.decode(STYLES["cursor"](collection, {"limit": "10", "cursor": first.next_cursor}).body,
                                 type=Body)
    assert [bytes(raw) for raw in second.data] == [data for _us, _key, data in collection.entries(9, 19)]


@pytest.mark.parametrize(("query", "name"), [
    ({"page": "x"}, "page"), ({"page": "0"}, "page"), ({"size": "1001"}, "size"), ({"size": "0"}, "size"),
])
def test_int_param_names_the_parameter(query, name):
    with pytest.raises(BadParameter, match=f"^{name}:"):
        STYLES["page"](make(count=1), query)


def test_int_param_default_and_bounds():
    assert int_param({}, "limit", 100, minimum=1, maximum=1000) == 100
    assert int_param({"limit": "1000"}, "limit", 100, minimum=1, maximum=1000) == 1000


def test_since_param():
    assert since_param({}) is None
    assert since_param({"updated_since": "2026-01-05T10:11:12Z"}) == parse_iso_us("2026-01-05T10:11:12Z")
    with pytest.raises(BadParameter, match=r"^updated_since:"):
        since_param({"updated_since": "2026-13-45T99:00:00Z"})


def test_keyset_after_key_needs_a_watermark_and_the_right_type():
    with pytest.raises(BadParameter, match=r"^after_key:"):
        STYLES["keyset"](make(count=1), {"after_key": "5"})
    with pytest.raises(BadParameter, match=r"^after_key:"):
        STYLES["keyset"](make(count=1), {"updated_since": "2026-01-01T00:00:00Z", "after_key": "x"})
