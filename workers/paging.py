"""The pagination styles: how to walk an upstream collection page by page.

Each style is one coroutine that asks for pages and hands each response to ``pages.handle`` as soon
as it arrives, so records are published while later pages are still being fetched. Styles that
know the total (page, offset) fetch the remaining pages concurrently, up to the source's
``max_concurrency``; styles that learn the next page from the current one (cursor, link, watermark)
go one after another, and overlap each fetch with the publishing of the page before.

``since`` is the watermark for an incremental sync (None for a full one). Parameter and field names
come from the source's ``[sources.pagination]`` table.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol

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

    def handle(self, response: Response) -> PageInfo: ...


Style = Callable[[SourceConfig, Pages, str | None], Awaitable[int]]


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

    first = pages.handle(await pages.get(source.url, params(0)))
    fetched, index, info = 1, 1, first
    total = first.meta.total if isinstance(first.meta.total, int) and first.meta.total >= 0 else None
    if total is not None and _more(first, size):
        known = math.ceil(total / size)
        infos = await _in_parallel(pages, source.url, [params(i) for i in range(1, known)], source.max_concurrency)
        fetched += len(infos)
        index = max(known, 1)  # a total of 0 beside records must not start over at the first page
        info = infos[-1] if infos else first
    # Records added during the sync (or no total given): continue one page at a time until the end.
    while _more(info, size) and info.records:
        info = pages.handle(await pages.get(source.url, params(index)))
        fetched, index = fetched + 1, index + 1
    return fetched


async def _in_parallel(pages: Pages, url: str, all_params: list[dict[str, str]], concurrency: int) -> list[PageInfo]:
    """Fetch pages with at most ``concurrency`` in flight; handle each as it lands; results in page order."""
    results: list[PageInfo | None] = [None] * len(all_params)
    queue = iter(enumerate(all_params))

    async def worker() -> None:
        for position, params in queue:
            results[position] = pages.handle(await pages.get(url, params))

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
    fetched = 0
    while True:
        info = pages.handle(await pages.get(source.url, params))
        fetched += 1
        cursor = info.meta.next_cursor
        if cursor in (None, "") or not info.records:
            return fetched
        if not isinstance(cursor, str | int):
            raise PageFormatError(f"{options.next_cursor_field!r} must be a string, got {cursor!r}")
        params = {**params, options.cursor_param: str(cursor)}


async def walk_links(source: SourceConfig, pages: Pages, since: str | None) -> int:
    """Follow the `Link: <url>; rel="next"` header until a page has none."""
    options = source.pagination_options
    url: str | None = source.url
    params: dict[str, str] = {**_since(source, since), options.page_param: str(options.first_page),
                              options.size_param: str(source.page_size)}
    fetched = 0
    while url is not None:
        response = await pages.get(url, params)
        info = pages.handle(response)
        fetched += 1
        url, params = _next_link(response), {}
        if not info.records:
            break
    return fetched


def _next_link(response: Response) -> str | None:
    from urllib.parse import urljoin

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
    fetched = 0
    while True:
        info = pages.handle(await pages.get(source.url, params))
        fetched += 1
        if not _more(info, source.page_size) or not info.records:
            return fetched
        if info.last is None:  # stopping here would silently end every sync at this page
            raise PageFormatError("a full page without one valid record leaves no keyset position to "
                                  f"continue from (after {params.get(options.updated_since_param)!r})")
        last_updated, last_key = info.last
        params = {**params, options.updated_since_param: last_updated, options.after_key_param: last_key}


STYLES: dict[str, Style] = {
    "page": walk_pages,
    "offset": walk_offsets,
    "cursor": walk_cursor,
    "link": walk_links,
    "watermark": walk_watermark,
}
