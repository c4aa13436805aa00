"""The Kafka changelog sink's pure parts (workers/sinks/kafka.py): chunks as Kafka records, delivery
reports judged, the clients' settings, and its config keys. The broker-facing parts are in
tests/integration/test_kafka_sink.py."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, Producer

from conflux.config import Config, load_config, redacted
from conflux.errors import ConfigError
from conflux.ipc.messages import Position
from conflux.log.kafka.producer import DeliveryReports, produce
from conflux.workers.sinks import make_sinks
from conflux.workers.sinks.base import NULL_HASH, Delivery, Retry
from conflux.workers.sinks.kafka import BATCH_OVERHEAD_BYTES, KafkaSink, Message, judge, to_messages
from tests.fixtures.kafka_sink import chunk, version

SOURCES = ('[[sources]]\nname = "customers"\nurl = "http://u/api/customers"\n'
           '[[sources]]\nname = "products"\nurl = "http://u/api/products"\nsinks = ["web"]\n'
           '[[sinks]]\nname = "web"\nurl = "http://s/ingest"\n')


def load(text: str, environ: dict[str, str] | None = None) -> Config:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "conflux.toml"
        path.write_text(text)
        return load_config(path, environ=environ or {})


def error(text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(text, environ)
    return str(caught.value)


def kafka_sink(text: str = "", environ: dict[str, str] | None = None, *, log: str = "") -> KafkaSink:
    config = load(f'[log]\nbootstrap_servers = "k1:9092"\ntopic_prefix = "prod."\n{log}\n{SOURCES}'
                  f'[[sinks]]\nname = "events"\ntype = "kafka"\n{text}', environ)
    return make_sinks(config, instance="merger-1")["events"]


# -- records --------------------------------------------------------------------------------------


def test_each_record_is_one_message_keyed_by_its_key_with_headers_and_a_tombstone_for_a_delete():
    sent = chunk("customers", [version("k\u00e9y", b'{"a":1}', offset=41), version("gone", None, offset=42)])
    messages, refused = to_messages(sent, 1 << 20, "t")
    assert refused == {}
    upsert, delete = messages
    assert (upsert.index, upsert.key, bytes(upsert.value)) == (0, "k\u00e9y".encode(), b'{"a":1}')
    assert upsert.headers == [("conflux-op", "upsert"), ("conflux-updated-at", "2026-01-02T03:04:05Z"),
                              ("conflux-hash", sent.values[0][1]), ("conflux-source", "customers"),
                              ("conflux-batch", sent.batch_id), ("conflux-seq", "41")]
    assert (delete.index, delete.key, delete.value) == (1, b"gone", None)
    assert dict(delete.headers)["conflux-op"] == "delete" and dict(delete.headers)["conflux-hash"] == NULL_HASH


def test_a_record_larger_than_the_limit_is_refused_with_its_size_and_the_topics_limit():
    sent = chunk("customers", [version("1", b'{"a":1}'), version("2", b'{"b":"%s"}' % (b"x" * 5000)),
                               version("3", None)])
    messages, refused = to_messages(sent, 2000, "prod.customers.records")
    assert [message.index for message in messages] == [0, 2]
    assert list(refused) == [1]
    assert "prod.customers.records" in refused[1] and f"({2000 + BATCH_OVERHEAD_BYTES} bytes" in refused[1]


# -- delivery reports -----------------------------------------------------------------------------


def test_reports_resolve_only_once_every_message_has_one_from_any_thread():
    async def scenario() -> tuple:
        loop = asyncio.get_running_loop()
        reports = DeliveryReports(3, loop)
        reports.refuse(1, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        thread = threading.Thread(target=reports.report, args=(0, None, _Sent("t", 2, 17)))
        thread.start()
        thread.join()
        await asyncio.sleep(0)  # the loop runs what the thread scheduled, if anything
        early = reports.future.done()
        reports.report(2, KafkaError(KafkaError.NOT_ENOUGH_REPLICAS), None)
        return early, await asyncio.wait_for(reports.future, 5)

    early, reports = asyncio.run(scenario())
    assert early is False
    assert reports.positions[0] == Position("t", 2, 17) and set(reports.errors) == {1, 2}


class _Sent:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._where = (topic, partition, offset)

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]


def _reports(count: int, errors: dict[int, int]) -> DeliveryReports:
    reports = DeliveryReports.__new__(DeliveryReports)
    reports.errors = {seq: KafkaError(code) for seq, code in errors.items()}
    reports.remaining = 0
    reports.positions = [None] * count
    return reports


def _messages(indices: list[int]) -> list[Message]:
    return [Message(index, b"k", b"{}", []) for index in indices]


def test_all_reports_positive_is_a_delivery_naming_only_the_records_refused_before_sending():
    outcome = judge(_reports(2, {}), _messages([0, 2]), {1: "too big"}, 3, "t")
    assert outcome == Delivery({1: "too big"}, 200, applied=2)
    tombstone = Message(3, b"k", None, [])
    assert judge(_reports(3, {}), [*_messages([0, 2]), tombstone], {}, 4, "t") == Delivery({}, 200, applied=4,
                                                                                             deleted=1)


def test_any_failed_report_is_a_retry_never_a_rejection():
    outcome = judge(_reports(3, {1: KafkaError._MSG_TIMED_OUT, 2: KafkaError.MSG_SIZE_TOO_LARGE}),
                    _messages([0, 1, 2]), {}, 3, "t")
    assert isinstance(outcome, Retry) and outcome.reason == "_MSG_TIMED_OUT"


def test_a_record_the_broker_finds_too_large_makes_the_chunk_too_large_for_the_dispatcher_to_halve():
    outcome = judge(_reports(3, {0: KafkaError.MSG_SIZE_TOO_LARGE, 1: KafkaError.MSG_SIZE_TOO_LARGE}),
                    _messages([0, 1, 2]), {}, 3, "t")
    assert isinstance(outcome, Delivery) and outcome.too_large and set(outcome.rejected) == {0, 1, 2}
    # A record librdkafka refused before sending is a rejection already, not a broker failure.
    refused_here = judge(_reports(2, {1: KafkaError.MSG_SIZE_TOO_LARGE}), _messages([0, 1]), {1: "big"}, 2, "t")
    assert refused_here == Delivery({1: "big"}, 200, applied=1)


# -- settings -------------------------------------------------------------------------------------


def test_the_producer_always_has_acks_all_idempotence_murmur2_and_a_stable_transactional_id():
    sink = kafka_sink('producer = { acks = "1", "enable.idempotence" = false, partitioner = "random", '
                      '"linger.ms" = 20 }\ntimeout_s = 12')
    producer, admin = sink.client_settings()
    assert (producer["acks"], producer["enable.idempotence"], producer["partitioner"]) == ("all", True,
                                                                                          "murmur2_random")
    assert producer["linger.ms"] == 20 and producer["message.timeout.ms"] == 12_000
    assert producer["transaction.timeout.ms"] > producer["message.timeout.ms"]
    assert producer["transactional.id"].startswith("conflux.sink.events.")
    assert producer["transactional.id"].endswith(".merger-1")
    assert producer["transactional.id"] == sink.client_settings()[0]["transactional.id"]
    assert admin["bootstrap.servers"] == producer["bootstrap.servers"] == "k1:9092"
    assert "acks" not in admin and "linger.ms" not in admin
    assert "transactional.id" not in kafka_sink("transactional = false").client_settings()[0]


def test_on_the_logs_cluster_the_kafka_tables_security_keys_apply_and_the_sinks_own_table_wins(monkeypatch):
    log = '[kafka.producer]\n"sasl.username" = "log"\n"linger.ms" = 50\n'
    monkeypatch.setenv("SINK_PASSWORD", "s3cret")
    shared = kafka_sink('producer = { "sasl.password_env" = "SINK_PASSWORD" }', {"SINK_PASSWORD": "s3cret"}, log=log)
    producer, admin = shared.client_settings()
    assert producer["sasl.username"] == admin["sasl.username"] == "log"
    assert producer["sasl.password"] == admin["sasl.password"] == "s3cret"
    assert producer["linger.ms"] != 50  # the log producer's tuning is the log's
    other = kafka_sink('bootstrap_servers = "elsewhere:9092"', log=log)
    producer, admin = other.client_settings()
    assert producer["bootstrap.servers"] == "elsewhere:9092" and "sasl.username" not in producer


# -- config ---------------------------------------------------------------------------------------


def test_topics_are_per_source_with_the_logs_prefix():
    sink = kafka_sink()
    assert sink.options.transactional is True and sink.options.batch_size == 5000
    assert sink.topic_of("customers") == "prod.customers.records"
    assert kafka_sink('topic = "cdc-{source}"').topic_of("customers") == "cdc-customers"


@pytest.mark.parametrize(("text", "log", "message"), [
    ('topic = "changes"', "", "sinks[1]: topic must hold {source}"),
    ('topic = "{prefix}{source}.{env}"', "", "may only hold the placeholders {prefix} and {source}"),
    ('topic = "{source}/records"', "", "'customers/records' (for source customers) is not a Kafka topic name"),
    ('topic = "{prefix}{source}"', 'backend = "kafka"', "'prod.customers' (for source customers) is one of the "
                                                        "log's own topics"),
    ('timeout_s = 0', "", "sinks[1]: timeout_s must be > 0"),
])
def test_config_errors_name_the_sink_and_the_key(text, log, message):
    found = error(f'[log]\nbootstrap_servers = "k1:9092"\ntopic_prefix = "prod."\n{log}\n{SOURCES}'
                  f'[[sinks]]\nname = "events"\ntype = "kafka"\n{text}')
    assert message in found, found


def test_a_topic_named_like_a_log_topic_is_fine_on_another_cluster_or_for_sources_routed_elsewhere():
    text = 'topic = "{prefix}{source}"'
    other = kafka_sink(f'{text}\nbootstrap_servers = "elsewhere:9092"', log='backend = "kafka"')
    assert other.topic_of("customers") == "prod.customers"
    routed_elsewhere = load('[log]\nbackend = "kafka"\nbootstrap_servers = "k1:9092"\ntopic_prefix = "prod."\n'
                            + SOURCES.replace('name = "customers"\n', 'name = "customers"\nsinks = ["web"]\n')
                            + f'[[sinks]]\nname = "events"\ntype = "kafka"\n{text}\n')
    assert [spec.name for spec in routed_elsewhere.sinks] == ["web", "events"]


def test_the_readme_example_loads_with_every_key():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### The Kafka changelog sink", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    config = load(f'[log]\nbootstrap_servers = "k1:9092"\n{SOURCES}{example}', {"EVENTS_KAFKA_PASSWORD": "pw"})
    options = config.sink_spec("events").options
    documented = {line.split("=", 1)[0].strip() for line in example.splitlines() if "=" in line}
    assert set(type(options).__struct_fields__) <= documented | {"producer"}
    assert options.producer == {"sasl.password_env": "EVENTS_KAFKA_PASSWORD"}
    assert options.topic == "{prefix}{source}.records" and options.transactional is True


def test_the_printed_config_masks_the_sinks_librdkafka_secrets():
    config = load(f'[log]\nbootstrap_servers = "k1:9092"\n{SOURCES}[[sinks]]\nname = "events"\ntype = "kafka"\n'
                  '[sinks.producer]\n"ssl.key.pem" = "-----BEGIN PRIVATE KEY-----k"\n"sasl.password" = "pw"\n'
                  '"linger.ms" = 5\n')
    events = next(spec for spec in redacted(config)["sinks"] if spec["name"] == "events")
    assert events["producer"] == {"ssl.key.pem": "***", "sasl.password": "***", "linger.ms": 5}


def test_one_delivery_in_flight_at_most_so_versions_of_a_key_stay_in_order():
    assert kafka_sink().options.max_in_flight == 1
    found = error(f'[log]\nbootstrap_servers = "k1:9092"\n{SOURCES}[[sinks]]\nname = "events"\ntype = "kafka"\n'
                  'max_in_flight = 2\n')
    assert "sinks[1]: max_in_flight must be 1 for a Kafka sink" in found, found


def test_a_full_queue_that_does_not_drain_by_the_deadline_is_a_timeout_not_a_drop():
    """A real librdkafka producer with room for one message and no broker to send it to."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    producer = Producer({"bootstrap.servers": closed, "queue.buffering.max.messages": 1, "log_level": 0})

    async def scenario() -> float:
        await produce(producer, "t", b"first", b"k", on_delivery=lambda *_: None)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await produce(producer, "t", b"second", b"k", on_delivery=lambda *_: None, deadline=started + 0.3)
        return time.monotonic() - started

    waited_s = asyncio.run(scenario())
    assert 0.3 <= waited_s < 2.0
    producer.purge()
