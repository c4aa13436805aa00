"""`[daemon] log_format = "json"` on a real daemon: every line the supervisor and its workers log is one
JSON object carrying the process's role and pid, and each processed log message gets a line with its
message id, record count and elapsed time."""

from __future__ import annotations

import json
from collections import Counter

from tests.fixtures.daemon import source, wait_converged
from tests.integration.test_metrics import scrape, value

COUNTS = {"customers": 400, "products": 300}
ANNOUNCEMENT = "conflux listening on http://"  # stdout, for whoever started the daemon; not a log line


def test_json_logs_carry_role_and_pid_and_a_line_per_processed_message(upstream_factory, analytics,
                                                                       daemon_factory):
    upstream = upstream_factory(**COUNTS)
    daemon = daemon_factory(sources=[source(name, upstream.url, page_size=100) for name in COUNTS],
                            sink_url=analytics.url, daemon={"log_format": "json"})
    wait_converged(upstream.url, analytics.url, {name: name for name in COUNTS}, timeout_s=60)
    pids = {worker["name"]: worker["pid"] for worker in daemon.status()["workers"]} | {"supervisor": daemon.pid}
    processed = {name: value(scrape(daemon.url), "conflux_messages_processed_total", topic=name) for name in COUNTS}
    assert daemon.stop() == 0, daemon.log()[-3000:]

    lines = [line for line in daemon.log().splitlines() if line and not line.startswith(ANNOUNCEMENT)]
    entries = []
    for line in lines:
        entry = json.loads(line)  # fails the test on any line that is not one JSON object
        assert isinstance(entry, dict) and {"ts", "level", "role", "pid", "logger", "msg"} <= set(entry), line
        entries.append(entry)
    for entry in entries:
        assert entry["pid"] == pids[entry["role"]], entry  # each process's own role and pid
    assert {"supervisor", "fetcher-0", "consumer-0", "consumer-1"} <= {entry["role"] for entry in entries}

    messages = [entry for entry in entries if "message_id" in entry]
    assert messages and all(entry["level"] == "info" and entry["role"].startswith("consumer-") for entry in messages)
    assert all(isinstance(entry["elapsed_ms"], float) and entry["elapsed_ms"] >= 0 for entry in messages)
    # A message read twice (a rewind re-reads what was acked but not yet committed) is logged twice,
    # as it is counted twice: one line per processing, and every record in some message.
    assert Counter(entry["topic"] for entry in messages) == processed
    records = Counter()
    for entry in {entry["message_id"]: entry for entry in messages}.values():
        records[entry["topic"]] += entry["records"]
    assert records == COUNTS
