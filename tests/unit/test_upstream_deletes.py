"""Deletes in the demo upstream's collections (demo/store.py): soft and hard deletes, listings in every
paging style, by-key lookups, the checksum of live records, restores, and the background delete
generator (demo/upstream_changes.py)."""

from __future__ import annotations

import asyncio
import random
import time

import msgspec
import pytest

from conflux.demo import datagen
from conflux.demo.checksum import Checksum, record_digest
from conflux.demo.paging_styles import STYLES
from conflux.demo.store import AlreadyDeleted, Collection, KeyConflict, ReadOnlyRecord, StoreError, UnknownKey
from conflux.demo.upstream_changes import DeleteGenerator, check_delete_style
from conflux.demo.upstream_time import parse_iso_us
from tests.unit.test_upstream_paging import walk

NOW_US = parse_iso_us("2026-11-01T12:00:00Z")
LATER_US = NOW_US + 5_000_000


def make(spec=datagen.CUSTOMERS, count=200, *, malformed_rate=0.0) -> Collection:
    generated = datagen.generate(spec, count, seed=1, precision="s", malformed_rate=malformed_rate)
    return Collection(spec, generated, precision="s")


def listed(collection: Collection) -> list[bytes]:
    return [data for _us, _key, data in collection.entries(0, len(collection))]


def listed_keys(collection: Collection) -> list[object]:
    return [key for _us, key, _data in collection.entries(0, len(collection))]


def live_checksum(collection: Collection) -> dict[str, object]:
    """The checksum recomputed from the listing: every valid record that is not marked deleted."""
    malformed = {key for key, _reason, _data in collection.malformed()}
    checksum = Checksum()
    for _us, key, data in collection.entries(0, len(collection)):
        if key not in malformed and not msgspec.json.decode(data).get("deleted"):
            checksum.add(record_digest(str(key), data))
    return checksum.as_dict()


# -- soft and hard deletes -------------------------------------------------------------------------

def test_a_soft_delete_stays_listed_as_the_newest_change_and_leaves_the_checksum():
    collection = make()
    before = collection.checksum.as_dict()
    data = collection.delete(17, NOW_US, hard=False)
    record = msgspec.json.decode(data)
    assert record["id"] == 17 and record["deleted"] is True and record["updated_at"] == "2026-11-01T12:00:00Z"
    assert listed(collection)[-1] == data and len(collection) == 200
    assert collection.checksum.as_dict() == live_checksum(collection)
    assert collection.checksum.count == before["count"] - 1
    assert collection.lookup(17) == data  # still served by key, flagged
    assert collection.counts() == {"records": 200, "valid": 199, "malformed": 0, "live": 199, "deleted": 1,
                                   "soft_deleted": 1, "hard_deleted": 0}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_a_hard_delete_leaves_every_paging_style_and_the_lookup(style):
    collection = make(count=350)
    keys_before = listed_keys(collection)
    gone = keys_before[::7]
    for key in gone:
        collection.delete(key, NOW_US, hard=True)
    expected = [data for _us, key, data in make(count=350).entries(0, 350) if key not in set(gone)]
    assert walk(collection, style) == expected
    for key in gone:
        with pytest.raises(UnknownKey):
            collection.lookup(key)
    assert collection.checksum.as_dict() == live_checksum(collection)
    assert collection.checksum.count == 350 - len(gone)


def test_a_hard_delete_announces_the_record_with_deleted_and_a_new_stamp():
    collection = make()
    data = collection.delete(5, NOW_US, hard=True)
    assert msgspec.json.decode(data) == {**msgspec.json.decode(make().lookup(5)), "deleted": True,
                                         "updated_at": "2026-11-01T12:00:00Z"}
    assert 5 not in listed_keys(collection)
    assert collection.counts()["hard_deleted"] == 1 and collection.counts()["records"] == 199


