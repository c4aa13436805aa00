"""The control process: the daemon's HTTP face on ``[control] listen``.

The supervisor binds the listening socket (so a replaced control process keeps the port and a bad
address fails at boot) and forks this process to serve it with aiohttp on uvloop, over TLS when
``tls_cert_file`` is set. State comes from the supervisor over the control channel; metrics are
aggregated from every process's files; webhooks are verified, published to the log, and answered
202 only once durable.

Endpoints and what they require (control_security.py has the signing rules):
- open: GET / (the page's HTML; its script asks for the token), /health, /ready, and /metrics unless
  ``metrics_require_token``;
- the admin bearer token, when ``[control] token`` is set: GET /status, POST /sync/{source}?full=true;
- the source's signature only (never the admin token): POST /webhook/{source}.
/ready and /health never make the supervisor work per request: /ready answers from a snapshot at
most ``READY_MAX_AGE_S`` old, so a probe flood costs the supervisor one snapshot a second.
"""

from __future__ import annotations

import asyncio
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
from conflux.workers.batching import RecordSchema, dead_letters, publish_limit_bytes, split_by_partition
from conflux.workers.control_limits import BodyBudget, ConnectionLimits
from conflux.workers.control_security import ReplayMemory, bearer_ok, server_ssl_context
from conflux.workers.keyindex import KeyIndex, key_index_dir
from conflux.workers.status_page import STATUS_PAGE_HTML, Throughput
from conflux.workers.webhook_envelope import WebhookEnvelope
from conflux.workers.webhook_signatures import DeliveryMemory, Presented, scheme_for, verify

logger = logging.getLogger(__name__)

# Routes anyone may call; "webhook" is checked by its signature instead, "metrics" by the config.
OPEN_ROUTES = frozenset({"page", "health", "ready"})
STATUS_TIMEOUT_S = 5.0
READY_MAX_AGE_S = 1.0
LISTEN_BACKLOG = 128


