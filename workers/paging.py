"""Paginators: how to walk an upstream collection page by page. The built-in styles and plugins alike.

A paginator is a class registered in the ``conflux.paginators`` entry-point group under the name a
source's ``pagination`` key takes (``setup.cfg`` registers page, offset, cursor, link, watermark and
next_url; a plugin package registers its own the same way). The interface, plugin API version 1:

- ``api_version = 1`` (``conflux.plugins.API_VERSION``); a class written for another version is a
  config error naming the source's ``pagination``.
- ``Options``: None, or a msgspec Struct of the paginator's own config keys, given in the source's
  ``[sources.pagination_options]`` table and validated at load with errors naming the field.
- ``stable``: True when a complete sync lists every record exactly once even while records change
  (keyset positions, cursors); a reconcile then deletes a key at its first miss (workers.reconcile).
- ``check(source, options)`` (classmethod, at config load): raise ValueError("FIELD: problem") for a
  source this paginator cannot walk.
- ``__init__(source, options)``: in the fetcher process, once per source, after fork; no I/O.
- ``walk(pages, url, since) -> int``: one sync of ``url`` (the source's url, or a child source's url for
  one parent record), from ``since`` (the text to send as updated_since; None for a full sync). It asks
  for each page with ``await pages.get(url, params)`` (params named as the API names them; the source's
  credentials, rate limit, retries, origin rule and POST body apply there) and hands each response to
  ``await pages.handle(response)``, which publishes its records and returns a ``PageInfo``. It returns
  the number of pages fetched. It may raise PageFormatError for a page that is not in the shape it
  expects (the sync fails, saves no watermark and is retried at the next poll); errors of
  ``pages.get`` (UpstreamError, OriginRefused) pass through. It bounds its walk with a ``WalkGuard``.

Styles that know the total (page, offset) fetch the remaining pages concurrently, up to the source's
``max_concurrency``; styles that learn the next page from the current one (cursor, link, watermark,
next_url) go one after another, and overlap each fetch with the publishing of the page before.

A hostile or buggy upstream cannot make a sync endless: each walk counts its pages against the
source's ``max_pages_per_sync`` and remembers every cursor, next link and keyset position it used, so
one that comes back (a loop) fails the sync with PageFormatError saying so.
"""

from __future__ import annotations

import asyncio
import math
import re
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol
from urllib.parse import parse_qsl, urljoin, urlsplit

from conflux import plugins
from conflux.config import SourceConfig
from conflux.errors import PageFormatError
from conflux.workers.shaping import iso_utc

if TYPE_CHECKING:
    from conflux.workers.batching import PageMeta
    from conflux.workers.upstream import Response

LINK_NEXT = re.compile(r'<([^>]+)>\s*;[^,]*rel="?next"?', re.IGNORECASE)


class PageInfo(NamedTuple):
    records: int                       # records on the page, valid or not
    meta: PageMeta                     # the paging fields of the body (has_more, total, next_cursor, next_url)
    last: tuple[str, str] | None       # (updated_since text, key) of the page's last valid record


class Pages(Protocol):
    async def get(self, url: str, params: dict[str, str]) -> Response: ...

    async def handle(self, response: Response) -> PageInfo: ...


class WalkGuard:
    """The bounds of one sync's walk: how many pages, and which positions were already visited."""

    def __init__(self, source: SourceConfig) -> None:
        self.max_pages = source.max_pages_per_sync
        self.pages = 0
        self.seen: set[object] = set()

    def count(self, pages: int = 1) -> None:
        """Before fetching ``pages`` more pages."""
        self.pages += pages
        if self.pages > self.max_pages:
            raise PageFormatError(f"the sync needs more than {self.max_pages} pages (max_pages_per_sync); "
                                  "stopped, in case the upstream's pagination never ends")

    def visit(self, what: str, position: object, shown: object = None) -> None:
        """Before moving to ``position`` (``shown`` in an error): one seen before in this sync means the
        pagination loops."""
        if position in self.seen:
            raise PageFormatError(f"pagination loops: the upstream sent {what} {_short(shown or position)} again, "
                                  "which this sync already fetched; stopped instead of fetching forever")
        self.seen.add(position)


class Paginator:
    """Base of every paginator; see the module's docstring for the contract."""

    api_version: ClassVar[int] = 1
    Options: ClassVar[type | None] = None
    stable: ClassVar[bool] = False

    def __init__(self, source: SourceConfig, options: Any = None) -> None:
        self.source = source
        self.options = options
        self.fields = source.pagination_options   # [sources.pagination]: parameter and field names

    @classmethod
    def check(cls, source: SourceConfig, options: Any) -> None:
        """At config load: ValueError("FIELD: problem") for a source this paginator cannot walk."""

    async def walk(self, pages: Pages, url: str, since: str | None) -> int:
        raise NotImplementedError

    def since_params(self, since: str | None) -> dict[str, str]:
        """``{updated_since_param: since}`` for an incremental sync, {} for a full one."""
        return {self.fields.updated_since_param: since} if since else {}


