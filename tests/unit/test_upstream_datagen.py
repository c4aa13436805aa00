"""Deterministic data generation of the demo upstream (demo/datagen.py) and its timestamps."""

from __future__ import annotations

import random
from collections import Counter

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conflux.demo import datagen
from conflux.demo.upstream_time import format_us, parse_iso_us, truncate_us
from conflux.workers import jsonscan


def test_same_seed_same_bytes_and_other_seed_other_bytes():
    first = datagen.generate(datagen.PRODUCTS, 500, seed=5, precision="s")
    again = datagen.generate(datagen.PRODUCTS, 500, seed=5, precision="s")
    other = datagen.generate(datagen.PRODUCTS, 500, seed=6, precision="s")
    assert first.items == again.items
    assert first.items != other.items


@pytest.mark.parametrize("spec", [datagen.CUSTOMERS, datagen.PRODUCTS, datagen.system_spec(1),
                                  datagen.system_spec(11)])
def test_records_are_sorted_by_time_then_key_and_carry_their_key(spec):
    generated = datagen.generate(spec, 2000, seed=1, precision="s")
    assert generated.items == sorted(generated.items)
    assert len({key for _us, key, _data in generated.items}) == 2000
    for sort_us, key, data in generated.items:
        record = msgspec.json.decode(data)
        assert record[spec.key_field] == key
        assert parse_iso_us(record["updated_at"]) == sort_us
        fields = list(record)
        assert fields[0] == spec.key_field and fields[-1] == "updated_at"


def test_keys_have_the_documented_shapes():
    assert datagen.generate(datagen.CUSTOMERS, 3, seed=1, precision="s").items[0][1] in (1, 2, 3)
    assert {key for _us, key, _data in datagen.generate(datagen.PRODUCTS, 3, seed=1, precision="s").items} == \
        {"SKU-000001", "SKU-000002", "SKU-000003"}
    assert datagen.system_spec(1).format_key(7) == "ord-000007"
    assert datagen.system_spec(12).name == "system_12"
    names = [spec.name for spec, _count in datagen.collection_plan(customers=1, products=1, systems=11,
                                                                   records_per_system=1)]
    assert names[:4] == ["customers", "products", "orders", "shipments"]
    assert names[-2:] == ["support_tickets", "system_11"]


def test_initial_times_lie_in_the_fixed_range_and_many_share_a_second():
    generated = datagen.generate(datagen.CUSTOMERS, 5000, seed=1, precision="s")
    stamps = [sort_us for sort_us, _key, _data in generated.items]
    assert min(stamps) >= parse_iso_us("2026-01-01T00:00:00Z")
    assert max(stamps) < parse_iso_us("2026-01-31T00:00:00Z")
    per_second = Counter(stamps)
    assert sum(n for n in per_second.values() if n > 1) > 0.9 * len(stamps)


@pytest.mark.parametrize(("precision", "pattern_length"), [("s", 20), ("ms", 24), ("us", 27)])
def test_precision_shapes_updated_at(precision, pattern_length):
    generated = datagen.generate(datagen.CUSTOMERS, 100, seed=1, precision=precision)
    for _us, _key, data in generated.items:
        stamp = msgspec.json.decode(data)["updated_at"]
        assert len(stamp) == pattern_length and stamp.endswith("Z")


def test_malformed_records_are_chosen_by_seed_half_without_key_half_with_bad_dates():
    generated = datagen.generate(datagen.PRODUCTS, 1000, seed=9, precision="s", malformed_rate=0.05)
    assert Counter(generated.malformed.values()) == {datagen.MISSING_KEY: 25, datagen.BAD_UPDATED_AT: 25}
    by_key = {key: msgspec.json.decode(data) for _us, key, data in generated.items}
    for key, reason in generated.malformed.items():
        if reason == datagen.MISSING_KEY:
            assert "sku" not in by_key[key]
        else:
            with pytest.raises(ValueError):
                parse_iso_us(by_key[key]["updated_at"])
    clean = datagen.generate(datagen.PRODUCTS, 1000, seed=9, precision="s")
    assert [item for item in generated.items if item[1] not in generated.malformed] == \
        [item for item in clean.items if item[1] not in generated.malformed]
    assert datagen.generate(datagen.PRODUCTS, 1000, seed=9, precision="s", malformed_rate=0.05) == generated


def test_hostile_records_are_deep_or_from_2999_chosen_by_seed_among_the_valid_ones():
    hostile = datagen.HostileRecords(deep=3, depth=1500, future=2)
    generated = datagen.generate(datagen.PRODUCTS, 400, seed=9, precision="s", malformed_rate=0.05, hostile=hostile)
    reasons = Counter(generated.malformed.values())
    assert (reasons[datagen.TOO_DEEP], reasons[datagen.FUTURE_UPDATED_AT], reasons[datagen.MISSING_KEY]) == (3, 2, 10)
    by_key = {key: data for _us, key, data in generated.items}
    for key, reason in generated.malformed.items():
        if reason == datagen.TOO_DEEP:
            assert by_key[key].endswith(b',"nested":' + b"[" * 1500 + b"]" * 1500 + b"}")
            assert jsonscan.parse(by_key[key], 1).member("sku") is not None
        elif reason == datagen.FUTURE_UPDATED_AT:
            assert msgspec.json.decode(by_key[key])["updated_at"] == datagen.FUTURE_STAMP
    assert [item[0] for item in generated.items] == sorted(item[0] for item in generated.items)
    assert datagen.generate(datagen.PRODUCTS, 400, seed=9, precision="s", malformed_rate=0.05,
                            hostile=hostile) == generated


def test_mutation_gives_a_fresh_value_for_the_mutable_field():
    rng = random.Random(1)
    assert set(datagen.CUSTOMERS.mutation(rng)) == {"tier"}
    assert isinstance(datagen.PRODUCTS.mutation(rng)["stock"], int)


@pytest.mark.parametrize("span", [1, 2, 5, 256, 257, 1_000_000])
def test_uniform_ints_stay_in_range(span):
    values = datagen.uniform_ints(random.Random(span), 5000, span)
    assert len(values) == 5000 and min(values) >= 0 and max(values) < span
    if span > 1:
        assert len(set(values)) > 1


@given(st.integers(min_value=0, max_value=4_102_444_800_000_000), st.sampled_from(["s", "ms", "us"]))
def test_timestamps_format_and_parse_back(us, precision):
    assert parse_iso_us(format_us(us, precision)) == truncate_us(us, precision)


def test_parse_accepts_offsets_and_an_unencoded_plus():
    utc = parse_iso_us("2026-01-05T10:11:12Z")
    assert parse_iso_us("2026-01-05T12:11:12+02:00") == utc
    assert parse_iso_us("2026-01-05T12:11:12 02:00") == utc
    assert parse_iso_us("2026-01-05T10:11:12") == utc
    for bad in ("not-a-date", "2026-13-45T99:00:00Z", ""):
        with pytest.raises(ValueError):
            parse_iso_us(bad)
