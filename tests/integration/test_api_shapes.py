"""The API shapes real upstreams have, end to end: the daemon pages the demo upstream serving each shape
and the sink converges to the upstream's checksum.

- next URLs in the body (JSON:API ``links.next``), with the records under a nested path, and the
  same-origin rule for a next URL that leads elsewhere;
- a cursor in a response header, the body being the bare list of records;
- POST search APIs, for every paging style, with JSON and form bodies: the parameters go into the body
  where its placeholders say, and updated_since with them;
- updated_since sent in epoch milliseconds.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import msgspec
import pytest
import requests

from tests.fixtures.daemon import source, wait_converged
from tests.support import wait_until

CUSTOMERS = {"customers": "customers"}


def _stats(upstream) -> dict:
    return requests.get(f"{upstream.url}/stats", timeout=10).json()["collections"]["customers"]


def _change(upstream, key: int, tier: str) -> None:
    requests.put(f"{upstream.url}/api/customers/{key}", json={"tier": tier}, timeout=10).raise_for_status()


def _report(daemon, name: str = "customers") -> dict:
    return daemon.status()["sources"].get(name, {})


def _incremental_after(daemon, asked_at: float) -> dict:
    return wait_until(lambda: daemon.sync_ok("customers", sync_type="incremental", after=asked_at), timeout_s=30,
                      message="an incremental sync")


def test_next_urls_in_the_body_with_records_under_a_nested_path(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=1200, products=0, records_path="result.items")
    daemon = daemon_factory(sources=[source(
        "customers", upstream.url, path="customers/next", pagination="next_url", page_size=100,
        records_path="result.items", pagination_fields={"next_url_path": "links.next"}, poll_interval_s=0.5)],
        sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=60)
    assert _stats(upstream)["requests"]["next"] >= 12
    # An incremental sync follows the next URLs from the watermark, and brings the change.
    asked_at = time.time()
    _change(upstream, 17, "diamond")
    _incremental_after(daemon, asked_at)
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    assert daemon.stop() == 0


def test_a_next_url_to_another_origin_is_refused(upstream_factory, analytics, daemon_factory):
    foreign = upstream_factory(customers=10, products=0, record_requests=True)
    upstream = upstream_factory(customers=300, products=0, next_link_origin=foreign.url)
    daemon = daemon_factory(sources=[source(
        "customers", upstream.url, path="customers/next", pagination="next_url", page_size=100,
        pagination_fields={"next_url_path": "links.next"}, headers={"X-Tenant": "acme"})], sink_url=analytics.url)
    report = wait_until(lambda: (r := _report(daemon)).get("last_sync_result", "").startswith("failed") and r,
                        timeout_s=30, message="the sync to fail")
    port = foreign.url.rsplit(":", 1)[1]
    assert f"refused: origin http://127.0.0.1:{port} is neither the source's own" in report["last_sync_result"]
    received = requests.get(f"{foreign.url}/admin/requests", timeout=10).json()["requests"]
    assert [r for r in received if not r["path_qs"].startswith("/admin/")] == []
    assert daemon.stop() == 0


def test_a_cursor_in_a_response_header_and_the_body_as_the_list(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=900, products=0)
    daemon = daemon_factory(sources=[source(
        "customers", upstream.url, path="customers/header-cursor", pagination="cursor", page_size=100,
        records_path="", pagination_fields={"next_cursor_header": "X-Next-Cursor"}, poll_interval_s=0.5)],
        sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=60)
    assert _stats(upstream)["requests"]["header-cursor"] == 9
    asked_at = time.time()
    _change(upstream, 5, "diamond")
    _incremental_after(daemon, asked_at)
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    assert daemon.stop() == 0


# style -> (the search endpoint's style, the request body)
SEARCHES = {
    "page": ("page", {"page": "{page}", "size": "{limit}", "filter": {"updated_since": "{updated_since}"}}),
    "offset": ("offset", {"window": {"offset": "{offset}", "limit": "{limit}"}, "since": "x"}),
    "cursor": ("cursor", {"paging": {"cursor": "{cursor}", "limit": "{limit}"}, "updated_since": "{updated_since}"}),
    "link": ("link", {"page": "{page}", "size": "{limit}"}),
    "watermark": ("keyset", {"updated_since": "{updated_since}", "after_key": "{after_key}", "limit": "{limit}"}),
    "next_url": ("next", {"limit": "{limit}", "updated_since": "{updated_since}"}),
}


@pytest.mark.parametrize("style", sorted(SEARCHES))
def test_a_post_search_api_in_every_paging_style(style, upstream_factory, analytics, daemon_factory):
    endpoint, body = SEARCHES[style]
    upstream = upstream_factory(customers=700, products=0, record_requests=True)
    fields = {"next_url_path": "links.next"} if style == "next_url" else {}
    daemon = daemon_factory(sources=[source(
        "customers", upstream.url, path=f"customers/search/{endpoint}", pagination=style, page_size=100,
        method="POST", body=body, pagination_fields=fields, poll_interval_s=0.5)], sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=60)
    asked_at = time.time()
    _change(upstream, 9, "diamond")
    _incremental_after(daemon, asked_at)
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    requests_seen = requests.get(f"{upstream.url}/admin/requests", timeout=10).json()["requests"]
    pages = [r for r in requests_seen if r["path_qs"].startswith("/api/customers/search")]
    assert pages and all(r["method"] == "POST" for r in pages)
    assert all(("application/json" in dict(r["headers"]).get("Content-Type", "")) for r in pages)
    # updated_since went where the body's placeholder said, or stayed in the query string.
    incremental = [r for r in pages if "updated_since" in r["path_qs"] or "updated_since" in r["body"]]
    assert incremental, "no request of an incremental sync"
    in_body = "{updated_since}" in msgspec.json.encode(body).decode()
    for request in incremental:
        query = parse_qs(urlsplit(request["path_qs"]).query)
        assert ("updated_since" in request["body"], "updated_since" in query) == (in_body, not in_body), request
    assert daemon.stop() == 0


def test_a_form_encoded_search(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=450, products=0, record_requests=True)
    daemon = daemon_factory(sources=[source(
        "customers", upstream.url, path="customers/search/offset", pagination="offset", page_size=100,
        method="POST", body_type="form", body={"offset": "{offset}", "limit": "{limit}", "label": "conflux"})],
        sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=60)
    pages = [r for r in requests.get(f"{upstream.url}/admin/requests", timeout=10).json()["requests"]
             if r["path_qs"].startswith("/api/customers/search")]
    assert sorted(parse_qs(r["body"])["offset"][0] for r in pages) == ["0", "100", "200", "300", "400"]
    assert all(r["path_qs"] == "/api/customers/search/offset" for r in pages)   # nothing left in the query
    assert daemon.stop() == 0


def test_updated_since_in_epoch_milliseconds(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=600, products=300, updated_since_format="epoch_ms")
    daemon = daemon_factory(sources=[
        source("customers", upstream.url, path="customers/cursor", pagination="cursor", page_size=100,
               updated_since_format="epoch_ms", poll_interval_s=0.5),
        # The same API with the default (the records' own ISO 8601 text): the upstream refuses it.
        source("products", upstream.url, path="products/cursor", pagination="cursor", page_size=100,
               poll_interval_s=0.5)], sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, {"customers": "customers", "products": "products"}, timeout_s=60)
    asked_at = time.time()
    _change(upstream, 11, "diamond")
    report = _incremental_after(daemon, asked_at)
    assert report["watermark"]   # the watermark stays the records' own text; only the query value is epoch
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    failed = wait_until(lambda: "failed" in (r := _report(daemon, "products")).get("last_sync_result", "") and r,
                        timeout_s=30, message="the products' incremental sync to fail")
    assert "updated_since: must be a number (epoch_ms)" in failed["last_sync_result"]
    assert daemon.stop() == 0