def paginator_class(name: str, where: str = "pagination") -> type[Paginator]:
    """The paginator registered as ``name`` (ConfigError naming ``where`` if none is)."""
    return plugins.load("paginators", name, where)


def make_paginator(source: SourceConfig) -> Paginator:
    """The source's paginator, with its options (already validated when the config was loaded)."""
    paginator = paginator_class(source.pagination)
    options = source.paginator_options
    if options is None or isinstance(options, dict):  # a SourceConfig made in code, not by load_config
        options = plugins.options(paginator, options or {}, f"{source.name}.pagination_options")
    return paginator(source, options)


def since_text(source: SourceConfig, instant_us: int, native: str) -> str:
    """What a source sends as updated_since for an instant: its ``updated_since_format``, or ``native``
    (the upstream's own text of it, from the records) by default. Epoch values are rounded down, so the
    bound stays inclusive."""
    form = source.updated_since_format
    if form == "native":
        return native
    if form == "iso8601":
        return iso_utc(instant_us)
    return str(instant_us // (1_000_000 if form == "epoch_s" else 1_000))


def native_text(source: SourceConfig, instant_us: int) -> str:
    """The upstream's text of an instant in the source's ``updated_format`` (rounded down)."""
    units = {"epoch_s": 1_000_000, "epoch_ms": 1_000, "epoch_us": 1}
    if source.updated_format in units:
        return str(instant_us // units[source.updated_format])
    return iso_utc(instant_us)


def more(info: PageInfo, size: int) -> bool:
    """Trust has_more when the upstream sends it; otherwise a full page means there may be more."""
    if isinstance(info.meta.has_more, bool):
        return info.meta.has_more
    return info.records >= size


async def in_parallel(pages: Pages, url: str, all_params: list[dict[str, str]], concurrency: int) -> list[PageInfo]:
    """Fetch pages with at most ``concurrency`` in flight; handle each as it lands; results in page order."""
    results: list[PageInfo | None] = [None] * len(all_params)
    queue = iter(enumerate(all_params))

    async def worker() -> None:
        for position, params in queue:
            results[position] = await pages.handle(await pages.get(url, params))

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(all_params)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # gather() does not cancel the rest: without this, a failed sync kept fetching in the background.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return [info for info in results if info is not None]


def same_page(url: str) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
    """What identifies a page's URL: parameters in any order, the host in any case, no fragment."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower(), parts.path, tuple(sorted(parse_qsl(parts.query, True)))


def link_next(response: Response) -> str | None:
    """The `Link: <url>; rel="next"` of a response, absolute; None when there is none."""
    for header in response.headers.getall("Link", []):
        match = LINK_NEXT.search(header)
        if match:
            return urljoin(response.url, match.group(1))
    return None


# -- the built-in styles ----------------------------------------------------------------------------------


class PageNumbers(Paginator):
    """page=N&size=S: the first page tells the total, the rest go in parallel."""

    def params(self, index: int, base: dict[str, str]) -> dict[str, str]:
        fields, size = self.fields, self.source.page_size
        return {**base, fields.page_param: str(fields.first_page + index), fields.size_param: str(size)}

    async def walk(self, pages: Pages, url: str, since: str | None) -> int:
        size, base = self.source.page_size, self.since_params(since)
        guard = WalkGuard(self.source)
        guard.count()
        first = await pages.handle(await pages.get(url, self.params(0, base)))
        fetched, index, info = 1, 1, first
        total = first.meta.total if isinstance(first.meta.total, int) and first.meta.total >= 0 else None
        if total is not None and more(first, size):
            known = math.ceil(total / size)
            guard.count(max(known - 1, 0))  # before listing the pages: a total of 10**15 must not fill memory
            infos = await in_parallel(pages, url, [self.params(i, base) for i in range(1, known)],
                                      self.source.max_concurrency)
            fetched += len(infos)
            index = max(known, 1)  # a total of 0 beside records must not start over at the first page
            info = infos[-1] if infos else first
        # Records added during the sync (or no total given): continue one page at a time until the end.
        while more(info, size) and info.records:
            guard.count()
            info = await pages.handle(await pages.get(url, self.params(index, base)))
            fetched, index = fetched + 1, index + 1
        return fetched


class Offsets(PageNumbers):
    """offset=K&limit=S: as page numbers, counted in records."""

    def params(self, index: int, base: dict[str, str]) -> dict[str, str]:
        size = self.source.page_size
        return {**base, self.fields.offset_param: str(index * size), self.fields.limit_param: str(size)}


class Cursor(Paginator):
    """limit=S[&cursor=C]: the next cursor comes in the body (next_cursor_field) or in a response header
    (next_cursor_header); an empty or missing one ends the walk."""

    stable = True

    @classmethod
    def check(cls, source: SourceConfig, options: Any) -> None:
        if not source.effective_records_path and not source.pagination_options.next_cursor_header:
            raise ValueError("pagination.next_cursor_header: the body is the list of records (records_path = \"\"), "
                             "so the cursor style needs the header that carries the next cursor")

    async def walk(self, pages: Pages, url: str, since: str | None) -> int:
        fields = self.fields
        params = {**self.since_params(since), fields.limit_param: str(self.source.page_size)}
        guard, fetched = WalkGuard(self.source), 0
        while True:
            guard.count()
            response = await pages.get(url, params)
            info = await pages.handle(response)
            fetched += 1
            cursor, what = self.next_cursor(response, info)
            if cursor in (None, "") or not info.records:
                return fetched
            if not isinstance(cursor, str | int) or isinstance(cursor, bool):
                raise PageFormatError(f"{what} must be a string, got {_short(cursor)}")
            guard.visit(f"the {what}", str(cursor))
            params = {**params, fields.cursor_param: str(cursor)}

    def next_cursor(self, response: Response, info: PageInfo) -> tuple[Any, str]:
        header = self.fields.next_cursor_header
        if header:
            return response.headers.get(header), f"{header!r} header"
        return info.meta.next_cursor, repr(self.fields.next_cursor_field)


class Links(Paginator):
    """Follow the `Link: <url>; rel="next"` header until a page has none."""

    async def walk(self, pages: Pages, url: str, since: str | None) -> int:
        fields = self.fields
        current: str | None = url
        params: dict[str, str] = {**self.since_params(since), fields.page_param: str(fields.first_page),
                                  fields.size_param: str(self.source.page_size)}
        guard, fetched = WalkGuard(self.source), 0
        while current is not None:
            guard.count()
            response = await pages.get(current, params)
            info = await pages.handle(response)
            fetched += 1
            guard.seen.add(same_page(response.url))
            current, params = link_next(response), {}
            if not info.records:
                break
            if current is not None:
                guard.visit("the next link", same_page(current), shown=current)
        return fetched


class NextUrl(Paginator):
    """The next page's URL is in the body, at ``next_url_path`` ("links.next", "links.next.href"): follow
    it, relative to the page's own URL, until it is null, empty or missing. The first request carries
    the page size (``limit_param``) and updated_since; every next URL is requested as the upstream wrote
    it. A next URL on another origin is refused unless ``allowed_origins`` names it (workers.upstream)."""

    @classmethod
    def check(cls, source: SourceConfig, options: Any) -> None:
        if not source.pagination_options.next_url_path:
            raise ValueError("pagination.next_url_path: required with pagination = \"next_url\" (the dotted path "
                             "of the next page's URL in the body, such as \"links.next\")")
        if not source.effective_records_path:
            raise ValueError("records_path: the next_url style reads the next URL from the body, so the records "
                             "must be in a field of it, not the body itself")

    async def walk(self, pages: Pages, url: str, since: str | None) -> int:
        path = self.fields.next_url_path
        current = url
        params = {**self.since_params(since), self.fields.limit_param: str(self.source.page_size)}
        guard, fetched = WalkGuard(self.source), 0
        while True:
            guard.count()
            response = await pages.get(current, params)
            info = await pages.handle(response)
            fetched += 1
            guard.seen.add(same_page(response.url))
            following = info.meta.next_url
            if following in (None, ""):
                return fetched
            if not isinstance(following, str):
                raise PageFormatError(f"{path!r} must be a URL (a string) or null, got {_short(following)}")
            current, params = urljoin(response.url, following), {}
            guard.visit("the next URL", same_page(current), shown=current)


class Keyset(Paginator):
    """Keyset: updated_since advances to the last record of each page, with its key as tie-breaker,
    so a run of records sharing one timestamp longer than a page is still walked through."""

    stable = True

    async def walk(self, pages: Pages, url: str, since: str | None) -> int:
        fields = self.fields
        params = {**self.since_params(since), fields.limit_param: str(self.source.page_size)}
        guard, fetched = WalkGuard(self.source), 0
        while True:
            guard.count()
            info = await pages.handle(await pages.get(url, params))
            fetched += 1
            if not more(info, self.source.page_size) or not info.records:
                return fetched
            if info.last is None:  # stopping here would silently end every sync at this page
                raise PageFormatError("a full page without one valid record leaves no keyset position to "
                                      f"continue from (after {params.get(fields.updated_since_param)!r})")
            last_updated, last_key = info.last
            guard.visit("the keyset position", info.last)
            params = {**params, fields.updated_since_param: last_updated, fields.after_key_param: last_key}


def _short(position: object) -> str:
    text = repr(position)
    return text if len(text) <= 200 else text[:200] + "..."
