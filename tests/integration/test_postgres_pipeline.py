"""End to end into PostgreSQL: demo upstream -> daemon -> a [[sinks]] postgres sink, with deletes, typed
columns and the server stopped mid-way. The backlog waits in the log while the server is down (nothing is
dead-lettered), and once it is back the tables hold exactly the upstream's live records (the upstream's
canonical checksum equals the one computed over the tables' data). And `conflux demo --sink postgres`."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from conflux.demo.demo_command import DSN_ENV
from conflux.demo.pg_tables import table_checksum
from tests.fixtures.daemon import source
from tests.fixtures.postgres import query, run_pg_local
from tests.support import conflux_argv, wait_until

COLLECTIONS = ("customers", "products")
TYPED = {"products": {"price": {"field": "price", "type": "numeric(12,2)"},
                      "stock": {"field": "stock", "type": "integer", "index": True}}}


def upstream_checksum(upstream_url: str, collection: str) -> tuple[str, int]:
    body = requests.get(f"{upstream_url}/api/{collection}/checksum", params={"canonical": "true"}, timeout=10).json()
    return body["checksum"], body["count"]


def converged(upstream_url: str, dsn: str) -> bool:
    return all(upstream_checksum(upstream_url, name) == table_checksum(dsn, "public", name) for name in COLLECTIONS)


def lag(daemon) -> int:
    return sum(row["lag"] or 0 for row in daemon.status()["partitions"])


@pytest.mark.slow
def test_upstream_to_postgres_with_deletes_and_an_outage(upstream_factory, daemon_factory, postgres_server_factory):
    server = postgres_server_factory()
    upstream = upstream_factory(customers=3000, products=2000, change_rate=40, delete_rate=8, delete_style="soft")
    # Cursor paging: page numbers drift while records change during the full sync (a changed record moves
    # to the end and the one after it slips back onto a page already read, until the next full sync).
    sources = [source(name, upstream.url, path=f"{name}/cursor", pagination="cursor", deleted="deleted",
                      poll_interval_s=0.5, page_size=500) for name in COLLECTIONS]
    daemon = daemon_factory(
        sources=sources, sink_url=None,
        sinks=[{"name": "warehouse", "type": "postgres", "dsn": server.dsn, "batch_size": 500, "timeout_s": 5.0,
                "columns": TYPED}],
        retry={"base_s": 0.05, "max_s": 0.5, "breaker_failures": 3, "breaker_cooldown_s": 0.5})
    wait_until(lambda: (table_checksum(server.dsn, "public", "products")[1] or 0) >= 1000, timeout_s=120,
               message="the full sync to reach PostgreSQL")

    server.stop()
    wait_until(lambda: daemon.status()["sinks"]["warehouse"]["circuit"] == "open", timeout_s=60,
               message="the warehouse breaker to open")
    backlog = wait_until(lambda: lag(daemon) if lag(daemon) > 0 else None, timeout_s=60,
                         message="changes to wait in the log while PostgreSQL is down")
    assert daemon.status()["sinks"]["warehouse"]["failing_s"] > 0
    server.start()

    # Hold the upstream still so that the two sides can meet.
    requests.post(f"{upstream.url}/admin/change-rate", json={"change_rate_per_s": 0}, timeout=10).raise_for_status()
    requests.post(f"{upstream.url}/admin/delete-rate", json={"delete_rate_per_s": 0}, timeout=10).raise_for_status()
    try:
        wait_until(lambda: converged(upstream.url, server.dsn), timeout_s=180, interval_s=0.5,
                   message="the tables to equal the upstream's live records")
    except AssertionError:
        sides = {name: (upstream_checksum(upstream.url, name), table_checksum(server.dsn, "public", name))
                 for name in COLLECTIONS}
        raise AssertionError(f"not converged (upstream, table): {sides}; backlog was {backlog}") from None

    stats = requests.get(f"{upstream.url}/stats", timeout=10).json()
    assert stats["collections"]["customers"]["soft_deleted"] > 0
    deleted = query(server.dsn, "SELECT count(*) FROM public.customers_deleted")[0][0]
    assert deleted == stats["collections"]["customers"]["soft_deleted"]  # every delete left its tombstone
    typed = query(server.dsn, "SELECT count(*) FROM public.products WHERE price = (data->>'price')::numeric "
                              "AND stock = (data->>'stock')::integer")[0][0]
    assert typed == upstream_checksum(upstream.url, "products")[1]
    assert not daemon.metric("conflux_dlq_records_total"), "an outage must never dead-letter records"
    deletes_applied = daemon.metric("conflux_sink_effects_total", sink="warehouse", source="customers",
                                    effect="deleted")
    assert deletes_applied >= deleted
    ledger = query(server.dsn, "SELECT count(DISTINCT batch_id), count(*) FROM public.conflux_batches")[0]
    assert ledger[0] == ledger[1] > 0


@pytest.mark.slow
def test_the_demo_starts_pg_local_without_a_dsn_and_prints_a_working_psql_line(tmp_path):
    """`conflux demo --sink postgres --once`: no DSN, so deploy/postgres/pg-local starts a server (in a state
    dir of the test's own here); the summary says the tables equal the upstream, and the printed psql line runs."""
    state_dir = Path(tempfile.mkdtemp(prefix="conflux-pg-demo-"))
    env = {**os.environ, "PG_STATE_DIR": str(state_dir)}
    env.pop(DSN_ENV, None)
    try:
        proc = subprocess.run(conflux_argv("demo", "--sink", "postgres", "--once", "--customers", "600",
                                           "--products", "400", "--dir", str(tmp_path / "demo")),
                              env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "checksums equal" in proc.stdout
        assert re.search(r"customers +upstream (\w+) \(600\) +sink \1 \(600\) +equal", proc.stdout)
        look = [line for line in proc.stdout.splitlines() if "look at them:" in line][-1]
        psql = subprocess.run(shlex.split(look.split("look at them:", 1)[1]), capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
        assert psql.returncode == 0 and "(5 rows)" in psql.stdout, psql.stdout + psql.stderr
    finally:
        run_pg_local("stop", state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
