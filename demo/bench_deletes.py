"""`conflux bench --deletes`: a delete-heavy run. After the export, the upstream deletes 10% of its
records, half soft (still listed, ``"deleted": true``) and half hard (gone from every listing); the
daemon marks deletes (``deleted = "deleted"``) and reconciles (cursor style: a key a complete full sync
does not list is deleted at once). Measured: the export with the key index on (its cost against the plain
run), how fast the upstream deleted, and from the last delete until the sink's checksum equals the
upstream's again: a full sync, the reconcile (and how long it took), and every delete acknowledged.

The upstream's webhooks go to the plain run's control port, not this daemon's: hard deletes must be
found by the reconcile, not announced.
"""

from __future__ import annotations

import time

import requests

DELETE_FRACTION = 0.10
# Asked of the upstream's background deleter, spread over at least DELETE_SPREAD_S and below what it can
# do (about 18,000/s on 2 busy cores): a saturated deleter catches up in bursts that hold its event loop,
# and the request that stops it at the target waits behind them (16% over the target at 20,000/s).
MAX_DELETE_RATE_PER_S = 10_000.0
MIN_DELETE_RATE_PER_S = 1_000.0
DELETE_SPREAD_S = 10.0
POLL_S = 0.01
CONVERGE_TIMEOUT_S = 600.0


def delete_options(upstream_url: str, collections: dict[str, str]) -> dict[str, dict]:
    return {name: {"url": f"{upstream_url}/api/{name}/cursor", "pagination": "cursor", "deleted": "deleted",
                   "reconcile": True, "poll_interval_s": 1.0}
            for name in collections}


class DeletePhase:
    """The `after_export` of the delete-heavy run: delete, stop, ask for full syncs, wait for equality."""

    def __init__(self, world, collections: dict[str, str], records: int) -> None:
        self.world = world
        self.collections = collections
        self.records = records
        self.target = round(records * DELETE_FRACTION)

    def __call__(self, daemon_url: str, sink_url: str) -> dict:
        upstream = self.world.services["upstream"].url
        before = requests.get(f"{upstream}/stats", timeout=10).json()["deletes"]
        deleting_s = self._delete(upstream)
        stopped = time.monotonic()
        asked_at = time.time()
        for name in self.collections:
            _ask_full_sync(daemon_url, name)
        equal, reports = self._await_convergence(daemon_url, asked_at)
        converge_s = time.monotonic() - stopped
        after = requests.get(f"{upstream}/stats", timeout=10).json()["deletes"]
        soft, hard = after["soft"] - before["soft"], after["hard"] - before["hard"]
        return {"deleted": soft + hard, "deleted_fraction": round((soft + hard) / self.records, 4),
                "soft_deleted": soft, "hard_deleted": hard,
                "delete_s": round(deleting_s, 3), "upstream_deletes_per_s": round((soft + hard) / deleting_s),
                "converge_s": round(converge_s, 3), "deletes_checksums_equal": equal,
                "reconcile": reports, "deletes_acknowledged": _metric(daemon_url, "conflux_records_deleted_total")}

    def _delete(self, upstream: str) -> float:
        started = time.monotonic()
        rate_per_s = min(MAX_DELETE_RATE_PER_S, max(MIN_DELETE_RATE_PER_S, self.target / DELETE_SPREAD_S))
        requests.post(f"{upstream}/admin/delete-rate", json={"delete_rate_per_s": rate_per_s,
                                                             "delete_style": "mixed"}, timeout=10).raise_for_status()
        with requests.Session() as session:
            while session.get(f"{upstream}/admin/delete-rate", timeout=10).json()["applied"] < self.target:
                time.sleep(POLL_S)  # the upstream deletes on its own schedule; this only watches the count
        requests.post(f"{upstream}/admin/delete-rate", json={"delete_rate_per_s": 0}, timeout=10).raise_for_status()
        return time.monotonic() - started

    def _await_convergence(self, daemon_url: str, asked_at: float) -> tuple[bool, dict]:
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        reports: dict = {}
        while time.monotonic() < deadline:
            sources = requests.get(f"{daemon_url}/status", timeout=10).json()["sources"]
            reports = {name: sources[name].get("reconcile") for name in self.collections}
            reconciled = all(report and report["sync_started_at"] > asked_at for report in reports.values())
            if reconciled and self._checksums_equal():
                return True, reports
            time.sleep(0.1)  # watching the sink converge is the measurement
        return False, reports

    def _checksums_equal(self) -> bool:
        upstream, sink = self.world.checksums(list(self.collections))
        return upstream == sink


def _ask_full_sync(daemon_url: str, source: str) -> None:
    deadline = time.monotonic() + 30
    while requests.post(f"{daemon_url}/sync/{source}", params={"full": "true"}, timeout=30).status_code != 202:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not accept a full sync of {source}")
        time.sleep(0.5)  # a fetcher restarting: ask again


def _metric(daemon_url: str, name: str) -> float:
    text = requests.get(f"{daemon_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))