@pytest.mark.parametrize("style", ["cursor", "keyset"])
def test_a_position_on_a_record_deleted_hard_meanwhile_still_leads_on(style):
    collection = make(count=300)
    query = {"limit": "50"}
    first = msgspec.json.decode(STYLES[style](collection, query).body)
    last = first["data"][-1]
    collection.delete(last["id"], NOW_US, hard=True)
    if style == "cursor":
        query["cursor"] = first["next_cursor"]
    else:
        query.update(updated_since=last["updated_at"], after_key=str(last["id"]))
    second = msgspec.json.decode(STYLES[style](collection, query).body)
    assert second["data"][0] == msgspec.json.decode(listed(collection)[49])  # the record after the gone one
    assert len(second["data"]) == 50


def test_lookup_answers_live_records_and_refuses_unknown_keys():
    collection = make(datagen.PRODUCTS, 20)
    assert msgspec.json.decode(collection.lookup("SKU-000003"))["sku"] == "SKU-000003"
    with pytest.raises(UnknownKey):
        collection.lookup("SKU-000999")


# -- what a delete refuses -------------------------------------------------------------------------

def test_a_repeated_delete_is_gone_but_a_soft_deleted_record_may_be_purged():
    collection = make()
    collection.delete(1, NOW_US, hard=False)
    with pytest.raises(AlreadyDeleted):
        collection.delete(1, LATER_US, hard=False)
    checksum = collection.checksum.as_dict()
    purged = collection.delete(1, LATER_US, hard=True)
    assert msgspec.json.decode(purged)["updated_at"] == "2026-11-01T12:00:05Z"
    assert 1 not in listed_keys(collection) and collection.checksum.as_dict() == checksum
    assert collection.counts()["soft_deleted"] == 0 and collection.counts()["hard_deleted"] == 1
    for hard in (False, True):
        with pytest.raises(AlreadyDeleted):
            collection.delete(1, LATER_US, hard=hard)


def test_unknown_and_malformed_records_cannot_be_deleted():
    collection = make(count=100, malformed_rate=0.1)
    malformed = next(key for key, _reason, _data in collection.malformed())
    before = collection.checksum.as_dict()
    with pytest.raises(UnknownKey):
        collection.delete(999, NOW_US, hard=False)
    with pytest.raises(ReadOnlyRecord):
        collection.delete(malformed, NOW_US, hard=True)
    assert collection.checksum.as_dict() == before and len(collection) == 100


@pytest.mark.parametrize("change", [
    lambda c: c.update(3, {"deleted": True}, NOW_US),
    lambda c: c.create({"name": "x", "deleted": False}, NOW_US),
])
def test_the_deleted_flag_is_not_set_by_put_or_post(change):
    collection = make(count=10)
    with pytest.raises(StoreError, match=r"^deleted:"):
        change(collection)
    assert collection.counts()["deleted"] == 0


# -- restores --------------------------------------------------------------------------------------

@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_a_put_restores_a_deleted_record_as_a_new_version(hard):
    collection = make()
    original = msgspec.json.decode(collection.lookup(9))
    collection.delete(9, NOW_US, hard=hard)
    restored = collection.update(9, {"tier": "gold"}, LATER_US)
    assert msgspec.json.decode(restored) == {**original, "tier": "gold", "updated_at": "2026-11-01T12:00:05Z"}
    assert listed(collection)[-1] == restored and listed_keys(collection).count(9) == 1
    assert collection.lookup(9) == restored
    assert collection.checksum.as_dict() == live_checksum(collection) and collection.checksum.count == 200
    assert collection.counts()["deleted"] == 0


def test_a_post_creates_a_hard_deleted_key_anew_but_not_a_soft_deleted_one():
    collection = make(datagen.PRODUCTS, 20)
    collection.delete("SKU-000004", NOW_US, hard=True)
    collection.delete("SKU-000005", NOW_US, hard=False)
    created = msgspec.json.decode(collection.create({"sku": "SKU-000004", "name": "Again"}, LATER_US))
    assert created == {"sku": "SKU-000004", "name": "Again", "updated_at": "2026-11-01T12:00:05Z"}
    with pytest.raises(KeyConflict):
        collection.create({"sku": "SKU-000005"}, LATER_US)
    assert collection.checksum.as_dict() == live_checksum(collection) and collection.checksum.count == 19


