"""Parent -> child sources end to end: the demo upstream's orders of each customer
(``/api/customers/{id}/orders``) synced as a child of the customers source.

- Every live parent's children arrive, each with its parent's key; a change to a child arrives by the
  child's own incremental sync; a new parent's children arrive in full, even those older than the
  child's watermark.
- A parent's soft delete stops its children's walks and, with reconcile on the child, deletes them; a
  hard-deleted parent's listing answers 404 and is skipped, and its reconcile deletes the children too.
- The child's rate limit and concurrency hold across all its parents' requests.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import requests

from tests.fixtures.daemon import config_settings, source, write_config
from tests.integration.test_rate_limit import max_in_window
from tests.support import REPO, conflux_argv, wait_until


def _orders(upstream, **options) -> dict:
    return source("orders", upstream.url, path="customers/{parent.id}/orders", parent="customers", **options)


def _sides(upstream, analytics) -> tuple[tuple, tuple]:
    up = requests.get(f"{upstream.url}/api/orders/checksum", params={"parent": "customers", "stamp": "parent_key"},
                      timeout=10).json()
    sink = requests.get(f"{analytics.url}/stats", timeout=10).json()["sources"].get("orders", {})
    return (up["checksum"], up["count"]), (sink.get("checksum"), sink.get("count"))


def wait_children_converged(upstream, analytics, timeout_s: float = 60.0) -> tuple:
    """The sink's orders are exactly the live orders of live customers, each with its parent_key."""
    try:
        return wait_until(lambda: (sides := _sides(upstream, analytics))[0] == sides[1] and sides[0],
                          timeout_s=timeout_s, interval_s=0.25, message="the child checksums to match")
    except AssertionError:
        raise AssertionError(f"not converged: upstream, sink = {_sides(upstream, analytics)}") from None


def _all_orders(upstream) -> list[dict]:
    out, page = [], 1
    while True:
        body = requests.get(f"{upstream.url}/api/orders", params={"page": page, "size": 1000}, timeout=10).json()
        out += body["data"]
        if not body["has_more"]:
            return out
        page += 1


def _sink_record(analytics, key: str) -> requests.Response:
    return requests.get(f"{analytics.url}/records/orders/{key}", timeout=10)


def test_children_of_every_live_parent_arrive_and_follow_changes(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=200, products=0, systems=1, records_per_system=4000)
    daemon = daemon_factory(sources=[source("customers", upstream.url, page_size=100, poll_interval_s=0.5),
                                     _orders(upstream, page_size=20, poll_interval_s=0.5)], sink_url=analytics.url)
    (_checksum, count) = wait_children_converged(upstream, analytics)
    assert count >= 100
    orders = _all_orders(upstream)
    mine = next(o for o in orders if o["customer_id"] <= 200)
    assert _sink_record(analytics, mine["id"]).json()["data"]["parent_key"] == mine["customer_id"]
    # A change to a child arrives by the child's incremental sync.
    requests.put(f"{upstream.url}/api/orders/{mine['id']}", json={"status": "refunded"}, timeout=10).raise_for_status()
    wait_children_converged(upstream, analytics, timeout_s=30)
    assert _sink_record(analytics, mine["id"]).json()["data"]["status"] == "refunded"
    # A new parent: its children are old, older than the child's watermark, yet they arrive.
    watermark = daemon.status()["sources"]["orders"]["watermark"]
    orphans: dict[int, list[dict]] = {}
    for order in orders:
        if order["customer_id"] > 200:
            orphans.setdefault(order["customer_id"], []).append(order)
    newcomer, theirs = max(orphans.items(), key=lambda item: sum(o["updated_at"] < watermark for o in item[1]))
    assert any(o["updated_at"] < watermark for o in theirs)
    requests.post(f"{upstream.url}/api/customers", json={"id": newcomer, "name": "New"}, timeout=10).raise_for_status()
    wait_children_converged(upstream, analytics, timeout_s=30)
    assert all(_sink_record(analytics, o["id"]).status_code == 200 for o in theirs)
    sources = daemon.status()["sources"]
    report = sources["orders"]
    assert report["last_sync_result"] == "ok" and report["syncs_failed"] == 0
    assert (report["parent"], sources["customers"]["parent"]) == ("customers", None)
    assert daemon.stop() == 0


