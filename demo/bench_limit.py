"""The limit: one process that does the pipeline's essential work on the same pages, and nothing else.

Fetches the upstream's pages (aiohttp on uvloop, a few in flight), decodes them into raw records and
key fields, hashes every record with xxh3, merges them latest-wins by key, and encodes the merged
records into sink batches — with no IPC, no log and no durability, and without sending the batches.
Conflux's end-to-end rate is reported as a ratio of this rate measured in the same run.
"""

from __future__ import annotations

import asyncio
import math
import time
from itertools import repeat

import aiohttp

from conflux.config import SourceConfig
from conflux.ipc.messages import Position
from conflux.workers.batching import RecordSchema
from conflux.workers.sinks.base import Chunk

SINK_BATCH = 1000


_NOWHERE = Position("bench", 0, 0)  # a chunk's body carries each record's log offset (its seq)


class _Merger:
    def __init__(self) -> None:
        self.pending: dict[str, tuple] = {}
        self.encoded_bytes = 0

    def add(self, source: str, columns) -> None:
        self.pending.update(zip(columns.keys, zip(columns.updated_us, columns.hashes, columns.records,
                                                  columns.updated, repeat(_NOWHERE), repeat(False))))
        if len(self.pending) >= SINK_BATCH:
            self.flush(source)

    def flush(self, source: str) -> None:
        keys, values = list(self.pending), list(self.pending.values())
        for start in range(0, len(keys), SINK_BATCH):
            self.encoded_bytes += len(Chunk(source, keys[start:start + SINK_BATCH],
                                            values[start:start + SINK_BATCH]).body)
        self.pending = {}


async def _collection(session: aiohttp.ClientSession, url: str, name: str, key: str, page_size: int,
                      concurrency: int) -> int:
    schema = RecordSchema(SourceConfig(name=name, url=url, key=key, page_size=page_size))
    merger = _Merger()
    records = 0

    async def page(number: int) -> dict:
        nonlocal records
        async with session.get(url, params={"page": str(number), "size": str(page_size)}) as response:
            body = await response.read()
        raws, fields, meta = schema.page_records(body)
        merger.add(name, schema.columns(raws, fields))
        records += len(raws)
        return {"total": meta.total}

    first = await page(1)
    numbers = iter(range(2, math.ceil(first["total"] / page_size) + 1))

    async def worker() -> None:
        for number in numbers:
            await page(number)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    merger.flush(name)
    return records


def measure_limit(upstream_url: str, collections: dict[str, str], *, page_size: int = 1000,
                  concurrency: int = 4) -> dict[str, float]:
    """Records per second of fetch + decode + hash + merge + encode, in this process."""
    import uvloop

    async def main() -> int:
        connector = aiohttp.TCPConnector(limit=concurrency * len(collections))
        async with aiohttp.ClientSession(connector=connector) as session:
            counts = await asyncio.gather(*(_collection(session, f"{upstream_url}/api/{name}", name, key,
                                                        page_size, concurrency)
                                            for name, key in collections.items()))
        return sum(counts)

    cpu_started, started = time.process_time(), time.perf_counter()
    records = uvloop.run(main())
    elapsed_s = time.perf_counter() - started
    return {"records": records, "seconds": round(elapsed_s, 3), "records_per_s": round(records / elapsed_s),
            "cpu_s": round(time.process_time() - cpu_started, 3)}