def test_a_hard_deleted_key_is_never_handed_out_again():
    collection = make(datagen.PRODUCTS, 20)
    collection.create({"name": "21st"}, NOW_US)
    collection.delete("SKU-000021", NOW_US, hard=True)
    collection.create({"sku": "SKU-000022"}, NOW_US)
    collection.delete("SKU-000022", NOW_US, hard=True)
    assert msgspec.json.decode(collection.create({"name": "next"}, NOW_US))["sku"] == "SKU-000023"


# -- who gets picked -------------------------------------------------------------------------------

def test_random_live_keys_skip_deleted_and_malformed_records():
    collection = make(count=300, malformed_rate=0.1)
    malformed = {key for key, _reason, _data in collection.malformed()}
    soft = [key for key in listed_keys(collection) if key not in malformed][::3]
    for key in soft:
        collection.delete(key, NOW_US, hard=False)
    rng = random.Random(4)
    assert not {collection.random_live_key(rng) for _ in range(500)} & (malformed | set(soft))


def test_the_last_live_record_is_still_found_and_then_none():
    collection = make(count=200)
    for key in range(2, 201):
        collection.delete(key, NOW_US, hard=False)
    rng = random.Random(1)
    assert {collection.random_live_key(rng) for _ in range(20)} == {1}
    collection.delete(1, NOW_US, hard=True)
    assert collection.random_live_key(rng) is None


def _run_deletes(generator: DeleteGenerator, duration_s: float) -> float:
    async def run() -> float:
        started = time.monotonic()
        task = asyncio.create_task(generator.run())
        await asyncio.sleep(duration_s)  # the measurement window, not synchronisation
        task.cancel()
        return time.monotonic() - started
    return asyncio.run(run())


def test_background_deletes_keep_the_rate_and_pick_each_live_record_once():
    collection = make(count=300, malformed_rate=0.2)
    malformed = {key for key, _reason, _data in collection.malformed()}
    deleted: list[tuple[object, bool]] = []

    def apply(target: Collection, key: object, hard: bool) -> None:
        deleted.append((key, hard))
        target.delete(key, time.time_ns() // 1000, hard=hard)

    generator = DeleteGenerator(collections=[collection], apply=apply, rate_per_s=200, seed=1, style="mixed")
    elapsed_s = _run_deletes(generator, 0.5)
    expected = 200 * elapsed_s
    assert 0.8 * expected - 5 <= len(deleted) <= expected + 1 and generator.applied == len(deleted)
    keys = [key for key, _hard in deleted]
    assert len(set(keys)) == len(keys) and not set(keys) & malformed
    hard = sum(hard for _key, hard in deleted)
    assert 0.25 * len(deleted) < hard < 0.75 * len(deleted)  # mixed: about half each
    assert collection.counts()["deleted"] == len(deleted)
    assert collection.checksum.as_dict() == live_checksum(collection)


@pytest.mark.parametrize("style", ["soft", "hard"])
def test_background_deletes_follow_the_style_and_the_seed(style):
    def picks(seed: int) -> list[tuple[object, bool]]:
        collection = make(count=100)
        out: list[tuple[object, bool]] = []
        generator = DeleteGenerator(collections=[collection], style=style, rate_per_s=1, seed=seed,
                                    apply=lambda c, key, hard: out.append((key, hard)) or c.delete(key, NOW_US,
                                                                                                   hard=hard))
        for _ in range(30):
            generator.step()
        return out
    assert picks(7) == picks(7) and picks(7) != picks(8)
    assert {hard for _key, hard in picks(7)} == {style == "hard"}


def test_delete_styles_are_checked_by_name():
    assert check_delete_style("mixed") == "mixed"
    with pytest.raises(ValueError, match=r"^delete_style:"):
        check_delete_style("sometimes")
