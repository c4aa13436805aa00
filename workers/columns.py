"""A page's records as columns: each record's key, updated instant, delete flag, content hash and bytes,
checked and shaped as its source says; the records that fail go aside with their reason.

Runs in fetcher processes for every page and in the control process for every webhook. The usual page
is all good: then each column is one C-level map over the page, Python parses each distinct timestamp
once, and only a shaped source edits records one by one. A page with a bad record takes the slow path,
which sorts the records one by one and says what is wrong with each.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from itertools import repeat
from operator import mul, or_
from typing import Annotated, Any

import msgspec
from msgspec import Raw
from xxhash import xxh3_64_hexdigest, xxh3_64_intdigest

from conflux.workers.shaping import SourceShape, composite_key, is_deleted

_stamps_encoder = msgspec.json.Encoder()
_aware_stamps_decoder = msgspec.json.Decoder(list[Annotated[datetime, msgspec.Meta(tz=True)]])


class Undecodable(msgspec.Struct, gc=False):
    """In place of a record's identity fields when msgspec cannot decode the record: its key and
    updated value when they could be read on their own (for the dead letter), and why it is refused."""

    key: Any = None
    updated: Any = None
    reason: str = ""


class Columns(msgspec.Struct, gc=False):
    """The valid records of a page in the record columns (``ipc.messages.RECORD_COLUMNS``), plus what
    was wrong with the others, and the upstream's own text of each updated value when it differs from
    what the sink gets (epoch numbers): the watermark and keyset paging speak the upstream's language."""

    keys: list[str]
    updated: list[str]
    updated_us: list[int]
    hashes: list[str]
    key_hashes: list[int]
    records: list[Raw]
    deleted: list[bool]               # [] when no record is a delete
    dead: list[tuple[Raw, str, str]]  # (record, key or "", reason)
    native: list[str] = []            # [] when it is `updated`

    def __len__(self) -> int:
        return len(self.keys)

    def native_text(self, index: int) -> str:
        return (self.native or self.updated)[index]

    def max_updated(self) -> tuple[int, str]:
        """The newest instant in these records and the upstream's text of it; (0, "") if there are none."""
        if not self.updated_us:
            return 0, ""
        best = max(range(len(self.updated_us)), key=self.updated_us.__getitem__)
        return self.updated_us[best], self.native_text(best)


def build_columns(shape: SourceShape, records: Sequence[Raw], fields: Sequence[Any], latest_us: int) -> Columns:
    """``records`` and their decoded identity ``fields`` (None: not an object; Undecodable: too deep)
    as columns; a record stamped after ``latest_us`` (the clock plus the allowed skew) is refused."""
    return _fast(shape, records, fields, latest_us) or _one_by_one(shape, records, fields, latest_us)


def _fast(shape: SourceShape, records: Sequence[Raw], fields: Sequence[Any], latest_us: int) -> Columns | None:
    """Every column in C-level maps, or None as soon as any record needs a closer look."""
    identity = shape.identity
    if not fields or not set(map(type, fields)) <= {identity.struct}:
        return None
    try:
        parts = [identity.column(fields, name) for name in shape.key_columns]
        stamps = identity.column(fields, "updated")
        markers = identity.optional_column(fields, "deleted") if shape.deleted_name else None
        filtered = identity.optional_column(fields, "filter") if shape.filter is not None else None
    except AttributeError:  # an object on the key's or updated's path is missing in some record
        return None
    keys = _keys(parts)
    times = _times(shape, stamps) if keys is not None else None
    if times is None or max(times[1]) > latest_us:
        return None
    if shape.reshaper is not None:
        shaped = list(map(shape.reshaper.reshape, records))
        if any(record is None for record, _why in shaped):
            return None
        records = [record for record, _why in shaped]
    texts, instants, native = times
    records = list(records)
    return Columns(keys, texts, instants, list(map(xxh3_64_hexdigest, records)), key_hashes(keys), records,
                   _deleted(shape, markers, filtered), [], native)


def _keys(parts: list[list[Any]]) -> list[str] | None:
    """The record keys from their parts: strings or integers, never "" (bools are not keys)."""
    for part in parts:
        if not set(map(type, part)) <= {str, int} or "" in part:
            return None
    if len(parts) > 1:
        return list(map(composite_key, zip(*parts)))
    keys = parts[0]
    return keys if type(keys[0]) is str and set(map(type, keys)) == {str} else list(map(str, keys))


def _times(shape: SourceShape, stamps: list[Any]) -> tuple[list[str], list[int], list[str]] | None:
    """(sink text, microseconds, upstream text or []) of every stamp, each distinct one parsed once."""
    if shape.timestamps.unit_us:
        if not set(map(type, stamps)) <= {int, float}:
            return None
        try:
            parsed = {stamp: shape.timestamps.parse_one(stamp) for stamp in set(stamps)}
        except (ValueError, OverflowError):
            return None
        pairs = list(map(parsed.__getitem__, stamps))
        return [text for _us, text in pairs], [us for us, _text in pairs], list(map(str, stamps))
    if set(map(type, stamps)) != {str}:
        return None
    parsed_us = _parse_stamps(stamps)
    if parsed_us is None:
        return None
    return stamps, list(map(parsed_us.__getitem__, stamps)), []


