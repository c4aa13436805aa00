"""The control process: the daemon's HTTP face on ``[control] listen``.

The supervisor binds the listening socket (so a replaced control process keeps the port and a bad
address fails at boot) and forks this process to serve it with aiohttp on uvloop. State comes from
the supervisor over the control channel; metrics are aggregated from every process's files;
webhooks are verified, published to the log, and answered 202 only once durable.

Endpoints: GET /health, /ready, /status, /metrics, / (status page); POST /sync/{source}?full=true,
POST /webhook/{source}. With ``[control] token`` set, all but /health, /ready and /metrics need
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

import msgspec
from aiohttp import web

from conflux import metrics
from conflux.errors import LogError, PageFormatError
from conflux.ipc.codec import encode_batch
from conflux.ipc.messages import StatusRequest, StatusSnapshot, SyncAccepted, SyncNow
from conflux.log import open_log
from conflux.log.base import OutgoingMessage
from conflux.secrets import read_secret
from conflux.workers.base import AsyncWorker
from conflux.workers.batching import RecordSchema, dead_letters, split_by_partition
from conflux.workers.status_page import STATUS_PAGE_HTML, Throughput

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
SIGNATURE_HEADER = "X-Conflux-Signature"
STATUS_TIMEOUT_S = 5.0


class ControlWorker(AsyncWorker):
    role = "control"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self._status_waiters: list[asyncio.Future] = []
        self._sync_waiters: dict[str, list[asyncio.Future]] = {}
        self.throughput = Throughput()

    async def main_async(self) -> int:
        backend = open_log(self.config)
        self.producer = backend.producer(durable=True)  # a webhook answered 202 must survive power loss
        self.dead_letters = backend.dead_letters()
        self.schemas = {source.name: RecordSchema(source) for source in self.config.sources}
        self.secrets = {source.name: read_secret(env=source.webhook_secret_env, literal=source.webhook_secret,
                                                 what=f"sources.{source.name}.webhook_secret")
                        for source in self.config.sources}
        self.token = read_secret(env=self.config.control.token_env, literal=self.config.control.token,
                                 what="control.token")
        app = self._app()
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.SockSite(runner, self.spec.listener)
        await site.start()
        sampler = asyncio.create_task(self._sample_throughput(), name="throughput")
        await self.stopping.wait()
        sampler.cancel()
        await runner.cleanup()
        await self.producer.close()
        self.dead_letters.close()
        return 0

    def _app(self) -> web.Application:
        max_body = max([s.webhook_max_bytes for s in self.config.sources] + [1 << 20])
        app = web.Application(middlewares=[self._auth_middleware], client_max_size=max_body + 1)
        app.add_routes([
            web.get("/", self.page),
            web.get("/health", self.health),
            web.get("/ready", self.ready),
            web.get("/status", self.status),
            web.get("/metrics", self.metrics),
            web.post("/sync/{source}", self.sync),
            web.post("/webhook/{source}", self.webhook),
        ])
        return app

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler):
        if self.token and request.path not in OPEN_PATHS:
            supplied = request.headers.get("Authorization", "")
            if not hmac.compare_digest(supplied.encode(), f"Bearer {self.token}".encode()):
                return _json({"error": "missing or wrong bearer token"}, status=401)
        return await handler(request)

    # -- supervisor conversation --------------------------------------------------------------------

    def on_control(self, message: object) -> None:
        if isinstance(message, StatusSnapshot):
            waiters, self._status_waiters = self._status_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(message.body)
        elif isinstance(message, SyncAccepted):
            for waiter in self._sync_waiters.pop(message.source, []):
                if not waiter.done():
                    waiter.set_result(message)

    async def _snapshot(self) -> dict:
        waiter = asyncio.get_running_loop().create_future()
        self._status_waiters.append(waiter)
        self.channel.send(StatusRequest())
        body = await asyncio.wait_for(waiter, timeout=STATUS_TIMEOUT_S)
        return msgspec.json.decode(body)

    async def _sample_throughput(self) -> None:
        """Every few seconds, the delivered and fetched totals of all processes (for the records/s chart)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                totals = await loop.run_in_executor(None, metrics.counter_totals, *Throughput.COUNTERS.values())
            except (OSError, ValueError) as exc:
                logger.warning("cannot read the metric files for the throughput chart: %s", exc)
            else:
                self.throughput.add(time.monotonic(), time.time(), totals)
            await asyncio.sleep(self.throughput.interval_s)

    # -- handlers ---------------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=STATUS_PAGE_HTML, content_type="text/html")

    async def health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        try:
            snapshot = await self._snapshot()
        except TimeoutError:
            return _json({"ready": False, "reason": "the supervisor did not answer"}, status=503)
        readiness = snapshot.get("ready", {})
        return _json(readiness, status=200 if readiness.get("ready") else 503)

    async def status(self, request: web.Request) -> web.Response:
        try:
            snapshot = await self._snapshot()
        except TimeoutError:
            return _json({"error": "the supervisor did not answer in time"}, status=503)
        snapshot["throughput"] = self.throughput.view()
        return _json(snapshot)

    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(None, metrics.render)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def sync(self, request: web.Request) -> web.Response:
        source = request.match_info["source"]
        if source not in self.schemas:
            return _json({"error": f"unknown source {source!r}"}, status=404)
        full = request.query.get("full", "false").lower() in ("1", "true", "yes")
        waiter = asyncio.get_running_loop().create_future()
        self._sync_waiters.setdefault(source, []).append(waiter)
        self.channel.send(SyncNow(source=source, full=full))
        try:
            answer = await asyncio.wait_for(waiter, timeout=STATUS_TIMEOUT_S)
        except TimeoutError:
            return _json({"error": "the supervisor did not answer in time"}, status=503)
        status = 202 if answer.accepted else 409
        return _json({"source": source, "full": full, "accepted": answer.accepted, "detail": answer.detail},
                     status=status)

    async def webhook(self, request: web.Request) -> web.Response:
        source = request.match_info["source"]
        if source not in self.schemas:
            return _json({"error": f"unknown source {source!r}"}, status=404)
        config = self.config.source(source)
        if (request.content_length or 0) > config.webhook_max_bytes:
            metrics.webhook_requests.labels(source, "413").inc()
            return _json({"error": f"body over {config.webhook_max_bytes} bytes"}, status=413)
        body = await _read_limited(request, config.webhook_max_bytes)
        if body is None:
            metrics.webhook_requests.labels(source, "413").inc()
            return _json({"error": f"body over {config.webhook_max_bytes} bytes"}, status=413)
        if not self._signed(source, body, request.headers.get(SIGNATURE_HEADER, "")):
            metrics.webhook_requests.labels(source, "401").inc()
            return _json({"error": f"missing or wrong {SIGNATURE_HEADER}"}, status=401)
        try:
            accepted, rejected = await self._publish_webhook(source, body)
        except PageFormatError as exc:
            metrics.webhook_requests.labels(source, "400").inc()
            return _json({"error": str(exc)}, status=400)
        except LogError as exc:
            metrics.webhook_requests.labels(source, "503").inc()
            return _json({"error": f"the log is not available: {exc}"}, status=503)
        metrics.webhook_requests.labels(source, "202").inc()
        return _json({"accepted": accepted, "dead_lettered": rejected}, status=202)

    def _signed(self, source: str, body: bytes, header: str) -> bool:
        secret = self.secrets.get(source, "")
        if not secret or not header.startswith("sha256="):
            return False
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected.encode(), header[len("sha256="):].strip().lower().encode())

    async def _publish_webhook(self, source: str, body: bytes) -> tuple[int, int]:
        """Same path as a fetched page: columns, dead letters, per-partition batches, durable publish."""
        schema = self.schemas[source]
        records, fields = schema.body_records(body)
        columns = schema.columns(records, fields)
        topic = self.config.topic_of(self.config.source(source))
        batches = split_by_partition(columns, source, "webhook", self.producer.partitions_for(topic))
        await self.producer.publish([OutgoingMessage(topic, partition, batch.keys[0].encode(), encode_batch(batch))
                                     for partition, batch in batches])
        if columns.dead:
            received = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            entries = dead_letters(columns, source, "fetch", f"webhook received {received}")
            await asyncio.get_running_loop().run_in_executor(None, self.dead_letters.add, entries)
            for _entry in entries:
                metrics.dlq_records.labels(source, "malformed").inc()
        metrics.records_fetched.labels(source).inc(len(records))
        return len(columns), len(columns.dead)


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None as soon as it grows past ``limit`` (chunked bodies carry no Content-Length)."""
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")
