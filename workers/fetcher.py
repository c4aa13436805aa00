"""The fetcher process: syncs its sources from their upstream APIs into the log.

asyncio on uvloop, one ``SourceSyncer`` task per source, so a slow or failing source never holds up
another. A source's first sync is full; after that it syncs incrementally every ``poll_interval_s``
from its watermark (inclusive), with a full pass every ``full_sync_interval_s``. Each page is
decoded, split into per-partition batches and published as soon as it arrives; the watermark is
saved only once every record of the sync (and every dead letter) is durable in the log.

A source's paginator (``workers.paging``, a built-in style or a plugin) walks its pages; a child source
(``parent = "..."``) is walked once per live parent record (``workers.parents``), in the fetcher that
holds its parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp

from conflux import metrics
from conflux.config import SourceConfig
from conflux.errors import LogError, PageFormatError, UpstreamError
from conflux.ipc.codec import encode_batch
from conflux.ipc.messages import DeadLetter, ReconcileReport, SourceReport, SourcesOwned, SyncNow
from conflux.log import open_log
from conflux.log.base import Checkpoint, CheckpointStore, DeadLetterStore, LogProducer, OutgoingMessage
from conflux.workers.base import AsyncWorker
from conflux.workers.batching import (
    RecordSchema,
    dead_letters,
    publish_limit_bytes,
    set_aside_oversized,
    split_by_partition,
)
from conflux.workers.columns import Columns
from conflux.workers.keyindex import KeyIndex, key_index_dir
from conflux.workers.ownership import ownership_for
from conflux.workers.page_request import PageRequests
from conflux.workers.paging import PageInfo, make_paginator, native_text, since_text
from conflux.workers.parents import (
    Cascade,
    ChildWalk,
    Parent,
    ParentIndex,
    ParentStamp,
    parent_changes,
    parent_index_dir,
)
from conflux.workers.reconcile import Reconciler
from conflux.workers.upstream import Response, UpstreamClient

logger = logging.getLogger(__name__)

MAX_PAGES_PUBLISHING = 8  # pages decoded but not yet durable, per source: bounds a fetcher's memory


class SyncPass:
    """One sync of one source: fetch pages, publish their batches, remember the newest instant seen."""

    def __init__(self, syncer: SourceSyncer, sync_type: str) -> None:
        self.syncer = syncer
        self.sync_type = sync_type
        self.publishing: set[asyncio.Task] = set()
        self.room = asyncio.Semaphore(MAX_PAGES_PUBLISHING)
        self.dead: list[DeadLetter] = []
        self.records = self.valid = self.deletes = 0
        self.newest: tuple[int, str] = (0, "")
        self.failure: BaseException | None = None
        self.parents_changed = 0   # a parent source: parents that became live or deleted in this pass

    async def get(self, url: str, params: dict[str, str], *, parent: Parent | None = None) -> Response:
        """One page request (``parent``: the parent record a child source's page is asked for)."""
        if self.failure is not None:
            raise self.failure
        await self.room.acquire()  # released when the page's batches are durable
        try:
            outgoing = self.syncer.requests.outgoing(params, parent.fields if parent is not None else None)
            return await self.syncer.client.send(url, outgoing)
        except BaseException:
            self.room.release()
            raise

    async def handle(self, response: Response, *, parent: Parent | None = None) -> PageInfo:
        syncer = self.syncer
        started = time.perf_counter()
        decoded = syncer.schema.page_records_fast(response.body)
        if decoded is None:  # a record too deep for msgspec: cutting the page apart is slow, keep it off the loop
            decoded = await asyncio.to_thread(syncer.schema.split_page, response.body)
        records, fields, meta = decoded
        if parent is not None and syncer.stamp is not None:
            records, fields = syncer.stamp.stamp(records, fields, parent.fields.get("", parent.key))
        columns = set_aside_oversized(syncer.schema.columns(records, fields), syncer.source.name, self.sync_type,
                                      syncer.max_batch_bytes)
        self._count(columns, len(records), response.url)
        seen_us = time.time_ns() // 1000
        if syncer.reconciler is not None:
            await syncer.reconciler.seen(columns, seen_us, parent=parent.key if parent is not None else "")
        if syncer.parent_index is not None:
            changes = parent_changes(syncer.schema, syncer.child_fields, columns, fields)
            self.parents_changed += await asyncio.to_thread(syncer.parent_index.record, changes, seen_us)
        task = asyncio.create_task(self._publish(syncer.messages(columns, self.sync_type)))
        self.publishing.add(task)
        task.add_done_callback(self.publishing.discard)
        metrics.records_fetched.labels(syncer.source.name).inc(len(records))
        metrics.processing_duration.labels("decode").observe(time.perf_counter() - started)
        last = (since_text(syncer.source, columns.updated_us[-1], columns.native_text(-1)), columns.keys[-1]) \
            if len(columns) else None
        return PageInfo(len(records), meta, last)

    def _count(self, columns: Columns, records: int, origin: str) -> None:
        self.records += records
        self.valid += len(columns)
        self.deletes += sum(columns.deleted)
        if columns.dead:
            self.dead.extend(dead_letters(columns, self.syncer.source.name, "fetch", origin))
        if len(columns):
            self.newest = max(self.newest, columns.max_updated())

    async def _publish(self, messages: list[OutgoingMessage]) -> None:
        try:
            await self.syncer.producer.publish(messages)
        except BaseException as exc:
            self.failure = exc
            raise
        finally:
            self.room.release()

    async def finish(self) -> None:
        """Wait until every page and dead letter of this pass is durable; raise the first failure."""
        if self.publishing:
            await asyncio.gather(*self.publishing, return_exceptions=True)
        if self.failure is not None:
            raise self.failure
        if self.dead:
            await asyncio.get_running_loop().run_in_executor(None, self.syncer.dead_letters.add, self.dead)
            for entry in self.dead:
                metrics.dlq_records.labels(entry.source, "malformed").inc()

    def abandon(self) -> None:
        for task in self.publishing:
            task.cancel()


class SourceSyncer:
    """The sync schedule and state of one source, living in a fetcher process."""

    def __init__(self, worker: FetcherWorker, source: SourceConfig, session: aiohttp.ClientSession) -> None:
        self.worker = worker
        self.source = source
        self.topic = worker.config.topic_of(source)
        self.partitions = worker.producer.partitions_for(self.topic)
        self.max_batch_bytes = publish_limit_bytes(worker.config.workers.ring_bytes, self.topic)
        # A parent source decodes the fields its children's urls use along with each record's identity.
        self.child_fields = sorted({path for child in worker.config.children_of(source.name)
                                    for path in child.parent_paths()})
        self.schema = RecordSchema(source, extra_fields=self.child_fields)
        self.client = UpstreamClient(source, worker.config.retry, session)
        self.client.breaker.on_change_hooks.append(lambda state: self._send_report())
        self.producer: LogProducer = worker.producer
        self.checkpoints: CheckpointStore = worker.checkpoints
        self.dead_letters: DeadLetterStore = worker.dead_letters
        self.paginator = make_paginator(source)
        self.requests = PageRequests(source)
        self.requested = asyncio.Event()
        self.force_full = False
        self.checkpoint: Checkpoint | None = None
        self.report = SourceReport(source=source.name)
        self.reconciler = Reconciler(source, worker.key_index(source.name), self.client, self.publish_columns,
                                     stable=self.paginator.stable) if source.reconcile else None
        self.parent_index = worker.parent_index(source.name) if worker.config.children_of(source.name) else None
        self._init_child(worker)

    def _init_child(self, worker: FetcherWorker) -> None:
        """A child source: its parent's index, its walk over the parents, the parent key it stamps."""
        source = self.source
        self.parents = worker.parent_index(source.parent) if source.parent else None
        self.children = ChildWalk(source, self.parents, self.paginator) if self.parents is not None else None
        identity = [*source.key_paths, source.updated, source.deleted, source.filter.field if source.filter else ""]
        self.stamp = ParentStamp(self.schema, source.parent_key_field, identity) \
            if source.parent and source.parent_key_field else None
        self.cascade = Cascade(source, self.parents, self.reconciler.index, self.publish_columns) \
            if self.parents is not None and self.reconciler is not None else None

    def messages(self, columns: Columns, sync_type: str) -> list[OutgoingMessage]:
        """The log messages of a page's (or a reconcile's) columns: per partition, cut to fit a ring frame."""
        batches = split_by_partition(columns, self.source.name, sync_type, self.partitions,
                                     max_batch_bytes=self.max_batch_bytes)
        return [OutgoingMessage(self.topic, partition, batch.keys[0].encode(), encode_batch(batch))
                for partition, batch in batches]

    async def publish_columns(self, columns: Columns, sync_type: str) -> None:
        """Publish and wait until durable (a reconcile's deletes)."""
        await self.producer.publish(self.messages(columns, sync_type))
        self.report.deletes_published += sum(columns.deleted)
        if self.parent_index is not None and await asyncio.to_thread(
                self.parent_index.record, parent_changes(self.schema, [], columns, []), time.time_ns() // 1000):
            self.worker.parents_changed(self.source.name)

    def request(self, full: bool) -> None:
        self.force_full = self.force_full or full
        self.requested.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.checkpoint = await loop.run_in_executor(None, self.checkpoints.load, self.source.name)
        if self.checkpoint is not None:
            self.report.watermark = self.checkpoint.watermark
        if self.parents is not None:
            await self._wait_for_parent()
        while True:
            full = await self._full_due()
            self.force_full = False
            self.requested.clear()
            await self._sync("full" if full else "incremental")
            await self._wait_for_next()

    async def _full_due(self) -> bool:
        if self.force_full or self.checkpoint is None:
            return True
        if self.parent_index is not None and not await asyncio.to_thread(self.parent_index.complete):
            return True   # the parent index of this instance must learn every parent before children use it
        return time.time() >= self.checkpoint.last_full_sync_at + self.source.full_sync_interval_s

    async def _wait_for_parent(self) -> None:
        """A child syncs once its parent's index knows every parent (a full sync of the parent completed)."""
        self.report.last_sync_result = f"waiting for the first complete full sync of its parent {self.source.parent!r}"
        self._send_report()
        while not await asyncio.to_thread(self.parents.complete):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.parents.ready.wait(), timeout=self.source.poll_interval_s)

    async def _wait_for_next(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.requested.wait(), timeout=self.source.poll_interval_s)

    async def _sync(self, sync_type: str) -> None:
        since = since_text(self.source, self.checkpoint.watermark_us, self.checkpoint.watermark) \
            if sync_type == "incremental" and self.checkpoint else None
        if since is not None and self._beyond_skew(self.checkpoint.watermark_us):
            # Saved before future stamps were refused: asking for updated_since=2999 would never see a change.
            logger.warning("%s: the saved watermark %s is in the future; syncing in full instead", self.source.name,
                           since)
            sync_type, since = "full", None
        started, wall_started = time.monotonic(), time.time()
        sync = SyncPass(self, sync_type)
        self.report.syncing = True
        self._send_report()
        try:
            pages = await self.walk(sync, since)
            await sync.finish()
        except (UpstreamError, PageFormatError, LogError) as exc:
            sync.abandon()
            self._finished(sync, wall_started, f"failed: {exc}")
            logger.warning("%s: %s sync failed after %d records: %s", self.source.name, sync_type, sync.records, exc)
            return
        await self._save_checkpoint(sync, wall_started)
        await self._family_synced(sync, wall_started)
        self._finished(sync, wall_started, "ok")
        logger.info("%s: %s sync ok: %d pages, %d records (%d dead-lettered) in %.2f s, watermark %s",
                    self.source.name, sync_type, pages, sync.records, len(sync.dead), time.monotonic() - started,
                    self.report.watermark or "-")
        if sync_type == "full" and self.reconciler is not None:
            await self._reconcile(round(wall_started * 1_000_000))

    async def walk(self, sync: SyncPass, since: str | None) -> int:
        """One walk of the source's pages over ``sync`` (its paginator; a child's over its live parents)."""
        if self.children is None:
            return await self.paginator.walk(sync, self.source.url, since)
        if self.cascade is not None:
            await self.cascade.run()
        return await self.children.walk(sync, since)

    async def _family_synced(self, sync: SyncPass, wall_started: float) -> None:
        """After a complete sync: a parent's index learns it (and wakes its children), a child notes its start."""
        started_us = round(wall_started * 1_000_000)
        if self.parent_index is not None:
            if sync.sync_type == "full":
                await asyncio.to_thread(self.parent_index.full_sync_complete, started_us)
                self.parent_index.ready.set()
            if sync.parents_changed:
                self.worker.parents_changed(self.source.name)
        if self.parents is not None:
            await asyncio.to_thread(self.parents.child_synced, self.source.name, started_us)

    async def _reconcile(self, started_us: int) -> None:
        """Only after a complete full sync whose records are all durable: see workers.reconcile."""
        try:
            self.report.reconcile = await self.reconciler.run(started_us)
        except LogError as exc:
            self.report.reconcile = ReconcileReport(at=time.time(), detail=f"failed: {exc}")
            logger.warning("%s: reconcile failed, nothing was deleted for good: %s", self.source.name, exc)
        self._send_report()

    async def _save_checkpoint(self, sync: SyncPass, wall_started: float) -> None:
        previous = self.checkpoint
        newest_us, newest_text = sync.newest
        if self.parents is not None:
            # Parents are walked one after another: a change to one walked early may be stamped before the
            # newest record of one walked late. Resume no later than the start (less the clocks' skew).
            bound_us = round((wall_started - self.source.max_clock_skew_s) * 1_000_000)
            if newest_us > bound_us:
                newest_us, newest_text = bound_us, native_text(self.source, bound_us)
        if previous is not None and previous.watermark_us >= newest_us and not self._beyond_skew(previous.watermark_us):
            newest_us, newest_text = previous.watermark_us, previous.watermark
        last_full = wall_started if sync.sync_type == "full" else (previous.last_full_sync_at if previous else 0.0)
        checkpoint = Checkpoint(self.source.name, newest_text, newest_us, last_full, time.time())
        await asyncio.get_running_loop().run_in_executor(None, self.checkpoints.save, checkpoint)
        self.checkpoint = checkpoint

    def _beyond_skew(self, instant_us: int) -> bool:
        """True for an instant later than now plus max_clock_skew_s, which no watermark may be."""
        return instant_us > (time.time() + self.source.max_clock_skew_s) * 1_000_000

    def _finished(self, sync: SyncPass, wall_started: float, result: str) -> None:
        report = self.report
        report.syncing = False
        report.last_sync_at = time.time()
        report.last_sync_type = sync.sync_type
        report.last_sync_result = result
        report.last_sync_records = sync.records
        report.breaker = self.client.breaker.state
        report.deletes_published += sync.deletes
        if result == "ok":
            report.syncs_ok += 1
            report.records_synced += sync.valid
            report.watermark = self.checkpoint.watermark if self.checkpoint else ""
            metrics.last_sync_timestamp.labels(self.source.name).set(report.last_sync_at)
        else:
            report.syncs_failed += 1
        self.update_lag()
        self._send_report()

    def update_lag(self) -> None:
        if self.checkpoint is not None and self.checkpoint.watermark_us:
            lag_s = max(0.0, time.time() - self.checkpoint.watermark_us / 1_000_000)
            metrics.sync_lag.labels(self.source.name).set(lag_s)

    def _send_report(self) -> None:
        self.report.breaker = self.client.breaker.state
        self.worker.channel.send(self.report)


class FetcherWorker(AsyncWorker):
    role = "fetcher"

    async def main_async(self) -> int:
        backend = open_log(self.config)
        self.producer = backend.producer()
        self.checkpoints = backend.checkpoints()
        self.dead_letters = backend.dead_letters()
        self.syncers: dict[str, SourceSyncer] = {}
        self.key_indexes: dict[str, KeyIndex] = {}
        self.parent_indexes: dict[str, ParentIndex] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.failure: BaseException | None = None
        ownership = ownership_for(backend, list(self.spec.sources),
                                  roots={name: self.config.root_of(name) for name in self.spec.sources})
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        # No cookie jar: cookies match by host and ignore the port, so they could reach another origin.
        async with aiohttp.ClientSession(connector=connector, auto_decompress=True,
                                         cookie_jar=aiohttp.DummyCookieJar()) as self.session:
            watcher = asyncio.create_task(ownership.run(self), name="ownership")
            watcher.add_done_callback(self._task_ended)
            await self.stopping.wait()
            watcher.cancel()
            # Stop fetching before giving the sources up, so the next owner never overlaps with us.
            tasks = list(self.tasks.values())
            self.lose(list(self.tasks))
            await asyncio.gather(watcher, *tasks, return_exceptions=True)
            ownership.close()
        await self.producer.close()
        self.checkpoints.close()
        self.dead_letters.close()
        for index in [*self.key_indexes.values(), *self.parent_indexes.values()]:
            index.close()
        if self.failure is not None:
            raise self.failure
        return 0

    def _task_ended(self, task: asyncio.Task) -> None:
        """A syncer or the ownership task died of an error (the log failed): exit as a crash, so the
        supervisor restarts this process instead of leaving a source unsynced."""
        if not task.cancelled() and task.exception() is not None:
            self.failure = self.failure or task.exception()
            self.stopping.set()

    def key_index(self, source: str) -> KeyIndex:
        if source not in self.key_indexes:
            self.key_indexes[source] = KeyIndex(key_index_dir(self.config), source)
        return self.key_indexes[source]

    def parent_index(self, source: str) -> ParentIndex:
        """The index of a parent source, shared by its syncer and its children's."""
        if source not in self.parent_indexes:
            self.parent_indexes[source] = ParentIndex(parent_index_dir(self.config), source)
        return self.parent_indexes[source]

    def parents_changed(self, source: str) -> None:
        """Parents of ``source`` became live or were deleted: its children sync now rather than at their poll."""
        for syncer in self.syncers.values():
            if syncer.source.parent == source:
                syncer.request(full=False)

    def gain(self, sources: list[str]) -> None:
        """Ownership handed us these sources: start syncing them (from their saved checkpoints)."""
        for name in sources:
            if name not in self.tasks:
                self.syncers[name] = SourceSyncer(self, self.config.source(name), self.session)
                self.tasks[name] = asyncio.create_task(self.syncers[name].run(), name=f"sync-{name}")
                self.tasks[name].add_done_callback(self._task_ended)
        self.channel.send(SourcesOwned(sources=sorted(self.syncers)))

    def lose(self, sources: list[str]) -> None:
        """Another fetcher owns these now: stop at once; an unfinished sync saved no checkpoint."""
        for name in sources:
            task = self.tasks.pop(name, None)
            self.syncers.pop(name, None)
            if task is not None:
                task.cancel()
        self.channel.send(SourcesOwned(sources=sorted(self.syncers)))

    def on_control(self, message: object) -> None:
        if isinstance(message, SyncNow) and message.source in self.syncers:
            self.syncers[message.source].request(message.full)

    def stats(self) -> dict[str, float]:
        for syncer in getattr(self, "syncers", {}).values():
            syncer.update_lag()
        return {"sources": len(getattr(self, "syncers", {}))}
