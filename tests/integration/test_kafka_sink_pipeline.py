"""Demo upstream (changing and soft-deleting records) -> daemon -> Kafka changelog sink, on the
embedded log and on the Kafka log: the sink's compacted topics, read back (the latest value of each
key, a tombstone removing it), hold exactly the upstream's live records, key and data bytes."""

from __future__ import annotations

import pytest
import requests

from tests.fixtures.daemon import source, wait_converged
from tests.fixtures.kafka_sink import Forwarder, free_port, latest_per_key, read_topic, topic_checksum
from tests.support import wait_until

pytestmark = pytest.mark.kafka

COLLECTIONS = {"customers": "customers", "products": "products"}


def changing_upstream(upstream_factory):
    """Records keep changing and getting soft-deleted ("deleted": true) while the daemon syncs."""
    return upstream_factory(customers=2000, products=1000, change_rate=40, delete_rate=40, delete_style="soft")


def cursor_source(name: str, upstream_url: str, **options) -> dict:
    """A source paged by cursor: stable while records change. Page numbers are not: a record that moves
    to the end shifts the others, and an unchanged one can be skipped until the next full sync."""
    return source(name, upstream_url, path=f"{name}/cursor", pagination="cursor", deleted="deleted",
                  poll_interval_s=0.5, **options)


def stop_changes_after_some_deletes(upstream_url: str) -> int:
    applied = wait_until(lambda: (n := requests.get(f"{upstream_url}/admin/delete-rate", timeout=10).json()["applied"])
                         >= 60 and n, timeout_s=60, message="the upstream deleting records")
    requests.post(f"{upstream_url}/admin/faults", json={"change_rate_per_s": 0, "delete_rate_per_s": 0},
                  timeout=10).raise_for_status()
    return applied


def wait_topics_equal_upstream(bootstrap: str, prefix: str, upstream_url: str, daemon,
                               timeout_s: float = 120.0) -> dict:
    """Poll until each source's changelog topic, read back, has the upstream's checksum and count."""
    def equal():
        upstream = {name: requests.get(f"{upstream_url}/api/{name}/checksum", timeout=10).json()
                    for name in COLLECTIONS}
        topics = {name: read_topic(bootstrap, f"{prefix}{name}.records") for name in COLLECTIONS}
        sides = {name: ({k: upstream[name][k] for k in ("checksum", "count")},
                        topic_checksum(latest_per_key(topics[name]))) for name in COLLECTIONS}
        equal.last = sides
        return topics if all(up == down for up, down in sides.values()) else None

    equal.last = None
    try:
        return wait_until(equal, timeout_s=timeout_s, interval_s=1.0, message="the topics to equal the upstream")
    except AssertionError:
        status = daemon.status()
        raise AssertionError(f"not converged (upstream, topic): {equal.last}\nsinks: {status['sinks']}\nworkers: "
                             f"{status['workers']}\nlog:\n{daemon.log()[-6000:]}") from None


def assert_deletes_are_tombstones(topics: dict) -> None:
    for name, messages in topics.items():
        tombstones = [m for m in messages if m.value() is None]
        assert tombstones, f"no tombstone in {name}'s topic"
        assert all(dict(m.headers())["conflux-op"] == b"delete" for m in tombstones)
        assert all(dict(m.headers())["conflux-source"] == name.encode() for m in messages)


