"""`conflux bench`: the end-to-end benchmark, with its limit and its old-style baseline in the same run.

    conflux bench --records 1000000 --backend embedded,kafka [--shaping] [--deletes] [--json]

Starts the demo upstream and analytics sink, measures the limit (bench_limit) and the old-style
baseline (bench_baseline) on the same pages, then for each backend starts the daemon and measures:
export_s (daemon up -> sink checksum equals the upstream's), records_per_s, the ratio to the limit
and to the baseline, peak RSS of the daemon's process tree, CPU-seconds per million records, and the
webhook-to-sink delay (p50/p99) under a steady change load. Writes an SVG chart of throughput per
stage over time. Machines are noisy: compare ratios within one run, not absolute rates across runs.

On the first backend, ``--deletes`` adds a delete-heavy run (demo/bench_deletes.py: 10% of the records
deleted, half soft and half hard, found by markers and reconcile) and ``--shaping`` a run with records
shaped on the way (demo/bench_shaping.py: nested key, epoch timestamp, select and rename), each
reported with its throughput as a fraction of the plain run's.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

REPO = Path(__file__).resolve().parent.parent
KEYS = {"customers": "id", "products": "sku"}
# The replaced system's own report: 10,000 products exported in 30-45 s (37.5 s taken as its rate).
OLD_SYSTEM_RECORDS_PER_S = round(10_000 / 37.5)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", type=int, default=1_000_000, help="records to sync (default 1000000)")
    parser.add_argument("--backend", default="embedded", help="embedded, kafka, or both: embedded,kafka")
    parser.add_argument("--collections", default="customers,products", help="demo collections to sync")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--consumers", type=int, default=None, help="consumer processes (default: config default)")
    parser.add_argument("--mergers", type=int, default=None, help="merger processes (default: config default)")
    parser.add_argument("--partitions", type=int, default=4, help="log partitions per topic (default 4)")
    parser.add_argument("--page-size", type=int, default=1000, help="upstream page size (default 1000)")
    parser.add_argument("--changes-per-s", type=float, default=5000.0,
                        help="steady change load for the webhook delay phase (default 5000; 0 skips it)")
    parser.add_argument("--change-seconds", type=float, default=10.0, help="length of that phase (default 10)")
    parser.add_argument("--baseline-records", type=int, default=50_000,
                        help="records for the old-style baseline (default 50000; 0 skips it)")
    parser.add_argument("--bootstrap", default=os.environ.get("CONFLUX_TEST_KAFKA", ""),
                        help="Kafka bootstrap servers (default $CONFLUX_TEST_KAFKA, else a broker is started)")
    parser.add_argument("--shaping", action="store_true",
                        help="also export nested, epoch-stamped records with select and rename (bench_shaping)")
    parser.add_argument("--deletes", action="store_true",
                        help="also run a delete-heavy export: 10%% deleted, half soft, half hard (bench_deletes)")
    parser.add_argument("--out", default=str(REPO / "bench" / "out"), help="directory for the chart and JSON")


def run(args: argparse.Namespace) -> int:
    from conflux.demo.bench_baseline import measure_baseline
    from conflux.demo.bench_limit import measure_limit
    from conflux.demo.world import World, free_port, start

    collections = {name: KEYS.get(name, "id") for name in args.collections.split(",")}
    directory = Path(tempfile.mkdtemp(prefix="conflux-bench-"))
    world = World(directory)
    kafka = _Kafka(args.bootstrap) if "kafka" in args.backend else None
    control_port, secret = free_port(), secrets.token_hex(16)
    try:
        counts = _split(args.records, list(collections))
        count_flags = [arg for name in collections for arg in _count_flag(name, counts[name])]
        upstream = world.add(start("upstream", [
            "upstream", "--port", "0", "--timestamp-precision", "us", "--seed", "7", *count_flags,
            "--webhook-url", f"http://127.0.0.1:{control_port}/webhook/{{collection}}", "--webhook-secret", secret],
            directory / "upstream.log", timeout_s=300))
        _say(args, f"upstream ready with {args.records:,} records; measuring the limit")
        limit = measure_limit(upstream.url, collections, page_size=args.page_size)
        baseline = _baseline(args, directory, upstream.url, collections, measure_baseline, start)
        results = {}
        for backend in args.backend.split(","):
            _say(args, f"end to end on the {backend} log")
            results[backend] = _run_backend(args, backend, world, directory, collections, control_port, secret,
                                            limit, baseline, kafka)
        extra = _extra_runs(args, world, directory, collections, count_flags, results, kafka, start)
        return _report(args, results, extra)
    finally:
        world.close()
        if kafka is not None:
            kafka.close()


def _split(total: int, names: list[str]) -> dict[str, int]:
    share = total // len(names)
    return {name: share + (total - share * len(names) if index == 0 else 0) for index, name in enumerate(names)}


def _count_flag(name: str, count: int) -> list[str]:
    if name in ("customers", "products"):
        return [f"--{name}", str(count)]
    return []


def _baseline(args, directory: Path, upstream_url: str, collections: dict, measure, start) -> dict | None:
    if args.baseline_records <= 0:
        return None
    _say(args, f"measuring the old-style baseline on {args.baseline_records:,} records")
    sink = start("baseline-sink", ["analytics", "--port", "0"], directory / "baseline-sink.log")
    try:
        return measure(upstream_url, sink.url, collections, min(args.baseline_records, args.records))
    finally:
        sink.stop()


def _log_settings(args, backend: str, kafka) -> dict:
    """The [log] table of one daemon: on Kafka, topics and a group of its own."""
    log_settings = {"backend": backend, "partitions": args.partitions}
    if backend == "kafka":
        tag = secrets.token_hex(4)
        log_settings.update(bootstrap_servers=kafka.bootstrap(), group=f"bench-{tag}", topic_prefix=f"bench{tag}.")
    return log_settings


def _run_backend(args, backend: str, world, directory: Path, collections: dict, control_port: int, secret: str,
                 limit: dict, baseline: dict | None, kafka) -> dict:
    from conflux.demo.bench_run import BackendRun

    run_dir = directory / backend
    run_dir.mkdir()
    runner = BackendRun(args, backend, world, run_dir, collections, control_port, secret,
                        _log_settings(args, backend, kafka))
    measured = runner.run()
    measured["limit_records_per_s"] = limit["records_per_s"]
    measured["ratio_to_limit"] = round(measured["records_per_s"] / limit["records_per_s"], 3)
    if baseline:
        measured["baseline_records_per_s"] = baseline["records_per_s"]
        measured["ratio_to_baseline"] = round(measured["records_per_s"] / baseline["records_per_s"], 1)
    else:
        measured["baseline_records_per_s"] = measured["ratio_to_baseline"] = None
    measured["limit"] = limit
    measured["old_system_records_per_s"] = OLD_SYSTEM_RECORDS_PER_S
    measured["ratio_to_old_system"] = round(measured["records_per_s"] / OLD_SYSTEM_RECORDS_PER_S)
    return measured


def _extra_runs(args, world, directory: Path, collections: dict, count_flags: list[str], results: dict, kafka,
                start) -> dict[str, dict]:
    """The delete-heavy run (on the plain upstream, which it changes), then the shaping run (on an upstream
    of its own), each on the first backend and compared with that backend's plain run."""
    backend, plain = next(iter(results.items()))
    extra = {}
    if args.deletes:
        _say(args, f"delete-heavy run on the {backend} log")
        extra["deletes"] = _delete_run(args, backend, world, directory, collections, plain, kafka)
    if args.shaping:
        _say(args, f"shaping run on the {backend} log")
        extra["shaping"] = _shaping_run(args, backend, world, directory, collections, count_flags, plain, kafka, start)
    return extra


