"""Ingest throughput of the demo analytics sink: 200 batches x 1000 records over real HTTP.

Bodies are built before the clock starts; a few client threads keep requests in flight, as Conflux's
mergers do. Prints records/s by wall clock and per CPU-second of the sink process (the client shares
the machine, so the second figure is the sink's own cost). Run on its own to see the figures:
``.venv/bin/pytest -m slow -s tests/integration/test_analytics_throughput.py``.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.fixtures.analytics import batch_body, sink_record

BATCHES = 200
RECORDS_PER_BATCH = 1000
CLIENT_THREADS = 3
DATA = b'{"id":"%s","name":"Customer %d","email":"c%d@example.com","balance":%d.25,"tags":["a","b"]}'
MIN_RECORDS_PER_S = 50_000  # generous: a loaded CI box must pass; the figures printed are what matter


def bodies() -> list[tuple[str, bytes]]:
    built = []
    for b in range(BATCHES):
        records = []
        for i in range(RECORDS_PER_BATCH):
            # 150k keys, so later batches update earlier records (replace, not only insert).
            key = f"cust-{(b * RECORDS_PER_BATCH + i) % 150_000:07d}"
            data = DATA % (key.encode(), i, i, i)
            updated_at = f"2024-05-01T12:{b // 60:02d}:{b % 60:02d}.{i:06d}Z"
            records.append(sink_record(key, data, updated_at=updated_at))
        batch_id = f"throughput-{b:04d}"
        built.append((batch_id, batch_body(batch_id, records)))
    return built


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post_all(url: str, work: list[tuple[str, bytes]]) -> None:
    sessions = [requests.Session() for _ in range(CLIENT_THREADS)]

    def post(item: tuple[int, tuple[str, bytes]]) -> int:
        n, (batch_id, body) = item
        response = sessions[n % CLIENT_THREADS].post(
            f"{url}/ingest", data=body, timeout=60,
            headers={"Idempotency-Key": batch_id, "Content-Type": "application/json"})
        return response.status_code

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        statuses = list(pool.map(post, enumerate(work)))
    assert set(statuses) == {200}


@pytest.mark.slow
@pytest.mark.parametrize("db", ["memory", "file"])
def test_ingest_throughput(analytics_factory, tmp_path, record_property, db):
    work = bodies()
    sink = analytics_factory(db=tmp_path / "sink.db" if db == "file" else None)
    cpu_before, started = cpu_seconds(sink.proc.pid), time.perf_counter()
    post_all(sink.url, work)
    wall_s, cpu_s = time.perf_counter() - started, cpu_seconds(sink.proc.pid) - cpu_before
    total = BATCHES * RECORDS_PER_BATCH
    stats = requests.get(f"{sink.url}/stats", timeout=10).json()
    assert stats["batches"] == BATCHES and stats["records_applied"] + stats["records_ignored_stale"] == total

    per_s, per_cpu_s = total / wall_s, total / max(cpu_s, 1e-3)
    record_property("records_per_s", round(per_s))
    record_property("records_per_sink_cpu_s", round(per_cpu_s))
    print(f"\nanalytics ingest ({db} db): {total} records in {wall_s:.2f} s = {per_s:,.0f} records/s; "
          f"sink CPU {cpu_s:.2f} s = {per_cpu_s:,.0f} records per CPU-second")
    assert per_s >= MIN_RECORDS_PER_S
