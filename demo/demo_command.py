"""`conflux demo`: the whole pipeline on the embedded log, in one command.

Starts the demo upstream, the analytics sink and the daemon in a temporary directory, shows the
full sync's progress (records/s per source), and ends with a summary: records synced, time, rate,
and whether the sink's checksums equal the upstream's. Without ``--once`` it keeps running with the
upstream changing records every second (polled and pushed through signed webhooks) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

COLLECTIONS = {"customers": "id", "products": "sku"}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="stop after the first full sync and its summary")
    parser.add_argument("--customers", type=int, default=10_000, help="customers in the demo CRM (default 10000)")
    parser.add_argument("--products", type=int, default=10_000, help="products in the demo inventory (default 10000)")
    parser.add_argument("--change-rate", type=float, default=20.0,
                        help="records changed per second after the full sync, without --once (default 20)")
    parser.add_argument("--dir", help="keep the demo's files here instead of a temporary directory")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on the full sync after this many s")


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
        sink = world.add(start("analytics", ["analytics", "--port", "0", "--db", str(directory / "analytics.db")],
                               directory / "analytics.log"))
        config = directory / "conflux.toml"
        config.write_text(config_toml(directory, upstream_url=upstream.url, sink_url=sink.url, collections=COLLECTIONS,
                                      control_listen=f"127.0.0.1:{control_port}",
                                      webhook_secret="" if args.once else secret))
        print(f"  upstream  {upstream.url}   (try {upstream.url}/api/customers?page=1&size=5)")
        print(f"  analytics {sink.url}   ({sink.url}/stats)")
        started = time.monotonic()
        daemon = world.add(start("daemon", ["run", "-c", str(config)], directory / "conflux.log"))
        print(f"  conflux   {daemon.url}   (status page {daemon.url}/, {daemon.url}/metrics)\n")
        ok = _follow_full_sync(world, {"customers": args.customers, "products": args.products}, started,
                               args.timeout, stop)
        if args.once or not ok:
            return 0 if ok else 1
        _live(world, upstream.url, args.change_rate, stop)
        return 0
    finally:
        codes = world.close()
        if codes.get("daemon") not in (None, 0):
            print(f"conflux demo: the daemon exited with {codes['daemon']}; see {directory / 'conflux.log'}",
                  file=sys.stderr)


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
