"""The daemon's state as plain data: what /status returns and what `conflux status` prints.

The supervisor owns the facts; each time the control process asks, it hands a ``DaemonFacts`` snapshot
to ``build_status``, which knows nothing of the supervisor itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec

from conflux.config import Config
from conflux.daemon.pool import Slot, SlotState
from conflux.ipc.messages import PartitionLag, SourceReport
from conflux.log.base import TopicPartition
from conflux.redact import redact_text


@dataclass(frozen=True)
class DaemonFacts:
    """What the supervisor knows at one moment, as much as /status shows."""

    config: Config
    config_path: str
    started_at: float
    generation: int
    backend: str
    state: str                  # running | draining | reloading
    log_reachable: bool
    slots: Sequence[Slot]
    sources: Mapping[str, SourceReport]
    lags: Mapping[TopicPartition, tuple[str, PartitionLag]]   # partition -> (reporting slot, lag)
    monotonic_now: float | None = None   # the supervisor's clock, for heartbeat ages (None: time.monotonic())
    reloads: Mapping[str, object] | None = None   # applied, refused, last_refusal, last_drain


def build_status(facts: DaemonFacts) -> dict:
    now_wall = time.time()
    now = time.monotonic() if facts.monotonic_now is None else facts.monotonic_now
    workers = [_worker(slot, now) for slot in facts.slots]
    return {
        "daemon": {
            "pid": os.getpid(),
            "started_at": facts.started_at,
            "uptime_s": round(now_wall - facts.started_at, 3),
            "generation": facts.generation,
            "backend": facts.backend,
            "state": facts.state,
            "config": facts.config_path,
            "reloads": dict(facts.reloads or {}),
        },
        "ready": _readiness(facts, workers),
        "sources": _sources(facts),
        "sinks": _sinks(facts),
        "workers": workers,
        "partitions": _partitions(facts),
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


def _readiness(facts: DaemonFacts, workers: list[dict]) -> dict:
    not_running = [w["name"] for w in workers if w["state"] != SlotState.RUNNING.value]
    reasons = []
    if not facts.log_reachable:
        reasons.append("the log is not reachable")
    if not_running:
        reasons.append("workers not running: " + ", ".join(not_running))
    if facts.state != "running":
        reasons.append("draining")
    return {"ready": not reasons, "log": facts.log_reachable, "reasons": reasons}


def _sources(facts: DaemonFacts) -> dict:
    out = {}
    for source in facts.config.sources:
        report = facts.sources.get(source.name)
        data = msgspec.to_builtins(report) if report is not None else {"source": source.name}
        ok, failed = data.get("syncs_ok", 0), data.get("syncs_failed", 0)
        data["success_rate"] = round(ok / (ok + failed), 4) if ok + failed else None
        data["topic"] = facts.config.topic_of(source)
        data["pagination"] = source.pagination
        data["parent"] = source.parent or None   # a child source: paged once per live record of this source
        data["sinks"] = facts.config.sink_names_of(source)
        data["fetcher"] = next((slot.name for slot in facts.slots
                                if slot.role == "fetcher" and source.name in slot.sources), None)
        data.pop("source", None)
        # Sync errors quote upstream URLs (a next link's ?api_key=, user:pass@): redacted like the logs.
        out[source.name] = {key: redact_text(value) if isinstance(value, str) else value for key, value in data.items()}
    return out


def _sinks(facts: DaemonFacts) -> dict:
    """Each sink as the mergers see it: the worst breaker, the longest failure, what it last answered
    (one merger's view), deliveries in flight in all of them, and the sources routed to it."""
    mergers = [slot.stats for slot in facts.slots if slot.role == "merger" and slot.stats]
    out = {}
    for spec in facts.config.sinks:
        prefix = "sink_" if spec.name == "default" else f"sink.{spec.name}."
        seen = [stats for stats in mergers if f"{prefix}circuit" in stats]
        circuit = max((stats[f"{prefix}circuit"] for stats in seen), default=0)
        out[spec.name] = {
            "type": spec.type,
            "sources": [source.name for source in facts.config.sources
                        if spec.name in facts.config.sink_names_of(source)],
            "circuit": {0: "closed", 1: "half_open", 2: "open"}.get(int(circuit), "closed"),
            "failing_s": max((stats[f"{prefix}failing_s"] for stats in seen), default=0.0),
            "last_status": max((stats[f"{prefix}last_status"] for stats in seen), default=-1),
            "in_flight": sum(stats.get(f"{prefix}in_flight", 0) for stats in seen),
        }
    return out


def _partitions(facts: DaemonFacts) -> list[dict]:
    owners = {tp: slot.name for slot in facts.slots for tp in slot.partitions}
    keys = sorted(set(owners) | set(facts.lags))
    rows = []
    for tp in keys:
        lag = facts.lags.get(tp, (None, None))[1]
        rows.append({"topic": tp[0], "partition": tp[1], "owner": owners.get(tp),
                     "committed": lag.committed if lag else None, "end": lag.end if lag else None,
                     "lag": lag.lag if lag else None})
    return rows
