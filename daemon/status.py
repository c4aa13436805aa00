"""The daemon's state as plain data: what /status returns and what `conflux status` prints.

Built by the supervisor (which owns the facts) each time the control process asks for it.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import msgspec

from daemon.pool import SlotState

if TYPE_CHECKING:
    from daemon.supervisor import Supervisor


def build_status(supervisor: Supervisor) -> dict:
    now_wall, now = time.time(), time.monotonic()
    workers = [_worker(slot, now) for slot in supervisor.slots.values()]
    return {
        "daemon": {
            "pid": os.getpid(),
            "started_at": supervisor.started_at,
            "uptime_s": round(now_wall - supervisor.started_at, 3),
            "generation": supervisor.generation,
            "backend": supervisor.backend.name,
            "state": "running" if supervisor.draining is None else (
                "draining" if supervisor.exit_after_drain else "reloading"),
            "config": supervisor.config_path or "",
        },
        "ready": _readiness(supervisor, workers),
        "sources": _sources(supervisor),
        "workers": workers,
        "partitions": _partitions(supervisor),
        "generated_at": now_wall,
    }


def _worker(slot, now: float) -> dict:
    return {
        "name": slot.name, "role": slot.role, "index": slot.index, "pid": slot.pid, "state": slot.state.value,
        "restarts": slot.restarts, "last_exit": slot.last_exit,
        "partitions": [list(tp) for tp in slot.partitions], "sources": list(slot.sources),
        "last_heartbeat_at": slot.last_heartbeat_wall or None,
        "heartbeat_age_s": round(now - slot.last_heartbeat, 3) if slot.alive else None,
        "stats": slot.stats,
    }


def _readiness(supervisor: Supervisor, workers: list[dict]) -> dict:
    not_running = [w["name"] for w in workers if w["state"] != SlotState.RUNNING.value]
    reasons = []
    if not supervisor.log_reachable:
        reasons.append("the log is not reachable")
    if not_running:
        reasons.append("workers not running: " + ", ".join(not_running))
    if supervisor.draining is not None:
        reasons.append("draining")
    return {"ready": not reasons, "log": supervisor.log_reachable, "reasons": reasons}


def _sources(supervisor: Supervisor) -> dict:
    out = {}
    for source in supervisor.config.sources:
        report = supervisor.sources.get(source.name)
        data = msgspec.to_builtins(report) if report is not None else {"source": source.name}
        ok, failed = data.get("syncs_ok", 0), data.get("syncs_failed", 0)
        data["success_rate"] = round(ok / (ok + failed), 4) if ok + failed else None
        data["topic"] = supervisor.config.topic_of(source)
        data["pagination"] = source.pagination
        data["fetcher"] = next((slot.name for slot in supervisor.slots.values()
                                if slot.role == "fetcher" and source.name in slot.sources), None)
        data.pop("source", None)
        out[source.name] = data
    return out


def _partitions(supervisor: Supervisor) -> list[dict]:
    owners = {tp: slot.name for slot in supervisor.slots.values() for tp in slot.partitions}
    keys = sorted(set(owners) | set(supervisor.lags))
    rows = []
    for tp in keys:
        lag = supervisor.lags.get(tp, (None, None))[1]
        rows.append({"topic": tp[0], "partition": tp[1], "owner": owners.get(tp),
                     "committed": lag.committed if lag else None, "end": lag.end if lag else None,
                     "lag": lag.lag if lag else None})
    return rows
