"""Deletes end to end: the real daemon between the demo upstream and the demo analytics sink.

One test per signal: a soft delete on a page and by webhook, a hard delete found by reconcile (cursor
style at once; page style at the second full sync, or at the first through lookup_url's 404), the
reconcile guard refusing when the upstream briefly lists nothing, ordering (a late older upsert never
revives a deleted key, a restore does) and a filter. Each ends with the sink holding exactly the
upstream's live records.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import datetime

import msgspec
import pytest
import requests

from conflux.demo.world import free_port
from tests.fixtures.analytics import expected_checksum, sink_checksum, stored_record, tombstone
from tests.fixtures.daemon import source, wait_converged
from tests.fixtures.upstream import listed_records
from tests.support import wait_until

CUSTOMERS = {"customers": "customers"}
COUNT = 300
SECRET = "whsec-deletes-1"
QUIET = {"poll_interval_s": 3600, "full_sync_interval_s": 3600}  # syncs only when a test asks


def delete(upstream_url: str, key: int, style: str) -> dict:
    response = requests.delete(f"{upstream_url}/api/customers/{key}", params={"style": style}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def instant(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def post_signed(daemon_url: str, body: bytes) -> requests.Response:
    stamp = str(int(time.time()))
    signature = "sha256=" + hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return requests.post(f"{daemon_url}/webhook/customers", data=body, timeout=30,
                         headers={"Content-Type": "application/json", "X-Conflux-Timestamp": stamp,
                                  "X-Conflux-Signature": signature})


def start(upstream_factory, analytics, daemon_factory, *, upstream_options=None, control=None, **options):
    upstream = upstream_factory(customers=COUNT, products=0, **(upstream_options or {}))
    path = options.pop("path", None)
    daemon = daemon_factory(sources=[source("customers", upstream.url, path=path, **options)], sink_url=analytics.url,
                            **({"control": control} if control else {}))
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=60)
    return upstream, daemon


# -- soft deletes ------------------------------------------------------------------------------------


def test_a_soft_delete_listed_on_a_page_reaches_the_sink_as_a_delete(upstream_factory, analytics, daemon_factory):
    upstream, daemon = start(upstream_factory, analytics, daemon_factory, deleted="deleted", poll_interval_s=0.3)
    deleted = [delete(upstream.url, key, "soft") for key in (7, 8, 9)]
    # The upstream still lists them, flagged: only `deleted = "deleted"` tells Conflux they are deletes.
    assert all(b'"deleted":true' in record for record in listed_records(upstream.url, "customers")[-3:])
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    assert sink_checksum(analytics.url, "customers")[1] == COUNT - 3
    for record in deleted:
        assert tombstone(analytics.url, "customers", str(record["id"])) == record["updated_at"]
    assert daemon.status()["sources"]["customers"]["deletes_published"] >= 3
    wait_until(lambda: (daemon.metric("conflux_records_deleted_total", source="customers") or 0) >= 3,
               timeout_s=10, message="the acknowledged deletes in the metric")
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_a_soft_delete_by_webhook_reaches_the_sink_as_a_delete(upstream_factory, analytics, daemon_factory):
    port = free_port()
    upstream, daemon = start(upstream_factory, analytics, daemon_factory, deleted="deleted", webhook_secret=SECRET,
                             control={"listen": f"127.0.0.1:{port}"}, **QUIET,
                             upstream_options={"webhook_url": f"http://127.0.0.1:{port}/webhook/{{collection}}",
                                               "webhook_secret": SECRET})
    # A hard delete is announced by webhook too, with "deleted": true: the marker makes it a delete as well.
    deleted = [delete(upstream.url, 7, "soft"), delete(upstream.url, 8, "soft"), delete(upstream.url, 9, "hard")]
    # Polling is an hour away: only the webhooks can have carried the deletes.
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    for record in deleted:
        assert tombstone(analytics.url, "customers", str(record["id"])) == record["updated_at"]
    webhooks = requests.get(f"{upstream.url}/stats", timeout=10).json()["webhooks"]
    assert webhooks["delivered"] >= 3 and webhooks["failed"] == 0, webhooks
    assert daemon.status()["sources"]["customers"]["last_sync_type"] == "full"  # no sync since the first
    assert daemon.stop() == 0, daemon.log()[-3000:]


# -- hard deletes: reconcile -------------------------------------------------------------------------


def test_cursor_style_reconcile_deletes_keys_the_full_sync_did_not_list_at_once(upstream_factory, analytics,
                                                                               daemon_factory):
    upstream, daemon = start(upstream_factory, analytics, daemon_factory, path="customers/cursor",
                             pagination="cursor", reconcile=True, **QUIET)
    gone = [delete(upstream.url, key, "hard") for key in (7, 8, 9)]
    asked = daemon.sync_now("customers")
    report = daemon.wait_reconcile("customers", asked)
    assert (report["live"], report["checked"], report["deleted"], report["waiting"], report["refused"]) == \
        (COUNT, 3, 3, 0, False), report
    assert 0 < report["duration_s"] < 30
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    for record in gone:
        # The delete is stamped with the full sync's start: after the request, before the report.
        deleted_at = instant(tombstone(analytics.url, "customers", str(record["id"])))
        assert asked < deleted_at <= report["at"] and abs(deleted_at - report["sync_started_at"]) < 1e-3
    assert daemon.metric("conflux_reconcile_keys_total", source="customers", outcome="deleted") == 3
    assert daemon.metric("conflux_reconcile_refused_total", source="customers") == 0
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_page_style_reconcile_deletes_a_missing_key_only_at_the_second_full_sync(upstream_factory, analytics,
                                                                                daemon_factory):
    upstream, daemon = start(upstream_factory, analytics, daemon_factory, reconcile=True, **QUIET)
    delete(upstream.url, 7, "hard")
    delete(upstream.url, 8, "hard")
    first = daemon.wait_reconcile("customers", daemon.sync_now("customers"))
    # A record can move past a page pager while it runs: one miss is not proof.
    assert (first["checked"], first["deleted"], first["waiting"]) == (2, 0, 2), first
    daemon.wait_committed()
    assert stored_record(analytics.url, "customers", "7") is not None
    assert sink_checksum(analytics.url, "customers")[1] == COUNT
    second = daemon.wait_reconcile("customers", daemon.sync_now("customers"))
    assert (second["checked"], second["deleted"], second["waiting"]) == (2, 2, 0), second
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    assert tombstone(analytics.url, "customers", "7") is not None
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_page_style_reconcile_with_a_lookup_deletes_at_the_first_full_sync_on_a_404(upstream_factory, analytics,
                                                                                   daemon_factory):
    upstream = upstream_factory(customers=COUNT, products=0)
    # reconcile_max_fraction = 1: the guard never refuses here, so the lookups alone decide.
    daemon = daemon_factory(sources=[source("customers", upstream.url, reconcile=True, reconcile_max_fraction=1.0,
                                            lookup_url=f"{upstream.url}/api/customers/{{key}}", **QUIET)],
                            sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=60)
    # A full sync that lists nothing: every key is missed, every lookup answers 200, every key is kept.
    requests.post(f"{upstream.url}/admin/faults", json={"empty_pages": True}, timeout=10).raise_for_status()
    blind = daemon.wait_reconcile("customers", daemon.sync_now("customers"))
    assert (blind["checked"], blind["kept"], blind["deleted"], blind["waiting"]) == (COUNT, COUNT, 0, 0), blind
    requests.post(f"{upstream.url}/admin/faults", json={"empty_pages": False}, timeout=10).raise_for_status()
    daemon.wait_committed()
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=10)
    gone = delete(upstream.url, 7, "hard")
    report = daemon.wait_reconcile("customers", daemon.sync_now("customers"))
    assert (report["checked"], report["deleted"], report["waiting"], report["kept"]) == (1, 1, 0, 0), report
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    assert tombstone(analytics.url, "customers", str(gone["id"])) is not None
    lookups = requests.get(f"{upstream.url}/stats", timeout=10).json()["collections"]["customers"]["requests"]
    assert lookups["lookup"] == COUNT + 1, lookups
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_the_reconcile_guard_refuses_when_the_upstream_briefly_lists_nothing(upstream_factory, analytics,
                                                                             daemon_factory):
    upstream, daemon = start(upstream_factory, analytics, daemon_factory, path="customers/cursor",
                             pagination="cursor", reconcile=True, **QUIET)
    requests.post(f"{upstream.url}/admin/faults", json={"empty_pages": True}, timeout=10).raise_for_status()
    report = daemon.wait_reconcile("customers", daemon.sync_now("customers"))
    assert report["refused"] and (report["live"], report["checked"], report["deleted"]) == (COUNT, COUNT, 0), report
    assert "reconcile_max_fraction = 0.5" in report["detail"]
    assert daemon.metric("conflux_reconcile_refused_total", source="customers") == 1
    assert "reconcile refused" in daemon.log()
    requests.post(f"{upstream.url}/admin/faults", json={"empty_pages": False}, timeout=10).raise_for_status()
    daemon.wait_committed()
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=10)  # nothing was deleted
    # The refusal forgot nothing: the next complete full sync reconciles as usual.
    delete(upstream.url, 11, "hard")
    report = daemon.wait_reconcile("customers", daemon.sync_now("customers"))
    assert not report["refused"] and (report["checked"], report["deleted"]) == (1, 1), report
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    assert daemon.stop() == 0, daemon.log()[-3000:]


# -- ordering ----------------------------------------------------------------------------------------


def test_a_late_older_upsert_never_revives_a_deleted_key_and_a_restore_does(upstream_factory, analytics,
                                                                           daemon_factory):
    port = free_port()
    upstream, daemon = start(upstream_factory, analytics, daemon_factory, deleted="deleted", webhook_secret=SECRET,
                             control={"listen": f"127.0.0.1:{port}"}, **QUIET,
                             upstream_options={"webhook_url": f"http://127.0.0.1:{port}/webhook/{{collection}}",
                                               "webhook_secret": SECRET})
    old = requests.get(f"{upstream.url}/api/customers/7", timeout=10).content
    deleted = delete(upstream.url, 7, "hard")  # announced by webhook; no listing shows the key any more
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    # The late copy reaches the merger that handed the delete over: it drops it as older.
    assert post_signed(daemon.url, old).status_code == 202
    daemon.wait_committed()
    assert daemon.metric("conflux_dedup_skipped_total", reason="stale") >= 1
    assert tombstone(analytics.url, "customers", "7") == deleted["updated_at"]
    # After a restart no merger remembers the key (and no listing shows it): only the sink's tombstone
    # stands between the late copy and the deleted key.
    assert daemon.stop() == 0, daemon.log()[-3000:]
    daemon = daemon.restart()
    daemon.wait_running()
    stale_before = requests.get(f"{analytics.url}/stats", timeout=10).json()["records_ignored_stale"]
    assert post_signed(daemon.url, old).status_code == 202
    wait_until(lambda: requests.get(f"{analytics.url}/stats", timeout=10).json()["records_ignored_stale"]
               > stale_before, timeout_s=30, message="the sink to ignore the late, older upsert")
    assert tombstone(analytics.url, "customers", "7") == deleted["updated_at"]
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=10)
    # Restored upstream: a newer upsert, which recreates the key.
    restored = requests.put(f"{upstream.url}/api/customers/7", json={"tier": "restored"}, timeout=10).json()
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=30)
    stored = stored_record(analytics.url, "customers", "7")
    assert stored["updated_at"] == restored["updated_at"] and stored["data"]["tier"] == "restored"
    assert daemon.stop() == 0, daemon.log()[-3000:]


# -- filters -----------------------------------------------------------------------------------------


def filtered(upstream_url: str, tiers: set[str]) -> tuple[str, int]:
    """The checksum a sink holding exactly the upstream's customers of these tiers shows."""
    decode = msgspec.json.decode
    return expected_checksum([(str(record["id"]), raw) for raw in listed_records(upstream_url, "customers")
                              if (record := decode(raw))["tier"] in tiers])


