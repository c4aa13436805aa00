"""The demo analytics sink as a real process on 127.0.0.1: its ingest contract, stats, faults and restart."""

from __future__ import annotations

import signal
import subprocess
import time

import msgspec
import pytest
import requests

from conflux.demo.analytics_wire import REASON_REJECT_RATE, rejected_by_rate
from conflux.demo.checksum import Checksum, record_digest
from tests.fixtures.analytics import batch_body, post_batch, sink_record
from tests.support import conflux_argv, wait_until

SOURCE = "crm.customers"


def stats(url: str) -> dict:
    response = requests.get(f"{url}/stats", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def source_stats(url: str, source: str = SOURCE) -> dict:
    return stats(url)["sources"].get(source, {"count": 0, "checksum": f"{0:016x}"})


def stored_data(url: str, key: str, source: str = SOURCE) -> bytes | None:
    """The exact data bytes the sink stored for a key, or None if it has none."""
    response = requests.get(f"{url}/records/{source}/{key}", timeout=10)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return bytes(msgspec.json.decode(response.content, type=dict[str, msgspec.Raw])["data"])


def expected_checksum(records: dict[str, bytes], *, tombstones: int = 0, deletes_applied: int = 0) -> dict:
    """What /stats shows for a source whose live records are ``records``."""
    checksum = Checksum()
    for key, data in records.items():
        checksum.add(record_digest(key, data))
    return {**checksum.as_dict(), "tombstones": tombstones, "deletes_applied": deletes_applied}


def lasting(sources: dict[str, dict]) -> dict[str, dict]:
    """Per-source stats without deletes_applied, which counts since the process started."""
    return {name: {k: v for k, v in fields.items() if k != "deletes_applied"} for name, fields in sources.items()}


# --- ingest and checksums -------------------------------------------------------------------------

def test_ingest_applies_records_and_checksum_matches_an_independent_one(analytics):
    # Odd but valid JSON spellings: the sink must hash and keep the bytes exactly as sent.
    latest = {f"c{i:03d}": b'{"id": %d, "name": "caf\\u00e9 %d" ,"n":[1, 2.50]}' % (i, i) for i in range(150)}
    first = [sink_record(key, data) for key, data in list(latest.items())[:100]]
    second = [sink_record(key, data) for key, data in list(latest.items())[100:]]
    assert post_batch(analytics.url, "b-1", first).json() == {"status": "applied", "batch_id": "b-1",
                                                              "applied": 100, "ignored_stale": 0}
    assert post_batch(analytics.url, "b-2", second).status_code == 200

    assert source_stats(analytics.url) == expected_checksum(latest)
    one = requests.get(f"{analytics.url}/stats/{SOURCE}", timeout=10).json()
    assert one == {"source": SOURCE, **expected_checksum(latest)}
    assert stored_data(analytics.url, "c007") == latest["c007"]
    counters = stats(analytics.url)
    assert (counters["batches"], counters["records_applied"]) == (2, 150)


def test_sources_are_counted_separately(analytics):
    post_batch(analytics.url, "b-1", [sink_record("k", b'{"a":1}', source="crm"),
                                      sink_record("k", b'{"b":2}', source="erp")])
    sources = stats(analytics.url)["sources"]
    assert sources["crm"] == expected_checksum({"k": b'{"a":1}'})
    assert sources["erp"] == expected_checksum({"k": b'{"b":2}'})
    unknown = requests.get(f"{analytics.url}/stats/nowhere", timeout=10).json()
    assert unknown == {"source": "nowhere", "count": 0, "checksum": "0000000000000000", "tombstones": 0,
                       "deletes_applied": 0}


def test_older_upserts_are_ignored_and_equal_instants_apply(analytics):
    url = analytics.url
    post_batch(url, "b-1", [sink_record("k", b'{"v":1}', updated_at="2024-01-01T12:00:00Z")])
    # One microsecond older, written with another offset and precision: stale.
    older = "2024-01-01T14:59:59.999999+03:00"
    reply = post_batch(url, "b-2", [sink_record("k", b'{"v":0}', updated_at=older)])
    assert reply.json() == {"status": "applied", "batch_id": "b-2", "applied": 0, "ignored_stale": 1}
    assert stored_data(url, "k") == b'{"v":1}'
    # The same instant spelled differently: a later arrival with an equal timestamp wins.
    post_batch(url, "b-3", [sink_record("k", b'{"v":2}', updated_at="2024-01-01T13:00:00.000000+01:00")])
    assert stored_data(url, "k") == b'{"v":2}'
    assert source_stats(url) == expected_checksum({"k": b'{"v":2}'})
    assert stats(url)["records_ignored_stale"] == 1


def test_equal_instants_are_ordered_by_seq(analytics):
    url = analytics.url
    post_batch(url, "b-1", [sink_record("k", b'{"v":8}', seq=8)])
    # The same instant seen earlier in the log (a lower seq), arriving late: stale.
    assert post_batch(url, "b-2", [sink_record("k", b'{"v":3}', seq=3)]).json()["ignored_stale"] == 1
    assert post_batch(url, "b-3", [sink_record("k", b'{"v":0}')]).json()["ignored_stale"] == 1  # absent: 0
    assert post_batch(url, "b-4", [sink_record("k", b'{"v":9}', seq=9)]).json()["applied"] == 1
    stored = requests.get(f"{url}/records/{SOURCE}/k", timeout=10).json()
    assert (stored["seq"], stored["data"]) == (9, {"v": 9})
    assert source_stats(url) == expected_checksum({"k": b'{"v":9}'})
    refused = post_batch(url, "b-5", [sink_record("k", seq=-1)])
    assert refused.status_code == 400 and "seq" in refused.json()["error"]


def test_within_a_batch_records_apply_in_order(analytics):
    records = [sink_record("k", b'{"v":1}', updated_at="2024-01-01T00:00:02Z"),
               sink_record("k", b'{"v":2}', updated_at="2024-01-01T00:00:01Z"),
               sink_record("k", b'{"v":3}', updated_at="2024-01-01T00:00:02Z")]
    assert post_batch(analytics.url, "b-1", records).json()["ignored_stale"] == 1
    assert stored_data(analytics.url, "k") == b'{"v":3}'


def test_deletes_remove_records_and_leave_tombstones(analytics):
    url = analytics.url
    post_batch(url, "b-1", [sink_record("a", b'{"a":1}', updated_at="2024-01-02T00:00:00Z"),
                            sink_record("b", b'{"b":1}', updated_at="2024-01-02T00:00:00Z")])
    # A delete older than the record is stale; one at the same instant applies.
    post_batch(url, "b-2", [sink_record("a", None, op="delete", updated_at="2024-01-01T00:00:00Z")])
    assert stored_data(url, "a") == b'{"a":1}'
    post_batch(url, "b-3", [sink_record("a", None, op="delete", updated_at="2024-01-02T00:00:00Z")])
    assert stored_data(url, "a") is None
    assert source_stats(url) == expected_checksum({"b": b'{"b":1}'}, tombstones=1, deletes_applied=1)

    gone = requests.get(f"{url}/records/{SOURCE}/a", timeout=10)
    assert gone.status_code == 404 and gone.json()["deleted_at"] == "2024-01-02T00:00:00Z"
    # A late, older upsert must not resurrect it; a newer one does.
    stale = post_batch(url, "b-4", [sink_record("a", b'{"a":0}', updated_at="2024-01-01T12:00:00Z")])
    assert stale.json()["ignored_stale"] == 1 and stored_data(url, "a") is None
    post_batch(url, "b-5", [sink_record("a", b'{"a":2}', updated_at="2024-01-03T00:00:00Z")])
    assert source_stats(url) == expected_checksum({"a": b'{"a":2}', "b": b'{"b":1}'}, deletes_applied=1)


def test_a_delete_of_an_unknown_key_blocks_older_upserts(analytics):
    url = analytics.url
    post_batch(url, "b-1", [sink_record("ghost", b"{}", op="delete", updated_at="2024-01-05T00:00:00Z")])
    post_batch(url, "b-2", [sink_record("ghost", b'{"g":1}', updated_at="2024-01-04T00:00:00Z")])
    assert stored_data(url, "ghost") is None
    assert source_stats(url)["count"] == 0


def test_stats_count_deletes_and_tombstones_per_source_and_a_kill_keeps_the_tombstones(analytics_factory,
                                                                                        tmp_path):
    db = tmp_path / "sink.db"
    first = analytics_factory(db=db)
    day = "2024-01-02T00:00:00Z"
    post_batch(first.url, "b-1", [sink_record("a", b'{"a":1}'), sink_record("b", b'{"b":1}'),
                                  sink_record("a", b'{"a":9}', source="erp")])
    deletes = post_batch(first.url, "b-2", [
        sink_record("a", None, op="delete", updated_at=day),
        sink_record("a", None, op="delete", updated_at=day),  # repeated: idempotent
        sink_record("ghost", None, op="delete", updated_at=day),  # never held: not an error
        sink_record("a", None, op="delete", source="erp", updated_at="2023-12-31T00:00:00Z")])  # older: stale
    assert deletes.status_code == 200 and deletes.json()["ignored_stale"] == 1
    sources = stats(first.url)["sources"]
    assert sources[SOURCE] == expected_checksum({"b": b'{"b":1}'}, tombstones=2, deletes_applied=3)
    assert sources["erp"] == expected_checksum({"a": b'{"a":9}'})
    assert requests.get(f"{first.url}/stats/{SOURCE}", timeout=10).json() == {"source": SOURCE, **sources[SOURCE]}
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL

    second = analytics_factory(db=db)
    assert stats(second.url)["sources"][SOURCE] == expected_checksum({"b": b'{"b":1}'}, tombstones=2)
    late = post_batch(second.url, "b-3", [sink_record("a", b'{"a":0}', updated_at="2024-01-01T12:00:00Z"),
                                          sink_record("ghost", b'{"g":0}', updated_at="2024-01-01T12:00:00Z")])
    assert late.json()["ignored_stale"] == 2 and stored_data(second.url, "ghost") is None
    post_batch(second.url, "b-4", [sink_record("a", b'{"a":2}', updated_at="2024-01-03T00:00:00Z")])
    assert stats(second.url)["sources"][SOURCE] == expected_checksum({"a": b'{"a":2}', "b": b'{"b":1}'},
                                                                     tombstones=1)


# --- idempotency ----------------------------------------------------------------------------------

def test_a_batch_id_applies_once(analytics):
    records = [sink_record(f"k{i}", b'{"i":%d}' % i) for i in range(5)]
    assert post_batch(analytics.url, "b-1", records).json()["status"] == "applied"
    again = post_batch(analytics.url, "b-1", records)
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate" and again.json()["batch_id"] == "b-1"
    counters = stats(analytics.url)
    assert (counters["batches"], counters["duplicate_batches"], counters["records_applied"]) == (1, 1, 5)


@pytest.mark.parametrize("header", [None, "other-id"], ids=["missing", "mismatched"])
def test_idempotency_key_must_equal_the_batch_id(analytics, header):
    reply = post_batch(analytics.url, "b-1", [sink_record("k")], idempotency_key=header)
    assert reply.status_code == 400
    assert "Idempotency-Key" in reply.json()["error"]
    assert stats(analytics.url)["batches"] == 0


# --- malformed and oversized bodies ---------------------------------------------------------------

GOOD = {"source": "s", "key": "k", "op": "upsert", "updated_at": "2024-01-01T00:00:00Z",
        "hash": "0123456789abcdef", "data": {}}


def without(record: dict, field: str) -> dict:
    return {name: value for name, value in record.items() if name != field}


MALFORMED = {
    "not json": (b"{oops", "malformed"),
    "an array": (b"[]", "object"),
    "no batch_id": (msgspec.json.encode({"records": []}), "batch_id"),
    "empty batch_id": (msgspec.json.encode({"batch_id": "", "records": []}), "batch_id"),
    "records not a list": (msgspec.json.encode({"batch_id": "b", "records": {}}), "records"),
    "null hash": (msgspec.json.encode({"batch_id": "b", "records": [{**GOOD, "hash": None}]}), "hash"),
    "no data": (msgspec.json.encode({"batch_id": "b", "records": [without(GOOD, "data")]}), "data"),
    "bad op": (msgspec.json.encode({"batch_id": "b", "records": [{**GOOD, "op": "merge"}]}), "op"),
    "key not a string": (msgspec.json.encode({"batch_id": "b", "records": [GOOD, {**GOOD, "key": 7}]}),
                         "records[1].key"),
}


@pytest.mark.parametrize("case", MALFORMED.keys())
def test_malformed_bodies_are_refused_with_a_reason(analytics, case):
    body, mentioned = MALFORMED[case]
    reply = requests.post(f"{analytics.url}/ingest", data=body, headers={"Idempotency-Key": "b"}, timeout=10)
    assert reply.status_code == 400
    assert mentioned in reply.json()["error"]
    assert stats(analytics.url)["batches"] == 0


def test_bodies_over_the_limit_get_413(analytics_factory):
    sink = analytics_factory(max_body_bytes=2000)
    small = [sink_record("k", b'{"pad": "%s"}' % (b"x" * 100))]
    assert post_batch(sink.url, "b-1", small).status_code == 200
    large = [sink_record("k", b'{"pad": "%s"}' % (b"x" * 5000))]
    assert post_batch(sink.url, "b-2", large).status_code == 413
    assert stats(sink.url)["batches"] == 1


# --- per-record rejections ------------------------------------------------------------------------

def bad_records() -> list[dict]:
    return [
        sink_record("good-1", b'{"ok":1}'),
        sink_record("bad-hash", b'{"x":1}', hash_hex="0123456789abcdef"),
        sink_record("", b'{"x":1}'),
        sink_record("not-object", b"[1,2]"),
        sink_record("bad-time", b'{"x":1}', updated_at="yesterday"),
        sink_record("good-2", b'{"ok":2}'),
    ]


def test_bad_records_are_rejected_individually(analytics):
    reply = post_batch(analytics.url, "b-1", bad_records())
    assert reply.status_code == 207
    body = reply.json()
    assert (body["status"], body["batch_id"], body["applied"]) == ("partial", "b-1", 2)
    assert body["rejected"] == [
        {"index": 1, "reason": "hash does not match xxh3-64 of data"},
        {"index": 2, "reason": "key is empty"},
        {"index": 3, "reason": "data is not a JSON object"},
        {"index": 4, "reason": "updated_at is not an ISO 8601 timestamp"},
    ]
    assert source_stats(analytics.url) == expected_checksum({"good-1": b'{"ok":1}', "good-2": b'{"ok":2}'})
    assert stats(analytics.url)["records_rejected"] == 4
    # The batch counts as applied: a retry is a duplicate that repeats the same rejections.
    again = post_batch(analytics.url, "b-1", bad_records())
    assert again.status_code == 200
    assert (again.json()["status"], again.json()["rejected"]) == ("duplicate", body["rejected"])


def test_a_batch_with_every_record_rejected_gets_422(analytics):
    reply = post_batch(analytics.url, "b-1", bad_records()[1:5])
    assert reply.status_code == 422 and reply.json()["batch_id"] == "b-1"
    assert [r["index"] for r in reply.json()["rejected"]] == [0, 1, 2, 3]
    assert source_stats(analytics.url)["count"] == 0


def test_reject_rate_refuses_the_predicted_records(analytics_factory):
    sink = analytics_factory(reject_rate=0.3)
    records = [sink_record(f"k{i}", b'{"i":%d}' % i) for i in range(200)]
    predicted = [i for i in range(200) if rejected_by_rate(SOURCE, f"k{i}", 0.3)]
    assert 20 < len(predicted) < 100
    reply = post_batch(sink.url, "b-1", records)
    assert reply.status_code == 207
    assert reply.json()["rejected"] == [{"index": i, "reason": REASON_REJECT_RATE} for i in predicted]
    assert stats(sink.url)["faults"]["reject_rate"] == len(predicted)
    kept = {f"k{i}": b'{"i":%d}' % i for i in range(200) if i not in predicted}
    assert source_stats(sink.url) == expected_checksum(kept)


# --- fault injection ------------------------------------------------------------------------------

def test_error_rate_fails_without_applying_and_retries_get_through(analytics_factory):
    sink = analytics_factory(error_rate=0.5, seed=7)
    latest = {}
    for n in range(20):
        records = [sink_record(f"k{n}", b'{"n":%d}' % n)]
        latest[f"k{n}"] = b'{"n":%d}' % n
        statuses = []
        while not statuses or statuses[-1] == 500:
            statuses.append(post_batch(sink.url, f"b-{n}", records).status_code)
            assert len(statuses) < 30
        assert statuses[-1] == 200
    counters = stats(sink.url)
    assert counters["faults"]["error_rate"] > 0
    assert counters["batches"] == 20 and counters["duplicate_batches"] == 0
    assert source_stats(sink.url) == expected_checksum(latest)


def test_error_rate_one_applies_nothing(analytics_factory):
    sink = analytics_factory(error_rate=1.0)
    assert post_batch(sink.url, "b-1", [sink_record("k")]).status_code == 500
    assert stats(sink.url)["batches"] == 0 and stats(sink.url)["faults"]["error_rate"] == 1


def test_latency_delays_ingest_responses(analytics_factory):
    sink = analytics_factory(latency_ms=400)
    started = time.monotonic()
    assert post_batch(sink.url, "b-1", [sink_record("k")]).status_code == 200
    assert time.monotonic() - started >= 0.4
    assert stats(sink.url)["faults"]["latency"] == 1


def test_apply_then_fail_applies_and_the_retry_is_a_duplicate(analytics_factory):
    sink = analytics_factory(apply_then_fail_rate=1.0)
    records = [sink_record("k", b'{"v":1}')]
    assert post_batch(sink.url, "b-1", records).status_code == 500
    assert source_stats(sink.url) == expected_checksum({"k": b'{"v":1}'})
    retry = post_batch(sink.url, "b-1", records)
    assert (retry.status_code, retry.json()["status"]) == (200, "duplicate")
    counters = stats(sink.url)
    assert (counters["batches"], counters["faults"]["apply_then_fail"]) == (1, 1)


def test_redirect_fault_sends_ingests_to_a_login_page_and_applies_nothing(analytics_factory):
    sink = analytics_factory(redirect_to="/login")
    reply = post_batch(sink.url, "b-1", [sink_record("k")])  # requests follows the 302 with a GET
    assert [r.status_code for r in reply.history] == [302] and reply.history[0].headers["Location"] == "/login"
    assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/html")
    counters = stats(sink.url)
    assert (counters["batches"], counters["faults"]["redirect"], counters["login_requests"]) == (0, 1, 1)


@pytest.mark.parametrize(("options", "status", "count"), [
    ({"html_200": True}, 200, "html_200"),
    ({"fail_status": 401}, 401, "fail_status"),
    ({"fail_status": 404}, 404, "fail_status"),
], ids=["html-200", "401", "404"])
def test_answer_faults_apply_nothing_until_lifted_at_run_time(analytics_factory, options, status, count):
    sink = analytics_factory(**options)
    reply = post_batch(sink.url, "b-1", [sink_record("k")])
    assert reply.status_code == status and "batch_id" not in reply.text
    assert stats(sink.url)["batches"] == 0 and stats(sink.url)["faults"][count] == 1
    lifted = requests.post(f"{sink.url}/admin/faults", json={"html_200": False, "fail_status": 0}, timeout=5)
    assert lifted.json()["html_200"] is False and lifted.json()["fail_status"] == 0
    assert post_batch(sink.url, "b-1", [sink_record("k")]).json()["batch_id"] == "b-1"
    assert stats(sink.url)["batches"] == 1


def health_status(url: str) -> int:
    return requests.get(f"{url}/health", timeout=5).status_code


def test_outage_windows_from_the_command_line(analytics_factory):
    sink = analytics_factory(outage_s="1:3")
    wait_until(lambda: health_status(sink.url) == 503, timeout_s=10, message="the outage window to start")
    down = requests.get(f"{sink.url}/stats", timeout=5)
    assert (down.status_code, down.headers["Retry-After"]) == (503, "1")
    assert post_batch(sink.url, "b-1", [sink_record("k")]).status_code == 503
    assert requests.get(f"{sink.url}/admin/faults", timeout=5).json()["outage_remaining_s"] > 0
    wait_until(lambda: health_status(sink.url) == 200, timeout_s=15, message="the outage window to end")
    assert post_batch(sink.url, "b-1", [sink_record("k")]).status_code == 200
    assert stats(sink.url)["faults"]["outage"] >= 3


def test_admin_outage_starts_now_and_can_be_ended(analytics):
    url = analytics.url
    assert health_status(url) == 200
    requests.post(f"{url}/admin/outage", json={"seconds": 60}, timeout=5).raise_for_status()
    reply = post_batch(url, "b-1", [sink_record("k")])
    assert (reply.status_code, reply.headers["Retry-After"]) == (503, "1")
    assert health_status(url) == 503
    requests.post(f"{url}/admin/outage", json={"seconds": 0}, timeout=5).raise_for_status()
    assert health_status(url) == 200
    assert post_batch(url, "b-1", [sink_record("k")]).status_code == 200


def test_faults_can_be_changed_at_run_time(analytics):
    url = analytics.url
    settings = requests.post(f"{url}/admin/faults", json={"error_rate": 1, "latency_ms": 5}, timeout=5)
    assert settings.json()["error_rate"] == 1.0 and settings.json()["latency_ms"] == 5.0
    assert post_batch(url, "b-1", [sink_record("k")]).status_code == 500
    requests.post(f"{url}/admin/faults", json={"error_rate": 0}, timeout=5).raise_for_status()
    assert post_batch(url, "b-1", [sink_record("k")]).status_code == 200
    for bad in ({"error_rate": 1.5}, {"no_such_fault": 1}, [1]):
        refused = requests.post(f"{url}/admin/faults", json=bad, timeout=5)
        assert refused.status_code == 400 and refused.json()["error"]
    assert requests.get(f"{url}/admin/faults", timeout=5).json()["latency_ms"] == 5.0


def test_invalid_fault_flags_stop_the_sink_with_the_config_exit_code():
    for flags in (["--error-rate", "2"], ["--outage-s", "10"], ["--outage-s", "a:b"], ["--fail-status", "99"]):
        done = subprocess.run(conflux_argv("analytics", "--port", "0", *flags), capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2, done
        assert flags[0] in done.stderr


def test_an_address_in_use_stops_the_sink_with_the_config_exit_code(analytics):
    port = analytics.url.rsplit(":", 1)[1]
    done = subprocess.run(conflux_argv("analytics", "--port", port), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done
    assert "cannot listen" in done.stderr


# --- persistence and shutdown ---------------------------------------------------------------------

def load_some(url: str) -> None:
    post_batch(url, "b-1", [sink_record(f"k{i}", b'{"i":%d}' % i) for i in range(50)])
    post_batch(url, "b-2", [sink_record("k3", None, op="delete", updated_at="2024-02-01T00:00:00Z"),
                            sink_record("k4", b'{"i":"four"}', updated_at="2024-02-01T00:00:00Z")])
    post_batch(url, "b-3", [sink_record("bad", b"[]")])


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["term", "int", "kill-9"])
def test_a_restart_with_the_same_db_keeps_records_checksums_and_batch_ids(analytics_factory, tmp_path,
                                                                        stop_signal):
    db = tmp_path / "sink.db"
    first = analytics_factory(db=db)
    load_some(first.url)
    before = stats(first.url)
    exit_code = first.stop(stop_signal)
    assert exit_code == (-signal.SIGKILL if stop_signal == signal.SIGKILL else 0), first.log_text()

    second = analytics_factory(db=db)
    after = stats(second.url)
    assert lasting(after["sources"]) == lasting(before["sources"]) and after["batches"] == 3
    assert after["sources"][SOURCE]["tombstones"] == 1
    assert stored_data(second.url, "k4") == b'{"i":"four"}'
    assert stored_data(second.url, "k3") is None
    # The tombstone survived too: an older upsert of k3 stays dead.
    post_batch(second.url, "b-4", [sink_record("k3", b"{}", updated_at="2024-01-15T00:00:00Z")])
    assert stored_data(second.url, "k3") is None
    for batch_id in ("b-1", "b-2", "b-3"):
        assert post_batch(second.url, batch_id, []).json()["status"] == "duplicate"
    assert lasting(stats(second.url)["sources"]) == lasting(before["sources"])


def test_records_are_readable_while_batches_are_still_journaled(analytics):
    # GET /records folds the journal first, so a write is visible at once.
    for n in range(30):
        post_batch(analytics.url, f"b-{n}", [sink_record("k", b'{"n":%d}' % n,
                                                         updated_at=f"2024-01-01T00:00:{n:02d}Z")])
        assert stored_data(analytics.url, "k") == b'{"n":%d}' % n


def test_data_is_stored_byte_for_byte(analytics):
    body = batch_body("b-1", [sink_record("k", b'{ "spaced" : [ 1 , 2 ] }')])
    reply = requests.post(f"{analytics.url}/ingest", data=body, headers={"Idempotency-Key": "b-1"},
                          timeout=10)
    assert reply.status_code == 200
    assert stored_data(analytics.url, "k") == b'{ "spaced" : [ 1 , 2 ] }'


def test_health_and_listening_line(analytics):
    assert requests.get(f"{analytics.url}/health", timeout=5).json() == {"status": "ok"}
    assert "conflux-analytics listening on http://127.0.0.1:" in analytics.log_text()
