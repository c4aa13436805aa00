"""One backend's part of `conflux bench`: start the daemon, time the export, sample the stages, then
measure the webhook-to-sink delay under a steady change load (or, for the shaping and delete-heavy runs,
whatever their own phase measures)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import requests

from conflux.config import to_toml
from conflux.demo.svgchart import line_chart, rates

SAMPLE_S = 0.25
STAGES = {"fetched": "conflux_records_fetched_total", "delivered": "conflux_records_delivered_total"}


class BackendRun:
    """``source_options`` adds or replaces keys of each collection's [[sources]] table; ``exported`` says when
    the export is complete (default: the sink's checksums equal the upstream's); ``after_export(daemon_url,
    sink_url)`` runs while the daemon still runs and adds its figures (default: the webhook delay)."""

    def __init__(self, args, backend: str, world, directory: Path, collections: dict[str, str], control_port: int,
                 secret: str, log_settings: dict, *, source_options: dict[str, dict] | None = None,
                 exported: Callable[[], bool] | None = None,
                 after_export: Callable[[str, str], dict] | None = None) -> None:
        self.args = args
        self.backend = backend
        self.world = world
        self.directory = directory
        self.collections = collections
        self.control_port = control_port
        self.secret = secret
        self.log_settings = log_settings
        self.source_options = source_options or {}
        self.exported = exported or self._checksums_equal
        self.after_export = after_export or (lambda _daemon_url, sink_url: self._webhook_delay(sink_url))
        self.samples: list[dict] = []
        self.peak_rss = 0
        self._stop = threading.Event()

    def run(self) -> dict:
        from conflux.demo.world import start

        sink = start("analytics", ["analytics", "--port", "0"], self.directory / "analytics.log")
        self.world.services["analytics"] = sink
        config = self.directory / "conflux.toml"
        config.write_text(self._config(sink.url))
        neighbours = {name: psutil.Process(self.world.services[name].proc.pid) for name in ("upstream", "analytics")}
        neighbours_cpu = {name: _tree_cpu_s(process) for name, process in neighbours.items()}
        launched = time.monotonic()
        daemon = start("daemon", ["run", "-c", str(config)], self.directory / "conflux.log")
        self.world.services["daemon"] = daemon
        up = time.monotonic()
        tree = psutil.Process(daemon.proc.pid)
        sampler = threading.Thread(target=self._sample, args=(daemon.url, sink.url, tree, up), daemon=True)
        sampler.start()
        export_s, equal = self._await_export(up)
        cpu_s = _tree_cpu_s(tree)
        # The demo services share the machine: what they burn during the export is not the daemon's.
        neighbours_cpu = {name: _tree_cpu_s(process) - neighbours_cpu[name] for name, process in neighbours.items()}
        self._stop.set()
        sampler.join()
        try:
            delay = self.after_export(daemon.url, sink.url)
        finally:
            code = daemon.stop(timeout_s=60)
            sink.stop()  # each run has a sink of its own; the world closes only the last one it knows
        records = self.args.records
        return {
            "backend": self.backend, "records": records, "startup_s": round(up - launched, 3),
            "export_s": round(export_s, 3), "records_per_s": round(records / export_s), "checksums_equal": equal,
            "peak_rss_mib": round(self.peak_rss / 2**20, 1),
            "cpu_s_per_million": round(cpu_s / records * 1_000_000, 2), "daemon_exit_code": code,
            "upstream_cpu_s_per_million": round(neighbours_cpu["upstream"] / records * 1_000_000, 2),
            "sink_cpu_s_per_million": round(neighbours_cpu["analytics"] / records * 1_000_000, 2),
            **delay, "chart": self._chart(), "series": self.samples,
        }

    def _config(self, sink_url: str) -> str:
        upstream = self.world.services["upstream"].url
        sources = [{"name": name, "url": f"{upstream}/api/{name}", "key": key, "page_size": self.args.page_size,
                    **({"webhook_secret": self.secret} if self.secret else {}), **self.source_options.get(name, {})}
                   for name, key in self.collections.items()]
        workers = {role: getattr(self.args, role) for role in ("consumers", "mergers") if getattr(self.args, role)}
        return to_toml({"log": {"path": f"{self.directory}/var/conflux.db", **self.log_settings}, "sources": sources,
                        "sink": {"url": f"{sink_url}/ingest"}, "workers": workers,
                        "control": {"listen": f"127.0.0.1:{self.control_port}"},
                        "daemon": {"state_dir": f"{self.directory}/var"}})

    def _checksums_equal(self) -> bool:
        upstream, sink = self.world.checksums(list(self.collections))
        return upstream == sink

    def _await_export(self, up: float) -> tuple[float, bool]:
        total = self.args.records
        deadline = up + max(300.0, total / 2000)
        while time.monotonic() < deadline:
            counts = self.world.sink_counts()
            if sum(counts.values()) >= total and self.exported():
                return time.monotonic() - up, True
            time.sleep(0.02)  # polling the sink's counters is the measurement itself
        return time.monotonic() - up, False

    def _sample(self, daemon_url: str, sink_url: str, tree: psutil.Process, up: float) -> None:
        while not self._stop.is_set():
            sample = {"t": round(time.monotonic() - up, 3)}
            try:
                sample.update(_stage_counts(daemon_url))
                sample["sink"] = sum(v["count"] for v in requests.get(f"{sink_url}/stats", timeout=5)
                                     .json()["sources"].values())
            except (requests.RequestException, ValueError, KeyError):
                pass
            self.peak_rss = max(self.peak_rss, _tree_rss(tree))
            self.samples.append(sample)
            self._stop.wait(SAMPLE_S)

    def _webhook_delay(self, sink_url: str) -> dict:
        rate, seconds = self.args.changes_per_s, self.args.change_seconds
        if rate <= 0:
            return {"webhook_p50_ms": None, "webhook_p99_ms": None, "changes_per_s": 0}
        upstream = self.world.services["upstream"].url
        requests.post(f"{sink_url}/admin/freshness", json={"enabled": True}, timeout=10).raise_for_status()
        requests.post(f"{upstream}/admin/change-rate", json={"change_rate_per_s": rate}, timeout=10)
        time.sleep(seconds)  # the steady load runs for this long; nothing to wait for but the clock
        requests.post(f"{upstream}/admin/change-rate", json={"change_rate_per_s": 0}, timeout=10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            upstream_sums, sink_sums = self.world.checksums(list(self.collections))
            if upstream_sums == sink_sums:
                break
            time.sleep(0.1)
        summary = requests.get(f"{sink_url}/freshness", timeout=10).json()
        return {"webhook_p50_ms": summary["p50_ms"], "webhook_p99_ms": summary["p99_ms"],
                "webhook_max_ms": summary["max_ms"], "changes_per_s": rate, "changes_applied": summary["count"]}

    def _chart(self) -> str:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        series = {stage: rates([(s["t"], s[stage]) for s in self.samples if stage in s])
                  for stage in ("fetched", "delivered", "sink")}
        path = out / f"throughput-{self.backend}-{time.strftime('%Y%m%d-%H%M%S')}.svg"
        path.write_text(line_chart(f"Conflux {self.backend}: {self.args.records:,} records, throughput per stage",
                                   series))
        return str(path)


def _stage_counts(daemon_url: str) -> dict[str, float]:
    text = requests.get(f"{daemon_url}/metrics", timeout=5).text
    out = dict.fromkeys(STAGES, 0.0)
    for line in text.splitlines():
        for stage, metric in STAGES.items():
            if line.startswith(metric + "{"):
                out[stage] += float(line.rsplit(" ", 1)[1])
    return out


def _tree_rss(tree: psutil.Process) -> int:
    total = 0
    for process in [tree, *_children(tree)]:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


def _tree_cpu_s(tree: psutil.Process) -> float:
    total = 0.0
    for process in [tree, *_children(tree)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def _children(tree: psutil.Process) -> list[psutil.Process]:
    try:
        return tree.children(recursive=True)
    except psutil.Error:
        return []

