"""The demo upstream's collections: records kept in (updated_at, key) order as pre-encoded JSON.

Owned by the upstream process's event loop (one thread, so no locks). Each record is encoded once
when it is generated or changed; serving a page only slices the order and joins bytes. An entry of
the order is ``(sort_us, key, json)``: tuples compare on (sort_us, key) because keys are unique, and
the JSON rides along so a page needs no second lookup.

Malformed records (no key field, a garbled ``updated_at``, and the hostile ones: nested too deep, or
stamped in 2999) sort by the hidden time they were generated with, are served like the others, never
count in the checksum and are read-only.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping

import msgspec
from sortedcontainers import SortedList

from conflux.demo.checksum import Checksum, record_digest
from conflux.demo.datagen import (
    NO_HOSTILE_RECORDS,
    CollectionSpec,
    Generated,
    HostileRecords,
    Key,
    collection_plan,
    generate,
)
from conflux.demo.upstream_time import format_us, truncate_us

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(dict).decode


class StoreError(Exception):
    """A change the store refuses; ``status`` is the HTTP status the API answers with."""

    status = 400


class UnknownKey(StoreError):
    status = 404


class KeyConflict(StoreError):
    status = 409


class ReadOnlyRecord(StoreError):
    status = 409


class Collection:
    """One collection: the ordered records, a key index, the running checksum of the valid ones."""

    def __init__(self, spec: CollectionSpec, generated: Generated, *, precision: str) -> None:
        self.spec = spec
        self.name = spec.name
        self.precision = precision
        self._order = SortedList(generated.items)
        self._by_key = {item[1]: item for item in generated.items}
        self._malformed = generated.malformed
        self._key_width = generated.key_width
        self._next_index = len(generated.items) + 1
        self._max_us = generated.items[-1][0] if generated.items else 0
        self.checksum = Checksum()
        for _sort_us, key, data in generated.items:
            if key not in self._malformed:
                self.checksum.add(record_digest(str(key), data))

    def __len__(self) -> int:
        return len(self._order)

    # -- reading ------------------------------------------------------------------------------

    def index_since(self, since_us: int | None) -> int:
        """Position of the first record with updated_at >= ``since_us`` (inclusive boundary)."""
        return 0 if since_us is None else self._order.bisect_left((since_us,))

    def index_after(self, sort_us: int, key: Key) -> int:
        """Position of the first record strictly after (sort_us, key), whether or not that record exists."""
        index = self._order.bisect_left((sort_us, key))
        if index < len(self._order) and self._order[index][:2] == (sort_us, key):
            index += 1
        return index

    def entries(self, start: int, stop: int) -> list[tuple[int, Key, bytes]]:
        return list(self._order.islice(start, stop))

    def parse_key(self, text: str) -> Key:
        """A key from a URL or query string, as its natural type. Raises ValueError."""
        if self.spec.key_prefix is None:
            return int(text)
        if not text:
            raise ValueError("empty key")
        return text

    def is_key(self, value: object) -> bool:
        """Whether a JSON value has this collection's key type (bools are not ints here)."""
        if self.spec.key_prefix is None:
            return type(value) is int
        return isinstance(value, str) and bool(value)

    def malformed(self) -> Iterator[tuple[Key, str, bytes]]:
        """(key, reason, json) of each malformed record, in key order."""
        for key in sorted(self._malformed):
            yield key, self._malformed[key], self._by_key[key][2]

    def random_valid_key(self, rng: random.Random) -> Key | None:
        """A uniformly chosen key of a valid record, or None if there seems to be none."""
        for _attempt in range(20):
            if not self._order:
                return None
            key = self._order[rng.randrange(len(self._order))][1]
            if key not in self._malformed:
                return key
        return None

    # -- changing -----------------------------------------------------------------------------

    def create(self, fields: Mapping[str, object], now_us: int) -> bytes:
        """Add a record; its key comes from ``fields`` or is the next free one. Returns its JSON."""
        key_field = self.spec.key_field
        if key_field in fields:
            key = fields[key_field]
            if not self.is_key(key):
                raise StoreError(f"{key_field}: must be a {self._key_type_name()}")
            if key in self._by_key:
                raise KeyConflict(f"{key_field}: {key!r} already exists")
        else:
            key = self._next_free_key()
        record = {key_field: key, **{k: v for k, v in fields.items() if k != key_field}}
        return self._put(key, record, now_us)

    def update(self, key: Key, fields: Mapping[str, object], now_us: int) -> bytes:
        """Merge ``fields`` into the record, stamp it and move it to the end. Returns its JSON."""
        current = self._by_key.get(key)
        if current is None:
            raise UnknownKey(f"key: no record {key!r} in {self.name}")
        if key in self._malformed:
            raise ReadOnlyRecord(f"key: {key!r} is a malformed fixture record and read-only")
        key_field = self.spec.key_field
        if key_field in fields and fields[key_field] != key:
            raise StoreError(f"{key_field}: the key of a record cannot change")
        record = _decode(current[2])
        record.update(fields)
        return self._put(key, record, now_us)

    def _put(self, key: Key, record: dict[str, object], now_us: int) -> bytes:
        stamp_us = max(truncate_us(now_us, self.precision), self._max_us)  # never before an earlier change
        self._max_us = stamp_us
        record["updated_at"] = format_us(stamp_us, self.precision)
        data = _encode(record)
        new_digest = record_digest(str(key), data)
        old = self._by_key.get(key)
        if old is None:
            self.checksum.add(new_digest)
        else:
            self._order.remove(old)
            self.checksum.replace(record_digest(str(key), old[2]), new_digest)
        entry = (stamp_us, key, data)
        self._order.add(entry)
        self._by_key[key] = entry
        return data

    def _next_free_key(self) -> Key:
        key = self.spec.format_key(self._next_index, self._key_width)
        while key in self._by_key:  # a client may have created this key explicitly
            self._next_index += 1
            key = self.spec.format_key(self._next_index, self._key_width)
        self._next_index += 1
        return key

    def _key_type_name(self) -> str:
        return "integer" if self.spec.key_prefix is None else "non-empty string"


def build_collections(*, seed: int, precision: str, malformed_rate: float, customers: int, products: int,
                      systems: int, records_per_system: int,
                      hostile: HostileRecords = NO_HOSTILE_RECORDS) -> dict[str, Collection]:
    """Generate every collection the upstream serves; called once, before the server starts."""
    plan = collection_plan(customers=customers, products=products, systems=systems,
                           records_per_system=records_per_system)
    collections = {}
    for spec, count in plan:
        generated = generate(spec, count, seed=seed, precision=precision, malformed_rate=malformed_rate,
                             hostile=hostile)
        collections[spec.name] = Collection(spec, generated, precision=precision)
    return collections
