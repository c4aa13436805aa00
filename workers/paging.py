"""The pagination styles: how to walk an upstream collection page by page.

Each style is one coroutine that asks for pages and hands each response to ``pages.handle`` as soon
as it arrives, so records are published while later pages are still being fetched. Styles that
know the total (page, offset) fetch the remaining pages concurrently, up to the source's
``max_concurrency``; styles that learn the next page from the current one (cursor, link, watermark)
go one after another, and overlap each fetch with the publishing of the page before.

``since`` is the watermark for an incremental sync (None for a full one). Parameter and field names
come from the source's ``[sources.pagination]`` table.

A hostile or buggy upstream cannot make a sync endless: each walk counts its pages against the
source's ``max_pages_per_sync`` and remembers every cursor, next link and keyset position it used, so
one that comes back (a loop) fails the sync with PageFormatError saying so.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol
from urllib.parse import parse_qsl, urljoin, urlsplit

from conflux.config import SourceConfig
from conflux.errors import PageFormatError
from conflux.workers.batching import PageMeta
from conflux.workers.upstream import Response

LINK_NEXT = re.compile(r'<([^>]+)>\s*;[^,]*rel="?next"?', re.IGNORECASE)


class PageInfo(NamedTuple):
    records: int                       # records on the page, valid or not
    meta: PageMeta
    last: tuple[str, str] | None       # (updated text, key) of the page's last valid record


class Pages(Protocol):
    async def get(self, url: str, params: dict[str, str]) -> Response: ...

    async def handle(self, response: Response) -> PageInfo: ...


Style = Callable[[SourceConfig, Pages, str | None], Awaitable[int]]


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


def _short(position: object) -> str:
    text = repr(position)
    return text if len(text) <= 200 else text[:200] + "..."


def _since(source: SourceConfig, since: str | None) -> dict[str, str]:
    return {source.pagination_options.updated_since_param: since} if since else {}


def _more(info: PageInfo, size: int) -> bool:
    """Trust has_more when the upstream sends it; otherwise a full page means there may be more."""
    if isinstance(info.meta.has_more, bool):
        return info.meta.has_more
    return info.records >= size


async def walk_numbered(source: SourceConfig, pages: Pages, since: str | None, *, offset_style: bool) -> int:
    """page=N&size=S or offset=K&limit=S: the first page tells the total, the rest go in parallel."""
    options, size = source.pagination_options, source.page_size
    base = {**_since(source, since)}

    def params(index: int) -> dict[str, str]:
        if offset_style:
            return {**base, options.offset_param: str(index * size), options.limit_param: str(size)}
        return {**base, options.page_param: str(options.first_page + index), options.size_param: str(size)}

    guard = WalkGuard(source)
    guard.count()
    first = await pages.handle(await pages.get(source.url, params(0)))
    fetched, index, info = 1, 1, first
    total = first.meta.total if isinstance(first.meta.total, int) and first.meta.total >= 0 else None
    if total is not None and _more(first, size):
        known = math.ceil(total / size)
        guard.count(max(known - 1, 0))  # before listing the pages: a total of 10**15 must not fill memory
        infos = await _in_parallel(pages, source.url, [params(i) for i in range(1, known)], source.max_concurrency)
        fetched += len(infos)
        index = max(known, 1)  # a total of 0 beside records must not start over at the first page
        info = infos[-1] if infos else first
    # Records added during the sync (or no total given): continue one page at a time until the end.
    while _more(info, size) and info.records:
        guard.count()
        info = await pages.handle(await pages.get(source.url, params(index)))
        fetched, index = fetched + 1, index + 1
    return fetched


async def _in_parallel(pages: Pages, url: str, all_params: list[dict[str, str]], concurrency: int) -> list[PageInfo]:
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


async def walk_pages(source: SourceConfig, pages: Pages, since: str | None) -> int:
    return await walk_numbered(source, pages, since, offset_style=False)


async def walk_offsets(source: SourceConfig, pages: Pages, since: str | None) -> int:
    return await walk_numbered(source, pages, since, offset_style=True)


async def walk_cursor(source: SourceConfig, pages: Pages, since: str | None) -> int:
    """limit=S[&cursor=C]: the next cursor comes in the body; an empty or null one ends the walk."""
    options = source.pagination_options
    params = {**_since(source, since), options.limit_param: str(source.page_size)}
    guard, fetched = WalkGuard(source), 0
    while True:
        guard.count()
        info = await pages.handle(await pages.get(source.url, params))
        fetched += 1
        cursor = info.meta.next_cursor
        if cursor in (None, "") or not info.records:
            return fetched
        if not isinstance(cursor, str | int):
            raise PageFormatError(f"{options.next_cursor_field!r} must be a string, got {cursor!r}")
        guard.visit(f"the {options.next_cursor_field!r}", str(cursor))
        params = {**params, options.cursor_param: str(cursor)}


async def walk_links(source: SourceConfig, pages: Pages, since: str | None) -> int:
    """Follow the `Link: <url>; rel="next"` header until a page has none."""
    options = source.pagination_options
    url: str | None = source.url
    params: dict[str, str] = {**_since(source, since), options.page_param: str(options.first_page),
                              options.size_param: str(source.page_size)}
    guard, fetched = WalkGuard(source), 0
    while url is not None:
        guard.count()
        response = await pages.get(url, params)
        info = await pages.handle(response)
        fetched += 1
        guard.seen.add(_same_page(response.url))
        url, params = _next_link(response), {}
        if not info.records:
            break
        if url is not None:
            guard.visit("the next link", _same_page(url), shown=url)
    return fetched


def _same_page(url: str) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
    """What identifies a page's URL: parameters in any order, the host in any case, no fragment."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower(), parts.path, tuple(sorted(parse_qsl(parts.query, True)))


def _next_link(response: Response) -> str | None:
    for header in response.headers.getall("Link", []):
        match = LINK_NEXT.search(header)
        if match:
            return urljoin(response.url, match.group(1))
    return None


async def walk_watermark(source: SourceConfig, pages: Pages, since: str | None) -> int:
    """Keyset: updated_since advances to the last record of each page, with its key as tie-breaker,
    so a run of records sharing one timestamp longer than a page is still walked through."""
    options = source.pagination_options
    params = {**_since(source, since), options.limit_param: str(source.page_size)}
    guard, fetched = WalkGuard(source), 0
    while True:
        guard.count()
        info = await pages.handle(await pages.get(source.url, params))
        fetched += 1
        if not _more(info, source.page_size) or not info.records:
            return fetched
        if info.last is None:  # stopping here would silently end every sync at this page
            raise PageFormatError("a full page without one valid record leaves no keyset position to "
                                  f"continue from (after {params.get(options.updated_since_param)!r})")
        last_updated, last_key = info.last
        guard.visit("the keyset position", info.last)
        params = {**params, options.updated_since_param: last_updated, options.after_key_param: last_key}


STYLES: dict[str, Style] = {
    "page": walk_pages,
    "offset": walk_offsets,
    "cursor": walk_cursor,
    "link": walk_links,
    "watermark": walk_watermark,
}
