"""The five pagination styles of the demo upstream, as pure functions of (collection, query string).

Run by the upstream process's request handlers. Each style validates its own parameters (raising
``BadParameter``, which names the parameter) and returns the response body assembled from the
records' pre-encoded JSON. All styles order records by (updated_at, key) and accept
``updated_since`` (inclusive). The parameter names are documented in ``demo/upstream.py``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec

from conflux.demo.datagen import Key
from conflux.demo.store import Collection
from conflux.demo.upstream_time import parse_iso_us

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

Query = Mapping[str, str]


class BadParameter(ValueError):
    """A query parameter the upstream rejects with 400; the message starts with its name."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name


@dataclass(frozen=True)
class Page:
    """A response body, and for the link style the number of the next page (None on the last)."""

    body: bytes
    next_page: int | None = None


class CursorPosition(msgspec.Struct, forbid_unknown_fields=True):
    """What a cursor encodes: the collection and the (updated_at, key) of the last record served."""

    c: str
    t: int
    k: int | str


_cursor_encoder = msgspec.json.Encoder()
_cursor_decoder = msgspec.json.Decoder(CursorPosition)


def encode_cursor(collection: str, sort_us: int, key: Key) -> str:
    raw = _cursor_encoder.encode(CursorPosition(c=collection, t=sort_us, k=key))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(collection: Collection, text: str) -> tuple[int, Key]:
    """(sort_us, key) from a cursor this upstream issued for ``collection``; else BadParameter."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        position = _cursor_decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise BadParameter("cursor", "not a cursor issued by this upstream") from exc
    if position.c != collection.name:
        raise BadParameter("cursor", f"issued for collection {position.c!r}, not {collection.name!r}")
    if not collection.is_key(position.k):
        raise BadParameter("cursor", "key has the wrong type for this collection")
    return position.t, position.k


def int_param(query: Query, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    text = query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadParameter(name, f"must be an integer, got {text!r}") from None
    if value < minimum:
        raise BadParameter(name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise BadParameter(name, f"must be <= {maximum}, got {value}")
    return value


def since_param(query: Query) -> int | None:
    """``updated_since`` in microseconds since the epoch, or None when absent."""
    text = query.get("updated_since")
    if text is None:
        return None
    try:
        return parse_iso_us(text)
    except ValueError:
        raise BadParameter("updated_since", f"must be an ISO 8601 timestamp, got {text!r}") from None


def _size(query: Query, name: str) -> int:
    return int_param(query, name, DEFAULT_PAGE_SIZE, minimum=1, maximum=MAX_PAGE_SIZE)


def _data(collection: Collection, start: int, stop: int) -> bytes:
    return b'{"data":[' + b",".join([entry[2] for entry in collection.entries(start, stop)]) + b"]"


def _bool(value: bool) -> bytes:
    return b"true" if value else b"false"


def page_style(collection: Collection, query: Query) -> Page:
    """``?page=1&size=100``: numbered pages of ``size`` records."""
    page = int_param(query, "page", 1, minimum=1)
    size = _size(query, "size")
    first = collection.index_since(since_param(query))
    start = first + (page - 1) * size
    total = len(collection) - first
    body = _data(collection, start, start + size) + b',"page":%d,"size":%d,"total":%d,"has_more":%s}' % (
        page, size, total, _bool(start + size < len(collection)))
    return Page(body)


def offset_style(collection: Collection, query: Query) -> Page:
    """``?offset=0&limit=100``: ``limit`` records from position ``offset``."""
    offset = int_param(query, "offset", 0, minimum=0)
    limit = _size(query, "limit")
    first = collection.index_since(since_param(query))
    start = first + offset
    total = len(collection) - first
    body = _data(collection, start, start + limit) + b',"offset":%d,"limit":%d,"total":%d,"has_more":%s}' % (
        offset, limit, total, _bool(start + limit < len(collection)))
    return Page(body)


def cursor_style(collection: Collection, query: Query, *, loop_after_pages: int = 0) -> Page:
    """``?limit=100[&cursor=…]``: the cursor is a keyset position, so changes never shift pages. With
    ``loop_after_pages`` (a hostile upstream), from that page on next_cursor points back to page 2."""
    limit = _size(query, "limit")
    first = start = collection.index_since(since_param(query))
    cursor = query.get("cursor")
    if cursor:
        start = max(start, collection.index_after(*decode_cursor(collection, cursor)))
    entries = collection.entries(start, start + limit)
    next_cursor = b"null"
    if entries and start + len(entries) < len(collection):
        sort_us, key, _data_bytes = entries[-1]
        if loop_after_pages and start - first >= (loop_after_pages - 1) * limit:
            sort_us, key, _data_bytes = collection.entries(first + limit - 1, first + limit)[0]
        next_cursor = b'"%s"' % encode_cursor(collection.name, sort_us, key).encode()
    data = b",".join([entry[2] for entry in entries])
    body = b'{"data":[' + data + b'],"next_cursor":' + next_cursor + b"}"
    return Page(body)


def link_style(collection: Collection, query: Query, *, loop_after_pages: int = 0) -> Page:
    """``?page=1&size=100``: the body holds only data; the next page is in the Link header. With
    ``loop_after_pages`` (a hostile upstream), from that page on the next link points back to page 1."""
    page = int_param(query, "page", 1, minimum=1)
    size = _size(query, "size")
    start = collection.index_since(since_param(query)) + (page - 1) * size
    next_page = page + 1 if start + size < len(collection) else None
    if next_page is not None and loop_after_pages and page >= loop_after_pages:
        next_page = 1
    return Page(_data(collection, start, start + size) + b"}", next_page)


def keyset_style(collection: Collection, query: Query) -> Page:
    """``?updated_since=W&limit=100[&after_key=K]``: records after (W, K), or from W without K."""
    limit = _size(query, "limit")
    since_us = since_param(query)
    after_key = query.get("after_key")
    if after_key is None:
        start = collection.index_since(since_us)
    elif since_us is None:
        raise BadParameter("after_key", "needs updated_since")
    else:
        try:
            key = collection.parse_key(after_key)
        except ValueError:
            raise BadParameter("after_key", f"not a key of {collection.name}: {after_key!r}") from None
        start = collection.index_after(since_us, key)
    has_more = _bool(start + limit < len(collection))
    body = _data(collection, start, start + limit) + b',"has_more":%s}' % has_more
    return Page(body)


STYLES: dict[str, Callable[..., Page]] = {
    "page": page_style,
    "offset": offset_style,
    "cursor": cursor_style,
    "link": link_style,
    "keyset": keyset_style,
}
