"""Turning upstream pages (or webhook bodies) into per-partition batches and dead letters.

Runs in fetcher processes for every page and in the control process for every webhook. The page is
decoded twice by msgspec in C: once into raw record bytes, once into just the key and updated
fields. Everything else about a record stays bytes. Per record, Python only checks the two fields,
hashes the bytes with xxh3 and picks a partition.

A record msgspec cannot decode (nested past its recursion limit) must not fail its page: only then
is the body cut into records by ``jsonscan`` (iterative, any depth), each decoded alone, and the
deep one becomes a dead letter with its reason. A record stamped more than the source's
``max_clock_skew_s`` in the future is a dead letter too: accepted, it would become the watermark and
win every later comparison against real updates.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from itertools import count
from typing import Any, NamedTuple

import msgspec
from msgspec import Raw
from xxhash import xxh3_64_hexdigest

from conflux.config import MAX_TOPIC_CHARS, MIN_RING_BYTES, SourceConfig
from conflux.errors import PageFormatError
from conflux.ipc.codec import (
    MAX_LOG_BATCH_BYTES,
    RECORD_BYTES_FACTOR,
    ROW_OVERHEAD_BYTES,
    batch_header_bytes,
    batch_room_bytes,
)
from conflux.ipc.messages import OPTIONAL_COLUMNS, RECORD_COLUMNS, Batch, DeadLetter, cut, take
from conflux.log.base import partitions_for
from conflux.redact import redact_text
from conflux.workers import jsonscan
from conflux.workers.columns import Columns, Undecodable, build_columns
from conflux.workers.shaping import SourceShape

_message_counter = count()
_stamps_encoder = msgspec.json.Encoder()
# What a frame of the smallest ring carries for the longest topic name (each character escaped): the
# batch limit of callers that do not pass the ring's own, so their batches fit any ring.
SAFE_BATCH_BYTES = batch_room_bytes(MIN_RING_BYTES, "\0" * MAX_TOPIC_CHARS)
# msgspec raises RecursionError, not DecodeError, for JSON nested past its depth limit.
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)
TOO_DEEP = "record is nested too deeply to decode (past the decoder's recursion limit)"


def new_message_id() -> str:
    """Unique across processes and restarts: random process prefix, then a counter."""
    return f"{_PROCESS_PREFIX}-{next(_message_counter):x}"


_PROCESS_PREFIX = os.urandom(6).hex()


def reseed_message_ids() -> None:
    """Called after fork: a child must not reuse its parent's prefix."""
    global _PROCESS_PREFIX
    _PROCESS_PREFIX = os.urandom(6).hex()


