"""`conflux dlq` against entries nobody expected: records nested too deep to decode, records that are
not objects, sources that left the config; and run on a machine that holds only the log's secrets."""

from __future__ import annotations

import json
import os
import subprocess

import msgspec
import requests

from conflux.config import load_config
from conflux.errors import ExitCode
from conflux.ipc.messages import DeadLetter
from conflux.log import open_log
from tests.fixtures.daemon import config_settings, source, wait_converged, write_config
from tests.support import REPO, conflux_argv, wait_until

DEEP = b'{"id": "deep", "nested": ' + b"[" * 3000 + b"]" * 3000 + b"}"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CONFLUX_", "DLQ_TEST_"))}
    return subprocess.run(conflux_argv(*args), capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**environ, **(env or {})})


def letter(entry_id: str, source_name: str, record: bytes, seen: float = 100.0) -> DeadLetter:
    return DeadLetter(id=entry_id, source=source_name, reason="why", stage="fetch", record=msgspec.Raw(record),
                      key=entry_id, origin="page 1", first_seen=seen, last_seen=seen)


def add_letters(config_path, entries: list[DeadLetter]) -> None:
    """Put entries in the config's DLQ, as the daemon would (this process may hold every secret)."""
    secrets = dict.fromkeys(["DLQ_TEST_WEBHOOK", "DLQ_TEST_UPSTREAM_TOKEN", "DLQ_TEST_SINK_TOKEN",
                             "DLQ_TEST_CONTROL"], "s")
    store = open_log(load_config(config_path, environ=secrets)).dead_letters()
    try:
        store.add(entries)
    finally:
        store.close()


def listed(config_path, env: dict[str, str] | None = None) -> list[dict]:
    out = cli("dlq", "list", "-c", str(config_path), "--json", env=env)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_dlq_list_and_show_a_record_nested_3000_levels_deep(tmp_path):
    """Before: RecursionError in `dlq list`, both in reading the entry and in printing its record."""
    config_path = write_config(tmp_path, config_settings(tmp_path, sources=[source("customers", "http://127.0.0.1:1")],
                                                         sink_url="http://127.0.0.1:1"))
    open_log(load_config(config_path)).prepare({"customers": 4})
    add_letters(config_path, [letter("deep", "customers", DEEP), letter("flat", "customers", b'{"a": 1}', 200.0)])

    entries = listed(config_path)
    assert [(e["id"], e["record"]) for e in entries] == [("deep", DEEP.decode()), ("flat", {"a": 1})]
    show = cli("dlq", "show", "-c", str(config_path), "deep")
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["record"] == DEEP.decode()


def test_dlq_commands_need_no_upstream_or_sink_secrets(tmp_path):
    """Before: `dlq list` exited 3 for want of the upstream's token, the sink's and the webhook secret."""
    sources = [source("customers", "http://127.0.0.1:1", webhook_secret_env="DLQ_TEST_WEBHOOK",
                      auth={"type": "bearer", "token_env": "DLQ_TEST_UPSTREAM_TOKEN"})]
    settings = config_settings(tmp_path, sources=sources, sink_url="http://127.0.0.1:1",
                               sink={"token_env": "DLQ_TEST_SINK_TOKEN"},
                               control={"token_env": "DLQ_TEST_CONTROL", "listen": "127.0.0.1:1"})
    config_path = write_config(tmp_path, settings)
    add_letters(config_path, [letter("a", "customers", b'{"a": 1}')])

    assert [e["id"] for e in listed(config_path)] == ["a"]
    assert cli("dlq", "show", "-c", str(config_path), "a").returncode == 0
    assert cli("dlq", "purge", "-c", str(config_path)).returncode == 2  # asks for --yes, as ever
    check = cli("config", "check", "-c", str(config_path))
    assert check.returncode == ExitCode.CONFIG_ERROR and "DLQ_TEST_WEBHOOK is not set" in check.stderr
    assert cli("config", "check", "-c", str(config_path), "--skip-secrets").returncode == 0
    status = cli("status", "-c", str(config_path))  # its one secret is the control token
    assert "DLQ_TEST_CONTROL" in status.stderr and "UPSTREAM" not in status.stderr
    status = cli("status", "-c", str(config_path), env={"DLQ_TEST_CONTROL": "t"})
    assert "config error" not in status.stderr and "cannot reach the daemon" in status.stderr


def test_dlq_on_kafka_still_needs_kafka_secrets(tmp_path):
    settings = config_settings(tmp_path, sources=[source("customers", "http://127.0.0.1:1")],
                               sink_url="http://127.0.0.1:1", sink={"token_env": "DLQ_TEST_SINK_TOKEN"})
    settings["log"] = {"backend": "kafka", "bootstrap_servers": "127.0.0.1:9"}
    settings["kafka"] = {"consumer": {"sasl.password_env": "DLQ_TEST_KAFKA_PASSWORD"}}
    config_path = write_config(tmp_path, settings)
    out = cli("dlq", "list", "-c", str(config_path))
    assert out.returncode == ExitCode.CONFIG_ERROR
    assert "kafka.consumer.sasl.password_env: environment variable DLQ_TEST_KAFKA_PASSWORD is not set" in out.stderr
    assert "SINK" not in out.stderr
    # A secret file is checked as early, not met as a traceback when the first client is made.
    settings["kafka"] = {"admin": {"ssl.key.password_file": str(tmp_path / "missing")}}
    out = cli("dlq", "list", "-c", str(write_config(tmp_path, settings)))
    assert out.returncode == ExitCode.CONFIG_ERROR and "Traceback" not in out.stderr
    assert f"kafka.admin.ssl.key.password_file: file '{tmp_path / 'missing'}' does not exist" in out.stderr


def test_dlq_replay_skips_what_it_cannot_replay_and_replays_the_rest(upstream_factory, analytics, daemon_factory):
    """Before: the first non-object entry ended the replay with a traceback; nothing after it went."""
    upstream = upstream_factory(customers=50, products=0)
    daemon = daemon_factory(sources=[source("customers", upstream.url)], sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, {"customers": "customers"}, timeout_s=60)
    good = [letter(f"good-{i}", "customers", json.dumps({"id": f"replayed-{i}", "updated_at": "2024-05-01T00:00:00Z",
                                                         "name": f"n{i}"}).encode(), 100.0 + i) for i in range(2)]
    bad = [letter("number", "customers", b"5", 50.0), letter("gone", "vanished", b'{"id": "x"}', 60.0),
           letter("text", "customers", b'"a string"', 70.0), letter("deep", "customers", DEEP, 80.0)]
    add_letters(daemon.config_path, [*bad, *good])

    out = cli("dlq", "replay", "-c", str(daemon.config_path), "--timeout", "60")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["entries"] == 6 and report["replayed"] == 2 and report["delivered"] == 2
    # The deep record can be read now (cut out of its body without recursion), so it is checked like any
    # record, found still invalid, and stays in the DLQ with that reason; the others cannot even be read.
    assert report["skipped"] == 3 and report["skipped_ids"] == ["gone", "number", "text"]
    assert report["still_invalid"] == 1
    for entry_id in report["skipped_ids"]:
        assert f"skipped dead letter {entry_id}: " in out.stderr
    assert "no longer in the config" in out.stderr

    for i in range(2):
        wait_until(lambda i=i: requests.get(f"{analytics.url}/records/customers/replayed-{i}", timeout=10).ok,
                   timeout_s=30, message=f"replayed-{i} in the sink")
    assert sorted(e["id"] for e in listed(daemon.config_path)) == ["deep", "gone", "number", "text"]