def _delete_run(args, backend: str, world, directory: Path, collections: dict, plain: dict, kafka) -> dict:
    from conflux.demo.bench_deletes import DeletePhase, delete_options
    from conflux.demo.bench_run import BackendRun
    from conflux.demo.world import free_port

    run_dir = directory / f"{backend}-deletes"
    run_dir.mkdir()
    log_settings = _log_settings(args, backend, kafka)
    runner = BackendRun(args, backend, world, run_dir, collections, free_port(), "", log_settings,
                        source_options=delete_options(world.services["upstream"].url, collections),
                        after_export=DeletePhase(world, collections, args.records))
    return _compared(runner.run(), plain)


def _shaping_run(args, backend: str, world, directory: Path, collections: dict, count_flags: list[str], plain: dict,
                 kafka, start) -> dict:
    from conflux.demo.bench_run import BackendRun
    from conflux.demo.bench_shaping import ShapedExport, shaping_options, start_shaped_upstream
    from conflux.demo.world import free_port

    start_shaped_upstream(world, directory, count_flags, start)
    run_dir = directory / f"{backend}-shaping"
    run_dir.mkdir()
    exported = ShapedExport(world, collections)
    log_settings = _log_settings(args, backend, kafka)
    runner = BackendRun(args, backend, world, run_dir, collections, free_port(), "", log_settings,
                        source_options=shaping_options(collections), exported=exported,
                        after_export=lambda _daemon_url, sink_url: {"sample_equal": exported.sample_equal(sink_url)})
    measured = _compared(runner.run(), plain)
    measured["records_equal"] = measured.pop("checksums_equal") and measured["sample_equal"]
    return measured


