"""Turning upstream pages (or webhook bodies) into per-partition batches and dead letters.

Runs in fetcher processes for every page and in the control process for every webhook. The page is
decoded twice by msgspec in C: once into raw record bytes, once into just the key and updated
fields. Everything else about a record stays bytes. Per record, Python only checks the two fields,
hashes the bytes with xxh3 and picks a partition.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from itertools import count, repeat
from operator import mul
from typing import Annotated, Any, NamedTuple

import msgspec
from msgspec import Raw
from xxhash import xxh3_64_hexdigest, xxh3_64_intdigest

from conflux.config import MAX_TOPIC_CHARS, MIN_RING_BYTES, SourceConfig
from conflux.errors import PageFormatError
from conflux.ipc.codec import MAX_LOG_BATCH_BYTES, ROW_OVERHEAD_BYTES, batch_header_bytes, batch_room_bytes
from conflux.ipc.messages import RECORD_COLUMNS, Batch, DeadLetter, cut, take
from conflux.log.base import partitions_for
from conflux.redact import redact_text

_message_counter = count()
_stamps_encoder = msgspec.json.Encoder()
_aware_stamps_decoder = msgspec.json.Decoder(list[Annotated[datetime, msgspec.Meta(tz=True)]])
# What a frame of the smallest ring carries for the longest topic name (each character escaped): the
# batch limit of callers that do not pass the ring's own, so their batches fit any ring.
SAFE_BATCH_BYTES = batch_room_bytes(MIN_RING_BYTES, "\0" * MAX_TOPIC_CHARS)
# msgspec raises RecursionError, not DecodeError, for JSON nested past its depth limit.
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


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


class Columns(msgspec.Struct, gc=False):
    """The valid records of a page in the record columns (``ipc.messages.RECORD_COLUMNS``), plus what
    was wrong with the others."""

    keys: list[str]
    updated: list[str]
    updated_us: list[int]
    hashes: list[str]
    key_hashes: list[int]
    records: list[Raw]
    dead: list[tuple[Raw, str, str]]  # (record, key or "", reason)

    def __len__(self) -> int:
        return len(self.keys)

    def max_updated(self) -> tuple[int, str]:
        """The newest instant in these records and its text; (0, "") if there are none."""
        if not self.updated_us:
            return 0, ""
        best = max(range(len(self.updated_us)), key=self.updated_us.__getitem__)
        return self.updated_us[best], self.updated[best]


class RecordSchema:
    """Per-source decoders, built once: where the records are and which fields identify them."""

    def __init__(self, source: SourceConfig) -> None:
        self.source = source.name
        self.key_field = source.key
        self.updated_field = source.updated
        fields = msgspec.defstruct(
            "KeyFields", [("key", Any, None), ("updated", Any, None)],
            rename={"key": source.key, "updated": source.updated},
        )
        self._fields_decoder = msgspec.json.Decoder(list[fields])
        self._one_fields_decoder = msgspec.json.Decoder(fields)
        self._raw_list_decoder = msgspec.json.Decoder(list[Raw])
        options = source.pagination_options
        self._path = [part for part in options.records_path.split(".") if part]
        meta_names = {"has_more": options.has_more_field, "total": options.total_field,
                      "next_cursor": options.next_cursor_field}
        self._page_decoder = msgspec.json.Decoder(_nested(self._path, list[Raw], meta_names))
        self._page_fields_decoder = msgspec.json.Decoder(_nested(self._path, list[fields]))

    # -- decoding -------------------------------------------------------------------------------

    def page_records(self, body: bytes) -> tuple[list[Raw], list[Any], PageMeta]:
        """Records, their key fields and the page's paging fields; PageFormatError if the shape is wrong."""
        try:
            envelope = self._page_decoder.decode(body)
        except _DECODE_ERRORS as exc:
            where = ".".join(self._path) or "the body"
            raise PageFormatError(f"page is not JSON with a list of records at {where!r}: {exc}") from None
        records = _dig(envelope, self._path)
        meta = PageMeta(*(getattr(envelope, name, None) for name in PageMeta._fields)) if self._path else PageMeta()
        fields = self._fields_for(records, lambda: _dig(self._page_fields_decoder.decode(body), self._path))
        return records, fields, meta

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
        except _DECODE_ERRORS as exc:
            raise PageFormatError(f"body is not JSON: {exc}") from None
        if first == b"{" and len(records) != 1:  # `{...}, {...}` is valid JSON only once wrapped in [ ]
            raise PageFormatError("body must be a JSON object or a list of objects")
        return records, self._fields_for(records, lambda: self._fields_decoder.decode(body))

    def _fields_for(self, records: list[Raw], decode_all) -> list[Any]:
        try:
            return decode_all()
        except _DECODE_ERRORS:
            # Some element is not an object (or the body is not JSON at all): sort them one by one.
            return [self._fields_or_none(record) for record in records]

    def _fields_or_none(self, record: Raw) -> Any:
        try:
            return self._one_fields_decoder.decode(record)
        except _DECODE_ERRORS:
            return None

    # -- columns --------------------------------------------------------------------------------

    def columns(self, records: Sequence[Raw], fields: Sequence[Any]) -> Columns:
        """Check each record's key and timestamp, hash it, and keep the good ones as columns.

        The common page is all good: then every step below is a C-level map over the page, and
        Python only parses each distinct timestamp once. A page with a bad record takes the slow
        path, which sorts the records one by one.
        """
        keys = [field.key for field in fields] if None not in fields else None
        stamps = [field.updated for field in fields] if keys is not None else None
        if keys is None or not _plain_keys(keys) or set(map(type, stamps)) != {str}:
            return self._columns_one_by_one(records, fields)
        parsed = _parse_stamps(stamps)
        if parsed is None:
            return self._columns_one_by_one(records, fields)
        if type(keys[0]) is not str:
            keys = list(map(str, keys))
        return Columns(keys=keys, updated=stamps, updated_us=list(map(parsed.__getitem__, stamps)),
                       hashes=list(map(xxh3_64_hexdigest, records)), key_hashes=_key_hashes(keys),
                       records=list(records), dead=[])

    def _columns_one_by_one(self, records: Sequence[Raw], fields: Sequence[Any]) -> Columns:
        out = Columns([], [], [], [], [], [], [])
        stamp_cache: dict[str, int] = {}
        for record, field in zip(records, fields, strict=True):
            problem = self._problem(field)
            if problem is None:
                try:
                    instant = stamp_cache.get(field.updated) or parse_timestamp_us(field.updated)
                except (ValueError, OverflowError):
                    problem = f"{self.updated_field!r} is not an ISO 8601 timestamp: {field.updated!r}"
            if problem is not None:
                out.dead.append((record, _key_text(field), problem))
                continue
            stamp_cache[field.updated] = instant
            out.keys.append(field.key if type(field.key) is str else str(field.key))
            out.updated.append(field.updated)
            out.updated_us.append(instant)
            out.records.append(record)
        out.hashes = list(map(xxh3_64_hexdigest, out.records))
        out.key_hashes = _key_hashes(out.keys)
        return out

    def _problem(self, field: Any) -> str | None:
        if field is None:
            return "record is not a JSON object"
        key = field.key
        if key is None:
            return f"missing key field {self.key_field!r}"
        if type(key) not in (str, int) or key == "":
            return f"key field {self.key_field!r} must be a non-empty string or an integer, got {key!r}"
        if field.updated is None:
            return f"missing updated field {self.updated_field!r}"
        if type(field.updated) is not str:
            return f"{self.updated_field!r} must be an ISO 8601 string, got {field.updated!r}"
        return None


