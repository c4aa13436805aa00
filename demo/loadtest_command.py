"""`conflux loadtest`: the old system's load tool, against a running deployment.

    conflux loadtest --mode throughput --target 10000 --duration 5m
    conflux loadtest --mode burst --records 1000 --concurrency 10

Throughput mode creates and updates records through the upstream at a steady target rate (records
per hour), then reports the rate achieved and how many of those changes reached the sink. Burst mode
drives changes as fast as ``--concurrency`` threads can and reports response times and success rate.
Each prints a readable report; ``--json FILE`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import requests


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("throughput", "burst"), default="throughput")
    parser.add_argument("--target", type=float, default=10_000, help="throughput mode: records per hour (10000)")
    parser.add_argument("--duration", default="5m", help="throughput mode: how long, e.g. 300, 30s, 5m, 1h (5m)")
    parser.add_argument("--records", type=int, default=1000, help="burst mode: changes to make (1000)")
    parser.add_argument("--concurrency", type=int, default=10, help="burst mode: threads (10)")
    parser.add_argument("--upstream", default="http://127.0.0.1:8081", help="demo upstream URL")
    parser.add_argument("--sink", default="http://127.0.0.1:8082", help="analytics sink URL")
    parser.add_argument("--collection", default="customers", help="collection to change (customers)")
    parser.add_argument("--grace", default="60s", help="how long to wait for changes to reach the sink (60s)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")


def parse_duration_s(text: str) -> float:
    """'300' / '30s' / '5m' / '1h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


class Change(msgspec.Struct):
    key: str
    updated_at: str
    sent_at: float
    status: int
    seconds: float


def _change(http: requests.Session, upstream: str, collection: str, key_pool: list[str], rng: random.Random) -> Change:
    started = time.time()
    create = not key_pool or rng.random() < 0.3
    try:
        if create:
            response = http.post(f"{upstream}/api/{collection}", json={"name": "loadtest", "tier": "bronze",
                                                                       "email": "load@example.com"}, timeout=30)
        else:
            key = rng.choice(key_pool)
            response = http.put(f"{upstream}/api/{collection}/{key}", json={"tier": f"load-{rng.randint(0, 9)}"},
                                timeout=30)
    except requests.RequestException:
        return Change("", "", started, 0, time.time() - started)
    body = response.json() if response.ok else {}
    key_field = "sku" if collection == "products" else "id"
    key = str(body.get(key_field, ""))
    if create and key:
        key_pool.append(key)
    return Change(key, body.get("updated_at", ""), started, response.status_code, time.time() - started)


def _keys(upstream: str, collection: str) -> list[str]:
    body = requests.get(f"{upstream}/api/{collection}", params={"page": 1, "size": 200}, timeout=30).json()
    field = "sku" if collection == "products" else "id"
    return [str(record[field]) for record in body["data"] if field in record]


def _throughput(args) -> tuple[list[Change], float]:
    duration_s = parse_duration_s(args.duration)
    interval_s = 3600.0 / args.target
    keys, rng, changes = _keys(args.upstream, args.collection), random.Random(7), []
    started = time.monotonic()
    with requests.Session() as http:
        next_at = started
        while time.monotonic() - started < duration_s:
            changes.append(_change(http, args.upstream, args.collection, keys, rng))
            next_at += interval_s
            time.sleep(max(0.0, next_at - time.monotonic()))  # pacing the load is the point of this mode
    return changes, time.monotonic() - started


def _burst(args) -> tuple[list[Change], float]:
    keys, lock = _keys(args.upstream, args.collection), threading.Lock()
    local = threading.local()

    def one(index: int) -> Change:
        if not hasattr(local, "http"):
            local.http = requests.Session()
        with lock:
            pool = keys
        return _change(local.http, args.upstream, args.collection, pool, random.Random(index))

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        changes = list(pool.map(one, range(args.records)))
    return changes, time.monotonic() - started


def _reached_sink(args, changes: list[Change]) -> tuple[int, list[float]]:
    """How many changed keys show (at least) their new updated_at at the sink; and their delays."""
    latest: dict[str, Change] = {}
    for change in changes:
        if change.key and 200 <= change.status < 300:
            latest[change.key] = change
    deadline, reached, delays = time.monotonic() + parse_duration_s(args.grace), {}, []
    while time.monotonic() < deadline and len(reached) < len(latest):
        for key, change in latest.items():
            if key in reached:
                continue
            response = requests.get(f"{args.sink}/records/{args.collection}/{key}", timeout=30)
            if response.ok and response.json().get("updated_at", "") >= change.updated_at:
                reached[key] = time.time()
                delays.append(reached[key] - change.sent_at)
        if len(reached) < len(latest):
            time.sleep(0.5)  # polling the sink: there is no event to wait on across processes
    return len(reached), delays


def _percentile(values: list[float], fraction: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000, 1) if ordered else None


def run(args: argparse.Namespace) -> int:
    changes, elapsed_s = _throughput(args) if args.mode == "throughput" else _burst(args)
    ok = [c for c in changes if 200 <= c.status < 300]
    reached, delays = _reached_sink(args, changes)
    seconds = [c.seconds for c in changes]
    report = {
        "mode": args.mode, "changes": len(changes), "succeeded": len(ok),
        "success_rate": round(len(ok) / len(changes), 4) if changes else None,
        "elapsed_s": round(elapsed_s, 2), "achieved_per_hour": round(len(ok) / elapsed_s * 3600) if elapsed_s else 0,
        "target_per_hour": args.target if args.mode == "throughput" else None,
        "distinct_keys_changed": len({c.key for c in ok}), "reached_sink": reached,
        "response_ms": {"p50": _percentile(seconds, 0.5), "p95": _percentile(seconds, 0.95),
                        "p99": _percentile(seconds, 0.99), "max": _percentile(seconds, 1.0)},
        "upstream_to_sink_ms": {"p50": _percentile(delays, 0.5), "p99": _percentile(delays, 0.99)},
    }
    _print(report)
    if args.json:
        with open(args.json, "wb") as handle:
            handle.write(msgspec.json.format(msgspec.json.encode(report)))
    return 0 if report["succeeded"] and reached == report["distinct_keys_changed"] else 1


def _print(report: dict) -> None:
    print(f"conflux loadtest ({report['mode']})")
    for key, value in report.items():
        if key != "mode":
            print(f"  {key:24s} {value}")
    sys.stdout.flush()
