"""Routing sources to sinks: every batch of a source goes to each of its sinks, an offset is committed
only once all of them have it, and a sink that is down holds back only the sources routed to it."""

from __future__ import annotations

import requests

from tests.fixtures.daemon import checksums, source, wait_converged
from tests.support import wait_until

FAST_RETRY = {"base_s": 0.05, "max_s": 0.5, "breaker_cooldown_s": 1.0}
DOWN = {"fail_status": 503}
UP = {"fail_status": 0}


def committed(daemon, topic: str) -> int:
    return sum(p["committed"] or 0 for p in daemon.status()["partitions"] if p["topic"] == topic)


def test_a_sink_that_is_down_holds_back_only_its_sources(upstream_factory, analytics_factory, daemon_factory):
    upstream = upstream_factory(customers=400, products=300)
    first, second = analytics_factory(**DOWN), analytics_factory()
    daemon = daemon_factory(
        sources=[source("customers", upstream.url, sinks=["default"]),
                 source("products", upstream.url, sinks=["second", "default"])],
        sink_url=first.url, retry=FAST_RETRY,
        sinks=[{"name": "second", "type": "http", "url": f"{second.url}/ingest"}])
    # `customers` goes only to the sink that is down; `products` to both, so it waits for that one too.
    wait_until(lambda: daemon.sync_ok("customers") and daemon.sync_ok("products"), timeout_s=60,
               message="both full syncs in the log")
    wait_converged(upstream.url, second.url, {"products": "products"}, timeout_s=60)
    wait_until(lambda: daemon.metric("conflux_circuit_state", target="sink") == 2, timeout_s=30,
               message="the first sink's breaker to open")
    # /status shows the mergers' view, one heartbeat behind the metrics.
    status = wait_until(lambda: (st := daemon.status())["sinks"]["default"]["circuit"] == "open"
                        and st["sinks"]["second"]["last_status"] == 200 and st, timeout_s=10,
                        message="the sinks' rows in /status")
    assert status["sinks"]["default"]["circuit"] == "open" and status["sinks"]["second"]["circuit"] == "closed"
    assert status["sinks"]["default"]["sources"] == ["customers", "products"]
    assert status["sinks"]["second"]["sources"] == ["products"] and status["sources"]["products"]["sinks"] == [
        "second", "default"]
    assert committed(daemon, "customers") == 0 and committed(daemon, "products") == 0  # one of its sinks lacks it
    assert daemon.metric("conflux_sink_records_total", sink="second", source="products", result="taken") >= 300
    assert daemon.metric("conflux_sink_retries_total", sink="default", reason="503") >= 1
    assert requests.get(f"{first.url}/stats", timeout=10).json()["batches"] == 0

    requests.post(f"{first.url}/admin/faults", json=UP, timeout=10).raise_for_status()
    wait_converged(upstream.url, first.url, {"customers": "customers", "products": "products"}, timeout_s=60)
    wait_until(lambda: all(p["lag"] == 0 for p in daemon.status()["partitions"]), timeout_s=30,
               message="every offset committed once both sinks have everything")
    up_side, second_side = checksums(upstream.url, second.url, {"products": "products"})
    assert up_side == second_side
    assert requests.get(f"{second.url}/stats", timeout=10).json()["sources"].get("customers") is None
    assert daemon.stop() == 0


def test_a_slow_sink_of_one_source_does_not_stall_another_source(upstream_factory, analytics_factory,
                                                                  daemon_factory):
    """Each source flushes on its own: one whose only sink is down keeps none of the other's records
    waiting, and its own records wait in the log, not in memory."""
    upstream = upstream_factory(customers=3000, products=300)
    down, up = analytics_factory(**DOWN), analytics_factory()
    daemon = daemon_factory(
        sources=[source("customers", upstream.url, sinks=["default"], page_size=100),
                 source("products", upstream.url, sinks=["up"])],
        sink_url=down.url, retry=FAST_RETRY, sinks=[{"name": "up", "type": "http", "url": f"{up.url}/ingest"}])
    wait_converged(upstream.url, up.url, {"products": "products"}, timeout_s=60)
    wait_until(lambda: committed(daemon, "products") > 0 and all(
        p["lag"] == 0 for p in daemon.status()["partitions"] if p["topic"] == "products"), timeout_s=30,
        message="products committed while customers wait")
    assert committed(daemon, "customers") == 0
    requests.post(f"{down.url}/admin/faults", json=UP, timeout=10).raise_for_status()
    wait_converged(upstream.url, down.url, {"customers": "customers"}, timeout_s=90)
    assert daemon.stop() == 0
