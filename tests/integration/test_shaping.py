"""Records shaped on the way, end to end: the real daemon between the demo upstream and the demo sink.

Each shaping option against records the demo upstream serves that way: nested key and timestamp
(``--layout nested``), epoch timestamps (``--timestamp-format``), a composite key, select/drop/rename,
and bad inputs going to the DLQ with their reasons. Where the shaping keeps records as the upstream sent
them (nested paths, epoch stamps) the sink's checksum must equal the upstream's; where it changes the
key or the record, the sink's records are compared with the upstream's one by one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
import requests

from tests.fixtures.analytics import expected_checksum, sink_checksum, stored_record, tombstone
from tests.fixtures.daemon import source, wait_converged
from tests.fixtures.upstream import listed_records
from tests.support import wait_until

CUSTOMERS = {"customers": "customers"}
UNIT_US = {"epoch_s": 1_000_000, "epoch_ms": 1_000, "epoch_us": 1}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
decode = msgspec.json.decode


def instant(value: int | str, fmt: str) -> datetime:
    """The moment an updated_at value of this format stands for (integer arithmetic: no float rounding)."""
    if fmt == "iso8601":
        return datetime.fromisoformat(value)
    return EPOCH + timedelta(microseconds=value * UNIT_US[fmt])


@pytest.mark.parametrize(("layout", "fmt", "precision", "pagination"), [
    ("nested", "iso8601", "s", "page"),
    ("flat", "epoch_s", "s", "watermark"),
    ("nested", "epoch_ms", "ms", "cursor"),
    ("nested", "epoch_us", "us", "watermark"),
])
def test_nested_keys_and_epoch_timestamps_reach_the_sink_as_the_upstream_sent_them(
        upstream_factory, analytics, daemon_factory, layout, fmt, precision, pagination):
    upstream = upstream_factory(customers=400, products=0, layout=layout, timestamp_format=fmt,
                                timestamp_precision=precision)
    prefix = "meta." if layout == "nested" else ""
    path = {"page": None, "cursor": "customers/cursor", "watermark": "customers/keyset"}[pagination]
    daemon = daemon_factory(sources=[source("customers", upstream.url, path=path, pagination=pagination,
                                            key=f"{prefix}id", updated=f"{prefix}updated_at", updated_format=fmt,
                                            deleted=f"{prefix}deleted", page_size=100, poll_interval_s=0.3)],
                            sink_url=analytics.url)
    # The key is the id, and the record's bytes are untouched: the checksums are comparable.
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=60)
    changed = requests.put(f"{upstream.url}/api/customers/5", json={"tier": "changed"}, timeout=10).json()
    deleted = requests.delete(f"{upstream.url}/api/customers/6", params={"style": "soft"}, timeout=10).json()
    # Incremental syncs ask for updated_since in the upstream's own format (a number for epoch stamps).
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    meta = changed["meta"] if layout == "nested" else changed
    stored = stored_record(analytics.url, "customers", "5")
    assert stored["data"] == changed  # the record keeps its own field as sent, a number for epoch stamps
    assert datetime.fromisoformat(stored["updated_at"]) == instant(meta["updated_at"], fmt)
    gone = deleted["meta"] if layout == "nested" else deleted
    assert datetime.fromisoformat(tombstone(analytics.url, "customers", "6")) == instant(gone["updated_at"], fmt)
    report = daemon.status()["sources"]["customers"]
    assert report["last_sync_type"] == "incremental" and report["watermark"] == str(gone["updated_at"])
    assert daemon.stop() == 0, daemon.log()[-3000:]


def wait_counted(analytics_url: str, counts: dict[str, int]) -> None:
    """Until the sink holds this many live records of each source."""
    wait_until(lambda: all(sink_checksum(analytics_url, name)[1] == count for name, count in counts.items()),
               timeout_s=60, message=f"the sink to hold {counts} records")


def composite(*parts: str) -> str:
    """The documented composite key, written out: parts joined by '|', '\\' and '|' escaped by '\\'."""
    return "|".join(part.replace("\\", "\\\\").replace("|", "\\|") for part in parts)


def test_a_composite_key_names_each_record_by_all_its_parts(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=0, products=300)
    for sku, warehouse in (("SKU-X1", "AMS|2"), ("SKU-X2", "AMS"), ("SKU|X2", "AMS\\")):
        created = requests.post(f"{upstream.url}/api/products", timeout=10,
                                json={"sku": sku, "name": "odd", "price": 1.0, "stock": 1, "warehouse": warehouse})
        assert created.status_code == 201, created.text
    daemon = daemon_factory(sources=[source("products", upstream.url, key=["warehouse", "sku"], poll_interval_s=0.3)],
                            sink_url=analytics.url)
    expected = expected_checksum([(composite(record["warehouse"], record["sku"]), raw)
                                  for raw in listed_records(upstream.url, "products") if (record := decode(raw))])
    assert expected[1] == 303
    wait_until(lambda: sink_checksum(analytics.url, "products") == expected, timeout_s=60,
               message="the sink to hold every product under its composite key")
    # ("AMS|2", "SKU-X1") and ("AMS", "2|SKU-X1") would both be "AMS|2|SKU-X1" without the escapes.
    assert stored_record(analytics.url, "products", "AMS\\|2|SKU-X1")["data"]["warehouse"] == "AMS|2"
    assert stored_record(analytics.url, "products", "AMS\\\\|SKU\\|X2")["data"]["sku"] == "SKU|X2"
    assert stored_record(analytics.url, "products", "AMS|SKU-X2")["data"]["sku"] == "SKU-X2"
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_select_drop_and_rename_shape_what_the_sink_holds(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=200, products=100)
    requests.put(f"{upstream.url}/api/customers/9", json={"tier": "changed"}, timeout=10).raise_for_status()
    daemon = daemon_factory(sources=[
        # The key and updated fields are read before the selection, so selecting them away is allowed.
        source("customers", upstream.url, fields={"select": ["name", "tier"], "rename": {"tier": "level"}},
               poll_interval_s=0.3),
        source("products", upstream.url, fields={"drop": ["stock", "updated_at"], "rename": {"warehouse": "site"}},
               poll_interval_s=0.3)], sink_url=analytics.url)
    shapes = {
        "customers": ("id", lambda r: {"name": r["name"], "level": r["tier"]}),
        "products": ("sku", lambda r: {"sku": r["sku"], "name": r["name"], "price": r["price"],
                                       "site": r["warehouse"]}),
    }
    for collection, (key_field, shape) in shapes.items():
        records = [decode(raw) for raw in listed_records(upstream.url, collection)]
        wait_counted(analytics.url, {collection: len(records)})
        daemon.wait_committed()
        for record in records:
            stored = stored_record(analytics.url, collection, str(record[key_field]))
            assert stored["data"] == shape(record) and stored["updated_at"] == record["updated_at"], record
    assert stored_record(analytics.url, "customers", "9")["data"]["level"] == "changed"
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_bad_inputs_go_to_the_dlq_with_their_reasons_and_the_rest_is_delivered(upstream_factory, analytics,
                                                                              daemon_factory):
    upstream = upstream_factory(customers=300, products=100, layout="nested", timestamp_format="epoch_ms",
                                malformed_rate=0.02)
    # Records the shaping cannot take, created upstream among good ones:
    clash = requests.post(f"{upstream.url}/api/customers", json={"name": "Clash", "tier": "gold", "level": 3},
                          timeout=10).json()
    requests.post(f"{upstream.url}/api/products", json={"sku": "SKU-NOWH", "name": "nowhere"},
                  timeout=10).raise_for_status()
    requests.post(f"{upstream.url}/api/products", json={"sku": "SKU-BOOL", "warehouse": True},
                  timeout=10).raise_for_status()
    daemon = daemon_factory(sources=[
        source("customers", upstream.url, key="meta.id", updated="meta.updated_at", updated_format="epoch_ms",
               fields={"drop": ["email"], "rename": {"tier": "level"}}),
        source("products", upstream.url, key=["warehouse", "meta.sku"], updated="meta.updated_at",
               updated_format="epoch_ms")], sink_url=analytics.url)
    malformed = requests.get(f"{upstream.url}/admin/malformed", timeout=10).json()
    expected = [("customers", str(clash["meta"]["id"]), "rename onto 'level', which the record already has"),
                ("products", "", "missing key field 'warehouse'"),
                # the key as well as it can be read: its parts, whatever they are
                ("products", "True|SKU-BOOL",
                 "key field 'warehouse' must be a non-empty string or an integer, got True")]
    for collection, entries in malformed.items():
        for entry in entries:
            if entry["reason"] == "missing_key":
                missing = "meta.id" if collection == "customers" else "meta.sku"
                expected.append((collection, "", f"missing key field {missing!r}"))
            else:
                key = str(entry["key"]) if collection == "customers" else composite(entry["record"]["warehouse"],
                                                                                   entry["key"])
                value = entry["record"]["meta"]["updated_at"]
                expected.append((collection, key, f"'meta.updated_at' must be a number (epoch_ms), got {value!r}"))

    def dead_letters() -> list[tuple[str, str, str]]:
        return sorted((entry["source"], entry["key"], entry["reason"]) for entry in daemon.dead_letters())

    # Generated and created, less the malformed and the refused ones.
    wait_counted(analytics.url, {"customers": 300 + 1 - len(malformed["customers"]) - 1,
                                 "products": 100 + 2 - len(malformed["products"]) - 2})
    try:
        wait_until(lambda: dead_letters() == sorted(expected), timeout_s=30, message="one dead letter per bad record")
    except AssertionError:
        assert dead_letters() == sorted(expected)  # shows the difference
    assert daemon.stop() == 0, daemon.log()[-3000:]
