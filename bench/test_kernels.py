"""Micro-benchmarks of the hot-path kernels, each beside the old-style way of doing the same work.

Run with `make bench` (pytest-benchmark). Each kernel has a `baseline_*` twin in the style of the
system Conflux replaced (per-record dicts, json, md5, pickling queues); compare the two within one
run: the ratio is what bench/README.md reports, because absolute timings on a shared 2-core machine
drift from run to run. In `make test` these run once each, untimed, as smoke tests.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import tempfile
from itertools import repeat

import msgspec
import pytest
import xxhash

from conflux.config import Config, SourceConfig
from conflux.ipc.codec import encode_batch
from conflux.ipc.messages import Batch, Position, cut
from conflux.ipc.shm import RingReader, RingWriter, create_ring, destroy_ring
from conflux.workers.batching import RecordSchema, publish_limit_bytes, split_by_partition
from conflux.workers.dedup import Deduplicator
from conflux.workers.merge import MergeState, Token
from conflux.workers.sinks.base import Chunk

RECORDS = 1000
FRAMES = 2000
FRAME_BYTES = 32 * 1024


def _stamp(i: int) -> str:
    return f"2026-01-0{1 + i % 9}T10:{i % 60:02d}:{i % 59:02d}Z"


def _page(offset: int = 0) -> bytes:
    records = [msgspec.json.encode({"id": offset + i, "name": f"Customer {i}", "email": f"c{i}@example.com",
                                    "tier": "gold", "updated_at": _stamp(i)}) for i in range(RECORDS)]
    return b'{"data":[' + b",".join(records) + b'],"page":1,"size":1000,"total":1000,"has_more":false}'


PAGE = _page()
SCHEMA = RecordSchema(SourceConfig(name="customers", url="http://127.0.0.1/api/customers"))
RAWS, FIELDS, _ = SCHEMA.page_records(PAGE)
COLUMNS = SCHEMA.columns(RAWS, FIELDS)
# What a fetcher cuts batches to with the default ring ([workers] ring_bytes, 8 MiB).
MAX_BATCH_BYTES = publish_limit_bytes(8 << 20, "customers")


# -- page decode into batches ----------------------------------------------------------------------

def test_page_to_batches(benchmark):
    def kernel():
        raws, fields, _ = SCHEMA.page_records(PAGE)
        return [encode_batch(batch) for _, batch in
                split_by_partition(SCHEMA.columns(raws, fields), "customers", "full", 4,
                                   max_batch_bytes=MAX_BATCH_BYTES)]
    assert len(benchmark(kernel)) == 4


def test_baseline_page_to_messages(benchmark):
    """Old style: json.loads the page, one dict and one JSON message per record."""
    def kernel():
        page = json.loads(PAGE)
        return [json.dumps({"message_id": i, "payload": record}) for i, record in enumerate(page["data"])]
    assert len(benchmark(kernel)) == RECORDS


# -- hashing and dedup ---------------------------------------------------------------------------------

def test_hash_and_dedup(benchmark):
    dedup = Deduplicator()
    dedup.remember("m", COLUMNS.key_hashes[::2], COLUMNS.hashes[::2])

    def kernel():
        hashes = list(map(xxhash.xxh3_64_hexdigest, RAWS))
        return dedup.fresh_indices(COLUMNS.key_hashes, hashes)
    assert len(benchmark(kernel)) == RECORDS // 2


def test_baseline_hash_and_dedup(benchmark):
    """Old style: md5 of each record's sorted JSON, compared in a dict."""
    records = json.loads(PAGE)["data"]
    seen = {r["id"]: hashlib.md5(json.dumps(r, sort_keys=True).encode()).hexdigest() for r in records[::2]}

    def md5(record: dict) -> str:
        return hashlib.md5(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def kernel():
        return [r for r in records if seen.get(r["id"]) != md5(r)]
    assert len(benchmark(kernel)) == RECORDS // 2


# -- merge and sink encoding -------------------------------------------------------------------------------

FRAME = Batch("m", "customers", "full", 0, *cut(COLUMNS, 0, len(COLUMNS)))
TOKEN = Token(consumer=0, generation=1, position=Position("customers", 0, 0))


def test_merge_and_encode_for_sink(benchmark):
    def kernel():
        state = MergeState()
        state.add(FRAME, TOKEN)
        unit = state.take("customers")
        return [len(chunk.body) for chunk in Chunk(unit.source, unit.keys, unit.values).cut(1000)]
    assert sum(benchmark(kernel)) > RECORDS


def test_encode_for_sink(benchmark):
    values = list(zip(COLUMNS.updated_us, COLUMNS.hashes, COLUMNS.records, COLUMNS.updated,
                      repeat(Position("customers", 0, 0)), repeat(False)))
    assert benchmark(lambda: Chunk("customers", COLUMNS.keys, values).body)


def test_baseline_merge_and_encode_for_sink(benchmark):
    """Old style: a dict of dicts, json.dumps of the whole batch."""
    records = json.loads(PAGE)["data"]

    def kernel():
        merged = {}
        for record in records:
            merged[str(record["id"])] = record
        return json.dumps({"batch_id": "b", "records": [
            {"source": "customers", "key": k, "op": "upsert", "updated_at": r["updated_at"],
             "hash": hashlib.md5(json.dumps(r).encode()).hexdigest(), "data": r} for k, r in merged.items()]})
    assert benchmark(kernel)


# -- moving frames between processes ------------------------------------------------------------------------

def _ring_reader(spec, count: int) -> None:
    reader = RingReader(spec)
    received = 0
    while received < count:
        frames = reader.read_many(256)
        received += len(frames)
        if not frames:
            reader.wait(0.1)
    os._exit(0)


def test_shared_memory_ring(benchmark):
    payload = os.urandom(FRAME_BYTES)
    with tempfile.TemporaryDirectory() as directory:
        spec = create_ring(directory, "bench", 8 << 20)
        writer = RingWriter(spec)

        def kernel():
            child = multiprocessing.get_context("fork").Process(target=_ring_reader, args=(spec, FRAMES))
            child.start()
            for _ in range(FRAMES):
                writer.write(payload, timeout_s=10)
            child.join(30)
            return child.exitcode
        assert benchmark.pedantic(kernel, rounds=3, iterations=1) == 0
        destroy_ring(spec)


def _queue_reader(queue, count: int) -> None:
    for _ in range(count):
        queue.get()


def test_baseline_multiprocessing_queue(benchmark):
    payload = os.urandom(FRAME_BYTES)
    context = multiprocessing.get_context("fork")

    def kernel():
        queue = context.Queue(maxsize=256)
        child = context.Process(target=_queue_reader, args=(queue, FRAMES))
        child.start()
        for _ in range(FRAMES):
            queue.put(payload)
        child.join(30)
        return child.exitcode
    assert benchmark.pedantic(kernel, rounds=3, iterations=1) == 0


def _pipe_reader(end, count: int) -> None:
    for _ in range(count):
        end.recv_bytes()


def test_baseline_pipe(benchmark):
    payload = os.urandom(FRAME_BYTES)
    context = multiprocessing.get_context("fork")

    def kernel():
        reader, writer = context.Pipe(duplex=False)
        child = context.Process(target=_pipe_reader, args=(reader, FRAMES))
        child.start()
        for _ in range(FRAMES):
            writer.send_bytes(payload)
        child.join(30)
        return child.exitcode
    assert benchmark.pedantic(kernel, rounds=3, iterations=1) == 0


# -- the embedded log ------------------------------------------------------------------------------------------

@pytest.fixture
def embedded_log(tmp_path):
    from conflux.log.embedded import EmbeddedLog

    config = msgspec.convert({"log": {"path": str(tmp_path / "log.db")},
                              "sources": [{"name": "customers", "url": "http://127.0.0.1/x"}]}, Config)
    log = EmbeddedLog(config)
    log.prepare({"customers": 4})
    return log


def test_embedded_log_append(benchmark, embedded_log):
    import asyncio

    from conflux.log.base import OutgoingMessage

    payloads = [(p, encode_batch(b)) for p, b in split_by_partition(COLUMNS, "customers", "full", 4,
                                                                          max_batch_bytes=MAX_BATCH_BYTES)]

    async def append_many(producer, pages: int):
        for _ in range(pages):
            await producer.publish([OutgoingMessage("customers", p, b"k", payload) for p, payload in payloads])

    def kernel():
        producer = embedded_log.producer()

        async def run():
            await append_many(producer, 50)
            await producer.close()
        asyncio.run(run())
    benchmark.pedantic(kernel, rounds=3, iterations=1)


def test_embedded_log_read(benchmark, embedded_log):
    import asyncio

    from conflux.log.base import OutgoingMessage

    payload = encode_batch(split_by_partition(COLUMNS, "customers", "full", 1, max_batch_bytes=MAX_BATCH_BYTES)[0][1])

    async def fill():
        producer = embedded_log.producer()
        await producer.publish([OutgoingMessage("customers", 0, b"k", payload) for _ in range(200)])
        await producer.close()
    asyncio.run(fill())

    def kernel():
        consumer = embedded_log.consumer(0, [("customers", 0)])
        consumer.start(lambda parts: None, lambda parts: None)
        consumer.seek(("customers", 0), 0)
        count = 0
        while batch := consumer.poll(64, 0.0):
            count += len(batch)
        consumer.close()
        return count
    assert benchmark(kernel) == 200
