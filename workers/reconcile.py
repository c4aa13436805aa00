"""Hard deletes: after a complete full sync of a source with ``reconcile = true``, delete the keys it
did not list.

Runs in the fetcher that owns the source. Every page and webhook of the source marks its keys as seen
in the source's on-disk key index (``workers.keyindex``). When a full sync that started at T0 has
read every page and every record of it is durable in the log, the live keys not seen since T0 are
the candidates:
- more than ``reconcile_max_fraction`` of the live keys missing refuses the whole reconcile (an
  upstream that briefly answers empty pages must not wipe analytics);
- a key with a version at or after T0 is kept (something newer than the sync exists);
- cursor and keyset styles (a paginator whose ``stable`` is true) list every record exactly once, so a
  candidate is deleted at once; with page, offset, link and next_url styles a record can move past the
  pager while the sync runs, so a candidate is deleted only at a second look: the next complete full
  sync misses it too, or ``lookup_url`` answers 404 for it.
A delete is published like any other version (``updated_at`` = T0, ``op`` delete) and reaches every
sink through the log, the consumers and the mergers; the index remembers it, so the key is not
deleted again, and a late, older upsert cannot revive it there either.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from msgspec import Raw
from xxhash import xxh3_64_hexdigest

from conflux import metrics
from conflux.config import SourceConfig
from conflux.errors import UpstreamError
from conflux.ipc.messages import ReconcileReport
from conflux.workers.columns import Columns
from conflux.workers.keyindex import Candidate, KeyIndex
from conflux.workers.shaping import iso_utc
from conflux.workers.upstream import UpstreamClient

logger = logging.getLogger(__name__)

CANDIDATE_BATCH = 1000
NULL_RECORD = Raw(b"null")


Publish = Callable[[Columns, str], Awaitable[None]]


class Reconciler:
    """A reconciled source's key index and the reconcile after each complete full sync. ``client`` is the
    source's own (lookups share its rate limit and credentials); ``publish`` makes columns durable."""

    def __init__(self, source: SourceConfig, index: KeyIndex, client: UpstreamClient, publish: Publish, *,
                 stable: bool = False) -> None:
        """``stable``: the source's paginator lists every record exactly once per sync (``Paginator.stable``)."""
        self.source = source
        self.index = index
        self.client = client
        self.publish = publish
        self.stable = stable

    async def seen(self, columns: Columns, seen_us: int, *, parent: str = "") -> None:
        """A page of the source was published: its keys are live (or deleted) as of ``seen_us``, and so are
        those of its dead-lettered records whose key could be read (see ``KeyIndex.seen_columns``);
        ``parent``: the parent record's key a child source's page was listed under."""
        if len(columns) or columns.dead:
            await asyncio.to_thread(self.index.seen_columns, columns, seen_us, parent=parent)

    async def run(self, started_us: int) -> ReconcileReport:
        """Compare the index with the full sync that started at ``started_us``; publish the deletes."""
        began = time.monotonic()
        reconcile = await asyncio.to_thread(self.index.reconcile, started_us)
        report = ReconcileReport(at=time.time(), live=reconcile.live, checked=reconcile.missing,
                                 sync_started_at=started_us / 1_000_000)
        if reconcile.live and reconcile.missing > self.source.reconcile_max_fraction * reconcile.live:
            await asyncio.to_thread(reconcile.abandon)
            report.duration_s = round(time.monotonic() - began, 3)
            return self._refused(report)
        try:
            candidates = reconcile.candidates(CANDIDATE_BATCH)
            while batch := await asyncio.to_thread(next, candidates, None):
                deleted, waiting = await self._decide(batch, started_us, report)
                await self._publish_deletes(deleted, started_us)
                await asyncio.to_thread(reconcile.decide, deleted=[c.key_hash for c in deleted],
                                        missed=[c.key_hash for c in waiting])
            await asyncio.to_thread(reconcile.commit)
        except BaseException:
            await asyncio.to_thread(reconcile.abandon)
            raise
        self._count(report)
        report.duration_s = round(time.monotonic() - began, 3)
        logger.info("%s: reconcile after the full sync: %d live keys, %d not listed: %d deleted, %d waiting "
                    "for a second look, %d kept, in %.2f s", self.source.name, report.live, report.checked,
                    report.deleted, report.waiting, report.kept, report.duration_s)
        return report

    def _refused(self, report: ReconcileReport) -> ReconcileReport:
        report.refused = True
        report.detail = (f"{report.checked} of {report.live} known keys were not listed, more than "
                         f"reconcile_max_fraction = {self.source.reconcile_max_fraction:g}: nothing deleted")
        metrics.reconciles_refused.labels(self.source.name).inc()
        metrics.reconcile_keys.labels(self.source.name, "checked").inc(report.checked)
        logger.warning("%s: reconcile refused: %s", self.source.name, report.detail)
        return report

    async def _decide(self, batch: list[Candidate], started_us: int,
                      report: ReconcileReport) -> tuple[list[Candidate], list[Candidate]]:
        """Which candidates to delete now and which wait for a second look."""
        deleted, waiting, look = [], [], []
        for candidate in batch:
            if candidate.updated_us >= started_us:
                report.kept += 1            # a version at or after the sync's start: never deleted by it
            elif self.stable or candidate.missed >= 1:
                deleted.append(candidate)
            elif self.source.lookup_url:
                look.append(candidate)
            else:
                waiting.append(candidate)
        for candidate, status in zip(look, await asyncio.gather(*map(self._look_up, look)), strict=True):
            if status == 404:
                deleted.append(candidate)
            elif status is None:
                waiting.append(candidate)   # the lookup failed: the next full sync looks again
            else:
                report.kept += 1            # the upstream still has it: the pager missed it
        report.deleted += len(deleted)
        report.waiting += len(waiting)
        return deleted, waiting

    async def _look_up(self, candidate: Candidate) -> int | None:
        """The lookup's status (404: deleted), or None when it could not be asked."""
        url = self.source.lookup_url.replace("{key}", quote(candidate.key, safe=""))
        try:
            response = await self.client.get(url, accept=frozenset({404}))
        except UpstreamError as exc:
            logger.warning("%s: lookup of a reconcile candidate failed: %s", self.source.name, exc)
            return None
        return response.status

    async def _publish_deletes(self, deleted: list[Candidate], started_us: int) -> None:
        """One delete version per key, at the sync's start, through the log like every other version."""
        if not deleted:
            return
        count = len(deleted)
        text = iso_utc(started_us)
        columns = Columns(keys=[c.key for c in deleted], updated=[text] * count, updated_us=[started_us] * count,
                          hashes=[xxh3_64_hexdigest(f"delete\0{c.key}\0{text}".encode()) for c in deleted],
                          key_hashes=[c.key_hash for c in deleted], records=[NULL_RECORD] * count,
                          deleted=[True] * count, dead=[])
        await self.publish(columns, "reconcile")

    def _count(self, report: ReconcileReport) -> None:
        for outcome in ("checked", "deleted", "waiting", "kept"):
            metrics.reconcile_keys.labels(self.source.name, outcome).inc(getattr(report, outcome))
