"""The chaos scenario runner: a full sync with live changes and deletes while faults are injected on a
schedule.

A scenario is a list of (second, fault) pairs played against a real daemon, a real demo upstream and
a real demo sink. Faults are chosen and timed from a fixed seed, so a failing run can be replayed.
At the end, changes and deletes stop, the pipeline must converge (the sink's checksum equals the
upstream's for every collection: the live records, soft- and hard-deleted ones gone), and the
dead-letter queue must hold exactly the upstream's malformed records. The report lists every fault
with when it was injected, the deletes on both sides, and the records lost (which must be 0).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

from tests.fixtures.daemon import Daemon, checksums
from tests.support import REPO, wait_until

Fault = Callable[["ChaosRun"], str]


@dataclass
class ChaosRun:
    daemon: Daemon
    upstream_url: str
    sink_url: str
    collections: dict[str, str]
    seed: int
    rng: random.Random = field(init=False)
    injected: list[tuple[float, str]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def play(self, schedule: list[tuple[float, Fault]]) -> None:
        for at_s, fault in sorted(schedule, key=lambda item: item[0]):
            delay_s = at_s - (time.monotonic() - self.started)
            if delay_s > 0:
                time.sleep(delay_s)  # the schedule itself is time-based; nothing waits on a result here
            self.injected.append((round(time.monotonic() - self.started, 1), fault(self)))

    def converge(self, timeout_s: float) -> dict:
        requests.post(f"{self.upstream_url}/admin/faults", json={"error_rate": 0, "throttle_rate": 0, "latency_ms": 0,
                                                                  "change_rate_per_s": 0, "delete_rate_per_s": 0},
                      timeout=10).raise_for_status()
        self.request_full_syncs()

        def equal():
            upstream, sink = checksums(self.upstream_url, self.sink_url, self.collections)
            return upstream == sink

        converged_at = None
        try:
            wait_until(equal, timeout_s=timeout_s, interval_s=0.5, message="convergence")
            converged_at = time.monotonic() - self.started
        except AssertionError:
            pass
        upstream, sink = checksums(self.upstream_url, self.sink_url, self.collections)
        lost = sum(max(0, upstream[name][1] - (sink[name][1] or 0)) for name in self.collections)
        mismatched = [name for name in self.collections if upstream[name] != sink[name]]
        return {"upstream": upstream, "sink": sink, "records_lost": lost, "collections_differing": mismatched,
                "converged_after_s": converged_at, "deletes": self.deletes()}

    def deletes(self) -> dict:
        """What was deleted upstream, what the sink holds as tombstones, and what the daemon reconciled."""
        upstream = requests.get(f"{self.upstream_url}/stats", timeout=10).json()
        collections = upstream["collections"]
        sink = requests.get(f"{self.sink_url}/stats", timeout=10).json()["sources"]
        sources = self.daemon.status()["sources"]
        return {"upstream": upstream["deletes"],
                "upstream_deleted": {name: collections[c]["deleted"] for name, c in self.collections.items()},
                "sink_tombstones": {name: sink.get(name, {}).get("tombstones") for name in self.collections},
                "reconciled": self.daemon.metric("conflux_reconcile_keys_total", outcome="deleted") or 0,
                "last_reconcile": {name: sources[name].get("reconcile") for name in self.collections}}

    def request_full_syncs(self) -> list[str]:
        """A hard delete shows only as a key a complete full sync no longer lists: ask for one now rather than
        wait for full_sync_interval_s. The regular schedule takes over if a fault swallows a request."""
        accepted = []
        for name in self.collections:
            response = requests.post(f"{self.daemon.url}/sync/{name}", params={"full": "true"}, timeout=30)
            if response.status_code == 202:
                accepted.append(name)
        return accepted

    def dead_letters(self) -> list[dict]:
        out = subprocess.run([sys.executable, "-m", "conflux", "dlq", "list", "-c", str(self.daemon.config_path),
                              "--json"], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def malformed(self) -> set[tuple[str, str]]:
        listed = requests.get(f"{self.upstream_url}/admin/malformed", timeout=30).json()
        return {(c, json.dumps(item["record"], sort_keys=True)) for c, items in listed.items() for item in items}


def report(run: ChaosRun, outcome: dict, dlq_equal: bool, dlq_count: int) -> str:
    lines = [f"chaos report (seed {run.seed})", "  faults injected:"]
    lines += [f"    t={at:6.1f}s  {what}" for at, what in run.injected]
    lines += [f"  converged after: {outcome['converged_after_s']} s",
              f"  records lost: {outcome['records_lost']}",
              f"  collections differing: {outcome['collections_differing'] or 'none'}",
              f"  dead letters: {dlq_count}, exactly the malformed records: {dlq_equal}",
              f"  deletes upstream: {outcome['deletes']['upstream']}, deleted per collection "
              f"{outcome['deletes']['upstream_deleted']}",
              f"  sink tombstones: {outcome['deletes']['sink_tombstones']}, keys deleted by reconciles: "
              f"{outcome['deletes']['reconciled']:g}"]
    for name, (checksum, count) in outcome["upstream"].items():
        lines.append(f"    {name}: upstream {checksum} ({count})  sink {outcome['sink'][name][0]} "
                     f"({outcome['sink'][name][1]})")
    return "\n".join(lines)


# -- faults ---------------------------------------------------------------------------------------


def kill_random_worker(roles: tuple[str, ...] = ("fetcher", "consumer", "merger")) -> Fault:
    def fault(run: ChaosRun) -> str:
        candidates = [w for w in _workers(run) if w["role"] in roles and w["pid"]]
        if not candidates:
            return "kill -9: no running worker to kill"
        victim = run.rng.choice(candidates)
        os.kill(victim["pid"], signal.SIGKILL)
        return f"kill -9 {victim['name']} (pid {victim['pid']})"
    return fault


def sink_outage(seconds: float) -> Fault:
    def fault(run: ChaosRun) -> str:
        requests.post(f"{run.sink_url}/admin/outage", json={"seconds": seconds}, timeout=10).raise_for_status()
        return f"sink outage for {seconds:g} s"
    return fault


def sink_apply_then_fail(rate: float, seconds: float) -> Fault:
    def fault(run: ChaosRun) -> str:
        _set_for(f"{run.sink_url}/admin/faults", {"apply_then_fail_rate": rate}, {"apply_then_fail_rate": 0.0},
                 seconds)
        return f"sink applies then answers 500 for {rate:.0%} of batches, {seconds:g} s"
    return fault


def upstream_storm(*, error_rate: float, throttle_rate: float, latency_ms: int, seconds: float) -> Fault:
    def fault(run: ChaosRun) -> str:
        _set_for(f"{run.upstream_url}/admin/faults",
                 {"error_rate": error_rate, "throttle_rate": throttle_rate, "latency_ms": latency_ms},
                 {"error_rate": 0.0, "throttle_rate": 0.0, "latency_ms": 0}, seconds)
        return (f"upstream storm for {seconds:g} s: {error_rate:.0%} 500s, {throttle_rate:.0%} 429s, "
                f"+{latency_ms} ms")
    return fault


def bad_config_reload() -> Fault:
    def fault(run: ChaosRun) -> str:
        path = run.daemon.config_path
        good = path.read_text()
        path.write_text(good.replace("[control]", "[control]\nbogus_key = 1", 1))
        run.daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in run.daemon.log(), timeout_s=20, message="the refused reload")
        path.write_text(good)
        return "SIGHUP with an invalid config (refused, old config kept)"
    return fault


def deletes_stop() -> Fault:
    """The upstream stops deleting, and every source is asked for a full sync: its reconcile finds the hard
    deletes while the other faults still run, as the soft ones already flowed with the incremental syncs."""
    def fault(run: ChaosRun) -> str:
        requests.post(f"{run.upstream_url}/admin/delete-rate", json={"delete_rate_per_s": 0},
                      timeout=10).raise_for_status()
        return f"upstream stops deleting; full syncs asked of {', '.join(run.request_full_syncs()) or 'none'}"
    return fault


def broker_restart(control, down_s: float) -> Fault:
    def fault(run: ChaosRun) -> str:
        control.stop()
        time.sleep(down_s)  # the outage itself is the fault: the broker stays down this long
        control.start()
        return f"Kafka broker stopped for {down_s:g} s and started again"
    return fault


def _set_for(url: str, on: dict, off: dict, seconds: float) -> None:
    requests.post(url, json=on, timeout=10).raise_for_status()
    timer = threading.Timer(seconds, lambda: requests.post(url, json=off, timeout=10))
    timer.daemon = True
    timer.start()


def _workers(run: ChaosRun) -> list[dict]:
    return wait_until(lambda: run.daemon.workers(), timeout_s=30, message="the worker list")