class ControlWorker(AsyncWorker):
    role = "control"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self._status_waiters: list[asyncio.Future] = []
        self._sync_waiters: dict[str, list[asyncio.Future]] = {}
        self._snapshot_body: bytes | None = None
        self._snapshot_at = self._requested_at = self._answered_at = float("-inf")
        self.throughput = Throughput()

    async def main_async(self) -> int:
        control = self.config.control
        backend = open_log(self.config)
        self.producer = backend.producer(durable=True)  # a webhook answered 202 must survive power loss
        self.dead_letters = backend.dead_letters()
        self.schemas = {source.name: RecordSchema(source) for source in self.config.sources}
        self.key_indexes = {source.name: KeyIndex(key_index_dir(self.config), source.name)
                            for source in self.config.sources if source.reconcile}
        self.secrets = {source.name: read_secret(env=source.webhook_secret_env, literal=source.webhook_secret,
                                                 what=f"sources.{source.name}.webhook_secret")
                        for source in self.config.sources}
        self.token = read_secret(env=control.token_env, literal=control.token, what="control.token")
        self.schemes = {source.name: scheme_for(source) for source in self.config.sources}
        self.envelopes = {source.name: WebhookEnvelope(source) for source in self.config.sources}
        self.replays = ReplayMemory(tolerance_s=control.webhook_tolerance_s)
        self.deliveries = DeliveryMemory()  # for the schemes that sign no send time (github, hmac)
        self.limits = ConnectionLimits(max_connections=control.max_connections,
                                       header_timeout_s=control.header_timeout_s)
        self.bodies = BodyBudget(control.webhook_buffer_bytes)
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        server = await self._serve(runner)
        sampler = asyncio.create_task(self._sample_throughput(), name="throughput")
        await self.stopping.wait()
        sampler.cancel()
        server.close()
        await runner.cleanup()
        await self.producer.close()
        self.dead_letters.close()
        for index in self.key_indexes.values():
            index.close()
        return 0

    async def _serve(self, runner: web.AppRunner) -> asyncio.Server:
        """aiohttp's protocol behind the connection limits, on the supervisor's socket, TLS if configured."""
        control = self.config.control
        context = server_ssl_context(control)
        tls = {"ssl": context, "ssl_handshake_timeout": control.header_timeout_s} if context else {}
        return await asyncio.get_running_loop().create_server(
            self.limits.factory(runner.server), sock=self.spec.listener, backlog=LISTEN_BACKLOG, **tls)

    def _app(self) -> web.Application:
        max_body = max([s.webhook_max_bytes for s in self.config.sources] + [1 << 20])
        app = web.Application(middlewares=[self._guard_middleware], client_max_size=max_body + 1)
        app.add_routes([
            web.get("/", self.page, name="page"),
            web.get("/health", self.health, name="health"),
            web.get("/ready", self.ready, name="ready"),
            web.get("/status", self.status, name="status"),
            web.get("/metrics", self.metrics, name="metrics"),
            web.post("/sync/{source}", self.sync, name="sync"),
            web.post("/webhook/{source}", self.webhook, name="webhook"),
        ])
        return app

    @web.middleware
    async def _guard_middleware(self, request: web.Request, handler):
        self.limits.request_started(request.transport)
        try:
            if self._needs_token(request) and not bearer_ok(request.headers.get("Authorization", ""), self.token):
                return _json({"error": "missing or wrong bearer token"}, status=401)
            return await handler(request)
        finally:
            self.limits.request_finished(request.transport)

    def _needs_token(self, request: web.Request) -> bool:
        """By the matched route, not the raw path: an unknown or odd path needs the token too."""
        if not self.token:
            return False
        route = request.match_info.route.name
        if route == "metrics":
            return self.config.control.metrics_require_token
        return route not in OPEN_ROUTES and route != "webhook"

    # -- supervisor conversation --------------------------------------------------------------------

    def on_control(self, message: object) -> None:
        if isinstance(message, StatusSnapshot):
            self._snapshot_body, self._snapshot_at = message.body, time.monotonic()
            self._answered_at = self._snapshot_at
            waiters, self._status_waiters = self._status_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(message.body)
        elif isinstance(message, SyncAccepted):
            for waiter in self._sync_waiters.pop(message.source, []):
                if not waiter.done():
                    waiter.set_result(message)

    async def _snapshot(self, endpoint: str, *, max_age_s: float = 0.0) -> dict:
        """The supervisor's status; with ``max_age_s``, a recent one or the answer to a question in flight."""
        now = time.monotonic()
        if self._snapshot_body is not None and now - self._snapshot_at <= max_age_s:
            return msgspec.json.decode(self._snapshot_body)
        waiter = asyncio.get_running_loop().create_future()
        self._status_waiters.append(waiter)
        in_flight = self._requested_at > self._answered_at and now - self._requested_at < STATUS_TIMEOUT_S
        if not (max_age_s and in_flight):
            self._requested_at = now
            metrics.control_status_requests.labels(endpoint).inc()
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
            snapshot = await self._snapshot("ready", max_age_s=READY_MAX_AGE_S)
        except TimeoutError:
            return _json({"ready": False, "reason": "the supervisor did not answer"}, status=503)
        readiness = snapshot.get("ready", {})
        return _json(readiness, status=200 if readiness.get("ready") else 503)

    async def status(self, request: web.Request) -> web.Response:
        try:
            snapshot = await self._snapshot("status")
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
        """Headers first (signature present, timestamp fresh, size), so a forged or stalled upload costs
        nothing; then the body under the shared buffer and a deadline; then the HMAC and the replay check."""
        source = request.match_info["source"]
        if source not in self.schemas:
            return _json({"error": f"unknown source {source!r}"}, status=404)
        max_bytes = self.config.source(source).webhook_max_bytes
        presented = self.schemes[source].presented(request.headers, now=time.time(),
                                                   tolerance_s=self.config.control.webhook_tolerance_s)
        if isinstance(presented, str):
            return _refusal(source, 401, presented)
        if (request.content_length or 0) > max_bytes:
            return _refusal(source, 413, f"body over {max_bytes} bytes")
        reserved = request.content_length if request.content_length is not None else max_bytes
        if not self.bodies.take(reserved):
            metrics.control_refused.labels("buffer_full").inc()
            return _refusal(source, 503, "too many webhook bodies in transit; retry", headers={"Retry-After": "1"})
        try:
            body = await self._read_body(request, source, max_bytes)
            if isinstance(body, web.Response):
                return body
            return await self._accept_signed(source, body, presented)
        finally:
            self.bodies.give(reserved)

    async def _read_body(self, request: web.Request, source: str, max_bytes: int) -> bytes | web.Response:
        timeout_s = self.config.control.body_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                body = await _read_limited(request, max_bytes)
        except TimeoutError:
            metrics.control_refused.labels("body_timeout").inc()
            return _refusal(source, 408, f"the body did not arrive within {timeout_s:g} s")
        return _refusal(source, 413, f"body over {max_bytes} bytes") if body is None else body

    async def _accept_signed(self, source: str, body: bytes, presented: Presented) -> web.Response:
        scheme = self.schemes[source]
        signature = verify(self.secrets.get(source, ""), presented, body)
        if not signature:
            return _refusal(source, 401, scheme.wrong)
        memory = self.replays if presented.timestamp is not None else self.deliveries
        verdict = self._claim(source, signature, presented.timestamp)
        if verdict == "replayed":
            return _refusal(source, 409, "this signed request was already accepted (a replay)")
        if verdict:
            return _refusal(source, 401, scheme.stale)
        try:
            accepted, rejected = await self._publish_webhook(source, body)
        except PageFormatError as exc:
            memory.release(source, signature)
            return _refusal(source, 400, str(exc))
        except LogError as exc:
            memory.release(source, signature)  # not taken: the sender may retry the same request
            return _refusal(source, 503, f"the log is not available: {exc}")
        metrics.webhook_requests.labels(source, "202").inc()
        return _json({"accepted": accepted, "dead_lettered": rejected}, status=202)

    def _claim(self, source: str, signature: str, timestamp: int | None) -> str:
        """"" if this signed request is new; "replayed", or why its timestamp is too old to tell."""
        if timestamp is None:
            return self.deliveries.claim(source, signature, now=time.time())
        return self.replays.claim(source, signature, timestamp, now=time.time())

    async def _publish_webhook(self, source: str, body: bytes) -> tuple[int, int]:
        """Same path as a fetched page: columns, dead letters, per-partition batches, durable publish.
        A vendor's envelope is opened first; an event it names a delete deletes every record it carries."""
        schema = self.schemas[source]
        records_body, deletes = self.envelopes[source].open(body)
        records, fields = schema.body_records(records_body)
        columns = schema.columns(records, fields)
        if deletes and len(columns):
            columns.deleted = [True] * len(columns)
        topic = self.config.topic_of(self.config.source(source))
        batches = split_by_partition(columns, source, "webhook", self.producer.partitions_for(topic),
                                     max_batch_bytes=publish_limit_bytes(self.config.workers.ring_bytes, topic))
        await self.producer.publish([OutgoingMessage(topic, partition, batch.keys[0].encode(), encode_batch(batch))
                                     for partition, batch in batches])
        index = self.key_indexes.get(source)
        if index is not None and (len(columns) or columns.dead):  # a reconciled source: these keys are listed now
            await asyncio.to_thread(index.seen_columns, columns, time.time_ns() // 1000)
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


def _refusal(source: str, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    metrics.webhook_requests.labels(source, str(status)).inc()
    return _json({"error": message}, status=status, headers=headers)


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json",
                        headers=headers)
