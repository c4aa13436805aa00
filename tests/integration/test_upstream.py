"""The demo upstream as users and the daemon see it: a real `conflux upstream` process on 127.0.0.1,
driven over HTTP with requests. Checksums are recomputed client-side from the exact record bytes
the pages carried, the way the analytics sink does it."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import pytest
import requests

from conflux.demo.checksum import Checksum, record_digest
from tests.fixtures.analytics import post_batch, sink_record
from tests.fixtures.upstream import start_upstream, stop_upstream
from tests.support import Service, wait_until

STYLES = ("page", "offset", "cursor", "link", "keyset")
KEY_FIELDS = {"customers": "id", "products": "sku", "orders": "id"}
TIMESTAMP_S = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


class PageBody(msgspec.Struct):
    data: list[msgspec.Raw]
    next_cursor: str | None = None
    has_more: bool = False


class MalformedEntry(msgspec.Struct):
    key: int | str
    reason: str
    record: msgspec.Raw


_page_decoder = msgspec.json.Decoder(PageBody)
_malformed_decoder = msgspec.json.Decoder(dict[str, list[MalformedEntry]])


# -- a small client ---------------------------------------------------------------------------

def get_page(session: requests.Session, url: str, params: dict) -> tuple[PageBody, requests.Response]:
    response = session.get(url, params=params, timeout=30)
    assert response.status_code == 200, f"{response.status_code} {response.text}"
    return _page_decoder.decode(response.content), response


def _since(since: str | None) -> dict[str, str]:
    return {} if since is None else {"updated_since": since}


def _numbered_pages(session, base, collection, size, since) -> Iterator[list[bytes]]:
    for page in itertools.count(1):
        body, _ = get_page(session, f"{base}/api/{collection}", {"page": page, "size": size, **_since(since)})
        yield body.data
        if not body.has_more:
            return


def _offset_pages(session, base, collection, size, since) -> Iterator[list[bytes]]:
    for offset in itertools.count(0, size):
        params = {"offset": offset, "limit": size, **_since(since)}
        body, _ = get_page(session, f"{base}/api/{collection}/offset", params)
        yield body.data
        if not body.has_more:
            return


def _cursor_pages(session, base, collection, size, since) -> Iterator[list[bytes]]:
    params: dict[str, object] = {"limit": size, **_since(since)}
    while True:
        body, _ = get_page(session, f"{base}/api/{collection}/cursor", params)
        yield body.data
        if body.next_cursor is None:
            return
        params["cursor"] = body.next_cursor


def _link_pages(session, base, collection, size, since) -> Iterator[list[bytes]]:
    url, params = f"{base}/api/{collection}/link", {"size": size, **_since(since)}
    while True:
        body, response = get_page(session, url, params)
        yield body.data
        if "next" not in response.links:
            return
        url, params = response.links["next"]["url"], {}
        assert url.startswith(base)


def _keyset_pages(session, base, collection, size, since) -> Iterator[list[bytes]]:
    params: dict[str, object] = {"limit": size, **_since(since)}
    while True:
        body, _ = get_page(session, f"{base}/api/{collection}/keyset", params)
        yield body.data
        if not body.has_more:
            return
        last = msgspec.json.decode(body.data[-1])
        params.update(updated_since=last["updated_at"], after_key=last[KEY_FIELDS[collection]])


PAGERS = {"page": _numbered_pages, "offset": _offset_pages, "cursor": _cursor_pages, "link": _link_pages,
          "keyset": _keyset_pages}


def fetch_all(service: Service, collection: str, style: str, *, size: int = 100, since: str | None = None,
              after_page: Callable[[int], None] | None = None) -> list[bytes]:
    """Every record of a full pass in ``style``, as the exact bytes served; ``after_page(n)`` runs
    between pages (n counts from 0)."""
    records: list[bytes] = []
    with requests.Session() as session:
        for number, data in enumerate(PAGERS[style](session, service.url, collection, size, since)):
            records += [bytes(raw) for raw in data]
            if after_page is not None:
                after_page(number)
    return records


def decode(raw: bytes) -> dict:
    return msgspec.json.decode(raw)


def keys_of(records: list[bytes], collection: str) -> list:
    return [decode(raw)[KEY_FIELDS[collection]] for raw in records]


def client_checksum(records: list[bytes], collection: str) -> dict[str, object]:
    checksum = Checksum()
    for raw in records:
        checksum.add(record_digest(str(decode(raw)[KEY_FIELDS[collection]]), raw))
    return checksum.as_dict()


def server_checksum(service: Service, collection: str) -> dict[str, object]:
    body = requests.get(f"{service.url}/api/{collection}/checksum", timeout=10).json()
    assert body["collection"] == collection
    return {"checksum": body["checksum"], "count": body["count"]}


def order_key(raw: bytes, collection: str) -> tuple[str, object]:
    record = decode(raw)
    return record["updated_at"], record[KEY_FIELDS[collection]]


def in_order(records: list[bytes], collection: str) -> bool:
    keys = [order_key(raw, collection) for raw in records]
    return keys == sorted(keys)


def put(service: Service, collection: str, key: object, fields: dict) -> requests.Response:
    return requests.put(f"{service.url}/api/{collection}/{key}", json=fields, timeout=10)


# -- a read-only upstream shared by the tests that only read ----------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = start_upstream(tmp_path_factory.mktemp("upstream-shared"), customers=1234, products=777,
                             systems=1, records_per_system=321, seed=3)
    yield service
    stop_upstream(service)


@pytest.fixture(scope="module")
def reference(shared: Service) -> dict[str, list[bytes]]:
    """Each collection of ``shared`` in order, read once with the simplest style."""
    return {name: fetch_all(shared, name, "offset", size=1000) for name in KEY_FIELDS}


@pytest.mark.parametrize("collection", sorted(KEY_FIELDS))
@pytest.mark.parametrize("style", STYLES)
def test_every_style_returns_every_record_once_in_order(shared, reference, style, collection):
    records = fetch_all(shared, collection, style, size=97)
    keys = keys_of(records, collection)
    assert len(keys) == len(set(keys)) == server_checksum(shared, collection)["count"]
    assert in_order(records, collection)
    assert records == reference[collection]
    assert client_checksum(records, collection) == server_checksum(shared, collection)


def test_timestamps_are_iso_seconds_and_many_records_share_one(reference):
    stamps = [decode(raw)["updated_at"] for raw in reference["customers"]]
    assert all(TIMESTAMP_S.match(stamp) for stamp in stamps)
    assert min(stamps) >= "2026-01-01T00:00:00Z" and max(stamps) < "2026-02-01T00:00:00Z"
    shared_counts = Counter(stamps)
    assert sum(n for n in shared_counts.values() if n > 1) > len(stamps) / 2


def _boundary(records: list[bytes]) -> str:
    """An updated_at in the middle of ``records`` that several records share."""
    stamps = [decode(raw)["updated_at"] for raw in records]
    counts = Counter(stamps)
    return next(stamp for stamp in stamps[len(stamps) // 2:] if counts[stamp] > 1)


@pytest.mark.parametrize("style", STYLES)
def test_updated_since_is_inclusive(shared, reference, style):
    everything = reference["customers"]
    since = _boundary(everything)
    expected = [raw for raw in everything if decode(raw)["updated_at"] >= since]
    records = fetch_all(shared, "customers", style, size=50, since=since)
    assert records == expected
    assert sum(decode(raw)["updated_at"] == since for raw in records) > 1


def test_updated_since_accepts_any_offset(shared, reference):
    since = _boundary(reference["products"])
    moment = datetime.fromisoformat(since).astimezone(timezone(timedelta(hours=2)))
    assert fetch_all(shared, "products", "cursor", since=moment.isoformat()) == \
        fetch_all(shared, "products", "cursor", since=since)


def test_page_style_reports_total_and_page_size_limits(shared, reference):
    body = requests.get(f"{shared.url}/api/customers", params={"page": 2, "size": 1000}, timeout=10).json()
    assert (body["page"], body["size"], body["total"], body["has_more"]) == (2, 1000, 1234, False)
    assert len(body["data"]) == 234
    for path, name in (("", "size"), ("/offset", "limit"), ("/cursor", "limit"), ("/link", "size"),
                       ("/keyset", "limit")):
        response = requests.get(f"{shared.url}/api/customers{path}", params={name: 1001}, timeout=10)
        assert response.status_code == 400
        assert response.json()["error"].startswith(f"{name}:")
    default = requests.get(f"{shared.url}/api/customers/offset", timeout=10).json()
    assert len(default["data"]) == 100 and default["total"] == 1234


def test_link_header_is_absolute_and_keeps_parameters(shared, reference):
    since = _boundary(reference["customers"])
    response = requests.get(f"{shared.url}/api/customers/link", params={"size": 10, "updated_since": since},
                            timeout=10)
    next_url = response.links["next"]["url"]
    assert next_url.startswith(f"{shared.url}/api/customers/link?")
    following = requests.get(next_url, timeout=10)
    assert following.status_code == 200
    assert "page=2" in next_url and "size=10" in next_url and "updated_since=" in next_url


BAD_REQUESTS = [
    ("/api/customers", {"page": "two"}, 400, "page"),
    ("/api/customers", {"page": 0}, 400, "page"),
    ("/api/customers", {"size": 0}, 400, "size"),
    ("/api/customers", {"updated_since": "yesterday"}, 400, "updated_since"),
    ("/api/customers/offset", {"offset": -1}, 400, "offset"),
    ("/api/customers/cursor", {"cursor": "not-a-cursor"}, 400, "cursor"),
    ("/api/customers/cursor", {"cursor": "eyJjIjoicHJvZHVjdHMiLCJ0IjoxLCJrIjoiU0tVIn0"}, 400, "cursor"),
    ("/api/customers/keyset", {"after_key": 5}, 400, "after_key"),
    ("/api/customers/keyset", {"updated_since": "2026-01-02T00:00:00Z", "after_key": "x"}, 400, "after_key"),
    ("/api/customers/link", {"updated_since": "2026-13-45T99:00:00Z"}, 400, "updated_since"),
    ("/api/nonexistent", {}, 404, "collection"),
    ("/api/nonexistent/cursor", {}, 404, "collection"),
]


@pytest.mark.parametrize(("path", "params", "status", "parameter"), BAD_REQUESTS)
def test_bad_parameters_are_rejected_by_name(shared, path, params, status, parameter):
    response = requests.get(f"{shared.url}{path}", params=params, timeout=10)
    assert response.status_code == status
    assert response.json()["error"].startswith(f"{parameter}:")


def test_health_and_collections(shared):
    assert requests.get(f"{shared.url}/health", timeout=10).json() == {"status": "ok"}
    stats = requests.get(f"{shared.url}/stats", timeout=10).json()
    assert list(stats["collections"]) == ["customers", "products", "orders"]
    assert stats["collections"]["orders"]["records"] == 321


# -- changes ----------------------------------------------------------------------------------

def test_post_and_put_stamp_move_and_keep_the_checksum(upstream_factory):
    service = upstream_factory(customers=300, products=50)
    before = server_checksum(service, "customers")
    assert client_checksum(fetch_all(service, "customers", "cursor"), "customers") == before
    created = requests.post(f"{service.url}/api/customers", json={"name": "New Person"}, timeout=10)
    assert created.status_code == 201
    assert decode(created.content)["id"] == 301
    updated = put(service, "customers", 7, {"tier": "platinum", "note": "vip"})
    assert updated.status_code == 200
    record = decode(updated.content)
    assert (record["id"], record["tier"], record["note"]) == (7, "platinum", "vip")
    assert record["updated_at"] >= decode(created.content)["updated_at"] > "2026-02"
    records = fetch_all(service, "customers", "cursor")
    assert set(records[-2:]) == {created.content, updated.content}
    assert in_order(records, "customers")
    after = server_checksum(service, "customers")
    assert after["count"] == 301 and after["checksum"] != before["checksum"]
    assert client_checksum(records, "customers") == after


def test_stamps_never_go_backwards(upstream_factory):
    service = upstream_factory(customers=50, products=50)
    keys = range(1, 31)
    stamps = [decode(put(service, "customers", key, {"tier": "gold"}).content)["updated_at"] for key in keys]
    assert stamps == sorted(stamps)
    records = fetch_all(service, "customers", "offset")
    assert [decode(raw)["id"] for raw in records[-30:]] == sorted(keys, key=lambda k: (stamps[k - 1], k))


def test_change_errors(upstream_factory):
    service = upstream_factory(customers=20, products=20)
    assert put(service, "customers", 999, {"tier": "gold"}).status_code == 404
    assert put(service, "customers", "abc", {"tier": "gold"}).status_code == 404
    assert put(service, "products", "SKU-000001", {"sku": "SKU-000002"}).status_code == 400
    duplicate = requests.post(f"{service.url}/api/products", json={"sku": "SKU-000003"}, timeout=10)
    assert duplicate.status_code == 409
    not_object = requests.post(f"{service.url}/api/products", data=b"[1, 2]", timeout=10)
    assert not_object.status_code == 400 and not_object.json()["error"].startswith("body:")
    wrong_type = requests.post(f"{service.url}/api/customers", json={"id": "seven"}, timeout=10)
    assert wrong_type.status_code == 400 and wrong_type.json()["error"].startswith("id:")
    assert requests.put(f"{service.url}/api/nope/1", json={}, timeout=10).status_code == 404


@pytest.mark.parametrize("style", ["cursor", "keyset"])
def test_cursor_and_keyset_stay_correct_while_records_change(upstream_factory, style):
    service = upstream_factory(customers=1000, products=10)
    all_keys = keys_of(fetch_all(service, "customers", "offset", size=1000), "customers")
    changed: dict[int, bytes] = {}
    seen_before_change: list[int] = []

    def change_some(page_number: int) -> None:
        if page_number != 2:
            return
        seen_before_change.extend(all_keys[:300])
        for key in all_keys[10:300:60] + all_keys[400:1000:120]:  # some seen, some not yet
            response = put(service, "customers", key, {"tier": "changed"})
            changed[key] = response.content

    records = fetch_all(service, "customers", style, size=100, after_page=change_some)
    counts = Counter(keys_of(records, "customers"))
    for key in all_keys:
        expected = 2 if key in changed and key in seen_before_change else 1
        assert counts[key] == expected, key
    for data in changed.values():
        assert records.count(data) == 1
    latest = {decode(raw)["id"]: raw for raw in records}
    assert client_checksum(list(latest.values()), "customers") == server_checksum(service, "customers")


def test_background_changes_follow_the_rate(upstream_factory):
    service = upstream_factory(customers=200, products=200, change_rate=100)
    started = time.monotonic()

    def applied() -> int:
        return requests.get(f"{service.url}/admin/change-rate", timeout=10).json()["applied"]

    wait_until(lambda: applied() >= 100, timeout_s=20, message="100 changes")
    elapsed_s = time.monotonic() - started
    print(f"background changes: 100 after {elapsed_s:.2f}s")
    assert elapsed_s > 0.5  # 100 changes at 100/s cannot all be done at once
    stop = requests.post(f"{service.url}/admin/change-rate", json={"change_rate_per_s": 0}, timeout=10)
    assert stop.json()["change_rate_per_s"] == 0
    for name in ("customers", "products"):
        records = fetch_all(service, name, "cursor")
        assert client_checksum(records, name) == server_checksum(service, name)
    stats = requests.get(f"{service.url}/stats", timeout=10).json()
    assert stats["changes"]["background"] >= 100
    bad = requests.post(f"{service.url}/admin/change-rate", json={"change_rate_per_s": -1}, timeout=10)
    assert bad.status_code == 400 and "change_rate_per_s" in bad.json()["error"]


def test_timestamp_precision_ms(upstream_factory):
    service = upstream_factory(customers=30, products=30, timestamp_precision="ms")
    millis = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
    records = fetch_all(service, "products", "page")
    assert all(millis.match(decode(raw)["updated_at"]) for raw in records)
    assert millis.match(decode(put(service, "products", "SKU-000001", {"stock": 1}).content)["updated_at"])


def test_systems_add_named_then_generic_collections(upstream_factory):
    service = upstream_factory(customers=5, products=5, systems=12, records_per_system=20)
    names = list(requests.get(f"{service.url}/stats", timeout=10).json()["collections"])
    assert names == ["customers", "products", "orders", "shipments", "payments", "analytics", "crm_events",
                     "erp_updates", "warehouse", "supplier", "marketing", "support_tickets", "system_11",
                     "system_12"]
    orders = [decode(raw) for raw in fetch_all(service, "orders", "cursor")]
    assert sorted(record["id"] for record in orders) == [f"ord-{n:06d}" for n in range(1, 21)]
    assert all(len(record) >= 4 and TIMESTAMP_S.match(record["updated_at"]) for record in orders)


# -- faults -----------------------------------------------------------------------------------

def _statuses(service: Service, count: int, path: str = "/api/customers") -> list[int]:
    with requests.Session() as session:
        return [session.get(f"{service.url}{path}", params={"size": 5}, timeout=10).status_code
                for _ in range(count)]


def test_error_rate_answers_that_fraction_with_500(upstream_factory):
    service = upstream_factory(customers=50, products=50, error_rate=0.25)
    sequence = _statuses(service, 400)
    statuses = Counter(sequence)
    print(f"error_rate 0.25: {statuses}")
    assert set(statuses) == {200, 500}
    assert 60 <= statuses[500] <= 140
    again = upstream_factory(customers=50, products=50, error_rate=0.25)
    assert _statuses(again, 400) == sequence, "the same seed gives the same faults"


def test_throttle_answers_429_with_retry_after(upstream_factory):
    service = upstream_factory(customers=50, products=50, throttle_rate=1.0, retry_after_s=7)
    response = requests.get(f"{service.url}/api/customers/cursor", timeout=10)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert "error" in response.json()
    requests.post(f"{service.url}/admin/faults", json={"throttle_rate": 0.5}, timeout=10).raise_for_status()
    statuses = Counter(_statuses(service, 200, "/api/customers/offset"))
    assert 60 <= statuses[429] <= 140 and statuses[200] == 200 - statuses[429]


def test_latency_is_added_to_page_responses(upstream_factory):
    service = upstream_factory(customers=50, products=50, latency_ms=400)
    with requests.Session() as session:
        timings = []
        for path in ("/api/customers", "/api/products/cursor", "/health"):
            started = time.monotonic()
            session.get(f"{service.url}{path}", timeout=10).raise_for_status()
            timings.append(time.monotonic() - started)
    print(f"latency_ms=400: page {timings[0]:.3f}s, cursor {timings[1]:.3f}s, health {timings[2]:.3f}s")
    assert timings[0] >= 0.4 and timings[1] >= 0.4
    assert timings[2] < 0.4


def test_faults_can_be_changed_at_run_time(upstream_factory):
    service = upstream_factory(customers=50, products=50)
    url = f"{service.url}/admin/faults"
    shown = requests.post(url, json={"error_rate": 1.0, "latency_jitter_ms": 5}, timeout=10).json()
    assert shown["error_rate"] == 1.0 and shown["latency_jitter_ms"] == 5
    assert requests.get(url, timeout=10).json() == shown
    assert set(_statuses(service, 5)) == {500}
    requests.post(url, json={"error_rate": 0}, timeout=10).raise_for_status()
    assert set(_statuses(service, 5)) == {200}
    for body, field in (({"error_rate": 2}, "error_rate"), ({"bogus": 1}, "bogus"),
                        ({"malformed_rate": 0.5}, "malformed_rate"), ({"latency_ms": "slow"}, "latency_ms")):
        response = requests.post(url, json=body, timeout=10)
        assert response.status_code == 400 and field in response.json()["error"], body
    assert requests.post(url, json=requests.get(url, timeout=10).json(), timeout=10).status_code == 200


def _is_malformed(record: dict, key_field: str) -> bool:
    if key_field not in record:
        return True
    try:
        datetime.fromisoformat(record["updated_at"])
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("collection", ["customers", "products"])
def test_malformed_records_are_served_listed_and_not_counted(upstream_factory, collection):
    service = upstream_factory(customers=400, products=300, malformed_rate=0.1)
    key_field = KEY_FIELDS[collection]
    records = fetch_all(service, collection, "cursor")
    malformed = [raw for raw in records if _is_malformed(decode(raw), key_field)]
    valid = [raw for raw in records if not _is_malformed(decode(raw), key_field)]
    listed = _malformed_decoder.decode(requests.get(f"{service.url}/admin/malformed", timeout=10).content)
    assert sorted(bytes(entry.record) for entry in listed[collection]) == sorted(malformed)
    assert len(malformed) == round(0.1 * len(records))
    reasons = Counter(entry.reason for entry in listed[collection])
    missing_key = (len(malformed) + 1) // 2  # the first, third, ... malformed record lacks its key
    assert reasons == {"missing_key": missing_key, "bad_updated_at": len(malformed) - missing_key}
    assert client_checksum(valid, collection) == server_checksum(service, collection)
    assert fetch_all(service, collection, "page") == records
    bad_date = next(entry.key for entry in listed[collection] if entry.reason == "bad_updated_at")
    assert put(service, collection, bad_date, {"name": "fixed"}).status_code == 409


# -- webhooks ---------------------------------------------------------------------------------

class Receiver:
    """A webhook receiver on 127.0.0.1 that records every POST."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        lock = threading.Lock()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    received.append((self.path, dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def _signed(secret: bytes, body: bytes, timestamp: str) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _fresh(headers) -> str:
    """The delivery's X-Conflux-Timestamp, checked to be the current unix second (give or take)."""
    timestamp = headers["X-Conflux-Timestamp"]
    assert abs(int(timestamp) - time.time()) < 30, timestamp
    return timestamp