def parse_timestamp_us(text: str) -> int:
    """ISO 8601 text -> microseconds since the epoch; a time without an offset is taken as UTC."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1_000_000)


class PageMeta(NamedTuple):
    """The paging fields of a page, as the upstream sent them (None when absent)."""

    has_more: Any = None
    total: Any = None
    next_cursor: Any = None
    next_url: Any = None


# PageMeta's fields -> the [sources.pagination] key that names their path in the body.
META_FIELDS = {"has_more": "has_more_field", "total": "total_field", "next_cursor": "next_cursor_field",
               "next_url": "next_url_path"}


class RecordSchema:
    """Per-source decoders, built once: where the records are, which fields identify them, and how
    they are shaped (``workers.shaping``)."""

    def __init__(self, source: SourceConfig, *, extra_fields: Sequence[str] = ()) -> None:
        """``extra_fields``: more dotted paths to decode with the identity (a parent's fields its children use)."""
        self.source = source.name
        self.shape = SourceShape(source, extra={f"extra{index}": path for index, path in enumerate(extra_fields)})
        self.max_clock_skew_s = source.max_clock_skew_s
        self._fields_type = fields = self.shape.identity.struct
        self._fields_decoder = msgspec.json.Decoder(list[fields])
        self._one_fields_decoder = msgspec.json.Decoder(fields)
        self._raw_list_decoder = msgspec.json.Decoder(list[Raw])
        options = source.pagination_options
        records_path = source.effective_records_path
        self._path = records_path.split(".") if records_path else []
        # The paging fields are read only from an envelope: a body that is the list has none.
        self._meta_paths = {name: path.split(".") for name, option in META_FIELDS.items()
                            for path in [getattr(options, option)] if path and self._path}
        self._page = Envelope(self._path, list[Raw], self._meta_paths)
        self._page_fields = Envelope(self._path, list[fields], {})

    # -- decoding -------------------------------------------------------------------------------

    def page_records(self, body: bytes) -> tuple[list[Raw], list[Any], PageMeta]:
        """Records, their key fields and the page's paging fields; PageFormatError if the shape is wrong."""
        return self.page_records_fast(body) or self.split_page(body)

    def page_records_fast(self, body: bytes) -> tuple[list[Raw], list[Any], PageMeta] | None:
        """``page_records`` all in msgspec; None when a record is too deep for it (then ``split_page``)."""
        try:
            envelope = self._page.decoder.decode(body)
        except RecursionError:
            return None
        except _DECODE_ERRORS as exc:
            raise PageFormatError(f"page is not JSON with a list of records at {self._where()!r}: {exc}") from None
        records = self._page.records(envelope)
        fields = self._fields_for(records, lambda: self._page_fields.records(self._page_fields.decoder.decode(body)))
        return records, fields, self._page.meta(envelope)

    def body_records(self, body: bytes) -> tuple[list[Raw], list[Any]]:
        """Records from a webhook body: one JSON object or a JSON list of objects."""
        first = body.lstrip()[:1]
        if first not in (b"[", b"{"):
            raise PageFormatError("body must be a JSON object or a list of objects")
        try:
            if first == b"[":
                records = self._raw_list_decoder.decode(body)
            else:
                records = self._raw_list_decoder.decode(b"[" + body + b"]")
        except RecursionError:
            return self._split_body(body, first)
        except _DECODE_ERRORS as exc:
            raise PageFormatError(f"body is not JSON: {exc}") from None
        if first == b"{" and len(records) != 1:  # `{...}, {...}` is valid JSON only once wrapped in [ ]
            raise PageFormatError("body must be a JSON object or a list of objects")
        return records, self._fields_for(records, lambda: self._fields_decoder.decode(body))

    def fields_of(self, records: Sequence[Raw]) -> list[Any]:
        """The identity fields of each record, decoded one by one (None: not an object)."""
        return [self._fields_or_none(record) for record in records]

    def _where(self) -> str:
        return ".".join(self._path) or "the body"

    def _fields_for(self, records: list[Raw], decode_all) -> list[Any]:
        try:
            return decode_all()
        except _DECODE_ERRORS:
            # Some element is not an object (or the body is not JSON at all): sort them one by one.
            return [self._fields_or_none(record) for record in records]

    def _fields_or_none(self, record: Raw) -> Any:
        try:
            return self._one_fields_decoder.decode(record)
        except RecursionError:
            return Undecodable(reason=TOO_DEEP)
        except msgspec.ValidationError:  # (a DecodeError too) a JSON value, but not an object
            return None
        except msgspec.DecodeError as exc:
            return Undecodable(reason=f"record cannot be decoded: {exc}")

    # -- the slow path: a record too deep for msgspec ---------------------------------------------

    def split_page(self, body: bytes) -> tuple[list[Raw], list[Any], PageMeta]:
        """``page_records`` for a page with a record too deep for msgspec: the page is cut into records
        by jsonscan (pure Python, about 10 MB/s on usual records), then each is decoded alone."""
        depth = max([len(self._path) + 1, *map(len, self._meta_paths.values())])
        root = _scan(body, depth, f"page is not JSON with a list of records at {self._where()!r}")
        node = root
        for name in self._path:
            node = node.member(name) if node.kind == b"{" else None
            if node is None:
                break
        if node is None or node.kind != b"[":
            raise PageFormatError(f"page has no list of records at {self._where()!r}")
        records, fields = self._split_records(body, [child for _name, child in node.children])
        meta = PageMeta(**{name: self._meta_value(body, root, path) for name, path in self._meta_paths.items()})
        return records, fields, meta

    def _split_body(self, body: bytes, first: bytes) -> tuple[list[Raw], list[Any]]:
        root = _scan(body, 1 if first == b"[" else 0, "body is not JSON")
        nodes = [child for _name, child in root.children] if root.kind == b"[" else [root]
        return self._split_records(body, nodes)

    def _split_records(self, body: bytes, nodes: list[jsonscan.Node]) -> tuple[list[Raw], list[Any]]:
        records = [Raw(body[node.start:node.end]) for node in nodes]
        fields = [self._fields_or_none(record) for record in records]
        for index, field in enumerate(fields):
            if type(field) is Undecodable:  # its own key fields, for the dead letter, if they can be read
                record = bytes(records[index])
                node = jsonscan.parse(record, 1)
                fields[index] = Undecodable(_member_value(record, node, self.shape.key_names[0]),
                                            _member_value(record, node, self.shape.updated_name), field.reason)
        return records, fields

    def _meta_value(self, body: bytes, root: jsonscan.Node, path: list[str]) -> Any:
        node: jsonscan.Node | None = root
        for name in path:
            node = node.member(name) if node.kind == b"{" else None
            if node is None:
                return None
        try:
            return msgspec.json.decode(body[node.start:node.end])
        except _DECODE_ERRORS:
            where = ".".join(path)
            raise PageFormatError(f"the page's {where!r} field cannot be decoded (nested too deeply)") from None

    # -- columns --------------------------------------------------------------------------------

    def columns(self, records: Sequence[Raw], fields: Sequence[Any]) -> Columns:
        """Check, shape and hash each record (``workers.columns``); the bad ones go aside with why."""
        return build_columns(self.shape, records, fields, self._latest_us())

    def _latest_us(self) -> int:
        """The newest updated instant accepted now: the clock plus the allowed skew."""
        return time.time_ns() // 1000 + round(self.max_clock_skew_s * 1_000_000)


def _scan(body: bytes, keep_depth: int, problem: str) -> jsonscan.Node:
    try:
        return jsonscan.parse(body, keep_depth)
    except ValueError as exc:
        raise PageFormatError(f"{problem}: {exc}") from None


def _member_value(body: bytes, node: jsonscan.Node, name: str) -> Any:
    """A top-level member of a record that is too deep as a whole, decoded alone; None if it cannot be."""
    member = node.member(name) if node.kind == b"{" else None
    if member is None:
        return None
    try:
        return msgspec.json.decode(body[member.start:member.end])
    except _DECODE_ERRORS:
        return None


def split_by_partition(columns: Columns, source: str, sync: str, partitions: int, *,
                       max_batch_bytes: int = SAFE_BATCH_BYTES) -> list[tuple[int, Batch]]:
    """Batches of each partition's records, in page order, each encoding to at most ``max_batch_bytes``
    (one batch per partition unless its share is larger); a key always lands in the same partition.

    A record that alone exceeds the limit still gets a batch of its own, never dropped: callers that
    know the ring's limit take such records out first (``set_aside_oversized``)."""
    if not columns.keys:
        return []
    created_us = time.time_ns() // 1000
    if partitions == 1:
        in_order, shares = columns, [(0, 0, len(columns))]
    else:
        # One stable sort by partition, then each share is a slice: C-level work instead of a loop per record.
        owners = partitions_for(columns.key_hashes, partitions)
        order = sorted(range(len(owners)), key=owners.__getitem__)
        in_order = Columns(*take(columns, order), dead=[])
        shares, start = [], 0
        for partition, size in sorted(Counter(owners).items()):
            shares.append((partition, start, start + size))
            start += size
    room = max_batch_bytes - batch_header_bytes(source, sync)
    return [(partition, _batch(in_order, source, sync, created_us, piece_start, piece_stop))
            for partition, start, stop in shares
            for piece_start, piece_stop in _pieces(in_order, start, stop, room)]


def publish_limit_bytes(ring_bytes: int, topic: str) -> int:
    """The largest batch a fetcher publishes to ``topic``: what one ring frame carries, within the log's limit."""
    return min(batch_room_bytes(ring_bytes, topic), MAX_LOG_BATCH_BYTES)


def _pieces(columns: Columns | Batch, start: int, stop: int, room: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of ``start:stop`` whose rows take at most ``room`` bytes each (a row
    larger than ``room`` is a range of its own). One range, without measuring rows one by one, when the
    bound on the whole share fits: the usual case."""
    if RECORD_BYTES_FACTOR * sum(map(len, columns.records[start:stop])) + ROW_OVERHEAD_BYTES * (stop - start) <= room:
        return [(start, stop)]
    ranges, used, piece_start = [], 0, start
    for index, size in enumerate(row_bytes(columns, start, stop), start):
        if used + size > room and index > piece_start:
            ranges.append((piece_start, index))
            piece_start, used = index, 0
        used += size
    ranges.append((piece_start, stop))
    return ranges


def row_bytes(columns: Columns | Batch, start: int = 0, stop: int | None = None) -> list[int]:
    """What each row of ``start:stop`` adds to an encoded Batch, exactly (a comma per column included)."""
    encode = _stamps_encoder.encode
    sizes = [list(map(len, map(encode, column[start:stop]))) for name in RECORD_COLUMNS if name != "records"
             for column in [getattr(columns, name)] if column or name not in OPTIONAL_COLUMNS]
    commas = len(sizes) + 1
    return [total + commas for total in map(sum, zip(*sizes, map(len, columns.records[start:stop])))]


def set_aside_oversized(columns: Columns, source: str, sync: str, max_batch_bytes: int) -> Columns:
    """The columns without the records too large for a batch of ``max_batch_bytes`` even alone; those
    join ``dead`` with their size as the reason. Run by the fetcher before it splits a page."""
    room = max_batch_bytes - batch_header_bytes(source, sync)
    if not columns.records or RECORD_BYTES_FACTOR * max(map(len, columns.records)) + ROW_OVERHEAD_BYTES <= room:
        return columns
    sizes = row_bytes(columns)
    if max(sizes) <= room:
        return columns
    keep = [index for index, size in enumerate(sizes) if size <= room]
    dead = [(columns.records[index], columns.keys[index], oversized_reason(len(columns.records[index]), size, room))
            for index, size in enumerate(sizes) if size > room]
    native = [columns.native[index] for index in keep] if columns.native else []
    return Columns(*take(columns, keep), dead=[*columns.dead, *dead], native=native)


def fit_batch(batch: Batch, max_batch_bytes: int) -> tuple[list[Batch], dict[int, str]]:
    """``batch`` cut into pieces (``Batch.subset``, same message id, records in order) that each encode
    to at most ``max_batch_bytes``, and the records that do not fit even alone: index -> reason.
    Run by the consumer for a log message too large for its ring (written by an older version)."""
    room = max_batch_bytes - batch_header_bytes(batch.source, batch.sync)
    sizes = row_bytes(batch)
    too_large = {index: oversized_reason(len(batch.records[index]), size, room)
                 for index, size in enumerate(sizes) if size > room}
    pieces, current, used = [], [], 0
    for index, size in enumerate(sizes):
        if index in too_large:
            continue
        if used + size > room and current:
            pieces.append(batch.subset(current))
            current, used = [], 0
        current.append(index)
        used += size
    if current:
        pieces.append(batch.subset(current))
    return pieces, too_large


def oversized_reason(record_bytes: int, row_bytes: int, room: int) -> str:
    return (f"record of {record_bytes} bytes is too large: it takes {row_bytes} bytes in a batch, and a batch "
            f"carries at most {room} bytes of records (a ring frame is half of [workers] ring_bytes; a log "
            f"message is at most {MAX_LOG_BATCH_BYTES} bytes); raise ring_bytes, then replay it")


def dead_letters(columns: Columns, source: str, stage: str, origin: str) -> list[DeadLetter]:
    """Dead-letter entries for ``columns.dead``; the origin (an upstream URL) loses its secrets here."""
    now, origin = time.time(), redact_text(origin)
    return [
        DeadLetter(id=dead_letter_id(source, stage, record), source=source, reason=reason, stage=stage,
                   record=record, key=key, origin=origin, first_seen=now, last_seen=now)
        for record, key, reason in columns.dead
    ]


def dead_letter_id(source: str, stage: str, record: bytes | Raw) -> str:
    """Same record, same source, same stage: same entry, so repeats count attempts instead of piling up."""
    return xxh3_64_hexdigest(b"%s\x00%s\x00%s" % (source.encode(), stage.encode(), bytes(record)))


def _batch(columns: Columns, source: str, sync: str, created_us: int, start: int, stop: int) -> Batch:
    return Batch(new_message_id(), source, sync, created_us, *cut(columns, start, stop))


class Envelope:
    """A page body as one msgspec type: the records at their dotted path (required: a page without them
    is not in the configured shape) and the paging fields at theirs (optional), decoded in one pass."""

    def __init__(self, path: list[str], leaf: Any, meta: dict[str, list[str]]) -> None:
        tree: dict[str, Any] = {}
        for name, where in [("", path), *meta.items()]:
            node = tree
            for part in where[:-1]:
                node = node.setdefault(part, {})
            if where:
                node[where[-1]] = name
        self.type, getters = _envelope_type(tree, leaf, "Envelope", ()) if path else (leaf, {"": ()})
        self._records = getters[""]
        self._meta = {name: getters[name] for name in meta}
        self.decoder = msgspec.json.Decoder(self.type)

    def records(self, envelope: Any) -> Any:
        for attribute in self._records:
            envelope = getattr(envelope, attribute)
        return envelope

    def meta(self, envelope: Any) -> PageMeta:
        return PageMeta(**{name: _follow(envelope, attributes) for name, attributes in self._meta.items()})


def _envelope_type(tree: dict[str, Any], leaf: Any, name: str, prefix: tuple[str, ...]) -> tuple[type, dict]:
    """A Struct for ``tree`` (member -> subtree, or a leaf's name: "" for the records); the branch that
    holds the records is required, the rest optional. Also each leaf's attribute path."""
    fields: list[tuple] = []
    rename: dict[str, str] = {}
    getters: dict[str, tuple[str, ...]] = {}
    for index, (member, child) in enumerate(sorted(tree.items())):
        attribute = f"f{index}"
        rename[attribute] = member
        if isinstance(child, dict):
            inner, inner_getters = _envelope_type(child, leaf, f"{name}_{index}", (*prefix, attribute))
            getters.update(inner_getters)
            fields.append((attribute, inner) if "" in inner_getters else (attribute, inner | None, None))
        else:
            getters[child] = (*prefix, attribute)
            fields.append((attribute, leaf) if child == "" else (attribute, Any, None))
    # Required fields first: msgspec wants those without a default before those with one.
    fields.sort(key=len)
    return msgspec.defstruct(name, fields, rename=rename), getters


def _follow(value: Any, attributes: tuple[str, ...]) -> Any:
    for attribute in attributes:
        value = getattr(value, attribute, None)
        if value is None:
            return None
    return value
