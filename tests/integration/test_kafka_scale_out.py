"""Two `conflux run` instances sharing one Kafka group: who fetches, who consumes, and what happens when
one of them dies or leaves.

Both instances run the same sources (same names, same topics), but the second one reaches the
upstream through another paging style's endpoint, so the upstream's request counters per style tell
the two instances' fetches apart.
"""

from __future__ import annotations

import os
import signal

import pytest
import requests

from tests.fixtures.daemon import Daemon, source, wait_converged
from tests.support import wait_until

pytestmark = pytest.mark.kafka

PARTITIONS = 4
STYLE_PATHS = {"page": "", "offset": "/offset"}


@pytest.fixture
def kafka_log(kafka_bootstrap: str, kafka_group_id: str) -> dict:
    return {"backend": "kafka", "bootstrap_servers": kafka_bootstrap, "group": kafka_group_id,
            "topic_prefix": f"{kafka_group_id}.", "partitions": PARTITIONS}


def sources_via(style: str, upstream_url: str, names: list[str], **options) -> list[dict]:
    """The same sources, fetched through ``style``'s endpoint of the demo upstream."""
    return [source(name, upstream_url, path=f"{name}{STYLE_PATHS[style]}", pagination=style, **options)
            for name in names]


def fetching(daemon: Daemon) -> set[str]:
    """The sources this instance's fetchers hold right now (SourcesOwned, as /status shows it)."""
    return {name for worker in daemon.workers("fetcher") for name in worker["sources"]}


def consuming(daemon: Daemon) -> set[tuple[str, int]]:
    return {tuple(p) for worker in daemon.workers("consumer") for p in worker["partitions"]}


def split_between(a: Daemon, b: Daemon, names: list[str], prefix: str) -> tuple[set, set] | None:
    """(a's sources, b's sources) once both groups settled: sources and partitions each held by exactly
    one instance, every one of them held, and both instances consuming."""
    sources_a, sources_b = fetching(a), fetching(b)
    parts_a, parts_b = consuming(a), consuming(b)
    every_partition = {(f"{prefix}{name}", p) for name in names for p in range(PARTITIONS)}
    settled = (sources_a.isdisjoint(sources_b) and sources_a | sources_b == set(names)
               and parts_a.isdisjoint(parts_b) and parts_a | parts_b == every_partition and parts_a and parts_b)
    return (sources_a, sources_b) if settled else None


def page_requests(upstream_url: str, names: list[str]) -> dict[str, dict[str, int]]:
    stats = requests.get(f"{upstream_url}/stats", timeout=10).json()["collections"]
    return {name: {style: stats[name]["requests"].get(style, 0) for style in STYLE_PATHS} for name in names}


def syncs_ok(daemon: Daemon, names) -> dict[str, int]:
    sources = daemon.status()["sources"]
    return {name: sources[name].get("syncs_ok", 0) for name in names}


def test_kill_9_of_one_instance_mid_sync_the_survivor_takes_over_and_converges(
        upstream_factory, analytics, daemon_factory, kafka_log):
    names = ["customers", "products"]
    upstream = upstream_factory(customers=12000, products=12000, latency_ms=60)
    options = {"page_size": 200, "max_concurrency": 1}
    first = daemon_factory(sources=sources_via("page", upstream.url, names, **options), sink_url=analytics.url,
                           log=kafka_log)
    second = daemon_factory(sources=sources_via("offset", upstream.url, names, **options), sink_url=analytics.url,
                            log=kafka_log)
    split = wait_until(lambda: split_between(first, second, names, kafka_log["topic_prefix"]), timeout_s=60,
                       message="sources and partitions split between the two instances")
    victim, survivor = (first, second) if "customers" in split[0] else (second, first)

    def victim_mid_sync() -> bool:
        reports = victim.status()["sources"]
        return all(reports[name].get("syncing") for name in fetching(victim))

    wait_until(victim_mid_sync, timeout_s=30, message="the victim syncing its sources")
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.wait_exit(10) == -signal.SIGKILL

    wait_until(lambda: fetching(survivor) == set(names) and len(consuming(survivor)) == len(names) * PARTITIONS,
               timeout_s=60, message="the survivor holding every source and partition")
    wait_converged(upstream.url, analytics.url, {name: name for name in names}, timeout_s=120)
    assert survivor.stop() == 0, survivor.log()[-3000:]


def test_one_fetcher_per_source_while_a_second_instance_joins_and_leaves_and_nothing_is_lost(
        upstream_factory, analytics, daemon_factory, kafka_log):
    names = ["customers", "products", "orders", "shipments", "payments", "analytics"]
    upstream = upstream_factory(customers=600, products=600, systems=4, records_per_system=600, change_rate=30)
    options = {"page_size": 200, "poll_interval_s": 0.3}
    first = daemon_factory(sources=sources_via("page", upstream.url, names, **options), sink_url=analytics.url,
                           log=kafka_log)
    wait_until(lambda: all(first.sync_ok(name) for name in names), timeout_s=60,
               message="the first instance syncing every source")

    second = daemon_factory(sources=sources_via("offset", upstream.url, names, **options), sink_url=analytics.url,
                            log=kafka_log)
    owned_first, owned_second = wait_until(
        lambda: split_between(first, second, names, kafka_log["topic_prefix"]), timeout_s=60,
        message="sources and partitions split between the two instances")
    assert owned_first and owned_second, "each instance should fetch something"
    assert_each_source_polled_by_its_owner_only(upstream.url, first, second, owned_first, owned_second, names)

    assert second.stop() == 0, second.log()[-3000:]
    wait_until(lambda: fetching(first) == set(names) and len(consuming(first)) == len(names) * PARTITIONS,
               timeout_s=60, message="the first instance holding everything again")
    requests.post(f"{upstream.url}/admin/change-rate", json={"change_rate_per_s": 0}, timeout=10).raise_for_status()
    wait_converged(upstream.url, analytics.url, {name: name for name in names}, timeout_s=90)
    assert first.stop() == 0, first.log()[-3000:]


def assert_each_source_polled_by_its_owner_only(upstream_url: str, first: Daemon, second: Daemon,
                                               owned_first: set, owned_second: set, names: list[str]) -> None:
    """Over a window of several syncs of every source, each source's page requests come through its
    owner's paging style only, and ownership does not move. Double polling, or a fetcher that syncs a
    source /status does not give it, shows up as requests in the other style."""
    owner_style = {**dict.fromkeys(owned_first, "page"), **dict.fromkeys(owned_second, "offset")}
    owner = {**dict.fromkeys(owned_first, first), **dict.fromkeys(owned_second, second)}

    def syncs_by_owners() -> dict[str, int]:
        return {name: syncs_ok(owner[name], [name])[name] for name in names}

    # A sync each first, so no request of a sync that a rebalance cancelled is still arriving.
    started = syncs_by_owners()
    wait_until(lambda: all(n > started[k] for k, n in syncs_by_owners().items()), timeout_s=30,
               message="one completed sync of every source by its owner")
    before, window_start = page_requests(upstream_url, names), syncs_by_owners()
    wait_until(lambda: all(n >= window_start[k] + 3 for k, n in syncs_by_owners().items()), timeout_s=60,
               message="three more syncs of every source")
    after = page_requests(upstream_url, names)
    assert (fetching(first), fetching(second)) == (owned_first, owned_second), "ownership moved during the window"
    for name in names:
        grew = {style for style in STYLE_PATHS if after[name][style] > before[name][style]}
        assert grew == {owner_style[name]}, f"{name}: requests grew through {grew}, owner polls via {owner_style[name]}"