def test_webhooks_are_delivered_signed(upstream_factory, receiver):
    service = upstream_factory(customers=100, products=100, webhook_secret="s3cret",
                               webhook_url=f"{receiver.url}/hooks/{{collection}}")
    updated = put(service, "customers", 5, {"tier": "gold"})
    created = requests.post(f"{service.url}/api/products", json={"name": "Widget", "price": 9.99}, timeout=10)
    wait_until(lambda: len(receiver.received) >= 2, timeout_s=10, message="two webhooks")
    by_path = {path: (headers, body) for path, headers, body in receiver.received}
    assert by_path["/hooks/customers"][1] == updated.content
    assert by_path["/hooks/products"][1] == created.content
    for headers, body in by_path.values():
        assert headers["X-Conflux-Signature"] == _signed(b"s3cret", body, _fresh(headers))
        assert headers["Content-Type"] == "application/json"
    requests.post(f"{service.url}/admin/change-rate", json={"change_rate_per_s": 200}, timeout=10)
    wait_until(lambda: len(receiver.received) >= 50, timeout_s=15, message="background webhooks")
    assert all(headers["X-Conflux-Signature"] == _signed(b"s3cret", body, _fresh(headers))
               for _path, headers, body in list(receiver.received))
    stats = requests.get(f"{service.url}/stats", timeout=10).json()["webhooks"]
    assert stats["delivered"] >= 50 and stats["failed"] == 0


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_webhook_failures_are_counted_and_never_block(upstream_factory):
    service = upstream_factory(customers=20, products=20, webhook_url=f"http://127.0.0.1:{_unused_port()}/x",
                               webhook_secret="s")
    started = time.monotonic()
    assert put(service, "customers", 1, {"tier": "gold"}).status_code == 200
    assert time.monotonic() - started < 2.0
    wait_until(lambda: requests.get(f"{service.url}/stats", timeout=10).json()["webhooks"]["failed"] >= 1,
               timeout_s=20, message="a failed webhook delivery")