def test_embedded_log_to_kafka_and_http_sinks_both_equal_the_upstream(upstream_factory, analytics, daemon_factory,
                                                                      kafka_bootstrap, kafka_group_id):
    upstream = changing_upstream(upstream_factory)
    prefix = f"{kafka_group_id}."
    sources = [cursor_source(name, upstream.url) for name in COLLECTIONS]
    daemon = daemon_factory(sources=sources, sink_url=analytics.url, log={"topic_prefix": prefix},
                            sinks=[{"name": "events", "type": "kafka", "bootstrap_servers": kafka_bootstrap}])
    stop_changes_after_some_deletes(upstream.url)
    topics = wait_topics_equal_upstream(kafka_bootstrap, prefix, upstream.url, daemon)
    wait_converged(upstream.url, analytics.url, COLLECTIONS, timeout_s=60)
    assert_deletes_are_tombstones(topics)
    assert set(daemon.status()["sinks"]) == {"default", "events"}
    assert daemon.status()["sinks"]["events"]["type"] == "kafka"
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_kafka_log_to_the_kafka_sink_alone_equals_the_upstream(upstream_factory, daemon_factory, kafka_bootstrap,
                                                               kafka_group_id):
    upstream = changing_upstream(upstream_factory)
    prefix = f"{kafka_group_id}."
    log = {"backend": "kafka", "bootstrap_servers": kafka_bootstrap, "group": kafka_group_id, "topic_prefix": prefix,
           "partitions": 4}
    sources = [cursor_source(name, upstream.url, sinks=["events"]) for name in COLLECTIONS]
    # [sink] (the HTTP sink "default") exists, but no source is routed to it: nothing listens there.
    daemon = daemon_factory(sources=sources, sink_url="http://127.0.0.1:9", log=log,
                            sinks=[{"name": "events", "type": "kafka", "partitions": 3}])
    stop_changes_after_some_deletes(upstream.url)
    topics = wait_topics_equal_upstream(kafka_bootstrap, prefix, upstream.url, daemon)
    assert_deletes_are_tombstones(topics)
    for name in COLLECTIONS:  # the sink's topics are its own, beside the log's
        assert {m.partition() for m in topics[name]} == {0, 1, 2}
    assert daemon.status()["sinks"]["events"]["sources"] == list(COLLECTIONS)
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_a_kafka_sink_that_is_down_holds_back_only_its_sources_and_catches_up(upstream_factory, analytics,
                                                                              daemon_factory, kafka_bootstrap,
                                                                              kafka_group_id):
    """customers go to the Kafka sink, whose bootstrap address answers nothing at first; products go to
    the HTTP sink. Products converge meanwhile; customers wait in the log (lag) behind the open breaker,
    with nothing dead-lettered; once the address forwards to the broker, customers catch up."""
    upstream = upstream_factory(customers=1500, products=800)
    prefix, port = f"{kafka_group_id}.", free_port()
    sources = [source("customers", upstream.url, sinks=["events"]), source("products", upstream.url, sinks=["default"])]
    daemon = daemon_factory(sources=sources, sink_url=analytics.url, log={"topic_prefix": prefix},
                            retry={"max_s": 1.0, "breaker_cooldown_s": 1.0, "breaker_failures": 2},
                            sinks=[{"name": "events", "type": "kafka", "bootstrap_servers": f"127.0.0.1:{port}",
                                    "timeout_s": 3.0}])
    wait_converged(upstream.url, analytics.url, {"products": "products"}, timeout_s=60)
    wait_until(lambda: daemon.status()["sinks"]["events"]["failing_s"] > 0, timeout_s=60,
               message="the Kafka sink failing")
    customers_log = f"{prefix}customers"
    lag = sum(p["lag"] or 0 for p in daemon.status()["partitions"] if p["topic"] == customers_log)
    assert lag > 0, daemon.status()["partitions"]
    assert daemon.metric("conflux_sink_retries_total", sink="events") > 0
    assert daemon.metric("conflux_dlq_records_total") in (None, 0.0)

    forwarder = Forwarder(port, kafka_bootstrap)
    try:
        upstream_side = requests.get(f"{upstream.url}/api/customers/checksum", timeout=10).json()
        wait_until(lambda: topic_checksum(latest_per_key(read_topic(kafka_bootstrap, f"{prefix}customers.records")))
                   == {k: upstream_side[k] for k in ("checksum", "count")}, timeout_s=90, interval_s=1.0,
                   message="customers caught up in the Kafka topic")
        wait_until(lambda: daemon.status()["sinks"]["events"]["failing_s"] == 0, timeout_s=30,
                   message="the Kafka sink healthy again")
        assert daemon.stop() == 0, daemon.log()[-3000:]
    finally:
        forwarder.close()