@pytest.mark.parametrize("rule", [{"in": ["gold", "platinum"]}, {"not_in": ["bronze", "silver"]}])
def test_a_record_outside_the_filter_is_sent_as_a_delete(upstream_factory, analytics, daemon_factory, rule):
    tiers = {"gold", "platinum"}
    upstream = upstream_factory(customers=COUNT, products=0)
    daemon = daemon_factory(sources=[source("customers", upstream.url, filter={"field": "tier", **rule},
                                            poll_interval_s=0.3)], sink_url=analytics.url)
    expected = filtered(upstream.url, tiers)
    assert 0 < expected[1] < COUNT
    wait_until(lambda: sink_checksum(analytics.url, "customers") == expected, timeout_s=60,
               message="the sink to hold exactly the filtered customers")
    records = [msgspec.json.decode(raw) for raw in listed_records(upstream.url, "customers")]
    leaving = next(record["id"] for record in records if record["tier"] == "gold")
    joining = next(record["id"] for record in records if record["tier"] == "bronze")
    moved = requests.put(f"{upstream.url}/api/customers/{leaving}", json={"tier": "silver"}, timeout=10).json()
    requests.put(f"{upstream.url}/api/customers/{joining}", json={"tier": "platinum"}, timeout=10).raise_for_status()
    expected = filtered(upstream.url, tiers)
    wait_until(lambda: sink_checksum(analytics.url, "customers") == expected, timeout_s=30,
               message="the sink to follow the records in and out of the filter")
    assert tombstone(analytics.url, "customers", str(leaving)) == moved["updated_at"]
    assert stored_record(analytics.url, "customers", str(joining))["data"]["tier"] == "platinum"
    assert daemon.stop() == 0, daemon.log()[-3000:]