# -- deletes ----------------------------------------------------------------------------------

def delete(service: Service, collection: str, key: object, style: str | None = None) -> requests.Response:
    params = {} if style is None else {"style": style}
    return requests.delete(f"{service.url}/api/{collection}/{key}", params=params, timeout=10)


def lookup(service: Service, collection: str, key: object) -> requests.Response:
    return requests.get(f"{service.url}/api/{collection}/{key}", timeout=10)


def live_checksum(records: list[bytes], collection: str) -> dict[str, object]:
    """The checksum a client computes from a full listing: every record not marked deleted."""
    return client_checksum([raw for raw in records if not decode(raw).get("deleted")], collection)


def collection_stats(service: Service, collection: str) -> dict:
    return requests.get(f"{service.url}/stats", timeout=10).json()["collections"][collection]


def test_delete_soft_and_hard_then_restore(upstream_factory):
    service = upstream_factory(customers=300, products=20)
    original = lookup(service, "customers", 8).content
    soft = delete(service, "customers", 7)  # --delete-style defaults to soft
    assert soft.status_code == 200
    assert decode(soft.content)["deleted"] is True and decode(soft.content)["updated_at"] > "2026-02"
    hard = delete(service, "customers", 8, style="hard")
    assert hard.status_code == 200
    stamp = decode(hard.content)["updated_at"]
    assert decode(hard.content) == {**decode(original), "deleted": True, "updated_at": stamp}
    assert lookup(service, "customers", 7).content == soft.content
    assert lookup(service, "customers", 8).status_code == 404
    for style in STYLES:
        records = fetch_all(service, "customers", style, size=70)
        assert records[-1] == soft.content and records.count(soft.content) == 1, style
        assert 8 not in keys_of(records, "customers") and len(records) == 299, style
        assert live_checksum(records, "customers") == server_checksum(service, "customers"), style
    assert server_checksum(service, "customers")["count"] == 298
    counts = collection_stats(service, "customers")
    assert {name: counts[name] for name in ("records", "valid", "live", "deleted", "soft_deleted",
                                            "hard_deleted")} == {"records": 299, "valid": 298, "live": 298,
                                                                 "deleted": 2, "soft_deleted": 1, "hard_deleted": 1}
    restored = put(service, "customers", 8, {"tier": "gold"})
    assert restored.status_code == 200 and "deleted" not in decode(restored.content)
    assert lookup(service, "customers", 8).content == restored.content
    records = fetch_all(service, "customers", "cursor")
    assert records[-1] == restored.content and len(records) == 300
    assert live_checksum(records, "customers") == server_checksum(service, "customers")
    assert server_checksum(service, "customers")["count"] == 299
    deletes = requests.get(f"{service.url}/stats", timeout=10).json()["deletes"]
    assert deletes == {"api": 2, "background": 0, "soft": 1, "hard": 1}


