"""The demo upstream's HTTP API (aiohttp.web) and its serve loop; the routes are documented in
``demo/upstream.py``.

Everything here runs in the upstream process after the data is generated: ``UpstreamApp.__init__``
only wires objects together, the start-up hook starts the background tasks (change generator,
webhook senders) inside the event loop, and ``serve`` runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from conflux.demo.datagen import Key
from conflux.demo.faults import EmptyListing, Fault, FaultInjector
from conflux.demo.paging_styles import LOOPING, STYLES, BadParameter
from conflux.demo.store import Collection, StoreError
from conflux.demo.upstream_auth import AuthGate
from conflux.demo.upstream_changes import ChangeGenerator, DeleteGenerator, check_delete_style
from conflux.demo.upstream_hostile import Hostile, HostileSettings
from conflux.demo.upstream_shapes import Children, normalized_since, search_query
from conflux.demo.upstream_stats import Stats
from conflux.demo.upstream_time import now_us
from conflux.demo.upstream_webhooks import WebhookSender

JSON = "application/json"
# Handlers answer in milliseconds; waiting longer at shutdown only delays the exit code.
SHUTDOWN_TIMEOUT_S = 2.0
MAX_BODY_BYTES = 1 << 20

_encode = msgspec.json.Encoder().encode
_decode_object = msgspec.json.Decoder(dict).decode
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(payload: object, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode(payload), status=status, content_type=JSON, headers=headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": message}, status=status, headers=headers)


def _client_error(error_class: type[web.HTTPClientError], message: str) -> web.HTTPClientError:
    return error_class(body=_encode({"error": message}), content_type=JSON)


class UpstreamApp:
    """The API over the generated collections, with fault injection, changes, webhooks and stats."""

    def __init__(self, *, collections: dict[str, Collection], faults: FaultInjector, seed: int,
                 change_rate_per_s: float, malformed_rate: float, webhooks: WebhookSender | None,
                 auth: AuthGate, count_headers: tuple[str, ...] = (),
                 hostile: HostileSettings | None = None, delete_rate_per_s: float = 0.0,
                 delete_style: str = "soft", records_path: tuple[str, ...] = ("data",),
                 since_format: str = "iso8601") -> None:
        self.collections = collections
        self.records_path = records_path
        self.since_format = since_format
        self.children = Children(collections)
        self.hostile = Hostile(hostile or HostileSettings())
        self.faults = faults
        self.malformed_rate = malformed_rate
        self.webhooks = webhooks
        self.auth = auth
        self.stats = Stats(collections, count_headers=count_headers)
        self.change_counts: Counter[str] = Counter()
        self.changes = ChangeGenerator(collections=list(collections.values()),
                                       apply=self.apply_background_change,
                                       rate_per_s=change_rate_per_s, seed=seed)
        self.delete_counts: Counter[str] = Counter()
        self.deletes = DeleteGenerator(collections=list(collections.values()),
                                       apply=self.apply_background_delete, rate_per_s=delete_rate_per_s,
                                       seed=seed, style=delete_style)
        self._tasks: list[asyncio.Task] = []

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._hostile, self._count_status, self._require_credentials],
                              client_max_size=MAX_BODY_BYTES)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        router = app.router
        router.add_get("/health", self.health)
        router.add_get("/stats", self.stats_view)
        router.add_get("/admin/faults", self.faults_view)
        router.add_post("/admin/faults", self.set_faults)
        router.add_get("/admin/change-rate", self.change_rate_view)
        router.add_post("/admin/change-rate", self.set_change_rate)
        router.add_get("/admin/delete-rate", self.delete_rate_view)
        router.add_post("/admin/delete-rate", self.set_delete_rate)
        router.add_get("/admin/malformed", self.malformed_view)
        router.add_get("/admin/auth", self.auth_view)
        router.add_get("/admin/requests", self.requests_view)
        router.add_post("/admin/auth", self.set_auth)
        router.add_post("/oauth/token", self.oauth_token)
        router.add_get("/api/{collection}/checksum", self.checksum)
        for style in STYLES:
            if style != "page":
                router.add_get(f"/api/{{collection}}/{style}", self._page_handler(style))
        router.add_get("/api/{collection}", self._page_handler("page"))
        router.add_post("/api/{collection}/search", self.search)
        router.add_post("/api/{collection}/search/{style}", self.search)
        router.add_get("/api/{parent}/{key}/{child}", self.child_page)
        router.add_get("/api/{parent}/{key}/{child}/{style}", self.child_page)
        router.add_post("/api/{collection}", self.create)
        router.add_put("/api/{collection}/{key}", self.update)
        # After the style and checksum routes, which win over a key of the same name.
        router.add_get("/api/{collection}/{key}", self.lookup)
        router.add_delete("/api/{collection}/{key}", self.delete)
        return app

    async def _start(self, _app: web.Application) -> None:
        if self.webhooks is not None:
            await self.webhooks.start()
        self._tasks = [asyncio.create_task(self.changes.run(), name="changes"),
                       asyncio.create_task(self.deletes.run(), name="deletes")]

    async def _stop(self, _app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.webhooks is not None:
            await self.webhooks.close()

    @web.middleware
    async def _hostile(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        await self.hostile.record(request)
        response = await handler(request)
        self.hostile.answered(response)
        return response

    @web.middleware
    async def _count_status(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        collection = request.match_info.get("collection")
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self.stats.record_status(collection, exc.status)
            raise
        self.stats.record_status(collection, response.status)
        return response

    @web.middleware
    async def _require_credentials(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/api/"):
            denied = self.auth.check(request.headers)
            if denied is not None:
                return error_response(401, f"credentials: {denied.reason}", {"WWW-Authenticate": denied.challenge})
        return await handler(request)

    def _collection(self, request: web.Request, part: str = "collection") -> Collection:
        name = request.match_info[part]
        collection = self.collections.get(name)
        if collection is None:
            known = ", ".join(self.collections)
            raise _client_error(web.HTTPNotFound, f"collection: unknown collection {name!r}; known: {known}")
        return collection

    # -- pages --------------------------------------------------------------------------------

    def _page_handler(self, style: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self.page(request, style)
        return handler

    async def page(self, request: web.Request, style: str) -> web.Response:
        """One page of ``style``, after the configured latency and unless a fault is drawn."""
        collection = self._collection(request)
        self.stats.record_request(collection.name, style, page=True, headers=request.headers)
        with self.stats.in_flight(collection.name):
            return await self._page(request, collection, style)

    async def search(self, request: web.Request) -> web.Response:
        """POST /api/{c}/search[/{style}]: a page of ``style`` (page by default) whose parameters come in a
        JSON object or form body (and the query string)."""
        collection = self._collection(request)
        style = request.match_info.get("style", "page")
        if style not in STYLES:
            return error_response(404, f"style: unknown paging style {style!r}; known: {', '.join(STYLES)}")
        body = await _search_body(request)
        self.stats.record_request(collection.name, f"search:{style}", page=True, headers=request.headers)
        with self.stats.in_flight(collection.name):
            return await self._page(request, collection, style, search_query(request.query, body))

    async def child_page(self, request: web.Request) -> web.Response:
        """GET /api/{parent}/{key}/{child}[/{style}]: a page of the children of one parent record."""
        parent = self._collection(request, "parent")
        style = request.match_info.get("style", "page")
        key = _key(parent, request)
        try:
            parent.lookup(key)
            view = self.children.view(parent, key, request.match_info["child"])
        except StoreError as exc:
            return error_response(exc.status, str(exc))
        except BadParameter as exc:
            return error_response(404, str(exc))
        if style not in STYLES:
            return error_response(404, f"style: unknown paging style {style!r}; known: {', '.join(STYLES)}")
        self.stats.record_request(view.name, f"child:{style}", page=True, headers=request.headers)
        with self.stats.in_flight(view.name):
            return await self._page(request, view, style)

    async def _page(self, request: web.Request, collection: Collection, style: str,
                    query: object = None) -> web.Response:
        delay_s = self.faults.delay_s()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        fault = self.faults.draw()
        if fault is Fault.THROTTLE:
            self.stats.record_throttle(collection.name)
            retry_after = {"Retry-After": str(self.faults.settings.retry_after_s)}
            return error_response(429, "throttled (injected fault)", retry_after)
        if fault is Fault.ERROR:
            return error_response(500, "internal error (injected fault)")
        redirect = self.hostile.page_redirect(request)
        if redirect is not None:
            return redirect
        try:
            query = normalized_since(query if query is not None else request.query, self.since_format)
            listing = EmptyListing(collection) if self.faults.settings.empty_pages else collection
            page = STYLES[style](listing, collection.layout.iso_since(query), **self._style_options(request, style))
        except BadParameter as exc:
            return error_response(400, str(exc))
        headers = dict(page.headers)
        if page.next_page is not None:
            headers["Link"] = f'<{self.hostile.next_link(request, page.next_page)}>; rel="next"'
        return self.hostile.page_answer(page.body, headers)

    def _style_options(self, request: web.Request, style: str) -> dict[str, object]:
        options: dict[str, object] = {"records_path": self.records_path}
        if self.hostile.settings.loop_after_pages and style in LOOPING:
            options["loop_after_pages"] = self.hostile.settings.loop_after_pages
        if style == "next":
            options["link"] = lambda changes: self.hostile.next_url(request, changes)
        return options

    async def checksum(self, request: web.Request) -> web.Response:
        """The checksum of the live valid records; with ``?parent=P`` of those whose parent record in P
        is live (what a child source holds), and ``&stamp=FIELD`` as forwarded with the parent key added."""
        collection = self._collection(request)
        self.stats.record_request(collection.name, "checksum", page=False)
        parent_name = request.query.get("parent")
        if parent_name is None:
            canonical = request.query.get("canonical") in ("1", "true")
            checksum = collection.canonical_checksum() if canonical else collection.checksum
            return json_response({"collection": collection.name, **checksum.as_dict()})
        parent = self.collections.get(parent_name)
        if parent is None:
            return error_response(404, f"parent: unknown collection {parent_name!r}")
        try:
            return json_response(self.children.checksum(parent, collection.name, request.query.get("stamp", "")))
        except BadParameter as exc:
            return error_response(404, str(exc))

    # -- changes ------------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        collection = self._collection(request)
        self.stats.record_request(collection.name, "create", page=False)
        fields = await _json_object(request)
        try:
            data = collection.create(fields, now_us())
        except StoreError as exc:
            return error_response(exc.status, str(exc))
        self._changed(collection, data, origin="api")
        return web.Response(body=data, status=201, content_type=JSON)

    async def update(self, request: web.Request) -> web.Response:
        """Merge the body into the record; a deleted record (soft or hard) is restored."""
        collection = self._collection(request)
        self.stats.record_request(collection.name, "update", page=False)
        fields = await _json_object(request)
        try:
            data = collection.update(_key(collection, request), fields, now_us())
        except StoreError as exc:
            return error_response(exc.status, str(exc))
        self._changed(collection, data, origin="api")
        return web.Response(body=data, content_type=JSON)

    async def lookup(self, request: web.Request) -> web.Response:
        """One record by key: 200 with it (soft-deleted ones carry ``"deleted": true``), 404 when it
        was never created or is hard-deleted."""
        collection = self._collection(request)
        self.stats.record_request(collection.name, "lookup", page=False)
        try:
            data = collection.lookup(_key(collection, request))
        except StoreError as exc:
            return error_response(exc.status, str(exc))
        return web.Response(body=data, content_type=JSON)

    async def delete(self, request: web.Request) -> web.Response:
        """Delete a record now, by ``?style=soft|hard`` or else by --delete-style; answers the deleted record."""
        collection = self._collection(request)
        self.stats.record_request(collection.name, "delete", page=False)
        style = request.query.get("style")
        if style not in (None, "soft", "hard"):
            return error_response(400, f"style: must be soft or hard, got {style!r}")
        hard = self.deletes.draw_hard() if style is None else style == "hard"
        try:
            data = collection.delete(_key(collection, request), now_us(), hard=hard)
        except StoreError as exc:
            return error_response(exc.status, str(exc))
        self._deleted(collection, data, origin="api", hard=hard)
        return web.Response(body=data, content_type=JSON)

    def apply_background_change(self, collection: Collection, key: Key, fields: dict[str, object]) -> None:
        self._changed(collection, collection.update(key, fields, now_us()), origin="background")

    def apply_background_delete(self, collection: Collection, key: Key, hard: bool) -> None:
        self._deleted(collection, collection.delete(key, now_us(), hard=hard), origin="background", hard=hard)

    def _changed(self, collection: Collection, data: bytes, *, origin: str) -> None:
        self.change_counts[origin] += 1
        if self.webhooks is not None:
            self.webhooks.offer(collection.name, data)

    def _deleted(self, collection: Collection, data: bytes, *, origin: str, hard: bool) -> None:
        """Count a delete and announce it: for a hard delete the webhook is the only sign besides its absence."""
        self.delete_counts[origin] += 1
        self.delete_counts["hard" if hard else "soft"] += 1
        if self.webhooks is not None:
            self.webhooks.offer(collection.name, data, deleted=True)

    # -- operations ---------------------------------------------------------------------------

    async def health(self, _request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def stats_view(self, request: web.Request) -> web.Response:
        counts = {name: collection.counts() for name, collection in self.collections.items()}
        view = self.stats.as_dict(counts, timestamps=request.query.get("timestamps") in ("1", "true"))
        view["changes"] = {"api": self.change_counts["api"], "background": self.change_counts["background"]}
        view["deletes"] = {name: self.delete_counts[name] for name in ("api", "background", "soft", "hard")}
        view["webhooks"] = self.webhooks.stats() if self.webhooks is not None else None
        view["auth"] = self.auth.view()
        return json_response(view)

    def _faults_dict(self) -> dict[str, object]:
        return {**msgspec.structs.asdict(self.faults.settings), "malformed_rate": self.malformed_rate,
                "change_rate_per_s": self.changes.rate_per_s, "delete_rate_per_s": self.deletes.rate_per_s,
                "delete_style": self.deletes.style}

    async def faults_view(self, _request: web.Request) -> web.Response:
        return json_response(self._faults_dict())

    async def set_faults(self, request: web.Request) -> web.Response:
        """Apply any of the fields ``GET /admin/faults`` shows; all are validated before any applies."""
        changes = await _json_object(request)
        try:
            rate_per_s = _rate("change_rate_per_s", changes.pop("change_rate_per_s", self.changes.rate_per_s))
            delete_rate_per_s = _rate("delete_rate_per_s", changes.pop("delete_rate_per_s", self.deletes.rate_per_s))
            delete_style = check_delete_style(changes.pop("delete_style", self.deletes.style))
            if changes.pop("malformed_rate", self.malformed_rate) != self.malformed_rate:
                raise ValueError("malformed_rate: fixed when the data is generated; restart to change it")
            settings = self.faults.settings.updated(changes)
        except ValueError as exc:
            return error_response(400, str(exc))
        self.faults.settings = settings
        self.changes.set_rate(rate_per_s)
        self.deletes.style = delete_style
        self.deletes.set_rate(delete_rate_per_s)
        return json_response(self._faults_dict())

    async def change_rate_view(self, _request: web.Request) -> web.Response:
        return json_response({"change_rate_per_s": self.changes.rate_per_s, "applied": self.changes.applied})

    async def set_change_rate(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        try:
            self.changes.set_rate(_rate("change_rate_per_s", body.get("change_rate_per_s")))
        except ValueError as exc:
            return error_response(400, str(exc))
        return await self.change_rate_view(request)

    async def delete_rate_view(self, _request: web.Request) -> web.Response:
        return json_response({"delete_rate_per_s": self.deletes.rate_per_s, "delete_style": self.deletes.style,
                              "applied": self.deletes.applied})

    async def set_delete_rate(self, request: web.Request) -> web.Response:
        """``{"delete_rate_per_s": R}`` and/or ``{"delete_style": "soft|hard|mixed"}``; both checked first."""
        body = await _json_object(request)
        try:
            rate_per_s = _rate("delete_rate_per_s", body.get("delete_rate_per_s", self.deletes.rate_per_s))
            style = check_delete_style(body.get("delete_style", self.deletes.style))
        except ValueError as exc:
            return error_response(400, str(exc))
        self.deletes.style = style
        self.deletes.set_rate(rate_per_s)
        return await self.delete_rate_view(request)

    async def malformed_view(self, request: web.Request) -> web.Response:
        """?records=0 leaves the records out (a too_deep one is more than most JSON parsers take)."""
        with_records = request.query.get("records") not in ("0", "false")
        view = {name: [{"key": key, "reason": reason, **({"record": msgspec.Raw(data)} if with_records else {})}
                       for key, reason, data in collection.malformed()]
                for name, collection in self.collections.items()}
        return json_response(view)

    async def requests_view(self, _request: web.Request) -> web.Response:
        """Every request received, with its headers and body, when started with --record-requests."""
        return json_response(self.hostile.view())

    # -- credentials --------------------------------------------------------------------------------

    async def oauth_token(self, request: web.Request) -> web.Response:
        redirect = self.hostile.token_redirect()
        if redirect is not None:
            return redirect
        form = await request.post()
        fields = {name: value for name, value in form.items() if isinstance(value, str)}
        answer = self.auth.issue(fields, request.headers.get("Authorization", ""))
        # RFC 6749 5.1: token responses must not be cached.
        return json_response(answer.body, status=answer.status, headers={"Cache-Control": "no-store"})

    async def auth_view(self, _request: web.Request) -> web.Response:
        return json_response(self.auth.view())

    async def set_auth(self, request: web.Request) -> web.Response:
        """Rotate the static token or the client secret, change the TTL, revoke issued tokens."""
        try:
            self.auth.update(await _json_object(request))
        except ValueError as exc:
            return error_response(400, str(exc))
        return json_response(self.auth.view())


def _rate(name: str, value: object) -> float:
    if type(value) not in (int, float) or not 0 <= value < math.inf:  # also refuses nan
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
    return float(value)


def _key(collection: Collection, request: web.Request) -> Key:
    """The key in the URL, as the collection's key type; a key of the wrong type is unknown (404)."""
    text = request.match_info["key"]
    try:
        return collection.parse_key(text)
    except ValueError:
        raise _client_error(web.HTTPNotFound, f"key: no record {text!r} in {collection.name}") from None


async def _search_body(request: web.Request) -> dict[str, object]:
    """A search request's parameters: a JSON object, or a form (application/x-www-form-urlencoded)."""
    if request.content_type == "application/x-www-form-urlencoded":
        form = await request.post()
        return {name: value for name, value in form.items() if isinstance(value, str)}
    return await _json_object(request)


async def _json_object(request: web.Request) -> dict[str, object]:
    body = await request.read()
    try:
        value = _decode_object(body)
    except msgspec.DecodeError as exc:
        raise _client_error(web.HTTPBadRequest, f"body: must be a JSON object ({exc})") from None
    return value


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; bound before the data is generated so a busy port fails fast."""
    family, _type, _proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return socket.create_server(address[:2], family=family)


def url_of(sock: socket.socket, host: str, *, scheme: str = "http") -> str:
    port = sock.getsockname()[1]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def serve(app: web.Application, sock: socket.socket, *, announce: str,
                ssl_context: ssl.SSLContext | None = None) -> None:
    """Serve on ``sock`` (https with ``ssl_context``) until SIGTERM or SIGINT; ``announce`` is printed
    once requests are accepted."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.SockSite(runner, sock, ssl_context=ssl_context).start()
        print(announce, flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
