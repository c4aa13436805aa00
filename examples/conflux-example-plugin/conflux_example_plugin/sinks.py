"""``[[sinks]] type = "jsonl"``: every record appended to a JSON-lines file per source, fsync'd before the
chunk is acknowledged.

One line per record, upserts and deletes alike, in the analytics ingest contract's fields plus the
batch it came in::

    {"batch_id": "...", "source": "crm", "key": "42", "op": "upsert", "updated_at": "...",
     "hash": "...", "seq": 17, "data": {...}}

Delivery is at least once: a chunk retried after a crash between the write and the acknowledgement
appears twice, with the same ``batch_id`` (a reader keeps the line with the greatest
(updated_at, seq) per key, and may skip a batch_id it has read).

    [[sinks]]
    name = "files"
    type = "jsonl"
    directory = "/var/lib/conflux/jsonl"     # <directory>/<source>.jsonl
    fsync = true                             # the default: a line is on disk before it is acknowledged
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec

from conflux.config import SinkOptions
from conflux.workers.sinks import Chunk, Delivery, Retry, Sink


class JsonLinesOptions(SinkOptions, kw_only=True):   # kw_only: a required key after the defaults
    directory: str
    fsync: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.directory:
            raise ValueError("directory must not be empty")


class IngestBody(msgspec.Struct):
    batch_id: str
    records: list[msgspec.Raw]


class JsonLinesSink(Sink):
    api_version = 1
    kind = "jsonl"
    Options = JsonLinesOptions

    async def start(self) -> None:
        await super().start()
        Path(self.options.directory).mkdir(parents=True, exist_ok=True)

    async def attempt(self, chunk: Chunk) -> Delivery | Retry:
        try:
            await asyncio.to_thread(self._append, chunk)
        except OSError as exc:   # a full disk, a directory gone: an outage, retried with backoff
            return Retry(reason=type(exc).__name__, message=f"cannot write {self._path(chunk)}: {exc}")
        return Delivery(rejected={}, applied=len(chunk))

    def _append(self, chunk: Chunk) -> None:
        body = msgspec.json.decode(chunk.body, type=IngestBody)
        prefix = b'{"batch_id":%s,' % msgspec.json.encode(body.batch_id)
        lines = b"".join(prefix + bytes(record)[1:] + b"\n" for record in body.records)
        with open(self._path(chunk), "ab") as handle:
            handle.write(lines)
            handle.flush()
            if self.options.fsync:
                os.fsync(handle.fileno())

    def _path(self, chunk: Chunk) -> Path:
        return Path(self.options.directory) / f"{chunk.source}.jsonl"