def test_delete_errors(upstream_factory):
    service = upstream_factory(customers=20, products=20, malformed_rate=0.2)
    assert delete(service, "customers", 999).status_code == 404
    assert delete(service, "customers", "abc").status_code == 404
    assert delete(service, "nope", 1).status_code == 404
    assert lookup(service, "customers", 999).status_code == 404
    bad_style = delete(service, "customers", 1, style="sometimes")
    assert bad_style.status_code == 400 and bad_style.json()["error"].startswith("style:")
    malformed = _malformed_keys(service)
    assert malformed
    live = next(key for key in range(1, 21) if key not in malformed)
    assert delete(service, "customers", live).status_code == 200
    assert delete(service, "customers", live).status_code == 410  # soft again: deleted already
    assert delete(service, "customers", live, style="hard").status_code == 200  # purged
    assert delete(service, "customers", live, style="hard").status_code == 410
    assert delete(service, "customers", next(iter(malformed))).status_code == 409
    flagged = put(service, "customers", 1, {"deleted": True})
    assert flagged.status_code == 400 and flagged.json()["error"].startswith("deleted:")
    for body, field in (({"delete_rate_per_s": -1}, "delete_rate_per_s"), ({"delete_style": "some"}, "delete_style"),
                        ({"delete_rate_per_s": "fast"}, "delete_rate_per_s")):
        for path in ("/admin/delete-rate", "/admin/faults"):
            refused = requests.post(f"{service.url}{path}", json=body, timeout=10)
            assert refused.status_code == 400 and refused.json()["error"].startswith(f"{field}:"), (path, body)
    assert requests.get(f"{service.url}/admin/delete-rate", timeout=10).json() == {
        "delete_rate_per_s": 0.0, "delete_style": "soft", "applied": 0}


