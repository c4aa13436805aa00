"""Per-source record shaping: where a record's identity is (nested and composite keys, epoch timestamps,
a delete marker, a filter field) and what of it reaches the sink (select, drop, rename).

Built once per source, used in fetcher processes for every page and in the control process for every
webhook. Identity fields are decoded by msgspec into a nested Struct made for the source's paths, so a
page's identities come out of one C-level decode; extracting them is one ``attrgetter`` per field.
Reshaping decodes each record's top level into ``dict[str, Raw]`` (values stay bytes), edits the dict
and encodes it again: only sources that configure ``[sources.fields]`` pay for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

import msgspec
from msgspec import Raw

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_UNITS_US = {"epoch_s": 1_000_000, "epoch_ms": 1_000, "epoch_us": 1}
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


def split_path(path: str) -> tuple[str, ...]:
    """'attributes.sku' -> ('attributes', 'sku'). Empty segments are a config error, checked there."""
    return tuple(path.split("."))


def composite_key(values: Sequence[str | int]) -> str:
    """The parts joined by '|', each '|' and '\\' inside a part escaped with '\\', so distinct tuples
    never give the same key: ('a|b', 'c') is 'a\\|b|c' and ('a', 'b|c') is 'a|b\\|c'."""
    return "|".join(str(value).replace("\\", "\\\\").replace("|", "\\|") for value in values)


def is_deleted(value: Any) -> bool:
    """A delete marker is set when it is true or any other non-null value (a deleted_at timestamp);
    false, null, "" and a missing field mean the record is live."""
    return value is not None and value is not False and value != ""


class Identity:
    """Decodes the fields that identify a record, wherever they are: ``leaves`` maps a name of ours
    ("key0", "updated", "deleted", "filter") to a dotted path in the record."""

    def __init__(self, leaves: dict[str, tuple[str, ...]]) -> None:
        self.leaves = leaves
        tree: dict[str, Any] = {}
        for name, path in leaves.items():
            node = tree
            for part in path[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"path {'.'.join(path)!r} runs through another field's value")
            if isinstance(node.get(path[-1]), dict):
                raise ValueError(f"path {'.'.join(path)!r} is an object on another field's path")
            node.setdefault(path[-1], []).append(name)  # one field may serve twice (a filter on the key)
        self.struct, python_names = _struct_for(tree, "Identity")
        self.getters = {name: attrgetter(".".join(python_names[name])) for name in leaves}
        self.page_decoder = msgspec.json.Decoder(list[self.struct])
        self.one_decoder = msgspec.json.Decoder(self.struct)

    def column(self, decoded: Sequence[Any], name: str) -> list[Any]:
        """One field of every decoded record; AttributeError if an object on the path is missing."""
        return list(map(self.getters[name], decoded))

    def optional_column(self, decoded: Sequence[Any], name: str) -> list[Any]:
        """Like ``column``, but None where an object on the path is missing: a delete marker or filter field
        inside an object that live records leave out (``deletion.at`` without ``deletion``) is simply unset."""
        try:
            return self.column(decoded, name)
        except AttributeError:
            return [self.value(record, name)[1] for record in decoded]

    def value(self, decoded: Any, name: str) -> tuple[bool, Any]:
        """(found, value) of one field of one record: not found when an object on its path is missing."""
        try:
            return True, self.getters[name](decoded)
        except AttributeError:
            return False, None


def _struct_for(tree: dict[str, Any], name: str, prefix: tuple[str, ...] = ()) -> tuple[type, dict[str, tuple]]:
    """A Struct type that decodes exactly the paths in ``tree`` (every field optional), and for each leaf
    name the Python attribute path to read it. Field names in the record may be anything, so the
    Struct's own names are f0, f1, ... renamed to the record's."""
    fields: list[tuple[str, Any, Any]] = []
    rename: dict[str, str] = {}
    python_names: dict[str, tuple] = {}
    for index, (record_name, child) in enumerate(sorted(tree.items())):
        attribute = f"f{index}"
        rename[attribute] = record_name
        if isinstance(child, dict):
            inner, inner_names = _struct_for(child, f"{name}_{index}", (*prefix, attribute))
            fields.append((attribute, inner | None, None))
            python_names.update(inner_names)
        else:
            fields.append((attribute, Any, None))
            python_names.update(dict.fromkeys(child, (*prefix, attribute)))
    return msgspec.defstruct(name, fields, rename=rename, gc=False), python_names


class SourceShape:
    """Everything shaping needs of one source, built once from its config: the identity paths (a key
    of one or more fields, updated, the delete marker, the filter field), the timestamp format, the
    filter and the reshaper (None when the source keeps records as they are)."""

    def __init__(self, source: Any, *, extra: dict[str, str] | None = None) -> None:
        """``extra``: more fields to decode with the identity, name -> dotted path (read with ``identity.value``)."""
        self.key_names = source.key_paths
        self.updated_name = source.updated
        self.max_clock_skew_s = source.max_clock_skew_s
        self.deleted_name = source.deleted
        leaves = {f"key{index}": split_path(path) for index, path in enumerate(self.key_names)}
        leaves["updated"] = split_path(source.updated)
        if source.deleted:
            leaves["deleted"] = split_path(source.deleted)
        if source.filter is not None:
            leaves["filter"] = split_path(source.filter.field)
        leaves.update({name: split_path(path) for name, path in (extra or {}).items()})
        self.identity = Identity(leaves)
        self.key_columns = [f"key{index}" for index in range(len(self.key_names))]
        self.timestamps = Timestamps(source.updated_format)
        self.filter = None if source.filter is None else RecordFilter(
            source.filter.in_ if source.filter.in_ is not None else source.filter.not_in,
            keep_listed=source.filter.in_ is not None)
        fields = source.fields
        self.reshaper = Reshaper(select=fields.select, drop=fields.drop, rename=fields.rename) \
            if source.shaped else None

    @property
    def deletes(self) -> bool:
        """Whether any record of this source can be a delete."""
        return bool(self.deleted_name) or self.filter is not None


class Timestamps:
    """Turns a page's updated values into (microseconds since the epoch, the text the sink gets), each
    distinct value parsed once. ISO 8601 text is forwarded as the upstream wrote it; an epoch number
    becomes ISO 8601 UTC (the record's own field keeps the number)."""

    def __init__(self, updated_format: str) -> None:
        self.format = updated_format
        self.unit_us = EPOCH_UNITS_US.get(updated_format, 0)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` cannot be this source's timestamp, or None."""
        if self.unit_us:
            if type(value) not in (int, float):
                return f"must be a number ({self.format}), got {_short(value)}"
            try:
                self.parse_one(value)
            except (ValueError, OverflowError):
                return f"is not a usable {self.format} timestamp: {_short(value)}"
            return None
        if type(value) is not str:
            return f"must be an ISO 8601 string, got {_short(value)}"
        try:
            self.parse_one(value)
        except (ValueError, OverflowError):
            return f"is not an ISO 8601 timestamp: {_short(value)}"
        return None

    def parse_one(self, value: Any) -> tuple[int, str]:
        """(microseconds, sink text) of one value; ValueError or OverflowError if it is not one."""
        if self.unit_us:
            instant_us = round(value * self.unit_us)
            return instant_us, iso_utc(instant_us)
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return round(moment.timestamp() * 1_000_000), value


def iso_utc(instant_us: int) -> str:
    """Microseconds since the epoch as ISO 8601 UTC ('2024-05-01T12:00:00Z', with a fraction only
    when there is one); OverflowError outside years 1-9999."""
    moment = EPOCH + timedelta(microseconds=instant_us)
    return moment.isoformat().replace("+00:00", "Z")


class RecordFilter:
    """``{ field = "status", in = [...] }`` or ``not_in``: which records the sink may hold. JSON types
    count: true is not 1, and "1" is not 1."""

    def __init__(self, values: Sequence[Any], *, keep_listed: bool) -> None:
        self.values = {_typed(value) for value in values}
        self.keep_listed = keep_listed

    def passes(self, value: Any) -> bool:
        listed = _hashable(value) and _typed(value) in self.values
        return listed if self.keep_listed else not listed


def _typed(value: Any) -> tuple[type, Any]:
    return type(value), value


def _hashable(value: Any) -> bool:
    return type(value) in (str, int, float, bool) or value is None


class Reshaper:
    """select / drop / rename of a record's top-level fields. The values are never parsed: each stays
    the bytes the upstream sent.

    With ``select`` the fields kept are known, so a record decodes into a Struct of exactly those fields
    (the others are skipped in C) and encodes from a twin Struct that carries the new names: about a
    quarter of the cost of a ``dict[str, Raw]`` round trip. Without it (drop, rename) the record goes
    through a dict, since any other field must stay."""

    _decoder = msgspec.json.Decoder(dict[str, Raw])
    _encoder = msgspec.json.Encoder()

    def __init__(self, *, select: Sequence[str] = (), drop: Sequence[str] = (),
                 rename: dict[str, str] | None = None) -> None:
        self.drop = frozenset(drop)
        self.select = tuple(name for name in dict.fromkeys(select) if name not in self.drop)
        self.rename = dict(rename or {})
        self._selected: tuple[msgspec.json.Decoder, type] | None = _selection_structs(self.select, self.rename) \
            if self.select else None

    def reshape(self, record: Raw) -> tuple[Raw | None, str]:
        """(the shaped record, "") or (None, why it cannot be shaped)."""
        if self._selected is not None:
            return self._reshape_selected(record)
        try:
            fields = self._decoder.decode(record)
        except _DECODE_ERRORS as exc:
            return None, f"record is not a JSON object: {exc}"
        for name in self.drop.intersection(fields):
            del fields[name]
        if self.rename:
            clash = next((new for old, new in self.rename.items()
                          if old in fields and new in fields and new not in self.rename), None)
            if clash is not None:
                return None, f"rename onto {clash!r}, which the record already has"
            fields = {self.rename.get(name, name): value for name, value in fields.items()}
        return Raw(self._encoder.encode(fields)), ""

    def _reshape_selected(self, record: Raw) -> tuple[Raw | None, str]:
        """Only the selected fields, in the order selected, renamed; a field the record lacks is left out.
        No rename can clash here: every other field is gone, and the config refuses a rename onto a
        selected field."""
        decoder, renamed = self._selected
        try:
            selected = decoder.decode(record)
        except _DECODE_ERRORS as exc:
            return None, f"record is not a JSON object: {exc}"
        return Raw(self._encoder.encode(renamed(*_astuple(selected)))), ""


_astuple = msgspec.structs.astuple


def _selection_structs(select: Sequence[str], rename: dict[str, str]) -> tuple[msgspec.json.Decoder, type]:
    """A decoder of the selected fields (each the bytes sent, or UNSET when absent, which encoding leaves
    out) and the Struct with the same fields under their new names."""
    fields = [(f"f{index}", Raw | msgspec.UnsetType, msgspec.UNSET) for index in range(len(select))]
    selected = msgspec.defstruct("Selected", fields, rename={f"f{i}": name for i, name in enumerate(select)},
                                 gc=False)
    renamed = msgspec.defstruct("Renamed", fields,
                                rename={f"f{i}": rename.get(name, name) for i, name in enumerate(select)}, gc=False)
    return msgspec.json.Decoder(selected), renamed


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
