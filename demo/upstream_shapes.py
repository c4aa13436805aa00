"""The API shapes of the demo upstream beyond plain GET pages: POST search requests, parent -> child
listings (``/api/customers/7/orders``), ``updated_since`` in epoch units, and the checksum of the
children of live parents. See "API shapes" in ``demo/upstream.py``.

Runs in the upstream process's request handlers. A child listing is a ``ChildView`` of the child
collection: the records whose reference field holds the parent's key, in (updated_at, key) order,
with the methods every paging style uses, so each style serves children as it serves a collection.
The views are cut from one index per (child, field), rebuilt only after the child collection changed.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any

import msgspec
from multidict import MultiDict

from conflux.demo.checksum import Checksum, record_digest
from conflux.demo.datagen import Key
from conflux.demo.paging_styles import BadParameter
from conflux.demo.store import Collection
from conflux.demo.upstream_time import format_us

# (parent, child) -> the child's field that holds the parent's key.
RELATIONS = {("customers", "orders"): "customer_id", ("customers", "support_tickets"): "customer_id",
             ("customers", "crm_events"): "customer_id", ("orders", "shipments"): "order_id",
             ("orders", "payments"): "order_id", ("products", "warehouse"): "sku"}
SINCE_FORMATS = ("iso8601", "epoch_s", "epoch_ms")
_EPOCH_UNITS_US = {"epoch_s": 1_000_000, "epoch_ms": 1_000}


class ChildView:
    """The records of ``child`` under one parent key, as a read-only collection for the paging styles."""

    def __init__(self, child: Collection, entries: list[tuple[int, Key, bytes]]) -> None:
        self.name = child.name
        self.spec = child.spec
        self.layout = child.layout
        self._child = child
        self._entries = entries
        self._positions = [(sort_us, key) for sort_us, key, _data in entries]

    def __len__(self) -> int:
        return len(self._entries)

    def index_since(self, since_us: int | None) -> int:
        return 0 if since_us is None else bisect.bisect_left(self._positions, (since_us,))

    def index_after(self, sort_us: int, key: Key) -> int:
        return bisect.bisect_right(self._positions, (sort_us, key))

    def entries(self, start: int, stop: int) -> list[tuple[int, Key, bytes]]:
        return self._entries[max(start, 0):max(stop, 0)]

    def parse_key(self, text: str) -> Key:
        return self._child.parse_key(text)

    def is_key(self, value: object) -> bool:
        return self._child.is_key(value)


class Children:
    """Child listings and their checksums, over the upstream's collections."""

    def __init__(self, collections: dict[str, Collection]) -> None:
        self.collections = collections
        self._indexes: dict[tuple[str, str], tuple[int, dict[Any, list]]] = {}

    def field(self, parent: str, child: str) -> str:
        """The child's reference field; BadParameter naming the pair when there is no such relation."""
        name = RELATIONS.get((parent, child))
        if name is None or child not in self.collections:
            known = ", ".join(f"{p}/{c}" for p, c in RELATIONS if p in self.collections and c in self.collections)
            raise BadParameter("child", f"{parent} has no children {child!r} (known: {known or 'none'})")
        return name

    def view(self, parent: Collection, key: Key, child: str) -> ChildView:
        """The children of one parent record (which the caller checked is listed)."""
        field = self.field(parent.name, child)
        return ChildView(self.collections[child], self._index(child, field).get(key, []))

    def checksum(self, parent: Collection, child: str, stamp: str = "") -> dict[str, object]:
        """The checksum of the live children of live parents: what a synced child source holds. With
        ``stamp``, each record as Conflux forwards it with the parent's key added as that field (when
        the record lacks it)."""
        field, collection = self.field(parent.name, child), self.collections[child]
        total = Checksum()
        for ref, entries in self._index(child, field).items():
            if not parent.is_live(ref):
                continue
            for _sort_us, key, data in entries:
                if collection.is_live(key):
                    total.add(record_digest(str(key), _stamped(data, stamp, ref) if stamp else data))
        return {"collection": child, "parent": parent.name, **total.as_dict()}

    def _index(self, child: str, field: str) -> dict[Any, list]:
        collection = self.collections[child]
        cached = self._indexes.get((child, field))
        if cached is not None and cached[0] == collection.version:
            return cached[1]
        decoder = msgspec.json.Decoder(msgspec.defstruct("Ref", [("ref", Any, None)], rename={"ref": field}))
        index: dict[Any, list] = {}
        for entry in collection.entries(0, len(collection)):
            ref = decoder.decode(entry[2]).ref
            if isinstance(ref, str | int):
                index.setdefault(ref, []).append(entry)
        self._indexes[(child, field)] = (collection.version, index)
        return index


def _stamped(data: bytes, field: str, ref: Key) -> bytes:
    if msgspec.json.decode(data, type=dict).get(field) is not None:
        return data
    inner = data.strip()[1:-1].strip()
    return b"{%s%s:%s}" % (inner + b"," if inner else b"", msgspec.json.encode(field), msgspec.json.encode(ref))


def search_query(query: Mapping[str, str], body: dict[str, Any]) -> MultiDict:
    """A POST search's parameters: the query string's, then the body's (its values win). Members of
    nested objects count by their own names ({"page": {"cursor": "..."}} gives cursor); null is absent."""
    merged = MultiDict(query)
    for name, value in _leaves(body):
        merged[name] = value
    return merged


def _leaves(body: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, value in body.items():
        if isinstance(value, dict):
            out += _leaves(value)
        elif isinstance(value, bool):
            out.append((name, "true" if value else "false"))
        elif isinstance(value, str | int | float):
            out.append((name, str(value)))
    return out


def normalized_since(query: Mapping[str, str], since_format: str) -> Mapping[str, str]:
    """``query`` with updated_since given in ``since_format`` rewritten as the ISO 8601 the styles read;
    BadParameter when it is not a value of that format."""
    text = query.get("updated_since")
    if text is None or since_format == "iso8601":
        return query
    try:
        instant_us = round(float(text) * _EPOCH_UNITS_US[since_format])
    except (ValueError, OverflowError):
        raise BadParameter("updated_since", f"must be a number ({since_format}), got {text!r}") from None
    rewritten = MultiDict(query)
    rewritten["updated_since"] = format_us(instant_us, "us")
    return rewritten