def _malformed_keys(service: Service) -> set:
    listed = requests.get(f"{service.url}/admin/malformed", params={"records": 0}, timeout=10).json()
    return {entry["key"] for entry in listed["customers"]}


def webhook_records(receiver: Receiver) -> list[tuple[str, bytes]]:
    """(collection, record JSON) of every delivery, batched ones split, as the upstream encoded them."""
    out = []
    for path, _headers, body in list(receiver.received):
        batched = body[:1] == b"["  # a lone change is an object, a batch of them a list
        for raw in msgspec.json.decode(body, type=list[msgspec.Raw]) if batched else [body]:
            out.append((path.rsplit("/", 1)[-1], bytes(raw)))
    return out


def settle_webhooks(service: Service) -> dict:
    def settled() -> dict | None:
        hooks = requests.get(f"{service.url}/stats", timeout=10).json()["webhooks"]
        return hooks if hooks["pending"] == 0 and hooks["delivered"] + hooks["failed"] == hooks["queued"] else None
    return wait_until(settled, timeout_s=30, message="every webhook delivered")


def test_delete_rate_deletes_at_about_the_rate_and_webhooks_announce_them(upstream_factory, receiver):
    service = upstream_factory(customers=400, products=400, delete_rate=40, delete_style="mixed",
                               webhook_url=f"{receiver.url}/hooks/{{collection}}", webhook_secret="s")
    started = time.monotonic()

    def applied() -> int:
        return requests.get(f"{service.url}/admin/delete-rate", timeout=10).json()["applied"]

    wait_until(lambda: applied() >= 60, timeout_s=30, message="60 background deletes")
    elapsed_s = time.monotonic() - started
    count = applied()
    print(f"background deletes: {count} after {elapsed_s:.2f}s at 40/s")
    assert elapsed_s > 1.0  # 60 deletes at 40/s take 1.5 s
    assert count <= 40 * (elapsed_s + 0.5) + 1
    stopped = requests.post(f"{service.url}/admin/delete-rate", json={"delete_rate_per_s": 0}, timeout=10).json()
    assert stopped["delete_rate_per_s"] == 0 and stopped["delete_style"] == "mixed"
    assert settle_webhooks(service)["failed"] == 0
    announced = webhook_records(receiver)
    assert len(announced) == stopped["applied"] and all(decode(raw)["deleted"] is True for _c, raw in announced)
    totals = {"soft": 0, "hard": 0}
    for name in ("customers", "products"):
        listing = fetch_all(service, name, "cursor")
        gone = [raw for collection, raw in announced if collection == name]
        for raw in gone:
            key = decode(raw)[KEY_FIELDS[name]]
            if raw in listing:
                totals["soft"] += 1
                assert lookup(service, name, key).content == raw
            else:
                totals["hard"] += 1
                assert key not in keys_of(listing, name) and lookup(service, name, key).status_code == 404
        assert live_checksum(listing, name) == server_checksum(service, name)
        assert server_checksum(service, name)["count"] == 400 - len(gone)
    assert totals["soft"] > 0 and totals["hard"] > 0
    deletes = requests.get(f"{service.url}/stats", timeout=10).json()["deletes"]
    assert deletes == {"api": 0, "background": stopped["applied"], **totals}