def test_a_listed_record_that_turned_invalid_is_dead_lettered_not_deleted_by_reconcile(upstream_factory, analytics,
                                                                                      daemon_factory):
    upstream = upstream_factory(customers=0, products=0)
    for index in range(20):
        requests.post(f"{upstream.url}/api/customers", json={"name": f"c{index}", "modified": "2026-01-01T00:00:00Z"},
                      timeout=10).raise_for_status()
    daemon = daemon_factory(sources=[source("customers", upstream.url, path="customers/cursor", pagination="cursor",
                                            updated="modified", reconcile=True, **QUIET)], sink_url=analytics.url)
    wait_until(lambda: sink_checksum(analytics.url, "customers")[1] == 20, timeout_s=60, message="20 customers")
    requests.put(f"{upstream.url}/api/customers/5", json={"modified": "last tuesday"}, timeout=10).raise_for_status()
    report = daemon.wait_reconcile("customers", daemon.sync_now("customers"))
    # The full sync saw key 5 (listed, but its newest version is invalid): nothing to delete.
    assert (report["checked"], report["deleted"]) == (0, 0), report
    daemon.wait_committed()
    assert stored_record(analytics.url, "customers", "5")["data"]["modified"] == "2026-01-01T00:00:00Z"
    [dead] = daemon.dead_letters()
    assert (dead["key"], dead["reason"]) == ("5", "'modified' is not an ISO 8601 timestamp: 'last tuesday'")
    assert daemon.stop() == 0, daemon.log()[-3000:]


