"""``pagination = "skip_take"``: APIs that page by ``?skip=N&take=M`` and tell the total in a header.

Many .NET and OData-flavoured APIs answer ``GET /items?skip=0&take=100`` with the page's records (often
the bare list: ``records_path = ""``) and the number of matching records in ``X-Total-Count``. The first
page tells the total; the remaining pages are fetched concurrently, up to the source's
``max_concurrency``. Without the header, pages are fetched one after another until one is short.
(``since`` filters by updated_since, and the upstream orders by it, so records that change during a
sync sort after the pages the total counted: the next incremental sync brings them.)

    [[sources]]
    name = "tickets"
    url = "https://helpdesk.example/api/tickets"
    pagination = "skip_take"
    records_path = ""

    [sources.pagination_options]
    skip_param = "skip"              # the defaults
    take_param = "take"
    total_header = "X-Total-Count"
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from conflux.config import SourceConfig
from conflux.errors import PageFormatError
from conflux.workers.paging import Pages, Paginator, WalkGuard, in_parallel


class SkipTakeOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    skip_param: str = "skip"
    take_param: str = "take"
    total_header: str = "X-Total-Count"

    def __post_init__(self) -> None:
        if not self.skip_param or not self.take_param:
            raise ValueError("skip_param and take_param must not be empty")


class SkipTake(Paginator):
    """Numbered by records skipped; the first page tells the total in a header."""

    api_version = 1
    Options = SkipTakeOptions
    stable = False      # records that change while a sync pages may move past it: reconcile looks twice

    @classmethod
    def check(cls, source: SourceConfig, options: SkipTakeOptions) -> None:
        if options.skip_param == options.take_param:
            raise ValueError(f"pagination_options.take_param: {options.take_param!r} is also the skip_param")

    def params(self, skip: int, base: dict[str, str]) -> dict[str, str]:
        return {**base, self.options.skip_param: str(skip), self.options.take_param: str(self.source.page_size)}

    async def walk(self, pages: Pages, url: str, since: str | None) -> int:
        size, base = self.source.page_size, self.since_params(since)
        guard = WalkGuard(self.source)
        guard.count()
        response = await pages.get(url, self.params(0, base))
        info = await pages.handle(response)
        total = self._total(response.headers.get(self.options.total_header))
        fetched, skip = 1, size
        if total is not None and total > size:
            rest = math.ceil(total / size) - 1
            guard.count(rest)    # before listing the pages: a bogus total must not fill memory
            infos = await in_parallel(pages, url, [self.params(size * (n + 1), base) for n in range(rest)],
                                      self.source.max_concurrency)
            fetched, skip = fetched + len(infos), size * (rest + 1)
            info = infos[-1] if infos else info
        # No total: on one page at a time until a short page. (Records added during the sync sort after
        # the total's pages, as their updated_at is newer: the next incremental sync brings them.)
        while total is None and info.records >= size:
            guard.count()
            info = await pages.handle(await pages.get(url, self.params(skip, base)))
            fetched, skip = fetched + 1, skip + size
        return fetched

    def _total(self, text: Any) -> int | None:
        if text is None:
            return None
        try:
            total = int(text)
        except ValueError:
            raise PageFormatError(f"the {self.options.total_header!r} header must be a number, got {text!r}") from None
        return max(total, 0)