def sink_batch(records: list[bytes], collection: str) -> list[dict]:
    """Sink records as Conflux sends them: a record marked deleted is a delete with data null."""
    out = []
    for raw in records:
        record = decode(raw)
        deleted = bool(record.get("deleted"))
        out.append(sink_record(str(record[KEY_FIELDS[collection]]), None if deleted else raw,
                               updated_at=record["updated_at"], source=collection,
                               op="delete" if deleted else "upsert"))
    return out


def sink_checksum(url: str, source: str) -> dict:
    stats = requests.get(f"{url}/stats/{source}", timeout=10).json()
    return {"checksum": stats["checksum"], "count": stats["count"]}


def test_the_sink_fed_the_same_records_and_deletes_agrees_on_the_checksum(upstream_factory, analytics, receiver):
    service = upstream_factory(customers=500, products=300, webhook_url=f"{receiver.url}/hooks/{{collection}}",
                               webhook_secret="s")
    snapshot = {name: fetch_all(service, name, "offset", size=1000) for name in ("customers", "products")}
    for name, records in snapshot.items():
        post_batch(analytics.url, f"full-{name}", sink_batch(records, name)).raise_for_status()
        assert sink_checksum(analytics.url, name) == server_checksum(service, name)
    requests.post(f"{service.url}/admin/faults", json={"change_rate_per_s": 100, "delete_rate_per_s": 100,
                                                      "delete_style": "mixed"}, timeout=10).raise_for_status()
    wait_until(lambda: requests.get(f"{service.url}/admin/delete-rate", timeout=10).json()["applied"] >= 80,
               timeout_s=30, message="80 background deletes")
    requests.post(f"{service.url}/admin/faults", json={"change_rate_per_s": 0, "delete_rate_per_s": 0},
                  timeout=10).raise_for_status()
    settle_webhooks(service)
    assert requests.get(f"{service.url}/stats", timeout=10).json()["deletes"]["hard"] > 0
    # What an incremental sync and the webhooks carry: changes and soft deletes in the listing, hard
    # deletes only in the webhooks. Fed in any order, the newest version of each key wins.
    since = max(decode(raw)["updated_at"] for records in snapshot.values() for raw in records)
    for name in ("customers", "products"):
        hooked = [raw for collection, raw in webhook_records(receiver) if collection == name]
        changed = fetch_all(service, name, "keyset", since=since)
        post_batch(analytics.url, f"changes-{name}", sink_batch(changed, name)).raise_for_status()
        post_batch(analytics.url, f"hooks-{name}", sink_batch(hooked, name)).raise_for_status()
        assert sink_checksum(analytics.url, name) == server_checksum(service, name)
        # A late replay of the first full sync: older upserts never bring a deleted key back.
        late = post_batch(analytics.url, f"late-{name}", sink_batch(snapshot[name], name)).json()
        assert late["ignored_stale"] > 0
        assert sink_checksum(analytics.url, name) == server_checksum(service, name)
        tombstones = requests.get(f"{analytics.url}/stats/{name}", timeout=10).json()["tombstones"]
        assert tombstones == collection_stats(service, name)["deleted"] > 0


