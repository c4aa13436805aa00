"""The demo upstream's collections: records kept in (updated_at, key) order as pre-encoded JSON.

Owned by the upstream process's event loop (one thread, so no locks). Each record is encoded once
when it is generated or changed; serving a page only slices the order and joins bytes. An entry of
the order is ``(sort_us, key, json)``: tuples compare on (sort_us, key) because keys are unique, and
the JSON rides along so a page needs no second lookup.

Malformed records (no key field, a garbled ``updated_at``, and the hostile ones: nested too deep, or
stamped in 2999) sort by the hidden time they were generated with, are served like the others, never
count in the checksum and are read-only.

Deletes are versions too: a delete stamps the record ``"deleted": true`` with a new ``updated_at``. A
soft-deleted record stays in the order (every listing serves it, as the newest change); a hard-deleted
one leaves the order and the key index, and only its last JSON is kept aside so that a later PUT can
restore it. The checksum covers live valid records only. A PUT of a deleted key, or a POST that names
a hard-deleted key, brings the record back (without the ``deleted`` flag) as a new version.

The JSON's shape is the collection's ``RecordLayout`` (demo/record_layout.py): the store edits records
as flat dicts and the layout puts the key, updated_at and deleted where they are served (top level, or
a ``meta`` object) and writes updated_at as ISO 8601 text or an epoch number.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping

from sortedcontainers import SortedList

from conflux.demo.checksum import Checksum, canonical_digest, record_digest
from conflux.demo.datagen import (
    NO_HOSTILE_RECORDS,
    CollectionSpec,
    Generated,
    HostileRecords,
    Key,
    collection_plan,
    generate,
)
from conflux.demo.record_layout import META, RecordLayout
from conflux.demo.upstream_time import truncate_us


class StoreError(Exception):
    """A change the store refuses; ``status`` is the HTTP status the API answers with."""

    status = 400


class UnknownKey(StoreError):
    status = 404


class KeyConflict(StoreError):
    status = 409


class ReadOnlyRecord(StoreError):
    status = 409


class AlreadyDeleted(StoreError):
    """A delete of a key that is deleted already (410 Gone); a soft-deleted record may still be purged."""

    status = 410


DELETED_FIELD = "deleted"


class Collection:
    """One collection: the ordered records, a key index, the running checksum of the live valid ones."""

    def __init__(self, spec: CollectionSpec, generated: Generated, *, precision: str,
                 layout: RecordLayout | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.precision = precision
        self.layout = layout or RecordLayout(precision=precision)  # must be the one ``generated`` was made with
        self._order = SortedList(generated.items)
        self._by_key = {item[1]: item for item in generated.items}
        self._malformed = generated.malformed
        self._soft_deleted: set[Key] = set()
        self._hard_deleted: dict[Key, bytes] = {}  # key -> its last JSON, for a restore by PUT
        self._key_width = generated.key_width
        self._next_index = len(generated.items) + 1
        self._max_us = generated.items[-1][0] if generated.items else 0
        self.version = 0   # counts changes: views cut from the order are rebuilt when it moves
        self.checksum = Checksum()
        for _sort_us, key, data in generated.items:
            if key not in self._malformed:
                self.checksum.add(record_digest(str(key), data))

    def __len__(self) -> int:
        """How many records the listings serve (soft-deleted ones included, hard-deleted ones not)."""
        return len(self._order)

    def counts(self) -> dict[str, int]:
        """What ``GET /stats`` shows per collection: ``valid`` counts the live valid records (the checksum's)."""
        soft, hard = len(self._soft_deleted), len(self._hard_deleted)
        return {"records": len(self._order), "valid": self.checksum.count, "malformed": len(self._malformed),
                "live": len(self._order) - soft, "deleted": soft + hard, "soft_deleted": soft, "hard_deleted": hard}

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

    def lookup(self, key: Key) -> bytes:
        """The JSON of a listed record (a soft-deleted one carries ``"deleted": true``); UnknownKey for
        a key never created or hard-deleted."""
        entry = self._by_key.get(key)
        if entry is None:
            raise UnknownKey(f"key: no record {key!r} in {self.name}")
        return entry[2]

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

    def is_live(self, key: Key) -> bool:
        """Whether ``key`` is a valid record that is not deleted: what changes and deletes may pick."""
        return key in self._by_key and key not in self._soft_deleted and key not in self._malformed

    def live_records(self) -> Iterator[tuple[Key, bytes]]:
        """(key, json) of each live valid record: the ones the checksum covers."""
        for _sort_us, key, data in self._order:
            if key not in self._soft_deleted and key not in self._malformed:
                yield key, data

    def canonical_checksum(self) -> Checksum:
        """The checksum over the live valid records as canonical JSON (computed now, not kept)."""
        checksum = Checksum()
        for key, data in self.live_records():
            checksum.add(canonical_digest(str(key), data))
        return checksum

    def malformed(self) -> Iterator[tuple[Key, str, bytes]]:
        """(key, reason, json) of each malformed record, in key order."""
        for key in sorted(self._malformed):
            yield key, self._malformed[key], self._by_key[key][2]

    def random_live_key(self, rng: random.Random) -> Key | None:
        """A uniformly chosen key of a live valid record, or None if there is none."""
        for _attempt in range(20):
            if not self._order:
                return None
            key = self._order[rng.randrange(len(self._order))][1]
            if self.is_live(key):
                return key
        # Mostly deleted or malformed: walk on from a random place rather than give up on the last ones.
        start = rng.randrange(len(self._order))
        for index in (*range(start, len(self._order)), *range(start)):
            key = self._order[index][1]
            if self.is_live(key):
                return key
        return None

    # -- changing -----------------------------------------------------------------------------

    def create(self, fields: Mapping[str, object], now_us: int) -> bytes:
        """Add a record; its key comes from ``fields`` (a hard-deleted key is created anew) or is the
        next free one. Returns its JSON."""
        self._refuse_reserved_fields(fields)
        key_field = self.spec.key_field
        if key_field in fields:
            key = fields[key_field]
            if not self.is_key(key):
                raise StoreError(f"{key_field}: must be a {self._key_type_name()}")
            if key in self._by_key:
                raise KeyConflict(f"{key_field}: {key!r} already exists")
            self._hard_deleted.pop(key, None)
        else:
            key = self._next_free_key()
        record = {key_field: key, **{k: v for k, v in fields.items() if k != key_field}}
        return self._put(key, record, now_us)

    def update(self, key: Key, fields: Mapping[str, object], now_us: int) -> bytes:
        """Merge ``fields`` into the record, stamp it and move it to the end; a deleted record is
        restored. Returns its JSON."""
        self._refuse_reserved_fields(fields)
        current = self._by_key.get(key)
        current_data = current[2] if current is not None else self._hard_deleted.get(key)
        if current_data is None:
            raise UnknownKey(f"key: no record {key!r} in {self.name}")
        if key in self._malformed:
            raise ReadOnlyRecord(f"key: {key!r} is a malformed fixture record and read-only")
        key_field = self.spec.key_field
        if key_field in fields and fields[key_field] != key:
            raise StoreError(f"{key_field}: the key of a record cannot change")
        record = self.layout.read(current_data, key_field)
        record.pop(DELETED_FIELD, None)
        record.update(fields)
        self._hard_deleted.pop(key, None)
        return self._put(key, record, now_us)

    def delete(self, key: Key, now_us: int, *, hard: bool) -> bytes:
        """Stamp the record ``"deleted": true``; soft keeps it listed, hard takes it out of every
        listing (a soft-deleted record may be purged so). Returns the deleted record's JSON."""
        current = self._by_key.get(key)
        if key in self._hard_deleted or (current is not None and key in self._soft_deleted and not hard):
            raise AlreadyDeleted(f"key: {key!r} in {self.name} is deleted already")
        if current is None:
            raise UnknownKey(f"key: no record {key!r} in {self.name}")
        if key in self._malformed:
            raise ReadOnlyRecord(f"key: {key!r} is a malformed fixture record and read-only")
        record = self.layout.read(current[2], self.spec.key_field)
        record[DELETED_FIELD] = True
        data = self._put(key, record, now_us, live=False)
        if hard:
            self.version += 1
            self._order.remove(self._by_key.pop(key))
            self._soft_deleted.discard(key)
            self._hard_deleted[key] = data
        return data

    def _put(self, key: Key, record: dict[str, object], now_us: int, *, live: bool = True) -> bytes:
        """Stamp ``record`` as the newest version of ``key``, place it last and keep the checksum (which
        holds the live valid records only) and the soft-deleted set up to date."""
        stamp_us = max(truncate_us(now_us, self.precision), self._max_us)  # never before an earlier change
        self._max_us = stamp_us
        self.version += 1
        record["updated_at"] = self.layout.stamp(stamp_us)
        data = self.layout.write(record, self.spec.key_field)
        old = self._by_key.get(key)
        if old is not None:
            self._order.remove(old)
            if key not in self._soft_deleted:
                self.checksum.remove(record_digest(str(key), old[2]))
        if live:
            self.checksum.add(record_digest(str(key), data))
            self._soft_deleted.discard(key)
        else:
            self._soft_deleted.add(key)
        entry = (stamp_us, key, data)
        self._order.add(entry)
        self._by_key[key] = entry
        return data

    def _next_free_key(self) -> Key:
        key = self.spec.format_key(self._next_index, self._key_width)
        # A client may have created this key explicitly; a deleted key is never handed out again.
        while key in self._by_key or key in self._hard_deleted:
            self._next_index += 1
            key = self.spec.format_key(self._next_index, self._key_width)
        self._next_index += 1
        return key

    def _refuse_reserved_fields(self, fields: Mapping[str, object]) -> None:
        if DELETED_FIELD in fields:
            raise StoreError(f"{DELETED_FIELD}: set by DELETE /api/{{c}}/{{key}}; a PUT restores a deleted record")
        if self.layout.nested and META in fields:
            raise StoreError(f"{META}: set by the upstream in the nested layout (the key and updated_at live there)")

    def _key_type_name(self) -> str:
        return "integer" if self.spec.key_prefix is None else "non-empty string"




def build_collections(*, seed: int, precision: str, malformed_rate: float, customers: int, products: int,
                      systems: int, records_per_system: int,
                      hostile: HostileRecords = NO_HOSTILE_RECORDS,
                      layout: RecordLayout | None = None) -> dict[str, Collection]:
    """Generate every collection the upstream serves; called once, before the server starts."""
    layout = layout or RecordLayout(precision=precision)
    plan = collection_plan(customers=customers, products=products, systems=systems,
                           records_per_system=records_per_system)
    collections = {}
    for spec, count in plan:
        generated = generate(spec, count, seed=seed, precision=precision, malformed_rate=malformed_rate,
                             hostile=hostile, layout=layout)
        collections[spec.name] = Collection(spec, generated, precision=precision, layout=layout)
    return collections
