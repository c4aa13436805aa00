"""The demo upstream's ordered collections (demo/store.py): changes, ordering and the checksum."""

from __future__ import annotations

import random

import msgspec
import pytest

from conflux.demo import datagen
from conflux.demo.checksum import Checksum, record_digest
from conflux.demo.store import Collection, KeyConflict, ReadOnlyRecord, StoreError, UnknownKey
from conflux.demo.upstream_time import parse_iso_us

NOW_US = parse_iso_us("2026-11-01T12:00:00.123456Z")


def make(spec=datagen.CUSTOMERS, count=200, *, malformed_rate=0.0, precision="s") -> Collection:
    generated = datagen.generate(spec, count, seed=1, precision=precision, malformed_rate=malformed_rate)
    return Collection(spec, generated, precision=precision)


def everything(collection: Collection) -> list[tuple[int, object, bytes]]:
    return collection.entries(0, len(collection))


def recomputed(collection: Collection) -> str:
    malformed = {key for key, _reason, _data in collection.malformed()}
    checksum = Checksum()
    for _us, key, data in everything(collection):
        if key not in malformed:
            checksum.add(record_digest(str(key), data))
    return checksum.hexdigest()


def test_update_merges_stamps_and_moves_to_the_end():
    collection = make()
    data = collection.update(17, {"tier": "gold", "note": "x"}, NOW_US)
    record = msgspec.json.decode(data)
    assert record == {**record, "id": 17, "tier": "gold", "note": "x", "updated_at": "2026-11-01T12:00:00Z"}
    assert everything(collection)[-1] == (parse_iso_us("2026-11-01T12:00:00Z"), 17, data)
    assert len(collection) == 200
    assert collection.checksum.hexdigest() == recomputed(collection)


def test_stamps_never_go_back_even_if_the_clock_does():
    collection = make()
    collection.update(1, {"tier": "gold"}, NOW_US)
    earlier = collection.update(2, {"tier": "gold"}, NOW_US - 3_600_000_000)
    assert msgspec.json.decode(earlier)["updated_at"] == "2026-11-01T12:00:00Z"
    assert [key for _us, key, _data in everything(collection)[-2:]] == [1, 2]


def test_create_assigns_the_next_key_or_takes_a_given_one():
    collection = make(datagen.PRODUCTS, 20)
    assert msgspec.json.decode(collection.create({"name": "A"}, NOW_US))["sku"] == "SKU-000021"
    collection.create({"sku": "SKU-000022", "name": "B"}, NOW_US)
    assert msgspec.json.decode(collection.create({"name": "C"}, NOW_US))["sku"] == "SKU-000023"
    assert collection.checksum.count == 23
    assert collection.checksum.hexdigest() == recomputed(collection)


@pytest.mark.parametrize(("action", "error"), [
    (lambda c: c.update(999, {}, NOW_US), UnknownKey),
    (lambda c: c.create({"id": 3}, NOW_US), KeyConflict),
    (lambda c: c.create({"id": "3"}, NOW_US), StoreError),
    (lambda c: c.create({"id": True}, NOW_US), StoreError),
    (lambda c: c.update(3, {"id": 4}, NOW_US), StoreError),
])
def test_refused_changes(action, error):
    collection = make(count=10)
    before = collection.checksum.hexdigest()
    with pytest.raises(error):
        action(collection)
    assert collection.checksum.hexdigest() == before


def test_malformed_records_are_excluded_read_only_and_never_picked_for_changes():
    collection = make(count=400, malformed_rate=0.1)
    malformed = {key for key, _reason, _data in collection.malformed()}
    assert len(malformed) == 40 and collection.checksum.count == 360
    assert collection.checksum.hexdigest() == recomputed(collection)
    with pytest.raises(ReadOnlyRecord):
        collection.update(next(iter(malformed)), {"tier": "gold"}, NOW_US)
    rng = random.Random(3)
    assert not {collection.random_live_key(rng) for _ in range(500)} & malformed


def test_index_since_is_inclusive_and_index_after_skips_the_position():
    collection = make(count=500)
    items = everything(collection)
    middle_us, middle_key, _data = items[250]
    first_at_time = next(i for i, item in enumerate(items) if item[0] == middle_us)
    assert collection.index_since(middle_us) == first_at_time
    assert collection.index_since(None) == 0
    assert collection.index_after(middle_us, middle_key) == 251
    collection.update(middle_key, {"tier": "gold"}, NOW_US)  # the position stays valid after a move
    assert collection.entries(collection.index_after(middle_us, middle_key), 500)[0] == items[251]


def test_keys_parse_as_their_natural_type():
    assert make(count=1).parse_key("12") == 12
    assert make(datagen.PRODUCTS, 1).parse_key("SKU-000012") == "SKU-000012"
    with pytest.raises(ValueError):
        make(count=1).parse_key("SKU-1")


def test_string_keys_sort_naturally_within_a_second():
    collection = make(datagen.system_spec(2), 300)
    items = everything(collection)
    assert items == sorted(items)
    assert all(isinstance(key, str) for _us, key, _data in items)