# -- operations -------------------------------------------------------------------------------

def test_stats_count_requests_and_arrival_times(upstream_factory):
    service = upstream_factory(customers=100, products=100)
    started = time.time()
    fetch_all(service, "customers", "page", size=10)
    requests.get(f"{service.url}/api/customers", params={"page": 0}, timeout=10)
    finished = time.time()
    stats = requests.get(f"{service.url}/stats", params={"timestamps": 1}, timeout=10).json()
    customers = stats["collections"]["customers"]
    assert customers["requests"] == {"page": 11}
    assert customers["status_codes"] == {"200": 10, "400": 1}
    assert len(customers["timestamps"]) == 11
    assert all(started - 1 <= t <= finished + 1 for t in customers["timestamps"])
    without = requests.get(f"{service.url}/stats", timeout=10).json()
    assert "timestamps" not in without["collections"]["customers"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_it_cleanly(upstream_factory, signum):
    service = upstream_factory(customers=10, products=10)
    assert service.stop(signum) == 0


def test_same_seed_same_data(upstream_factory):
    first = upstream_factory(customers=200, products=100, seed=42)
    second = upstream_factory(customers=200, products=100, seed=42)
    third = upstream_factory(customers=200, products=100, seed=43)
    assert fetch_all(first, "products", "offset") == fetch_all(second, "products", "offset")
    assert server_checksum(first, "customers") == server_checksum(second, "customers")
    assert server_checksum(first, "customers") != server_checksum(third, "customers")


@pytest.mark.slow
def test_a_million_records_generate_and_serve_fast(upstream_factory):
    started = time.monotonic()
    service = upstream_factory(customers=500_000, products=500_000)
    startup_s = time.monotonic() - started
    with requests.Session() as session:
        first_page_started = time.monotonic()
        body, _ = get_page(session, f"{service.url}/api/customers", {"page": 400, "size": 1000})
        first_page_s = time.monotonic() - first_page_started
        assert len(body.data) == 1000
        pages, loop_started = 0, time.monotonic()
        params: dict[str, object] = {"limit": 1000}
        while time.monotonic() - loop_started < 3.0:
            body, _ = get_page(session, f"{service.url}/api/products/cursor", params)
            params["cursor"] = body.next_cursor
            pages += 1
        loop_s = time.monotonic() - loop_started
    print(f"1M records: start-up {startup_s:.2f}s, first page {first_page_s * 1000:.1f}ms, cursor size=1000: "
          f"{pages / loop_s:.0f} pages/s, {pages * 1000 / loop_s:.0f} records/s (one client)")
    assert server_checksum(service, "customers")["count"] == 500_000
    assert startup_s < 60
