"""The analytics sink's HTTP API (aiohttp.web), served on the sink process's uvloop event loop.

Routes: ``POST /ingest``, ``GET /stats``, ``GET /stats/{source}``, ``GET /records/{source}/{key}``,
``GET /health``, ``GET /login`` (the HTML page a redirect fault points at, as an ingress would) and the
fault controls ``GET|POST /admin/faults`` and ``POST /admin/outage``. During an
injected outage every route except ``/admin/*`` answers 503 with ``Retry-After: 1``, /health included,
so the sink looks like a real outage to probes as well; the admin routes keep working so tests can steer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
from aiohttp import web

from conflux.demo.analytics_faults import Faults, FaultSpecError, decode_outage_request, patched_settings
from conflux.demo.analytics_store import BatchOutcome, SourceState, Store, StoreFailed
from conflux.demo.analytics_wire import REASON_REJECT_RATE, MalformedBody, check_batch, decode_batch

log = logging.getLogger("conflux.analytics")

_encoder = msgspec.json.Encoder()
LOGIN_PAGE = "<!doctype html><html><head><title>Sign in</title></head><body><form>Sign in</form></body></html>\n"


class RecordView(msgspec.Struct):
    """Body of ``GET /records/{source}/{key}``; ``data`` is the stored bytes, not re-encoded."""

    source: str
    key: str
    updated_at: str
    seq: int
    data: msgspec.Raw


class Counters:
    """Per-process counters for /stats; they restart at zero with the process, unlike /stats' "batches",
    which counts the applied batch ids kept in the db. ``requests`` counts every HTTP request, those
    refused by an injected outage included; ``ingest_requests`` only POST /ingest; ``login_requests``
    GET /login (a client that follows a redirect fault lands there)."""

    __slots__ = ("duplicate_batches", "ingest_requests", "login_requests", "records_applied",
                 "records_ignored_stale", "records_rejected", "requests")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def json_response(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encoder.encode(body), status=status, headers=headers,
                        content_type="application/json")


class Sink:
    """Request handlers over one Store and one Faults; ``on_fatal`` stops the process."""

    def __init__(self, *, store: Store, faults: Faults, max_body_bytes: int,
                 on_fatal: Callable[[], None]) -> None:
        self.store = store
        self.faults = faults
        self.max_body_bytes = max_body_bytes
        self.counters = Counters()
        self._on_fatal = on_fatal
        self._failed = False

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._outage_middleware])
        app.router.add_post("/ingest", self.ingest)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/stats/{source}", self.source_stats)
        app.router.add_get("/records/{source}/{key:.+}", self.record)
        app.router.add_get("/health", self.health)
        app.router.add_get("/login", self.login)
        app.router.add_get("/admin/faults", self.get_faults)
        app.router.add_post("/admin/faults", self.set_faults)
        app.router.add_post("/admin/outage", self.start_outage)
        app.router.add_get("/freshness", self.freshness)
        app.router.add_post("/admin/freshness", self.reset_freshness)
        return app

    async def freshness(self, request: web.Request) -> web.Response:
        """Percentiles of (apply time - updated_at) over the records applied since the last reset."""
        return json_response(self.store.freshness.summary())

    async def reset_freshness(self, request: web.Request) -> web.Response:
        """{"enabled": true} starts measuring afresh; {"enabled": false} stops."""
        try:
            enabled = bool(msgspec.json.decode(await request.read()).get("enabled", True))
        except (msgspec.DecodeError, AttributeError):
            return json_response({"error": "body must be a JSON object like {\"enabled\": true}"}, status=400)
        self.store.freshness.reset(enabled=enabled)
        return json_response(self.store.freshness.summary())

    @web.middleware
    async def _outage_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        self.counters.requests += 1
        if not request.path.startswith("/admin/"):
            remaining_s = self.faults.outage_remaining_s()
            if remaining_s > 0.0:
                self.faults.counts["outage"] += 1
                return json_response({"error": "injected outage", "remaining_s": round(remaining_s, 3)},
                                     status=503, headers={"Retry-After": "1"})
        return await handler(request)

    async def ingest(self, request: web.Request) -> web.Response:
        self.counters.ingest_requests += 1
        response = await self._ingest(request)
        latency_ms = self.faults.settings.latency_ms
        if latency_ms > 0.0:
            self.faults.counts["latency"] += 1
            await asyncio.sleep(latency_ms / 1000.0)
        return response

    async def _ingest(self, request: web.Request) -> web.Response:
        if self._failed:
            # Memory is ahead of the db and the process is stopping: take nothing more.
            return json_response({"error": "the sink's store failed; it is stopping"}, status=503)
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        forced = self._forced_answer()
        if forced is not None:
            return forced
        try:
            batch = decode_batch(body)
        except MalformedBody as exc:
            return json_response({"error": str(exc)}, status=400)
        idempotency_key = request.headers.get("Idempotency-Key")
        if idempotency_key != batch.batch_id:
            reason = "missing" if idempotency_key is None else "does not match batch_id"
            return json_response({"error": f"Idempotency-Key header {reason}"}, status=400)
        if self.faults.draw_error():
            return json_response({"error": "injected by --error-rate; nothing applied"}, status=500)
        if batch.batch_id in self.store.batch_ids:
            return self._duplicate(batch.batch_id)
        changes, rejected = check_batch(batch, self.faults.settings.reject_rate)
        try:
            outcome = self.store.apply(batch.batch_id, body, changes, rejected)
        except StoreFailed as exc:
            log.error("%s; stopping, a restart reloads the last committed state", exc)
            self._failed = True
            self._on_fatal()
            return json_response({"error": str(exc)}, status=500)
        self._count(outcome)
        if self.faults.draw_apply_then_fail():
            return json_response({"error": "injected by --apply-then-fail-rate after applying"}, status=500)
        return _outcome_response(batch.batch_id, outcome)

    def _forced_answer(self) -> web.Response | None:
        """A fault that answers without applying anything, and without the acknowledgement."""
        kind = self.faults.forced_answer()
        settings = self.faults.settings
        if kind == "redirect":
            return web.Response(status=302, headers={"Location": settings.redirect_to}, text="Found")
        if kind == "html_200":
            return web.Response(text=LOGIN_PAGE, content_type="text/html")
        if kind == "fail_status":
            return json_response({"error": f"injected by fail_status {settings.fail_status}"},
                                 status=settings.fail_status)
        return None

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        if (request.content_length or 0) <= self.max_body_bytes:
            try:
                return await request.read()
            except web.HTTPRequestEntityTooLarge:  # a chunked body that outgrew the limit
                pass
        return json_response({"error": f"body exceeds --max-body-bytes ({self.max_body_bytes})"}, status=413)

    def _duplicate(self, batch_id: str) -> web.Response:
        self.counters.duplicate_batches += 1
        previous = self.store.previous_outcome(batch_id)
        body: dict[str, object] = {"status": "duplicate", "batch_id": batch_id}
        if previous is not None:
            body.update(applied=previous.applied, ignored_stale=previous.ignored_stale)
            if previous.rejected:
                body["rejected"] = previous.rejected
        return json_response(body)

    def _count(self, outcome: BatchOutcome) -> None:
        counters = self.counters
        counters.records_applied += outcome.applied
        counters.records_ignored_stale += outcome.ignored_stale
        counters.records_rejected += len(outcome.rejected)
        self.faults.counts["reject_rate"] += sum(r.reason == REASON_REJECT_RATE for r in outcome.rejected)

    async def stats(self, request: web.Request) -> web.Response:
        return json_response({
            "sources": self.store.source_stats(),
            "batches": len(self.store.batch_ids),
            **self.counters.as_dict(),
            "faults": self.faults.counts,
        })

    async def source_stats(self, request: web.Request) -> web.Response:
        """One source; a source never seen is an empty collection (count 0, checksum 0, no tombstones)."""
        source = request.match_info["source"]
        state = self.store.sources.get(source)
        summary = (state or SourceState()).as_dict()
        return json_response({"source": source, **summary})

    async def record(self, request: web.Request) -> web.Response:
        source, key = request.match_info["source"], request.match_info["key"]
        stored = await self.store.record(source, key)
        if stored is None:
            return json_response({"error": f"no record {key!r} in source {source!r}"}, status=404)
        updated_at, seq, data = stored
        if data is None:
            return json_response({"error": f"record {key!r} in source {source!r} was deleted",
                                  "deleted_at": updated_at}, status=404)
        return json_response(RecordView(source, key, updated_at, seq, msgspec.Raw(data)))

    async def health(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def login(self, request: web.Request) -> web.Response:
        self.counters.login_requests += 1
        return web.Response(text=LOGIN_PAGE, content_type="text/html")

    async def get_faults(self, request: web.Request) -> web.Response:
        return json_response({**self.faults.as_dict(), "counts": self.faults.counts})

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults.settings = patched_settings(self.faults.settings, await request.read())
        except FaultSpecError as exc:
            return json_response({"error": str(exc)}, status=400)
        return await self.get_faults(request)

    async def start_outage(self, request: web.Request) -> web.Response:
        try:
            outage = decode_outage_request(await request.read())
        except FaultSpecError as exc:
            return json_response({"error": str(exc)}, status=400)
        self.faults.start_outage(outage.seconds)
        return await self.get_faults(request)


def _outcome_response(batch_id: str, outcome: BatchOutcome) -> web.Response:
    """The acknowledgement: Conflux counts a batch as delivered only if the answer names its batch_id."""
    if not outcome.rejected:
        return json_response({"status": "applied", "batch_id": batch_id, "applied": outcome.applied,
                              "ignored_stale": outcome.ignored_stale})
    body = {"status": "partial", "batch_id": batch_id, "applied": outcome.applied,
            "ignored_stale": outcome.ignored_stale, "rejected": outcome.rejected}
    if outcome.applied == 0 and outcome.ignored_stale == 0:
        # Every record was refused: the batch as a whole is unprocessable.
        return json_response({**body, "status": "rejected"}, status=422)
    return json_response(body, status=207)