def _parse_stamps(stamps: list[str]) -> dict[str, int] | None:
    """Each distinct ISO 8601 stamp parsed once, all in C: msgspec reads RFC 3339 with an offset. None if
    any is not that (no offset, another ISO 8601 form, or garbage): the slow path sorts them out."""
    unique = list(set(stamps))
    try:
        moments = _aware_stamps_decoder.decode(_stamps_encoder.encode(unique))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return dict(zip(unique, map(round, map(mul, map(datetime.timestamp, moments), repeat(1e6)))))


def _deleted(shape: SourceShape, markers: list[Any] | None, filtered: list[Any] | None) -> list[bool]:
    """Which records are deletes: a set delete marker, or a value the filter keeps out. [] if none."""
    flags = list(map(is_deleted, markers)) if markers is not None else None
    if filtered is not None:
        outside = [not passes for passes in map(shape.filter.passes, filtered)]
        flags = outside if flags is None else list(map(or_, flags, outside))
    return flags if flags and any(flags) else []


def key_hashes(keys: list[str]) -> list[int]:
    return list(map(xxh3_64_intdigest, map(str.encode, keys)))


# -- the slow path ---------------------------------------------------------------------------------------


def _one_by_one(shape: SourceShape, records: Sequence[Raw], fields: Sequence[Any], latest_us: int) -> Columns:
    out = Columns([], [], [], [], [], [], [], [], [])
    deleted: list[bool] = []
    for record, field in zip(records, fields, strict=True):
        row, problem = _row(shape, record, field, latest_us)
        if problem:
            out.dead.append((record, key_text(shape, field), problem))
            continue
        key, text, instant, native, shaped, is_delete = row
        out.keys.append(key)
        out.updated.append(text)
        out.updated_us.append(instant)
        out.native.append(native)
        out.records.append(shaped)
        deleted.append(is_delete)
    out.hashes = list(map(xxh3_64_hexdigest, out.records))
    out.key_hashes = key_hashes(out.keys)
    out.deleted = deleted if any(deleted) else []
    if not shape.timestamps.unit_us:
        out.native = []
    return out


def _row(shape: SourceShape, record: Raw, field: Any, latest_us: int) -> tuple[tuple, str]:
    """One record's (key, sink text, instant, upstream text, shaped record, is a delete), or why not."""
    if field is None:
        return (), "record is not a JSON object"
    if type(field) is Undecodable:
        return (), field.reason
    key, problem = _key_of(shape, field)
    if problem:
        return (), problem
    instant, text, native, problem = _instant_of(shape, field, latest_us)
    if problem:
        return (), problem
    if shape.reshaper is not None:
        record, problem = shape.reshaper.reshape(record)
        if problem:
            return (), problem
    marker = shape.identity.value(field, "deleted")[1] if shape.deleted_name else None
    outside = shape.filter is not None and not shape.filter.passes(shape.identity.value(field, "filter")[1])
    return (key, text, instant, native, record, is_deleted(marker) or outside), ""


def _key_of(shape: SourceShape, field: Any) -> tuple[str, str]:
    parts = []
    for name, column in zip(shape.key_names, shape.key_columns, strict=True):
        found, value = shape.identity.value(field, column)
        if not found or value is None:
            return "", f"missing key field {name!r}"
        if type(value) not in (str, int) or value == "":
            return "", f"key field {name!r} must be a non-empty string or an integer, got {value!r}"
        parts.append(value)
    return (composite_key(parts) if len(parts) > 1 else str(parts[0])), ""


def _instant_of(shape: SourceShape, field: Any, latest_us: int) -> tuple[int, str, str, str]:
    """(microseconds, sink text, upstream text, "") of the record's updated value, or (0, "", "", why not)."""
    name, timestamps = shape.updated_name, shape.timestamps
    found, value = shape.identity.value(field, "updated")
    if not found or value is None:
        return 0, "", "", f"missing updated field {name!r}"
    problem = timestamps.problem(value)
    if problem:
        return 0, "", "", f"{name!r} {problem}"
    instant, text = timestamps.parse_one(value)
    if instant > latest_us:
        return 0, "", "", (f"{name!r} is {value!r}, more than max_clock_skew_s = {shape.max_clock_skew_s:g} s "
                           "in the future")
    return instant, text, str(value) if timestamps.unit_us else text, ""


def key_text(shape: SourceShape, field: Any) -> str:
    """What a dead letter says of its record's key, as well as it can be read."""
    if field is None:
        return ""
    if type(field) is Undecodable:
        value = field.key
    else:
        parts = [shape.identity.value(field, column)[1] for column in shape.key_columns]
        if any(part is None for part in parts):
            return ""
        value = composite_key(parts) if len(parts) > 1 else parts[0]
    if value is None:
        return ""
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()