def _compared(measured: dict, plain: dict) -> dict:
    """A run's figures (without its time series) and its throughput as a fraction of the plain run's."""
    measured = {k: v for k, v in measured.items() if k != "series"}
    measured["plain_records_per_s"] = plain["records_per_s"]
    measured["ratio_to_plain"] = round(measured["records_per_s"] / plain["records_per_s"], 3)
    return measured


def _report(args, results: dict[str, dict], extra: dict[str, dict]) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    first = next(iter(results.values()))
    document = {**{k: v for k, v in first.items() if k != "series"}, "backends": {
        name: {k: v for k, v in values.items() if k != "series"} for name, values in results.items()}, **extra}
    (out_dir / f"bench-{stamp}.json").write_bytes(msgspec.json.format(msgspec.json.encode(document)))
    if args.json:
        print(msgspec.json.encode(document).decode())
    else:
        for name, values in results.items():
            print(f"\n{name}:")
            for key in ("records", "export_s", "records_per_s", "limit_records_per_s", "ratio_to_limit",
                        "baseline_records_per_s", "ratio_to_baseline", "ratio_to_old_system", "peak_rss_mib",
                        "cpu_s_per_million",
                        "webhook_p50_ms", "webhook_p99_ms", "checksums_equal", "chart"):
                print(f"  {key:24s} {values.get(key)}")
        for name, values in extra.items():
            print(f"\n{name} ({values['backend']}):")
            for key, value in values.items():
                if key not in ("backend", "chart", "limit"):
                    print(f"  {key:24s} {value}")
    return 0 if _passed(results, extra) else 1


def _passed(results: dict[str, dict], extra: dict[str, dict]) -> bool:
    """Every export ended equal: checksums (plain, delete-heavy before and after its deletes) or records."""
    deletes, shaping = extra.get("deletes", {}), extra.get("shaping", {})
    return (all(values["checksums_equal"] for values in results.values())
            and deletes.get("checksums_equal", True) and deletes.get("deletes_checksums_equal", True)
            and shaping.get("records_equal", True))


def _say(args, text: str) -> None:
    print(f"conflux bench: {text}", file=sys.stderr if args.json else sys.stdout, flush=True)


class _Kafka:
    """The given bootstrap servers, or a broker started with deploy/kafka/kafka-local for this run."""

    def __init__(self, bootstrap: str) -> None:
        self._given = bootstrap
        self._state_dir: str | None = None
        self._lock = threading.Lock()

    def bootstrap(self) -> str:
        with self._lock:
            if self._given:
                return self._given
            self._state_dir = tempfile.mkdtemp(prefix="conflux-bench-kafka-")
            out = subprocess.run([str(REPO / "deploy" / "kafka" / "kafka-local"), "start"], capture_output=True,
                                 text=True, env={**os.environ, "KAFKA_STATE_DIR": self._state_dir}, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"could not start a Kafka broker:\n{out.stdout}\n{out.stderr}")
            self._given = out.stdout.strip().splitlines()[-1]
            return self._given

    def close(self) -> None:
        if self._state_dir:
            subprocess.run([str(REPO / "deploy" / "kafka" / "kafka-local"), "stop"],
                           env={**os.environ, "KAFKA_STATE_DIR": self._state_dir}, capture_output=True, timeout=120)
