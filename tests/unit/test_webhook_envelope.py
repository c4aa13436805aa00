"""Vendor webhook envelopes as pure logic: the record(s) at webhook_records_path (one object or a list),
events that webhook_delete_when makes deletes, bodies without records there, bodies too deep for msgspec,
and the records' way on through the source's schema into columns."""

from __future__ import annotations

import json

import pytest

from conflux.config import SourceConfig, WebhookDeleteWhen, load_config, to_toml
from conflux.errors import ConfigError, PageFormatError
from conflux.workers.batching import RecordSchema
from conflux.workers.webhook_envelope import WebhookEnvelope

CUSTOMER = {"id": 7, "name": "Ada", "updated_at": "2026-01-01T00:00:00Z"}
STRIPE_DELETES = WebhookDeleteWhen(field="type", in_=["customer.deleted"])


def source(**options) -> SourceConfig:
    return SourceConfig(name="crm", url="http://upstream/api/customers", **options)


def stripe_event(kind: str, record: object = CUSTOMER) -> bytes:
    return json.dumps({"id": "evt_1", "object": "event", "type": kind, "data": {"object": record}}).encode()


def test_a_plain_source_takes_the_body_as_it_is():
    body = b'[{"id": 1}, {"id": 2}]'
    assert WebhookEnvelope(source()).open(body) == (body, False)


def test_the_records_path_finds_one_record_and_the_event_type_says_delete():
    envelope = WebhookEnvelope(source(webhook_records_path="data.object", webhook_delete_when=STRIPE_DELETES))
    records, deletes = envelope.open(stripe_event("customer.updated"))
    assert json.loads(records) == CUSTOMER and not deletes
    records, deletes = envelope.open(stripe_event("customer.deleted"))
    assert json.loads(records) == CUSTOMER and deletes


def test_the_records_path_may_hold_a_list():
    body = json.dumps({"event": "sync", "result": {"items": [CUSTOMER, {**CUSTOMER, "id": 8}]}}).encode()
    records, deletes = WebhookEnvelope(source(webhook_records_path="result.items")).open(body)
    assert [record["id"] for record in json.loads(records)] == [7, 8] and not deletes


@pytest.mark.parametrize(("value", "deletes"), [
    ("deleted", True), ("edited", False), (None, False), ({"nested": "deleted"}, False), (["deleted"], False),
])
def test_a_delete_is_a_listed_value_of_the_field_compared_as_json(value, deletes):
    when = WebhookDeleteWhen(field="action", in_=["deleted", 1])
    envelope = WebhookEnvelope(source(webhook_records_path="customer", webhook_delete_when=when))
    body = json.dumps({"action": value, "customer": CUSTOMER}).encode()
    assert envelope.open(body)[1] is deletes
    # true is not 1, and "1" is not 1: JSON types count, as in a source's filter
    assert envelope.open(json.dumps({"action": True, "customer": CUSTOMER}).encode())[1] is False
    assert envelope.open(json.dumps({"action": 1, "customer": CUSTOMER}).encode())[1] is True


def test_a_delete_field_missing_from_the_event_means_no_delete():
    envelope = WebhookEnvelope(source(webhook_delete_when=STRIPE_DELETES))
    assert envelope.open(json.dumps(CUSTOMER).encode()) == (json.dumps(CUSTOMER).encode(), False)
    listed = json.dumps([CUSTOMER]).encode()
    assert envelope.open(listed) == (listed, False)  # a list of records is no event


@pytest.mark.parametrize(("body", "words"), [
    (json.dumps({"type": "ping"}).encode(), "no record at webhook_records_path 'data.object'"),
    (json.dumps({"data": None}).encode(), "no record at webhook_records_path 'data.object'"),
    (json.dumps({"data": {"object": None}}).encode(), "no record at webhook_records_path 'data.object'"),
    (json.dumps({"data": "text"}).encode(), "no record at webhook_records_path 'data.object'"),
    (json.dumps([{"data": {"object": CUSTOMER}}]).encode(), "no record at webhook_records_path 'data.object'"),
    (json.dumps({"data": {"object": 5}}).encode(), "holds b'5', not a record"),
    (b'{"data": {"object": ', "body is not JSON"),
])
def test_a_body_without_records_at_the_path_is_refused_with_the_path_named(body, words):
    with pytest.raises(PageFormatError) as caught:
        WebhookEnvelope(source(webhook_records_path="data.object")).open(body)
    assert words in str(caught.value)


def test_a_record_too_deep_for_msgspec_is_still_found_and_goes_aside_with_its_reason():
    deep = '{"id": 9, "updated_at": "2026-01-01T00:00:00Z", "tree": ' + "[" * 3000 + "]" * 3000 + "}"
    body = ('{"type": "customer.deleted", "data": {"object": [' + json.dumps(CUSTOMER) + ", " + deep + "]}}").encode()
    src = source(webhook_records_path="data.object", webhook_delete_when=STRIPE_DELETES)
    records, deletes = WebhookEnvelope(src).open(body)
    assert deletes
    schema = RecordSchema(src)
    columns = schema.columns(*schema.body_records(records))
    assert columns.keys == ["7"]
    assert [(key, reason) for _record, key, reason in columns.dead] == [("9", "record is nested too deeply to decode "
                                                                               "(past the decoder's recursion limit)")]


def test_delete_when_is_validated_with_the_field_named(tmp_path):
    def error(when: dict) -> str:
        path = tmp_path / "conflux.toml"
        path.write_text(to_toml({"sources": [{"name": "crm", "url": "http://u/api", "webhook_delete_when": when}]}))
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ={})
        return str(caught.value)

    assert error({"field": "type"}) == "sources[0].webhook_delete_when.in: missing required key"
    assert error({"field": "type", "in": []}) == "sources[0].webhook_delete_when: in: give at least one value"
    assert error({"field": "a..b", "in": ["x"]}).startswith("sources[0].webhook_delete_when: field: 'a..b'")
    assert error({"field": "type", "in": ["x"], "not_in": ["y"]}) == \
        "sources[0].webhook_delete_when.not_in: unknown key"


def test_the_webhook_keys_round_trip_through_config_check(tmp_path):
    from conflux.config import redacted

    keys = {"webhook_signature": "stripe", "webhook_records_path": "data.object",
            "webhook_delete_when": {"field": "type", "in": ["customer.deleted", 3, True]}}
    path = tmp_path / "conflux.toml"
    path.write_text(to_toml({"sources": [{"name": "crm", "url": "http://u/api", **keys}]}))
    data = redacted(load_config(path, environ={}))
    assert {key: data["sources"][0][key] for key in keys} == keys
    path.write_text(to_toml(data))
    assert redacted(load_config(path, environ={})) == data