def _source_test(config_path, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(conflux_argv("source", "test", "-c", str(config_path), "--source", name, *args),
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_source_test_walks_a_child_over_the_parents_this_host_keeps(upstream_factory, analytics, daemon_factory,
                                                                   tmp_path):
    upstream = upstream_factory(customers=60, products=0, systems=1, records_per_system=4000)
    sources = [source("customers", upstream.url, page_size=100), _orders(upstream, page_size=20)]
    fresh = write_config(tmp_path, config_settings(tmp_path, sources=sources, sink_url=analytics.url))
    before = _source_test(fresh, "orders", "--pages", "3")
    assert before.returncode == 3 and "there is none on this host yet" in before.stderr, before.stderr
    assert not (tmp_path / "var").exists()   # the test wrote nothing
    daemon = daemon_factory(sources=sources, sink_url=analytics.url)
    wait_children_converged(upstream, analytics)
    assert daemon.stop() == 0
    result = _source_test(daemon.config_path, "orders", "--pages", "3", "--json")
    assert result.returncode == 0, result.stderr
    pages = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(pages) == 3 and all("/api/customers/" in page["url"] for page in pages)
    records = [record for page in pages for record in page["sink_records"]]
    assert records and all(record["data"]["parent_key"] == record["data"]["customer_id"] for record in records)


def test_a_parents_delete_stops_its_children_and_deletes_them(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=150, products=0, systems=1, records_per_system=4000, record_requests=True)
    daemon = daemon_factory(sources=[
        source("customers", upstream.url, page_size=100, poll_interval_s=0.5, reconcile=True, deleted="deleted",
               lookup_url=f"{upstream.url}/api/customers/{{key}}", full_sync_interval_s=3600),
        _orders(upstream, page_size=50, poll_interval_s=1, reconcile=True, full_sync_interval_s=3600)],
        sink_url=analytics.url)
    wait_children_converged(upstream, analytics)
    orders = _all_orders(upstream)
    by_parent: dict[int, list[dict]] = {}
    for order in orders:
        by_parent.setdefault(order["customer_id"], []).append(order)
    soft, hard = sorted((key for key in by_parent if key <= 150), key=lambda key: -len(by_parent[key]))[:2]
    assert len(by_parent[soft]) >= 2 and by_parent[hard]

    # A soft delete: the parent's next incremental sync sees it, the children are deleted at once.
    requests.delete(f"{upstream.url}/api/customers/{soft}", params={"style": "soft"}, timeout=10).raise_for_status()
    wait_children_converged(upstream, analytics, timeout_s=30)
    for order in by_parent[soft]:
        assert "was deleted" in _sink_record(analytics, order["id"]).json()["error"]
    deleted_at = time.time()
    # ... and its listing is not asked for again.
    wait_until(lambda: daemon.sync_ok("orders", after=deleted_at + 1), timeout_s=30, message="two more child syncs")
    seen = requests.get(f"{upstream.url}/admin/requests", timeout=10).json()["requests"]
    late = [r for r in seen if r["path_qs"].startswith(f"/api/customers/{soft}/orders") and r["at"] > deleted_at]
    assert late == []

    # A hard delete: the listing answers 404 and is skipped; the parent's reconcile then deletes the children.
    requests.delete(f"{upstream.url}/api/customers/{hard}", params={"style": "hard"}, timeout=10).raise_for_status()
    asked_at = time.time()
    wait_until(lambda: daemon.sync_ok("orders", after=asked_at + 1), timeout_s=30, message="a child sync")
    assert daemon.status()["sources"]["orders"]["syncs_failed"] == 0
    statuses = requests.get(f"{upstream.url}/stats", timeout=10).json()["status_codes"]
    assert statuses.get("404", 0) >= 1   # the gone parent's listing, skipped
    assert requests.post(f"{daemon.url}/sync/customers", params={"full": "true"}, timeout=10).status_code == 202
    wait_children_converged(upstream, analytics, timeout_s=30)
    for order in by_parent[hard]:
        assert _sink_record(analytics, order["id"]).status_code == 404
    cascaded = len(by_parent[soft]) + len(by_parent[hard])
    wait_until(lambda: daemon.status()["sources"]["orders"]["deletes_published"] >= cascaded, timeout_s=30,
               message="the child's report to count the deletes")
    assert daemon.stop() == 0


def test_rate_limit_and_concurrency_hold_across_all_parents(upstream_factory, analytics, daemon_factory):
    rate_rps = 25.0
    upstream = upstream_factory(customers=100, products=0, systems=1, records_per_system=2000, latency_ms=100)
    daemon = daemon_factory(sources=[
        source("customers", upstream.url, page_size=100, poll_interval_s=60),
        _orders(upstream, page_size=50, poll_interval_s=60, max_concurrency=2, rate_limit_rps=rate_rps)],
        sink_url=analytics.url)
    wait_children_converged(upstream, analytics)
    stats = requests.get(f"{upstream.url}/stats", params={"timestamps": 1}, timeout=10).json()["collections"]["orders"]
    arrivals = stats["timestamps"]
    assert stats["requests"]["child:page"] == len(arrivals) >= 100
    assert stats["max_in_flight"] == 2
    assert max_in_window(arrivals, 1.0) <= rate_rps + 1
    assert daemon.stop() == 0


@pytest.mark.kafka
def test_on_kafka_a_family_is_owned_by_one_fetcher(upstream_factory, analytics, daemon_factory, kafka_bootstrap,
                                                    kafka_group_id):
    """Two fetcher processes share the sources through the Kafka group; the children go with their parent,
    whichever partition of the sources topic their own names would pick."""
    upstream = upstream_factory(customers=150, products=300, systems=1, records_per_system=3000)
    log = {"backend": "kafka", "bootstrap_servers": kafka_bootstrap, "group": kafka_group_id,
           "topic_prefix": f"{kafka_group_id}.", "partitions": 2}
    # Names whose own partitions of the 12 of the sources topic differ: 3, 7, 10 and 6 (customers: 1).
    children = ["orders", "customer_orders", "orders_by_customer", "c_orders"]
    daemon = daemon_factory(sources=[source("customers", upstream.url, page_size=100),
                                     source("products", upstream.url, page_size=100),
                                     *[source(name, upstream.url, path="customers/{parent.id}/orders",
                                              parent="customers", page_size=50) for name in children]],
                            sink_url=analytics.url, log=log, workers={"fetchers": 2})
    wait_children_converged(upstream, analytics, timeout_s=90)
    sources = wait_until(lambda: all((s := daemon.status()["sources"])[name]["last_sync_result"] == "ok"
                                     for name in children) and s, timeout_s=60, message="every child synced")
    assert {sources[name]["fetcher"] for name in children} == {sources["customers"]["fetcher"]}
    assert daemon.stop() == 0
