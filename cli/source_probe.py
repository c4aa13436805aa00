"""The engine of `conflux source test`: one source's pages fetched by the fetcher's own code, kept instead
of published.

Runs in the CLI process, in one asyncio loop. A real ``SourceSyncer`` is built for the source, beside
a stand-in for the fetcher process (``_Nowhere``) that has no log, checkpoint store, dead-letter store
or supervisor: so the source's auth, rate limit, paging style and shaping (``RecordSchema``, columns,
dead letters) are exactly the fetcher's, and nothing is written anywhere. ``ProbePass`` is the
fetcher's ``SyncPass`` (the ``Pages`` its paging style walks) with two differences: it stops after
``max_pages`` pages, and it keeps each page's columns and dead letters for the report instead of
publishing them. Pages are fetched one at a time (``max_concurrency = 1``) so they are reported in order.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import msgspec

from conflux.config import Config, SourceConfig
from conflux.errors import ConfigError
from conflux.ipc.messages import DeadLetter
from conflux.redact import redact_url
from conflux.workers.columns import Columns
from conflux.workers.fetcher import SourceSyncer, SyncPass
from conflux.workers.paging import PageInfo
from conflux.workers.parents import ParentIndex, parent_index_dir
from conflux.workers.shaping import EPOCH_UNITS_US
from conflux.workers.sinks.base import NULL_HASH
from conflux.workers.upstream import Response

LINK_NEXT = re.compile(r'<([^>]+)>\s*;[^,]*rel="?next"?', re.IGNORECASE)


class StopProbe(Exception):
    """Raised by ``ProbePass.get`` instead of fetching a page beyond ``--pages``: ends the walk early."""


@dataclass
class PageReport:
    """What one page gave: its answer, its records as the sink would get them, its dead letters."""

    page: int
    status: int
    url: str
    bytes: int
    time_s: float
    records: int = 0
    columns: Columns | None = None
    dead: list[DeadLetter] = field(default_factory=list)
    next: dict[str, Any] = field(default_factory=dict)

    @property
    def deletes(self) -> int:
        return sum(self.columns.deleted) if self.columns is not None else 0

    @property
    def upserts(self) -> int:
        return (len(self.columns) if self.columns is not None else 0) - self.deletes

    def sink_records(self, source: str) -> list[dict[str, Any]]:
        """The page's records as they would reach an HTTP sink (without ``seq``: no log position yet)."""
        columns = self.columns
        if columns is None:
            return []
        out = []
        for index, key in enumerate(columns.keys):
            delete = bool(columns.deleted) and columns.deleted[index]
            out.append({"source": source, "key": key, "op": "delete" if delete else "upsert",
                        "updated_at": columns.updated[index],
                        "hash": NULL_HASH if delete else columns.hashes[index],
                        "data": None if delete else columns.records[index]})
        return out


class _Nowhere:
    """The fetcher process's log producer, stores and supervisor channel, as far as a probe needs them:
    partitions to split pages by, and publishing that keeps nothing."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions

    def partitions_for(self, topic: str) -> int:
        return self.partitions

    async def publish(self, messages: list) -> None:
        return None

    def send(self, message: object) -> None:
        return None


class ProbePass(SyncPass):
    """The fetcher's sync pass, stopping after ``max_pages`` (0: none) and keeping what it would publish."""

    def __init__(self, syncer: SourceSyncer, sync_type: str, *, max_pages: int, on_page) -> None:
        super().__init__(syncer, sync_type)
        self.max_pages = max_pages
        self.on_page = on_page
        self.fetched = 0
        self.stopped = False             # the walk wanted another page beyond max_pages
        self.reports: list[PageReport] = []
        self._timings: dict[int, float] = {}
        self._columns: Columns | None = None
        syncer.messages = self._keep  # what the fetcher would cut into log messages, kept for the report

    def _keep(self, columns: Columns, sync_type: str) -> list:
        self._columns = columns
        return []

    async def get(self, url: str, params: dict[str, str], **options: Any) -> Response:
        if self.max_pages and self.fetched >= self.max_pages:
            self.stopped = True
            raise StopProbe
        self.fetched += 1
        started = time.perf_counter()
        response = await super().get(url, params, **options)
        self._timings[id(response)] = time.perf_counter() - started
        return response

    async def handle(self, response: Response, **options: Any) -> PageInfo:
        dead_before = len(self.dead)
        self._columns = None
        info = await super().handle(response, **options)
        report = PageReport(page=len(self.reports) + 1, status=response.status, url=redact_url(response.url),
                            bytes=len(response.body), time_s=self._timings.pop(id(response), 0.0),
                            records=info.records, columns=self._columns, dead=self.dead[dead_before:],
                            next=next_token(response, info))
        self.reports.append(report)
        self.on_page(report)
        return info


