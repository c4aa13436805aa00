"""Every Prometheus series Conflux exports, defined once.

prometheus-client runs in multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is set by the supervisor
before anything imports prometheus_client, each process writes its own mmap'd files, and the
control process aggregates them for ``/metrics``. The metric objects below are created at import
(before fork) and hold no files until first used; prometheus-client notices the new pid in a
child and opens that child's own files. When a worker dies, the supervisor calls
``mark_process_dead`` so its live gauges vanish.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values

STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

records_fetched = Counter("conflux_records_fetched_total", "Records read from upstream pages and webhooks",
                          ["source"])
records_delivered = Counter("conflux_records_delivered_total", "Records the sink acknowledged", ["source"])
records_deleted = Counter("conflux_records_deleted_total",
                          "Deletes the sink acknowledged (delete markers, filtered-out records, reconciles)",
                          ["source"])
reconcile_keys = Counter("conflux_reconcile_keys_total",
                         "Keys a reconcile looked at after a complete full sync, by outcome: checked, deleted, "
                         "waiting (missed once, deleted at the second look), kept", ["source", "outcome"])
reconciles_refused = Counter("conflux_reconcile_refused_total",
                             "Reconciles refused because they would delete more than reconcile_max_fraction of the "
                             "known keys", ["source"])
messages_processed = Counter("conflux_messages_processed_total", "Log messages consumed and routed", ["topic"])
messages_failed = Counter("conflux_messages_failed_total", "Log messages that could not be processed", ["topic"])
processing_duration = Histogram("conflux_processing_duration_seconds", "Time spent per unit of work, by stage",
                                ["stage"], buckets=STAGE_BUCKETS_S)
dedup_skipped = Counter("conflux_dedup_skipped_total", "Records or messages skipped as duplicates", ["reason"])
dlq_records = Counter("conflux_dlq_records_total", "Records sent to the dead-letter queue", ["source", "reason"])
sync_lag = Gauge("conflux_sync_lag_seconds", "Now minus the watermark of the last completed sync", ["source"],
                 multiprocess_mode="livemostrecent")
last_sync_timestamp = Gauge("conflux_last_sync_timestamp_seconds", "When the last sync of a source completed",
                            ["source"], multiprocess_mode="livemostrecent")
consumer_lag = Gauge("conflux_consumer_lag", "Messages not yet committed, per partition", ["topic", "partition"],
                     multiprocess_mode="livemostrecent")
upstream_request_duration = Histogram("conflux_upstream_request_duration_seconds", "Upstream HTTP requests",
                                      ["source", "status"], buckets=REQUEST_BUCKETS_S)
sink_request_duration = Histogram("conflux_sink_request_duration_seconds",
                                  "Sink requests by answer (HTTP status, ok, or error) and sink", ["status", "sink"],
                                  buckets=REQUEST_BUCKETS_S)
circuit_state = Gauge("conflux_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open", ["target"],
                      multiprocess_mode="livemostrecent")
worker_restarts = Counter("conflux_worker_restarts_total", "Workers restarted after they died", ["role"])
reloads = Counter("conflux_reloads_total", "Config reloads (HUP) by result: applied or refused", ["result"])
workers = Gauge("conflux_workers", "Worker slots by role and state", ["role", "state"],
                multiprocess_mode="livemostrecent")
queue_depth = Gauge("conflux_queue_depth", "Items waiting in internal queues", ["queue"],
                    multiprocess_mode="livesum")
upstream_retries = Counter("conflux_upstream_retries_total", "Upstream requests retried", ["source", "reason"])
sink_records = Counter("conflux_sink_records_total",
                       "Records each sink took or refused for good (to the dead-letter queue)",
                       ["sink", "source", "result"])
sink_retries = Counter("conflux_sink_retries_total", "Sink deliveries retried, by reason and sink", ["reason", "sink"])
sink_effects = Counter("conflux_sink_effects_total",
                       "What the records a sink took did there, where the sink says (PostgreSQL does): applied "
                       "(changed the destination, deletes included), deleted (the deletes among them), stale "
                       "(older than what it holds, or a batch applied before)", ["sink", "source", "effect"])
dlq_write_failures = Counter("conflux_dlq_write_failures_total",
                             "Failed writes of dead letters (retried with backoff, then the worker exits)", ["source"])
oldest_unacked = Gauge("conflux_oldest_unacked_seconds",
                       "Age of the oldest log message a consumer has waiting for the sink's acknowledgement",
                       ["consumer"], multiprocess_mode="livemax")
ack_timeouts = Counter("conflux_ack_timeouts_total",
                       "Log messages that waited longer than [workers] ack_timeout_s for the sink's acknowledgement",
                       ["topic"])
webhook_requests = Counter("conflux_webhook_requests_total", "Webhook requests by outcome", ["source", "status"])
control_status_requests = Counter("conflux_control_status_requests_total",
                                  "Status snapshots the control process asked the supervisor for", ["endpoint"])
control_refused = Counter("conflux_control_refused_total",
                          "Control-port connections or requests cut off by a limit", ["reason"])

CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}
# The label values the workers use, so the supervisor can declare their counters at 0 up front.
DEDUP_REASONS = ("message_id", "content_hash", "stale")
STAGES = ("decode", "consume", "merge", "sink")
CONTROL_REFUSALS = ("connection_limit", "header_timeout", "body_timeout", "buffer_full")


def prepare_directory(path: str) -> None:
    """Supervisor, at start: an empty directory for this run's metric files, exported to every child."""
    if not getattr(values.ValueClass, "_multiprocess", False):
        # Too late to switch: series made now would stay in this process and /metrics would be empty.
        raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


