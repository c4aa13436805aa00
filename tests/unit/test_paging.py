"""The pagination styles (workers/paging.py) against a fake in-memory upstream that implements the
``Pages`` protocol: every record is walked exactly once, in as few round trips as the style allows."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import msgspec
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from conflux.config import PaginationConfig, SourceConfig
from conflux.errors import PageFormatError, UpstreamError
from conflux.workers.batching import RecordSchema
from conflux.workers.paging import PageInfo, make_paginator, since_text
from conflux.workers.upstream import Response

URL = "http://upstream.test/api/customers"


def stamp(second: int) -> str:
    return f"2024-05-01T10:{second // 60:02d}:{second % 60:02d}Z"


def dataset(count: int, *, same_second: int = 1) -> list[dict]:
    """Records sorted by (updated_at, id), ``same_second`` of them sharing each timestamp."""
    return [{"id": f"k{i:04d}", "updated_at": stamp(i // same_second), "n": i} for i in range(count)]


class FakeUpstream:
    """An upstream collection behind every style, plus the fetcher's side of ``Pages``: parse each
    page as the fetcher does and remember which records it handed on."""

    def __init__(self, source: SourceConfig, records: list[dict], *, has_more: bool = True,
                 total: bool = True, link_base: str = URL) -> None:
        self.source, self.options = source, source.pagination_options
        self.records = records
        self.send_has_more, self.send_total, self.link_base = has_more, total, link_base
        self.schema = RecordSchema(source)
        self.requests: list[dict[str, str]] = []
        self.handled: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self.after_request: dict[int, Any] = {}   # request number -> callable run after serving it
        self.fail_request: int | None = None

    # -- Pages --------------------------------------------------------------------------------------

    async def get(self, url: str, params: dict[str, str]) -> Response:
        query = {**dict(parse_qsl(urlsplit(url).query)), **params}
        number = len(self.requests)
        self.requests.append(query)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for _ in range(3):  # let concurrent requests overlap
                await asyncio.sleep(0)
            if number == self.fail_request:
                raise UpstreamError(f"request {number} failed")
            response = self.serve(url, query)
        finally:
            self.in_flight -= 1
        if number in self.after_request:
            self.after_request.pop(number)()
        return response

    async def handle(self, response: Response) -> PageInfo:
        records, fields, meta = self.schema.page_records(response.body)
        columns = self.schema.columns(records, fields)
        self.handled += columns.keys
        last = (since_text(self.source, columns.updated_us[-1], columns.native_text(-1)), columns.keys[-1]) \
            if len(columns) else None
        return PageInfo(len(records), meta, last)

    # -- the upstream ------------------------------------------------------------------------------

    def visible(self, query: dict[str, str]) -> list[dict]:
        since = query.get(self.options.updated_since_param)
        rows = sorted(self.records, key=lambda r: (r["updated_at"], r.get("id", "")))
        if since is None:
            return rows
        after = query.get(self.options.after_key_param)
        if after is None:
            return [r for r in rows if r["updated_at"] >= since]
        return [r for r in rows if (r["updated_at"], r.get("id", "")) > (since, after)]

    def window(self, query: dict[str, str]) -> tuple[int, int]:
        """(page size, first position) of the page a request asks for, in the style's own terms."""
        style, options = self.source.pagination, self.options
        if style in ("page", "link"):
            size = int(query[options.size_param])
            return size, (int(query[options.page_param]) - options.first_page) * size
        position = {"offset": query.get(options.offset_param), "cursor": query.get(options.cursor_param),
                    "next_url": query.get("from")}.get(style)
        return int(query[options.limit_param]), int(position or "0")

    def serve(self, url: str, query: dict[str, str]) -> Response:
        rows, style, options = self.visible(query), self.source.pagination, self.options
        headers: CIMultiDict[str] = CIMultiDict()
        size, start = self.window(query)
        data, more = rows[start:start + size], start + size < len(rows)
        body: dict[str, Any] = {"data": data}
        if self.send_has_more and style != "link":
            body[options.has_more_field] = more
        if self.send_total and style in ("page", "offset"):
            body[options.total_field] = len(rows)
        if style == "cursor" and options.next_cursor_header and more:
            headers.add(options.next_cursor_header, str(start + size))
        elif style == "cursor" and not options.next_cursor_header:
            body[options.next_cursor_field] = str(start + size) if more else None
        if style == "next_url":
            body["links"] = {"next": f"?{urlencode({**query, 'from': str(start + size)})}" if more else None}
        if style == "link" and more:
            page = int(query[options.page_param])
            prev, after = (urlencode({**query, options.page_param: str(n)}) for n in (page - 1, page + 1))
            headers.add("Link", f'<{self.link_base}?{prev}>; rel="prev", <{self.link_base}?{after}>; rel="next"')
        url = f"{url.split('?')[0]}?{urlencode(query)}"   # the URL as requested, as aiohttp reports it
        return Response(200, CIMultiDictProxy(headers), msgspec.json.encode(body), url)


