"""The chaos suite: at least 200k records with live changes and deletes under every kind of fault, fixed
seeds.

Runs in CI at this moderate size. For the first 14 s, through the storm, the kills and the sink's
failures, the upstream deletes records in the background, half soft (listed with "deleted": true) and
half hard (gone from every listing); then it stops and both sources are asked for a full sync, whose
reconcile finds the hard deletes while the remaining faults run. Both sources mark deletes (``deleted``)
and reconcile: customers page by cursor (a missing key is deleted at once), products by page number (a
missing key is confirmed by the by-key lookup's 404). At the end the sink must equal the upstream's live
records (no record lost, none deleted kept) and the dead-letter queue must hold exactly the upstream's
malformed records.
"""

from __future__ import annotations

import json

import pytest

from tests.chaos.scenario import (
    ChaosRun,
    bad_config_reload,
    broker_restart,
    deletes_stop,
    kill_random_worker,
    report,
    sink_apply_then_fail,
    sink_outage,
    upstream_storm,
)
from tests.fixtures.daemon import source

RECORDS = 200_000
SEED = 20261127
DELETES_PER_S = 40
COLLECTIONS = {"customers": "customers", "products": "products"}


def _world(upstream_factory, analytics_factory, daemon_factory, **log):
    upstream = upstream_factory(customers=RECORDS // 2, products=RECORDS // 2, seed=SEED, malformed_rate=0.001,
                                change_rate=100, delete_rate=DELETES_PER_S, delete_style="mixed")
    sink = analytics_factory(seed=SEED)
    deletes = {"deleted": "deleted", "reconcile": True}
    daemon = daemon_factory(
        sources=[source("customers", upstream.url, path="customers/cursor", pagination="cursor", page_size=1000,
                        poll_interval_s=1.0, full_sync_interval_s=20.0, **deletes),
                 source("products", upstream.url, page_size=1000, poll_interval_s=1.0, full_sync_interval_s=20.0,
                        lookup_url=f"{upstream.url}/api/products/{{key}}", **deletes)],
        sink_url=sink.url, retry={"base_s": 0.1, "max_s": 2.0, "max_attempts": 30, "breaker_cooldown_s": 3.0},
        workers={"heartbeat_timeout_s": 20.0}, **log)
    return upstream, sink, daemon


def _finish(run: ChaosRun) -> None:
    outcome = run.converge(timeout_s=150)
    dead = run.dead_letters()
    got = {(e["source"], json.dumps(e["record"], sort_keys=True)) for e in dead}
    expected = run.malformed()
    text = report(run, outcome, got == expected, len(dead))
    print(text)
    assert outcome["records_lost"] == 0 and not outcome["collections_differing"], text
    assert got == expected, f"{text}\nDLQ has {len(got - expected)} extra and misses {len(expected - got)}"
    # Not vacuous: both kinds of delete happened, and the hard ones were found by reconciles.
    deletes = outcome["deletes"]
    assert deletes["upstream"]["soft"] > 0 and deletes["upstream"]["hard"] > 0 and deletes["reconciled"] > 0, text


# Every scenario starts with the same faults on the workers, the upstream and the sink.
COMMON_FAULTS = [
    (1.0, kill_random_worker(("consumer",))),
    (2.0, upstream_storm(error_rate=0.3, throttle_rate=0.2, latency_ms=30, seconds=6)),
    (3.0, kill_random_worker(("merger",))),
    (5.0, sink_apply_then_fail(0.3, seconds=8)),
    (7.0, bad_config_reload()),
    (9.0, kill_random_worker(("fetcher",))),
    (14.0, deletes_stop()),
]


@pytest.mark.chaos
@pytest.mark.slow
def test_chaos_on_the_embedded_log(upstream_factory, analytics_factory, daemon_factory):
    upstream, sink, daemon = _world(upstream_factory, analytics_factory, daemon_factory)
    run = ChaosRun(daemon, upstream.url, sink.url, COLLECTIONS, SEED)
    run.play([*COMMON_FAULTS, (11.0, sink_outage(20)), (16.0, kill_random_worker()), (33.0, kill_random_worker())])
    _finish(run)
    assert daemon.stop() == 0, daemon.log()[-3000:]


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.kafka
def test_chaos_on_kafka(upstream_factory, analytics_factory, daemon_factory, kafka_bootstrap, kafka_group_id,
                        kafka_broker_control):
    log = {"backend": "kafka", "bootstrap_servers": kafka_bootstrap, "group": kafka_group_id,
           "topic_prefix": f"{kafka_group_id}.", "partitions": 4}
    upstream, sink, daemon = _world(upstream_factory, analytics_factory, daemon_factory, log=log)
    run = ChaosRun(daemon, upstream.url, sink.url, COLLECTIONS, SEED)
    run.play([*COMMON_FAULTS, (11.0, broker_restart(kafka_broker_control, down_s=5)), (20.0, sink_outage(20)),
              (25.0, kill_random_worker()), (41.0, kill_random_worker())])
    _finish(run)
    assert daemon.stop() == 0, daemon.log()[-3000:]