RECONCILE_OUTCOMES = ("checked", "deleted", "waiting", "kept")


def declare_reconciled(sources: Iterable[str]) -> None:
    """Supervisor, before fork: the reconcile series of the sources that reconcile, at 0."""
    for source in sources:
        reconciles_refused.labels(source)
        for outcome in RECONCILE_OUTCOMES:
            reconcile_keys.labels(source, outcome)


def declare(*, roles: Iterable[str], sources: Iterable[str], topics: Iterable[str]) -> None:
    """Supervisor, before fork: every counter whose labels are known up front exists at 0, so dashboards
    and ``rate()`` see it before its first event (a series born at 1 hides that first 1 from rate())."""
    for role in roles:
        worker_restarts.labels(role)
    for result in ("applied", "refused"):
        reloads.labels(result)
    for source in sources:
        records_fetched.labels(source)
        records_delivered.labels(source)
        records_deleted.labels(source)
        for reason in ("malformed", "sink_rejected"):
            dlq_records.labels(source, reason)
        dlq_write_failures.labels(source)
    for topic in topics:
        messages_processed.labels(topic)
        messages_failed.labels(topic)
        ack_timeouts.labels(topic)
        dlq_records.labels(topic, "undecodable")  # the consumer only knows the topic of a broken message
    for reason in DEDUP_REASONS:
        dedup_skipped.labels(reason)
    for stage in STAGES:
        processing_duration.labels(stage)
    for reason in CONTROL_REFUSALS:
        control_refused.labels(reason)
    for endpoint in ("ready", "status"):
        control_status_requests.labels(endpoint)


def mark_dead(pid: int) -> None:
    """Supervisor, after reaping a worker: drop its live gauges (its counters stay in the totals)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)


def render() -> bytes:
    """Control process: the aggregated exposition of every process's files."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


def counter_totals(*names: str) -> dict[str, dict[str, float]]:
    """Control process: each named counter summed over every process, by its first label's value."""
    files = glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "counter_*.db"))
    totals: dict[str, dict[str, float]] = {name: {} for name in names}
    for family in multiprocess.MultiProcessCollector.merge(files, accumulate=False):
        for sample in family.samples:
            by_label = totals.get(sample.name)
            if by_label is not None:
                label = next(iter(sample.labels.values()), "")
                by_label[label] = by_label.get(label, 0.0) + sample.value
    return totals
