"""`conflux demo`: the whole pipeline on the embedded log, in one command.

Starts the demo upstream, the analytics sink and the daemon in a temporary directory, shows the
full sync's progress (records/s per source), and ends with a summary: records synced, time, rate,
and whether the sink's checksums equal the upstream's. Without ``--once`` it keeps running with the
upstream changing records every second (polled and pushed through signed webhooks) until Ctrl-C.
``--sink postgres`` delivers into PostgreSQL tables instead (``--dsn``, or a server of
deploy/postgres/pg-local started for the demo) and prints the psql line to look at them.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLLECTIONS = {"customers": "id", "products": "sku"}
PG_LOCAL = Path(__file__).resolve().parent.parent / "deploy" / "postgres" / "pg-local"
DSN_ENV = "CONFLUX_DEMO_POSTGRES_DSN"  # the daemon reads the DSN from here: a password never lands in the file


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="stop after the first full sync and its summary")
    parser.add_argument("--customers", type=int, default=10_000, help="customers in the demo CRM (default 10000)")
    parser.add_argument("--products", type=int, default=10_000, help="products in the demo inventory (default 10000)")
    parser.add_argument("--change-rate", type=float, default=20.0,
                        help="records changed per second after the full sync, without --once (default 20)")
    parser.add_argument("--dir", help="keep the demo's files here instead of a temporary directory")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on the full sync after this many s")
    parser.add_argument("--sink", choices=("analytics", "postgres"), default="analytics",
                        help="where the records go: the demo analytics sink (default) or PostgreSQL tables")
    parser.add_argument("--dsn", default=os.environ.get(DSN_ENV, ""),
                        help=f"with --sink postgres: the server (default ${DSN_ENV}; without one, "
                             "deploy/postgres/pg-local start runs a local server, left running afterwards)")
    parser.add_argument("--pg-schema", default="conflux_demo",
                        help="with --sink postgres: the demo's own schema, emptied at start (default conflux_demo)")


def run(args: argparse.Namespace) -> int:
    from conflux.demo.world import World, config_toml, free_port, start

    directory = Path(args.dir or tempfile.mkdtemp(prefix="conflux-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    world = World(directory)
    stop = _install_interrupt()
    try:
        secret = secrets.token_hex(16)
        control_port = free_port()
        change_args = [] if args.once else ["--webhook-url", f"http://127.0.0.1:{control_port}/webhook/{{collection}}",
                                            "--webhook-secret", secret]
        print(f"conflux demo: files in {directory}")
        upstream = world.add(start("upstream", ["upstream", "--port", "0", "--customers", str(args.customers),
                                                "--products", str(args.products), *change_args],
                                   directory / "upstream.log"))
        print(f"  upstream  {upstream.url}   (try {upstream.url}/api/customers?page=1&size=5)")
        sink_url, sinks_toml, env = _sink(args, world, directory)
        config = directory / "conflux.toml"
        config.write_text(config_toml(directory, upstream_url=upstream.url, sink_url=sink_url, collections=COLLECTIONS,
                                      control_listen=f"127.0.0.1:{control_port}",
                                      webhook_secret="" if args.once else secret, sinks_toml=sinks_toml))
        started = time.monotonic()
        daemon = world.add(start("daemon", ["run", "-c", str(config)], directory / "conflux.log", env=env))
        print(f"  conflux   {daemon.url}   (status page {daemon.url}/, {daemon.url}/metrics)\n")
        ok = _follow_full_sync(world, {"customers": args.customers, "products": args.products}, started,
                               args.timeout, stop)
        if world.postgres is not None:
            print(f"  {_look(world.postgres)}")
        if args.once or not ok:
            return 0 if ok else 1
        _live(world, upstream.url, args.change_rate, stop)
        return 0
    finally:
        codes = world.close()
        if codes.get("daemon") not in (None, 0):
            print(f"conflux demo: the daemon exited with {codes['daemon']}; see {directory / 'conflux.log'}",
                  file=sys.stderr)


def _sink(args: argparse.Namespace, world, directory: Path) -> tuple[str, str, dict[str, str]]:
    """Start the chosen sink: (the analytics URL, or "", the [[sinks]] TOML, or "", the daemon's env)."""
    from conflux.demo.world import start

    if args.sink == "analytics":
        sink = world.add(start("analytics", ["analytics", "--port", "0", "--db", str(directory / "analytics.db")],
                               directory / "analytics.log"))
        print(f"  analytics {sink.url}   ({sink.url}/stats)")
        return sink.url, "", {}
    from conflux.demo.world import PostgresTarget

    dsn = args.dsn or _start_pg_local()
    _empty_schema(dsn, args.pg_schema)
    world.postgres = PostgresTarget(dsn, args.pg_schema)
    print(f"  postgres  {_shown(dsn)}   tables {args.pg_schema}.customers, {args.pg_schema}.products")
    print(f"            {_look(world.postgres)}")
    sinks_toml = (f'[[sinks]]\nname = "warehouse"\ntype = "postgres"\ndsn_env = "{DSN_ENV}"\n'
                  f'schema = "{args.pg_schema}"\n')
    return "", sinks_toml, {DSN_ENV: dsn}


def _look(target) -> str:
    return (f"look at them: {_psql()} '{_shown(target.dsn)}' -c 'SELECT key, updated_at, data FROM "
            f"{target.schema}.customers ORDER BY updated_at DESC LIMIT 5'")


def _start_pg_local() -> str:
    """The DSN of deploy/postgres/pg-local's server, started if it is not running (and left running, so the
    tables can still be looked at after the demo)."""
    if not PG_LOCAL.exists():
        raise SystemExit("conflux demo: no --dsn, and deploy/postgres/pg-local is not here (run the demo from a "
                         f"checkout, or give --dsn or ${DSN_ENV})")
    print("  postgres  starting deploy/postgres/pg-local (stop it with: deploy/postgres/pg-local stop)")
    result = subprocess.run([str(PG_LOCAL), "start"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise SystemExit(f"conflux demo: pg-local could not start PostgreSQL:\n{result.stderr[-2000:]}")
    return lines[-1]


def _empty_schema(dsn: str, schema: str) -> None:
    """The demo's schema, emptied: the tables of an earlier run hold versions of another log."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))


def _shown(dsn: str) -> str:
    """The DSN as printed: a password masked (in user:password@ or a password= pair), the rest usable."""
    dsn = re.sub(r"(://[^:/@?]*:)[^@/?]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)[^\s&]+", r"\1***", dsn)


def _psql() -> str:
    """psql as the user can run it: on PATH (Debian's postgresql-client), else the server package's own."""
    if shutil.which("psql"):
        return "psql"
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))
    return str(found[-1]) if found else "psql"


def _install_interrupt() -> dict[str, bool]:
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return flag


def _follow_full_sync(world, expected: dict[str, int], started: float, timeout_s: float, stop) -> bool:
    """Print progress once a second until every source is complete and the checksums agree."""
    previous, previous_at = {name: 0 for name in expected}, time.monotonic()
    while not stop["stop"] and time.monotonic() - started < timeout_s:
        time.sleep(0.5)
        counts, now = world.sink_counts(), time.monotonic()
        rates = {n: (counts.get(n, 0) - previous[n]) / max(now - previous_at, 1e-6) for n in expected}
        line = "   ".join(f"{n} {counts.get(n, 0):>9,}/{expected[n]:,} {rates[n]:>9,.0f} rec/s" for n in expected)
        print(f"\r  {now - started:6.1f}s  {line}", end="", flush=True)
        previous, previous_at = {n: counts.get(n, 0) for n in expected}, now
        if all(counts.get(n, 0) >= expected[n] for n in expected):
            upstream, sink = world.checksums(list(expected))
            if upstream == sink:
                return _summary(expected, time.monotonic() - started, upstream, sink)
    upstream, sink = world.checksums(list(expected))
    print()
    return _summary(expected, time.monotonic() - started, upstream, sink)


def _summary(expected: dict[str, int], elapsed_s: float, upstream: dict, sink: dict) -> bool:
    total = sum(count for _, count in sink.values() if count)
    equal = upstream == sink
    print("\n")
    print(f"  synced {total:,} records in {elapsed_s:.2f} s ({total / elapsed_s:,.0f} records/s), "
          "counted from the daemon's start")
    for name in expected:
        mark = "equal" if upstream[name] == sink[name] else "DIFFERENT"
        print(f"  {name:10s} upstream {upstream[name][0]} ({upstream[name][1]:,})   "
              f"sink {sink[name][0]} ({(sink[name][1] or 0):,})   {mark}")
    print(f"\n  checksums {'equal: the sink holds exactly what the upstream holds' if equal else 'differ'}")
    return equal


def _live(world, upstream_url: str, change_rate: float, stop) -> None:
    """Keep the upstream changing and show that the sink follows, until Ctrl-C."""
    import requests

    requests.post(f"{upstream_url}/admin/change-rate", json={"change_rate_per_s": change_rate}, timeout=10)
    print(f"\n  live: the upstream changes {change_rate:g} records/s (webhooks + polling). Ctrl-C to stop.\n")
    while not stop["stop"]:
        time.sleep(2)
        upstream, sink = world.checksums(list(COLLECTIONS))
        state = "in sync" if upstream == sink else "catching up"
        counts = ", ".join(f"{name} {sink[name][1] or 0:,}" for name in COLLECTIONS)
        print(f"  {time.strftime('%H:%M:%S')}  {counts}  {state}", flush=True)
    print("\n  stopping (the daemon drains and commits first)")