def source(style: str, *, page_size: int = 7, max_concurrency: int = 3, max_pages_per_sync: int = 100_000,
           updated_since_format: str = "native", **options: Any) -> SourceConfig:
    if style == "next_url":
        options.setdefault("next_url_path", "links.next")
    return SourceConfig(name="crm", url=URL, pagination=style, page_size=page_size, max_concurrency=max_concurrency,
                        max_pages_per_sync=max_pages_per_sync, pagination_options=PaginationConfig(**options),
                        updated_since_format=updated_since_format)


def walk(upstream: FakeUpstream, since: str | None = None) -> int:
    return asyncio.run(make_paginator(upstream.source).walk(upstream, URL, since))


ALL_STYLES = ["page", "offset", "cursor", "link", "watermark", "next_url"]


@pytest.mark.parametrize("style", ALL_STYLES)
@pytest.mark.parametrize("count", [0, 1, 48, 49, 50])
def test_every_style_walks_every_record_exactly_once(style: str, count: int) -> None:
    upstream = FakeUpstream(source(style), dataset(count))
    pages = walk(upstream)
    assert upstream.handled == [r["id"] for r in upstream.records]
    assert pages == len(upstream.requests)
    assert pages <= max(1, -(-count // 7)) + (style == "watermark" and count % 7 == 0 and count > 0)


@pytest.mark.parametrize("style", ALL_STYLES)
def test_without_has_more_a_full_page_means_there_may_be_more(style: str) -> None:
    upstream = FakeUpstream(source(style), dataset(49), has_more=False, total=False)
    pages = walk(upstream)
    assert sorted(upstream.handled) == [r["id"] for r in upstream.records]
    assert pages == (7 if style in ("cursor", "link", "next_url") else 8)  # the 8th page is empty and ends the walk


@pytest.mark.parametrize("style", ["page", "offset"])
def test_numbered_styles_fetch_the_remaining_pages_concurrently_up_to_the_limit(style: str) -> None:
    upstream = FakeUpstream(source(style, page_size=5, max_concurrency=3), dataset(100))
    assert walk(upstream) == 20
    assert upstream.max_in_flight == 3
    assert sorted(upstream.handled) == [r["id"] for r in upstream.records]


def test_page_style_uses_the_configured_parameter_names() -> None:
    upstream = FakeUpstream(source("page", page_param="p", size_param="per_page", first_page=0,
                                   total_field="count", has_more_field="more"), dataset(15))
    walk(upstream)
    assert [(q["p"], q["per_page"]) for q in upstream.requests] == [("0", "7"), ("1", "7"), ("2", "7")]
    assert upstream.handled == [r["id"] for r in upstream.records]


def test_offset_style_asks_for_offsets_in_steps_of_the_page_size() -> None:
    upstream = FakeUpstream(source("offset", max_concurrency=1), dataset(20))
    walk(upstream)
    assert [(q["offset"], q["limit"]) for q in upstream.requests] == [("0", "7"), ("7", "7"), ("14", "7")]


@pytest.mark.parametrize("style", ALL_STYLES)
def test_since_is_sent_as_updated_since_and_filters_the_walk(style: str) -> None:
    upstream = FakeUpstream(source(style), dataset(30))
    walk(upstream, since=stamp(10))
    assert upstream.requests[0]["updated_since"] == stamp(10)
    assert upstream.handled == [r["id"] for r in upstream.records if r["updated_at"] >= stamp(10)]


@pytest.mark.parametrize("style", ["page", "offset", "cursor", "watermark"])
def test_records_added_during_the_sync_are_walked_too(style: str) -> None:
    upstream = FakeUpstream(source(style, max_concurrency=2), dataset(30))
    late = [{"id": f"new{i}", "updated_at": stamp(500 + i), "n": -i} for i in range(12)]
    upstream.after_request[0] = lambda: upstream.records.extend(late)  # right after the first page
    walk(upstream)
    assert sorted(upstream.handled) == sorted(r["id"] for r in upstream.records)
    assert len(upstream.handled) == 42


def test_watermark_walks_through_a_run_of_one_timestamp_longer_than_a_page() -> None:
    upstream = FakeUpstream(source("watermark", page_size=5), dataset(40, same_second=17))
    walk(upstream)
    assert upstream.handled == [r["id"] for r in upstream.records]
    second = upstream.requests[1]
    assert (second["updated_since"], second["after_key"]) == (stamp(0), "k0004")


def test_watermark_refuses_to_stop_silently_at_a_full_page_of_invalid_records() -> None:
    """Regression: a full page without one valid record left the walk no keyset position to move
    to, and it ended as if the collection were finished; everything after that page was never
    synced (the next sync started before it again). Now the sync fails and says why."""
    records = dataset(30)
    for record in records[7:14]:  # the whole second page
        del record["id"]
    upstream = FakeUpstream(source("watermark"), records)
    with pytest.raises(PageFormatError, match="keyset"):
        walk(upstream)
    assert upstream.handled == [r["id"] for r in records[:7]]


def test_cursor_ends_on_a_null_or_empty_cursor_and_rejects_an_odd_one() -> None:
    upstream = FakeUpstream(source("cursor"), dataset(10))
    upstream.serve = lambda url, query: Response(200, CIMultiDictProxy(CIMultiDict()), msgspec.json.encode(
        {"data": dataset(3), "next_cursor": {"not": "a cursor"}}), url)
    with pytest.raises(PageFormatError, match="next_cursor"):
        walk(upstream)
    for end in ("", None):
        upstream = FakeUpstream(source("cursor"), dataset(10))
        upstream.serve = lambda url, query, end=end: Response(200, CIMultiDictProxy(CIMultiDict()),
                                                              msgspec.json.encode({"data": dataset(3),
                                                                                   "next_cursor": end}), url)
        assert walk(upstream) == 1


def test_link_follows_relative_next_links_resolved_against_the_page_url() -> None:
    upstream = FakeUpstream(source("link"), dataset(20), link_base="/api/customers")
    walk(upstream)
    assert upstream.handled == [r["id"] for r in upstream.records]
    assert [(q["page"], q["size"]) for q in upstream.requests] == [("1", "7"), ("2", "7"), ("3", "7")]


def test_a_failed_page_stops_the_concurrent_fetches() -> None:
    """Regression: when one concurrent page failed, gather() raised but left the other workers
    running, so a failed sync went on fetching (and publishing) pages in the background."""
    upstream = FakeUpstream(source("page", page_size=2, max_concurrency=3), dataset(60))
    upstream.fail_request = 2

    async def scenario() -> int:
        with pytest.raises(UpstreamError):
            await make_paginator(upstream.source).walk(upstream, URL, None)
        requested = len(upstream.requests)
        for _ in range(20):
            await asyncio.sleep(0)
        return requested

    requested = asyncio.run(scenario())
    assert len(upstream.requests) == requested < 30
    assert upstream.in_flight == 0


@pytest.mark.parametrize("style", ["page", "offset"])
def test_a_total_too_small_for_the_page_does_not_fetch_the_first_page_twice(style: str) -> None:
    """Regression: a total of 0 (some APIs' "unknown") on a page with records made the walk start
    over at the first page, fetching and publishing it twice."""
    upstream = FakeUpstream(source(style), dataset(20))
    serve = upstream.serve

    def total_zero(url: str, query: dict[str, str]) -> Response:
        response = serve(url, query)
        body = msgspec.json.decode(response.body)
        return response._replace(body=msgspec.json.encode({**body, "total": 0}))

    upstream.serve = total_zero
    assert walk(upstream) == 3
    assert upstream.handled == [r["id"] for r in upstream.records]


# -- a hostile or buggy upstream cannot make a sync endless ------------------------------------------


def test_a_cursor_that_comes_back_fails_the_sync_instead_of_looping() -> None:
    """Regression: an upstream whose next_cursor repeated made the sync fetch the same pages forever."""
    upstream = FakeUpstream(source("cursor"), dataset(70))
    serve = upstream.serve

    def looping(url: str, query: dict[str, str]) -> Response:
        response = serve(url, query)
        body = msgspec.json.decode(response.body)
        if body["next_cursor"] == "28":  # after page 4, back to page 2
            body["next_cursor"] = "7"
        return response._replace(body=msgspec.json.encode(body))

    upstream.serve = looping
    with pytest.raises(PageFormatError, match="pagination loops: the upstream sent the 'next_cursor' '7' again"):
        walk(upstream)
    assert len(upstream.requests) == 4


def test_a_next_link_that_comes_back_fails_the_sync_whatever_the_parameter_order() -> None:
    upstream = FakeUpstream(source("link"), dataset(70))
    serve = upstream.serve

    def looping(url: str, query: dict[str, str]) -> Response:
        response = serve(url, query)
        if query["page"] == "3":
            headers = CIMultiDict({"Link": f'<{URL}?size=7&page=1>; rel="next"'})
            return response._replace(headers=CIMultiDictProxy(headers), url=f"{URL}?page=3&size=7")
        return response._replace(url=f"{URL}?page={query['page']}&size=7")

    upstream.serve = looping
    with pytest.raises(PageFormatError, match="pagination loops: the upstream sent the next link"):
        walk(upstream)
    assert [q["page"] for q in upstream.requests] == ["1", "2", "3"]


def test_a_keyset_position_that_does_not_move_fails_the_sync() -> None:
    """An upstream that ignores after_key serves the same full page again and again."""
    upstream = FakeUpstream(source("watermark"), dataset(30, same_second=30))
    upstream.visible = lambda query: sorted(upstream.records, key=lambda r: r["id"])
    with pytest.raises(PageFormatError, match="pagination loops: the upstream sent the keyset position"):
        walk(upstream)
    assert len(upstream.requests) == 2


@pytest.mark.parametrize("style", ALL_STYLES)
def test_max_pages_per_sync_caps_every_style(style: str) -> None:
    upstream = FakeUpstream(source(style, max_pages_per_sync=3), dataset(70))
    with pytest.raises(PageFormatError, match=r"more than 3 pages \(max_pages_per_sync\)"):
        walk(upstream)
    assert len(upstream.requests) <= 3
    assert walk(FakeUpstream(source(style, max_pages_per_sync=10), dataset(70))) <= 10


@pytest.mark.parametrize("style", ["page", "offset"])
def test_a_huge_total_fails_before_any_page_list_is_built(style: str) -> None:
    """A total of 10**15 made the numbered styles build a list of every page's parameters first."""
    upstream = FakeUpstream(source(style), dataset(20))
    serve = upstream.serve
    upstream.serve = lambda url, query: (lambda response: response._replace(body=msgspec.json.encode(
        {**msgspec.json.decode(response.body), "total": 10**15})))(serve(url, query))
    with pytest.raises(PageFormatError, match="max_pages_per_sync"):
        walk(upstream)
    assert len(upstream.requests) == 1


# -- next URL in the body, cursor in a header, updated_since formats ----------------------------------------


def test_next_url_follows_the_relative_link_in_the_body_until_it_is_null() -> None:
    upstream = FakeUpstream(source("next_url"), dataset(20))
    assert walk(upstream, since=stamp(0)) == 3
    assert upstream.handled == [r["id"] for r in upstream.records]
    # The first request asks for the page size and updated_since; every next URL is taken as it is.
    assert upstream.requests[0] == {"limit": "7", "updated_since": stamp(0)}
    assert [q["from"] for q in upstream.requests[1:]] == ["7", "14"]


@pytest.mark.parametrize("end", [None, "", "missing"])
def test_next_url_ends_on_null_empty_or_missing(end: object) -> None:
    upstream = FakeUpstream(source("next_url"), dataset(20))
    links = {} if end == "missing" else {"next": end}
    upstream.serve = lambda url, query: Response(200, CIMultiDictProxy(CIMultiDict()), msgspec.json.encode(
        {"data": dataset(7), "links": links}), url)
    assert walk(upstream) == 1


def test_next_url_that_is_not_a_string_fails_the_sync_naming_the_path() -> None:
    upstream = FakeUpstream(source("next_url", next_url_path="paging.next.href"), dataset(20))
    upstream.serve = lambda url, query: Response(200, CIMultiDictProxy(CIMultiDict()), msgspec.json.encode(
        {"data": dataset(7), "paging": {"next": {"href": 42}}}), url)
    with pytest.raises(PageFormatError, match=r"'paging\.next\.href' must be a URL"):
        walk(upstream)


def test_a_next_url_that_comes_back_fails_the_sync() -> None:
    upstream = FakeUpstream(source("next_url"), dataset(70))
    serve = upstream.serve

    def looping(url: str, query: dict[str, str]) -> Response:
        response = serve(url, query)
        body = msgspec.json.decode(response.body)
        if query.get("from") == "21":
            body["links"]["next"] = "?limit=7&from=7"
        return response._replace(body=msgspec.json.encode(body))

    upstream.serve = looping
    with pytest.raises(PageFormatError, match="pagination loops: the upstream sent the next URL"):
        walk(upstream)
    assert [q.get("from") for q in upstream.requests] == [None, "7", "14", "21"]


def test_the_cursor_can_come_from_a_response_header() -> None:
    upstream = FakeUpstream(source("cursor", next_cursor_header="X-Next-Cursor"), dataset(20))
    assert walk(upstream) == 3
    assert upstream.handled == [r["id"] for r in upstream.records]
    assert [q.get("cursor") for q in upstream.requests] == [None, "7", "14"]


def test_a_header_cursor_that_comes_back_fails_the_sync() -> None:
    upstream = FakeUpstream(source("cursor", next_cursor_header="X-Next-Cursor"), dataset(70))
    serve = upstream.serve

    def looping(url: str, query: dict[str, str]) -> Response:
        response = serve(url, query)
        return response._replace(headers=CIMultiDictProxy(CIMultiDict({"X-Next-Cursor": "7"})))

    upstream.serve = looping
    with pytest.raises(PageFormatError, match="'X-Next-Cursor' header '7' again"):
        walk(upstream)


@pytest.mark.parametrize(("form", "expected"), [
    ("native", "2024-05-01T10:00:07+00:00"), ("iso8601", "2024-05-01T10:00:07Z"),
    ("epoch_s", "1714557607"), ("epoch_ms", "1714557607000")])
def test_updated_since_is_sent_in_the_configured_format(form: str, expected: str) -> None:
    instant_us = 1714557607_000_000
    assert since_text(source("page", updated_since_format=form), instant_us, "2024-05-01T10:00:07+00:00") == expected
    assert since_text(source("page", updated_since_format="epoch_ms"), instant_us + 999, "") == "1714557607000"


def test_the_keyset_position_is_sent_in_the_updated_since_format_too() -> None:
    upstream = FakeUpstream(source("watermark", updated_since_format="epoch_s"), dataset(20))
    upstream.visible = lambda query: upstream.records[int(query["after_key"][1:]) + 1 if "after_key" in query else 0:]
    walk(upstream)
    assert upstream.handled == [r["id"] for r in upstream.records]
    assert (upstream.requests[1]["updated_since"], upstream.requests[1]["after_key"]) == ("1714557606", "k0006")


@pytest.mark.parametrize(("style", "options", "problem"), [
    ("next_url", {"next_url_path": ""}, "pagination.next_url_path: required"),
    ("next_url", {"records_path": ""}, "records_path: the next_url style reads the next URL from the body"),
    ("cursor", {"records_path": ""}, "pagination.next_cursor_header: the body is the list of records"),
])
def test_a_style_refuses_a_source_it_cannot_walk(style: str, options: dict, problem: str) -> None:
    config = source(style, **options)
    paginator = make_paginator(config)
    with pytest.raises(ValueError, match=problem):
        paginator.check(config, None)
