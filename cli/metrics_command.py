"""`conflux metrics --url U --duration 300 --interval 10 --export FILE.json`: the old metrics collector.

Runs in the operator's shell. It scrapes a Prometheus text endpoint (the daemon's ``/metrics``) every
``--interval`` seconds for ``--duration`` seconds and writes one JSON document: every series with its
points, plus a summary per series (delta and rate per second for counters, min/max/last for the
rest). Ctrl-C (or TERM) stops early and still writes what was collected; the handlers are installed
explicitly, so this holds when it was started with SIGINT ignored (a background job, a CI runner). A
failed scrape is recorded and the sampling goes on, so a daemon restart shows up as a gap rather than
ending the run. With ``-c``, the config's control token is sent (for ``metrics_require_token``) and an
https control port is used when it has ``tls_cert_file``; ``--cacert`` names the CA to trust.

Output shape::

    {"url": ..., "interval_s": 10, "duration_s": 300, "started_at": <epoch s>, "finished_at": ...,
     "scrapes": [{"t": <epoch s>, "ok": true, "elapsed_ms": 3.2}, {"t": ..., "ok": false, "error": "..."}],
     "series": [{"name": "conflux_records_fetched_total", "labels": {"source": "customers"},
                 "type": "counter", "points": [[<epoch s>, 500.0], ...],
                 "summary": {"first": ..., "last": ..., "min": ..., "max": ..., "delta": ..., "rate_per_s": ...}}]}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from itertools import pairwise
from urllib.parse import urlsplit

import requests

from conflux.cli.stop_signals import StopSignals

SCRAPE_TIMEOUT_S = 10.0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the metrics URL (a bare http://host:port gets /metrics added)")
    parser.add_argument("-c", "--config", help="take the URL from this config's [control] listen instead")
    parser.add_argument("--duration", dest="duration_s", type=float, default=300.0, metavar="SECONDS",
                        help="seconds to sample for (default %(default)s)")
    parser.add_argument("--interval", dest="interval_s", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between scrapes (default %(default)s)")
    parser.add_argument("--export", metavar="FILE.json", help="write the JSON here (default: stdout)")
    parser.add_argument("--buckets", action="store_true", help="keep histogram _bucket series (left out by default)")
    parser.add_argument("--cacert", metavar="FILE", help="CA certificate(s) to trust for an https control port")


def run(args: argparse.Namespace) -> int:
    if args.interval_s <= 0 or args.duration_s < 0:
        print("conflux metrics: --interval must be > 0 and --duration >= 0", file=sys.stderr)
        return 2
    try:
        url, token = metrics_url(args)
    except ValueError as exc:
        print(f"conflux metrics: {exc}", file=sys.stderr)
        return 2
    collector = Collector(url, keep_buckets=args.buckets, token=token, cacert=args.cacert)
    with StopSignals() as stop:
        collector.sample(duration_s=args.duration_s, interval_s=args.interval_s, stop=stop)
    document = collector.document(duration_s=args.duration_s, interval_s=args.interval_s)
    write(document, args.export)
    ok = sum(1 for scrape in document["scrapes"] if scrape["ok"])
    print(f"conflux metrics: {ok} of {len(document['scrapes'])} scrapes, {len(document['series'])} series"
          + (f", written to {args.export}" if args.export else ""), file=sys.stderr)
    return 0 if ok else 1


def metrics_url(args: argparse.Namespace) -> tuple[str, str]:
    """The URL to scrape, and the control token to send ("" without -c or without a token)."""
    if not (args.url or args.config):
        raise ValueError("give --url or -c")
    url, token = args.url, ""
    if args.config:
        from conflux.cli.status_command import StatusError, control_url
        from conflux.config import load_config
        from conflux.errors import ConfigError
        from conflux.secrets import read_secret

        try:
            control = load_config(args.config, secrets="none").control
            token = read_secret(env=control.token_env, literal=control.token, what="control.token")
            url = url or control_url(control.listen, tls=bool(control.tls_cert_file))
        except (ConfigError, StatusError) as exc:
            raise ValueError(str(exc)) from None
    return (url.rstrip("/") + "/metrics" if urlsplit(url).path in ("", "/") else url), token


class Collector:
    """The scrapes of one run, kept as {(name, labels): [(t, value), ...]}."""

    def __init__(self, url: str, *, keep_buckets: bool = False, token: str = "", cacert: str | None = None) -> None:
        self.url = url
        self.keep_buckets = keep_buckets
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        # Per request, not on the session: REQUESTS_CA_BUNDLE in the environment would win over session.verify.
        self.verify: str | bool = cacert or True
        self.scrapes: list[dict] = []
        self.points: dict[tuple[str, tuple], list[list[float]]] = {}
        self.types: dict[str, str] = {}
        self.started_at = time.time()

    def sample(self, *, duration_s: float, interval_s: float, stop: StopSignals) -> None:
        """Scrape at 0, interval, 2*interval, ... up to duration (deadlines on the monotonic clock),
        or until ``stop`` records Ctrl-C or TERM."""
        start = time.monotonic()
        self.started_at = time.time()
        total = int(duration_s / interval_s + 1e-9) + 1
        for number in range(1, total + 1):
            stop.wait(max(0.0, start + (number - 1) * interval_s - time.monotonic()))
            if stop.stopped:
                print("conflux metrics: interrupted; writing what was collected", file=sys.stderr)
                return
            outcome = self.scrape()
            print(f"conflux metrics: scrape {number} of {total}: {outcome[:100]}", file=sys.stderr, flush=True)

    def scrape(self) -> str:
        """One scrape into the collection; returns what happened, for the progress line."""
        from prometheus_client.parser import text_string_to_metric_families

        now, began = time.time(), time.perf_counter()
        try:
            response = self.session.get(self.url, timeout=SCRAPE_TIMEOUT_S, verify=self.verify)
            response.raise_for_status()
            families = list(text_string_to_metric_families(response.text))
        except (requests.RequestException, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
            self.scrapes.append({"t": round(now, 3), "ok": False, "error": error})
            return error
        for family in families:
            for sample in family.samples:
                if sample.name.endswith("_bucket") and not self.keep_buckets:
                    continue
                self.types[sample.name] = family.type
                key = (sample.name, tuple(sorted(sample.labels.items())))
                self.points.setdefault(key, []).append([round(now, 3), sample.value])
        self.scrapes.append({"t": round(now, 3), "ok": True,
                             "elapsed_ms": round((time.perf_counter() - began) * 1000, 1)})
        return f"{sum(len(family.samples) for family in families)} samples"

    def document(self, *, duration_s: float, interval_s: float) -> dict:
        series = [{"name": name, "labels": dict(labels), "type": self.types.get(name, "unknown"),
                   "points": points, "summary": summarize(self.types.get(name, ""), points)}
                  for (name, labels), points in sorted(self.points.items())]
        return {"url": self.url, "interval_s": interval_s, "duration_s": duration_s,
                "started_at": round(self.started_at, 3), "finished_at": round(time.time(), 3),
                "scrapes": self.scrapes, "series": series}


def summarize(kind: str, points: list[list[float]]) -> dict:
    values = [value for _, value in points]
    summary = {"first": values[0], "last": values[-1], "min": min(values), "max": max(values)}
    if kind in ("counter", "histogram", "summary"):
        # Monotonic, as in Prometheus' increase(): a drop means the daemon restarted and counts from 0.
        increase = sum(b - a if b >= a else b for a, b in pairwise(values))
        span_s = points[-1][0] - points[0][0]
        summary["delta"] = increase
        summary["rate_per_s"] = round(increase / span_s, 6) if span_s > 0 else None
    return summary


def write(document: dict, path: str | None) -> None:
    text = json.dumps(document, indent=1)
    if not path:
        print(text)
        return
    partial = f"{path}.partial"
    with open(partial, "w") as handle:
        handle.write(text + "\n")
    os.replace(partial, path)