def _plain_keys(keys: list[Any]) -> bool:
    """All keys are non-empty strings, or all are integers (bools are not keys)."""
    kinds = set(map(type, keys))
    return kinds == {int} or (kinds == {str} and "" not in keys)


def _parse_stamps(stamps: list[str]) -> dict[str, int] | None:
    """Each distinct timestamp parsed once, all in C: msgspec reads RFC 3339 with an offset. None if any
    does not (no offset, another ISO 8601 form, or garbage); the slow path then sorts them out."""
    unique = list(set(stamps))
    try:
        moments = _aware_stamps_decoder.decode(_stamps_encoder.encode(unique))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return dict(zip(unique, map(round, map(mul, map(datetime.timestamp, moments), repeat(1e6)))))


def _key_hashes(keys: list[str]) -> list[int]:
    return list(map(xxh3_64_intdigest, map(str.encode, keys)))


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
    if 3 * sum(map(len, columns.records[start:stop])) + ROW_OVERHEAD_BYTES * (stop - start) <= room:
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
    sizes = [list(map(len, map(encode, getattr(columns, name)[start:stop])))
             for name in RECORD_COLUMNS if name != "records"]
    return [total + 6 for total in map(sum, zip(*sizes, map(len, columns.records[start:stop])))]


def set_aside_oversized(columns: Columns, source: str, sync: str, max_batch_bytes: int) -> Columns:
    """The columns without the records too large for a batch of ``max_batch_bytes`` even alone; those
    join ``dead`` with their size as the reason. Run by the fetcher before it splits a page."""
    room = max_batch_bytes - batch_header_bytes(source, sync)
    if not columns.records or 3 * max(map(len, columns.records)) + ROW_OVERHEAD_BYTES <= room:
        return columns
    sizes = row_bytes(columns)
    if max(sizes) <= room:
        return columns
    keep = [index for index, size in enumerate(sizes) if size <= room]
    dead = [(columns.records[index], columns.keys[index], oversized_reason(len(columns.records[index]), size, room))
            for index, size in enumerate(sizes) if size > room]
    return Columns(*take(columns, keep), dead=[*columns.dead, *dead])


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


def _nested(path: list[str], leaf: Any, meta_names: dict[str, str] | None = None) -> Any:
    """A Struct type that reaches ``leaf`` through the dotted records path (or ``leaf`` itself).
    With ``meta_names``, the outermost level also picks up the paging fields."""
    for depth, name in enumerate(reversed(path)):
        outermost = depth == len(path) - 1
        fields: list[Any] = [("inner", leaf)]
        rename = {"inner": name}
        if outermost and meta_names:
            fields += [(field, Any, None) for field in meta_names]
            rename.update(meta_names)
        leaf = msgspec.defstruct(f"Envelope{depth}", fields, rename=rename)
    return leaf


def _dig(value: Any, path: list[str]) -> Any:
    for _ in path:
        value = value.inner
    return value


def _key_text(field: Any) -> str:
    if field is None or field.key is None:
        return ""
    return field.key if isinstance(field.key, str) else msgspec.json.encode(field.key).decode()