def next_token(response: Response, info: PageInfo) -> dict[str, Any]:
    """What the page says about the next one: its paging fields that are set, a next link, and the
    keyset position of its last valid record."""
    token = {name: value for name, value in zip(info.meta._fields, info.meta) if value is not None}
    for header in response.headers.getall("Link", []):
        match = LINK_NEXT.search(header)
        if match:
            token["link"] = redact_url(match.group(1))
    if info.last is not None:
        token["last"] = {"updated": info.last[0], "key": info.last[1]}
    return token


def since_text(source: SourceConfig, iso: str) -> str:
    """``--since`` (ISO 8601) as the source's ``updated_since`` value: in its ``updated_since_format``, by
    default the text itself or a number of the source's epoch unit; ValueError if it is not ISO 8601."""
    from conflux.workers.batching import parse_timestamp_us
    from conflux.workers.paging import since_text as formatted

    instant_us = parse_timestamp_us(iso)
    unit_us = EPOCH_UNITS_US.get(source.updated_format)
    return formatted(source, instant_us, str(instant_us // unit_us) if unit_us else iso)


async def probe(config: Config, source: SourceConfig, *, max_pages: int, since: str | None, on_page) -> ProbePass:
    """Walk the source's pages as a sync would (incremental from ``since``, else full) until the end or
    ``max_pages``; UpstreamError or PageFormatError as a sync would fail."""
    # One page at a time, reported in order; nothing to reconcile (a reconcile writes its key index).
    source = msgspec.structs.replace(source, max_concurrency=1, reconcile=False)
    # The source and its parents: a parent is tested without its children, so it keeps no parent index.
    config = msgspec.structs.replace(config, sources=[source, *_ancestors(config, source)])
    nowhere = _Nowhere(config.log.partitions)
    worker = SimpleNamespace(config=config, producer=nowhere, checkpoints=nowhere, dead_letters=nowhere,
                             channel=nowhere, parent_index=lambda name: _parent_index(config, source, name))
    async with aiohttp.ClientSession(auto_decompress=True, cookie_jar=aiohttp.DummyCookieJar()) as session:
        syncer = SourceSyncer(worker, source, session)
        sync = ProbePass(syncer, "incremental" if since else "full", max_pages=max_pages, on_page=on_page)
        with contextlib.suppress(StopProbe):
            await _walk(syncer, sync, since)
        return sync


async def _walk(syncer: SourceSyncer, sync: ProbePass, since: str | None) -> int:
    """The fetcher's own walk of the source's pages (its paginator; a child's over its parents), over the
    probe's pass."""
    return await syncer.walk(sync, since)


def _ancestors(config: Config, source: SourceConfig) -> list[SourceConfig]:
    out = []
    while source.parent:
        source = config.source(source.parent)
        out.append(source)
    return out


def _parent_index(config: Config, source: SourceConfig, parent: str) -> ParentIndex:
    """A child source is tested over the live parents the daemon keeps on this host, read only."""
    index = ParentIndex(parent_index_dir(config), parent)
    if not Path(index.path).is_file():
        raise ConfigError(f"source {source.name!r} is a child of {parent!r}: it is tested over the parents the "
                          f"daemon keeps in {index.path}, and there is none on this host yet (test {parent!r}, "
                          "or run the daemon first)")
    return index
