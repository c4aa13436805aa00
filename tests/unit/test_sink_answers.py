"""How the merger reads the sink's answers (workers/sinks.py ``interpret``): only the sink's
acknowledgement is a delivery, only "this batch is bad" answers dead-letter, everything else is retried."""

from __future__ import annotations

import msgspec
import pytest

from conflux.workers.sinks.http import Delivery, Retry, interpret

BATCH = "b-42"


def ack(**fields) -> bytes:
    return msgspec.json.encode({"status": "applied", "batch_id": BATCH, "applied": 3, **fields})


def test_a_2xx_with_the_acknowledgement_is_a_delivery():
    assert interpret(200, ack(), 3, BATCH) == Delivery({}, 200)
    assert interpret(201, ack(), 3, BATCH) == Delivery({}, 201)
    partial = ack(rejected=[{"index": 1, "reason": "bad hash"}, {"index": 9, "reason": "out of range"}])
    assert interpret(207, partial, 3, BATCH) == Delivery({1: "bad hash"}, 207)
    # A duplicate repeats the first delivery's rejections, which may have been lost with its answer.
    duplicate = msgspec.json.encode({"status": "duplicate", "batch_id": BATCH, "rejected": [{"index": 0}]})
    assert interpret(200, duplicate, 3, BATCH) == Delivery({0: "rejected by the sink"}, 200)


NOT_ACKS = {
    "html": b"<!doctype html><html><body>Sign in</body></html>",
    "empty": b"",
    "other json": b'{"ok": true}',
    "another batch": msgspec.json.encode({"batch_id": "b-7"}),
    "a list": msgspec.json.encode([{"batch_id": BATCH}]),
    "batch_id not a string": b'{"batch_id": 42}',
    "rejected not a list": msgspec.json.encode({"batch_id": BATCH, "rejected": "all"}),
    "too deep to decode": b'{"batch_id": "b-42", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
}


@pytest.mark.parametrize("status", [200, 204, 207])
@pytest.mark.parametrize("case", NOT_ACKS)
def test_a_2xx_without_the_acknowledgement_is_retried(case, status):
    outcome = interpret(status, NOT_ACKS[case], 3, BATCH)
    assert isinstance(outcome, Retry) and outcome.reason == "not_acknowledged", outcome
    assert str(status) in outcome.message and "acknowledgement" in outcome.message


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_retried_and_the_target_is_logged_without_its_secrets(status):
    outcome = interpret(status, b"", 3, BATCH, location="https://me:pw@sso.example/login?token=secret#x")
    assert isinstance(outcome, Retry) and outcome.reason == "redirect"
    assert "https://sso.example/login" in outcome.message
    assert not any(secret in outcome.message for secret in ("me:", "pw", "secret", "#x"))
    assert "to /login;" in interpret(status, b"", 3, BATCH, location="/login?next=%2Fingest").message
    assert "to nowhere;" in interpret(status, b"", 3, BATCH).message


@pytest.mark.parametrize("status", [401, 403, 404, 405, 408, 409, 429, 500, 502, 503, 504])
def test_outages_and_misconfigurations_are_retried_not_dead_lettered(status):
    outcome = interpret(status, b'{"error": "nope"}', 3, BATCH)
    assert isinstance(outcome, Retry) and outcome.reason == str(status)
    assert "nope" in outcome.message


def test_a_400_dead_letters_the_whole_batch_with_the_sinks_reason():
    outcome = interpret(400, b'{"error": "malformed body: records"}', 2, BATCH)
    assert outcome.status == 400 and set(outcome.rejected) == {0, 1}
    assert all("400" in reason and "malformed body" in reason for reason in outcome.rejected.values())


def test_a_413_is_too_large_for_the_merger_to_split():
    outcome = interpret(413, b'{"error": "body exceeds"}', 4, BATCH)
    assert outcome.too_large and set(outcome.rejected) == {0, 1, 2, 3}
    assert not interpret(400, b"", 4, BATCH).too_large


def test_a_422_names_the_refused_records_or_refuses_them_all():
    named = msgspec.json.encode({"batch_id": BATCH, "rejected": [{"index": 2, "reason": "key is empty"}]})
    assert interpret(422, named, 3, BATCH) == Delivery({2: "key is empty"}, 422)
    everything = interpret(422, b'{"error": "schema mismatch"}', 2, BATCH)
    assert everything == Delivery({0: "schema mismatch", 1: "schema mismatch"}, 422)
    html = interpret(422, b"<html>no</html>", 1, BATCH)
    assert set(html.rejected) == {0} and "<html>no</html>" in html.rejected[0]
