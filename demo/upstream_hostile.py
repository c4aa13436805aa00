"""The demo upstream as a buggy or hostile API: what Conflux must survive without leaking or looping.

Runs in the upstream process; every behaviour is off unless its flag (``demo/upstream.py``) turns it
on. Next links and redirects that lead to another origin, a cookie on every answer, cursors and
next links that loop back, pages padded with megabytes of whitespace (and gzip-compressed: a gzip
bomb), and a recorder of every request, so a second upstream playing "the foreign origin" can show
exactly which headers and bodies reached it.
"""

from __future__ import annotations

import gzip
import secrets
import time
import zlib
from collections import deque
from dataclasses import dataclass
from functools import cached_property

from aiohttp import web

MAX_RECORDED = 10_000
MAX_RECORDED_BODY = 64 << 10
MIB = 1 << 20


@dataclass(frozen=True)
class HostileSettings:
    next_link_origin: str = ""     # link style: next links point at this origin (same path and query)
    redirect_pages_to: str = ""    # page requests are answered 302 to this origin (same path and query)
    redirect_token_to: str = ""    # POST /oauth/token is answered 307 to this origin's /oauth/token
    set_cookie: bool = False       # every answer sets a session cookie
    loop_after_pages: int = 0      # cursor and link styles: after this many pages, point back to page 2 / page 1
    pad_pages_mib: float = 0.0     # whitespace after every page body (valid JSON, only larger)
    gzip_pages: bool = False       # pages go out gzip-compressed (with padding: a gzip bomb)
    record_requests: bool = False  # keep every request for GET /admin/requests


class Hostile:
    """Applies ``HostileSettings`` to requests and answers."""

    def __init__(self, settings: HostileSettings) -> None:
        self.settings = settings
        self.requests: deque[dict[str, object]] = deque(maxlen=MAX_RECORDED)
        self.cookie = secrets.token_hex(8)

    async def record(self, request: web.Request) -> None:
        if not self.settings.record_requests:
            return
        body = await request.read() if request.can_read_body else b""
        self.requests.append({"at": time.time(), "method": request.method, "path_qs": request.path_qs,
                              "headers": [[str(name), value] for name, value in request.headers.items()],
                              "body": body[:MAX_RECORDED_BODY].decode("utf-8", "replace")})

    def answered(self, response: web.StreamResponse) -> None:
        if self.settings.set_cookie:
            response.set_cookie("demo_session", self.cookie, path="/")

    def page_redirect(self, request: web.Request) -> web.Response | None:
        if not self.settings.redirect_pages_to:
            return None
        return web.Response(status=302, headers={"Location": self.settings.redirect_pages_to + request.path_qs})

    def token_redirect(self) -> web.Response | None:
        if not self.settings.redirect_token_to:
            return None
        # 307 keeps the method and the body: a client that follows it re-sends its client secret.
        return web.Response(status=307, headers={"Location": self.settings.redirect_token_to + "/oauth/token"})

    def next_link(self, request: web.Request, next_page: int) -> str:
        url = request.url.update_query(page=next_page)
        if self.settings.next_link_origin:
            return self.settings.next_link_origin + url.path_qs
        return str(url)

    def next_url(self, request: web.Request, changes: dict[str, str]) -> str:
        """The next_url style's link: relative (``?limit=..&cursor=..``), or absolute on --next-link-origin."""
        url = request.url.update_query(changes)
        if self.settings.next_link_origin:
            return self.settings.next_link_origin + url.path_qs
        return "?" + url.query_string

    def page_answer(self, body: bytes, headers: dict[str, str]) -> web.Response:
        """The page as sent: padded and/or gzip-compressed when asked to."""
        settings = self.settings
        if settings.gzip_pages:
            body = gzip.compress(body, compresslevel=1) + self._gzip_padding
            headers = {**headers, "Content-Encoding": "gzip"}
        elif settings.pad_pages_mib:
            body += self._padding
        return web.Response(body=body, headers=headers, content_type="application/json")

    @cached_property
    def _padding(self) -> bytes:
        return b" " * round(self.settings.pad_pages_mib * MIB)

    @cached_property
    def _gzip_padding(self) -> bytes:
        """The padding as one more gzip member (members concatenate), compressed once a MiB at a time."""
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
        whole_mib, rest = divmod(round(self.settings.pad_pages_mib * MIB), MIB)
        chunk = b" " * MIB
        parts = [compressor.compress(chunk) for _ in range(whole_mib)]
        parts += [compressor.compress(b" " * rest), compressor.flush()]
        return b"".join(parts)

    def view(self) -> dict[str, object]:
        return {"recording": self.settings.record_requests, "requests": list(self.requests)}
