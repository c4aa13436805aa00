"""How the demo upstream writes its records: where the key, ``updated_at`` and ``deleted`` sit, and what
``updated_at`` is.

Used by the upstream process when it generates, changes and deletes records, and when it reads
``updated_since``. The store works on flat records (``{key_field, ...fields, updated_at[, deleted]}``);
the layout turns them into the served JSON and back:

- ``flat`` (the default): as they are, ``{"id": 7, "name": ..., "updated_at": ...}``;
- ``nested``: key, updated_at and deleted move into a ``meta`` object,
  ``{"meta": {"id": 7, "updated_at": ...}, "name": ...}``: a source reads them as ``meta.id`` etc.

``updated_at`` is ISO 8601 UTC text (``iso8601``, the default) or an integer number of seconds,
milliseconds or microseconds since the epoch (``epoch_s``, ``epoch_ms``, ``epoch_us``). With an epoch
format ``updated_since`` may be such a number too (Conflux sends its watermark back as the upstream
wrote it), or ISO 8601 text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from conflux.demo.upstream_time import PRECISION_UNIT_US, format_us

TIMESTAMP_FORMATS = ("iso8601", "epoch_s", "epoch_ms", "epoch_us")
EPOCH_UNIT_US = {"epoch_s": 1_000_000, "epoch_ms": 1_000, "epoch_us": 1}
LAYOUTS = ("flat", "nested")
META = "meta"
UPDATED = "updated_at"
DELETED = "deleted"

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(dict).decode


@dataclass(frozen=True)
class RecordLayout:
    """The shape of served records; ``precision`` is how finely the upstream stamps its changes."""

    precision: str = "s"
    timestamp_format: str = "iso8601"
    nested: bool = False

    def __post_init__(self) -> None:
        problem = layout_problem(self.precision, self.timestamp_format)
        if problem:
            raise ValueError(problem)

    @property
    def epoch_unit_us(self) -> int:
        """Microseconds per unit of an epoch format; 0 for ISO 8601."""
        return EPOCH_UNIT_US.get(self.timestamp_format, 0)

    def stamp(self, us: int) -> str | int:
        """The ``updated_at`` value of an instant (already truncated to the precision)."""
        unit_us = self.epoch_unit_us
        return us // unit_us if unit_us else format_us(us, self.precision)

    def iso_since(self, query: Mapping[str, str]) -> Mapping[str, str]:
        """The query with an ``updated_since`` given as an epoch number in this layout's unit (as the records
        carry it) rewritten as the ISO 8601 text the paging styles read; anything else as it is."""
        text = query.get("updated_since")
        unit_us = self.epoch_unit_us
        if text is None or not unit_us or not text.strip().lstrip("-").isdigit():
            return query
        return {**query, "updated_since": format_us(int(text) * unit_us, "us")}

    def row_fields(self, key_field: str, columns: list[str]) -> list[str]:
        """The field names of a generated row type, in the order ``rows`` fills them."""
        return [META, *columns] if self.nested else [key_field, *columns, UPDATED]

    def rows(self, key_field: str, columns: dict[str, list], keys: list, stamps: list) -> Any:
        """An iterable of rows to encode: one msgspec Struct per record (twice as fast as dicts)."""
        row_type = msgspec.defstruct("row", self.row_fields(key_field, list(columns)), gc=False)
        if not self.nested:
            return map(row_type, keys, *columns.values(), stamps)
        meta_type = msgspec.defstruct("meta", [key_field, UPDATED], gc=False)
        return map(row_type, map(meta_type, keys, stamps), *columns.values())

    def read(self, data: bytes, key_field: str) -> dict[str, Any]:
        """A served record as a flat dict (key first, then the fields, updated_at and deleted last)."""
        record = _decode(data)
        if not self.nested:
            return record
        meta = record.pop(META, None) or {}
        flat = {key_field: meta[key_field]} if key_field in meta else {}
        flat.update(record)
        for name in (UPDATED, DELETED):
            if name in meta:
                flat[name] = meta[name]
        return flat

    def write(self, record: dict[str, Any], key_field: str) -> bytes:
        """A flat record (as ``read`` gives) as the served JSON."""
        if not self.nested:
            return _encode(record)
        fields = dict(record)
        meta = {name: fields.pop(name) for name in (key_field, UPDATED, DELETED) if name in fields}
        return _encode({META: meta, **fields})


def layout_problem(precision: str, timestamp_format: str) -> str:
    """Why this precision and format cannot go together, or ""."""
    if precision not in PRECISION_UNIT_US:
        return f"timestamp precision: must be one of {', '.join(PRECISION_UNIT_US)}, got {precision!r}"
    if timestamp_format not in TIMESTAMP_FORMATS:
        return f"timestamp format: must be one of {', '.join(TIMESTAMP_FORMATS)}, got {timestamp_format!r}"
    unit_us = EPOCH_UNIT_US.get(timestamp_format, 0)
    if unit_us > PRECISION_UNIT_US[precision]:
        return (f"timestamp format {timestamp_format} cannot carry timestamp precision {precision} "
                "(an integer number of its unit would lose the fraction)")
    return ""
