"""daemon.logs: one JSON object per line (or readable text), every line tagged with role and pid, secrets
blanked out. The daemon-level check (a real daemon's whole stderr in JSON) is in
tests/integration/test_control_logs.py."""

from __future__ import annotations

import json
import logging
import os

import pytest

from conflux import logs


@pytest.fixture(autouse=True)
def restore_logging():
    """logs.setup() replaces the root handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)


@pytest.fixture
def stderr(capsys):
    """Reads what this test's logging wrote (logs.setup() must be called inside the test)."""
    return lambda: capsys.readouterr().err


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_json_format_is_one_object_per_line_with_role_pid_and_structured_fields(stderr):
    logs.setup("consumer-1", fmt="json")
    log = logging.getLogger("workers.consumer")
    log.info("message %s: %d records", "m-1", 500, extra={"message_id": "m-1", "records": 500, "elapsed_ms": 1.25})
    log.warning("two\nlines")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    lines = json_lines(stderr())
    assert len(lines) == 3  # newlines inside messages and tracebacks stay inside their JSON strings
    assert all(line["role"] == "consumer-1" and line["pid"] == os.getpid() for line in lines)
    first = lines[0]
    assert first["level"] == "info" and first["logger"] == "workers.consumer"
    assert first["msg"] == "message m-1: 500 records"
    assert (first["message_id"], first["records"], first["elapsed_ms"]) == ("m-1", 500, 1.25)
    assert first["ts"].endswith("Z")
    assert lines[1]["msg"] == "two\nlines"
    assert "RuntimeError: boom" in lines[2]["exc"]


def test_text_format_names_role_and_pid(stderr):
    logs.setup("merger-0", fmt="text")
    logging.getLogger("workers.merger").info("flushed %d", 3)
    line = stderr().strip()
    assert f"merger-0[{os.getpid()}]" in line
    assert line.endswith("workers.merger: flushed 3")


def test_level_filters_lines(stderr):
    logs.setup("fetcher-0", fmt="json", level="warning")
    logging.getLogger("x").info("hidden")
    logging.getLogger("x").warning("shown")
    assert [line["msg"] for line in json_lines(stderr())] == ["shown"]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secrets_are_blanked_in_every_format(stderr, fmt):
    logs.setup("control-0", fmt=fmt, secrets=["hunter2-token"])
    logging.getLogger("x").info("token is %s", "hunter2-token", extra={"header": "Bearer hunter2-token"})
    out = stderr()
    assert "hunter2-token" not in out and "***" in out


def test_pid_is_the_processs_own_after_fork(tmp_path, monkeypatch):
    """The supervisor sets logging up before it forks; a child's lines must carry the child's pid."""
    path = tmp_path / "log.jsonl"
    with path.open("w") as stream:
        monkeypatch.setattr("sys.stderr", stream)
        logs.setup("supervisor", fmt="json")
        pid = os.fork()
        if pid == 0:  # the child: log one line and leave without running pytest's teardown
            try:
                logging.getLogger("child").info("from the child")
                stream.flush()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        logging.getLogger("parent").info("from the parent")
        stream.flush()
    assert os.waitstatus_to_exitcode(status) == 0
    pids = {line["msg"]: line["pid"] for line in json_lines(path.read_text())}
    assert pids == {"from the child": pid, "from the parent": os.getpid()}


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_every_secret_bearing_form_is_redacted_in_every_format(stderr, fmt):
    """Not only values the config names: URLs with userinfo or ?api_key=, secret headers, Kafka keys and
    PEM blocks are masked in whatever line quotes them (an aiohttp error, a repr of headers)."""
    pem = "-----BEGIN PRIVATE KEY-----\nMII-pem-body\n-----END PRIVATE KEY-----"
    logs.setup("fetcher-0", fmt=fmt, secrets=[pem])
    log = logging.getLogger("x")
    log.warning("giving up on %s", "https://bob:pw-userinfo@crm.example/api?api_key=k-query&page=2")
    log.warning("request headers %s", {"Cookie": "sid=c-cookie", "X-Signature-Key": "k-signature", "Accept": "json"})
    log.warning("librdkafka: ssl.key.password=k-keypass sasl.password=k-sasl")
    log.warning("loaded %s", pem)
    log.warning("got", extra={"api_key": "k-extra", "records": 5})
    out = stderr()
    for secret in ("pw-userinfo", "k-query", "c-cookie", "k-signature", "k-keypass", "k-sasl", "MII-pem-body",
                   "k-extra"):
        assert secret not in out, secret
    assert "https://***@crm.example/api?api_key=***&page=2" in out and "'Accept': 'json'" in out
