"""No size of batch stops a consumer (issue 13, finding 4): with a small [workers] ring_bytes, pages whose
partition shares exceed a ring frame, and log messages written too large by an older version, all
arrive; a record too large for any frame is in the DLQ with its reason; nothing goes FATAL."""

from __future__ import annotations

import asyncio

import msgspec
import requests

from conflux.config import SourceConfig, load_config
from conflux.demo.checksum import Checksum, record_digest
from conflux.ipc.codec import batch_room_bytes, encode_batch
from conflux.log import open_log
from conflux.log.base import OutgoingMessage
from conflux.workers.batching import RecordSchema, split_by_partition
from tests.fixtures.daemon import source
from tests.support import wait_until

RING_BYTES = 1 << 16  # the smallest ring: a frame carries about 32 KB
QUIET = {"poll_interval_s": 3600}


def _sink_side(analytics_url: str, name: str) -> tuple[str | None, int | None]:
    stats = requests.get(f"{analytics_url}/stats", timeout=10).json()["sources"].get(name, {})
    return stats.get("checksum"), stats.get("count")


def _expected(records: list[tuple[str, bytes]]) -> tuple[str, int]:
    checksum = Checksum()
    for key, data in records:
        checksum.add(record_digest(key, data))
    return checksum.hexdigest(), checksum.count


def _dead_letters(daemon) -> list:
    store = open_log(load_config(daemon.config_path, environ={})).dead_letters()
    try:
        return store.list()
    finally:
        store.close()


def _nothing_crashed(daemon) -> None:
    workers = daemon.workers()
    assert all(w["state"] == "running" and w["restarts"] == 0 for w in workers), workers
    assert "FrameTooLarge" not in daemon.log() and "Traceback" not in daemon.log()


def _all_committed(daemon) -> bool:
    partitions = daemon.status()["partitions"]
    return bool(partitions) and all(p["lag"] == 0 for p in partitions)


def test_pages_whose_partition_share_exceeds_a_ring_frame_all_arrive(upstream_factory, analytics, daemon_factory):
    """One page of 160 records of ~3 KB is ~120 KB per partition, four times a frame of the 64 KiB ring.
    Before: the consumer raised FrameTooLarge, crash-looped and went FATAL with every partition it owned."""
    upstream = upstream_factory(customers=0, products=0)
    created = [requests.post(f"{upstream.url}/api/customers", json={"name": f"c{n}", "notes": "n" * 3000},
                             timeout=10) for n in range(160)]
    huge = requests.post(f"{upstream.url}/api/customers", json={"name": "huge", "notes": "h" * 40_000}, timeout=10)
    assert all(r.status_code == 201 for r in [*created, huge])
    daemon = daemon_factory(sources=[source("customers", upstream.url, page_size=500, **QUIET)],
                            sink_url=analytics.url, workers={"ring_bytes": RING_BYTES})
    delivered = [(str(r.json()["id"]), r.content) for r in created]
    wait_until(lambda: _sink_side(analytics.url, "customers") == _expected(delivered) and _all_committed(daemon),
               timeout_s=60, message="every record but the huge one in the sink, every offset committed")
    [letter] = _dead_letters(daemon)
    assert (letter.stage, letter.key, bytes(letter.record)) == ("fetch", str(huge.json()["id"]), huge.content)
    assert letter.reason.startswith(f"record of {len(huge.content)} bytes is too large")
    assert "ring_bytes" in letter.reason
    # The sink and the DLQ together hold exactly what the upstream holds.
    upstream_side = requests.get(f"{upstream.url}/api/customers/checksum", timeout=10).json()
    assert (upstream_side["checksum"], upstream_side["count"]) == _expected([*delivered, (letter.key, huge.content)])
    _nothing_crashed(daemon)
    assert daemon.stop() == 0


def test_a_log_message_too_large_for_the_ring_is_sent_in_pieces(upstream_factory, analytics, daemon_factory):
    """A message written before batches were cut to the ring (or by another producer): the consumer
    sends it as several frames, commits past it only once all are acknowledged, and dead-letters the
    one record no frame can carry."""
    upstream = upstream_factory(customers=0, products=0)
    daemon = daemon_factory(sources=[source("customers", upstream.url, **QUIET)], sink_url=analytics.url,
                            workers={"ring_bytes": RING_BYTES})
    daemon.wait_running()
    records = [msgspec.json.encode({"id": n, "updated_at": "2026-01-01T00:00:00Z", "notes": "n" * 3000})
               for n in range(100)]
    huge = msgspec.json.encode({"id": 100, "updated_at": "2026-01-01T00:00:00Z", "notes": "h" * 40_000})
    payloads = _old_style_messages([*records, huge])
    assert all(len(payload) > batch_room_bytes(RING_BYTES, "customers") for _, payload in payloads)
    asyncio.run(_publish(daemon, payloads))
    delivered = [(str(n), record) for n, record in enumerate(records)]
    wait_until(lambda: _sink_side(analytics.url, "customers") == _expected(delivered) and _all_committed(daemon),
               timeout_s=60, message="every record but the huge one in the sink, every offset committed")
    [letter] = _dead_letters(daemon)
    assert (letter.stage, letter.key, bytes(letter.record)) == ("consume", "100", huge)
    assert "too large" in letter.reason and letter.origin.startswith("customers/")
    assert "more than a ring frame carries" in daemon.log()
    _nothing_crashed(daemon)
    assert daemon.stop() == 0


def _old_style_messages(records: list[bytes]) -> list[tuple[int, bytes]]:
    """One message per partition, however large, as Conflux wrote them before it cut batches to the ring."""
    schema = RecordSchema(SourceConfig(name="customers", url="http://unused/api/customers"))
    raws, fields = schema.body_records(b"[" + b",".join(records) + b"]")
    batches = split_by_partition(schema.columns(raws, fields), "customers", "full", 1, max_batch_bytes=1 << 30)
    return [(partition, encode_batch(batch)) for partition, batch in batches]


async def _publish(daemon, payloads: list[tuple[int, bytes]]) -> None:
    producer = open_log(load_config(daemon.config_path, environ={})).producer()
    try:
        await producer.publish([OutgoingMessage("customers", partition, b"k", payload)
                                for partition, payload in payloads])
    finally:
        await producer.close()