@pytest.mark.kafka
def test_soft_and_hard_deletes_reach_the_sink_through_the_kafka_log(upstream_factory, analytics, daemon_factory,
                                                                    kafka_bootstrap, kafka_group_id):
    upstream = upstream_factory(customers=COUNT, products=0)
    log = {"backend": "kafka", "bootstrap_servers": kafka_bootstrap, "group": kafka_group_id,
           "topic_prefix": f"{kafka_group_id}.", "partitions": 4}
    daemon = daemon_factory(sources=[source("customers", upstream.url, path="customers/cursor", pagination="cursor",
                                            deleted="deleted", reconcile=True, poll_interval_s=0.5,
                                            full_sync_interval_s=3600)], sink_url=analytics.url, log=log)
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=90)
    soft = delete(upstream.url, 7, "soft")
    delete(upstream.url, 8, "hard")
    report = daemon.wait_reconcile("customers", daemon.sync_now("customers"))
    assert (report["checked"], report["deleted"]) == (1, 1), report   # 7 is listed, marked; 8 is missing
    wait_converged(upstream.url, analytics.url, CUSTOMERS, timeout_s=60)
    assert tombstone(analytics.url, "customers", "7") == soft["updated_at"]
    assert abs(instant(tombstone(analytics.url, "customers", "8")) - report["sync_started_at"]) < 1e-3
    assert daemon.stop() == 0, daemon.log()[-3000:]
