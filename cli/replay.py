"""`conflux dlq replay`: put dead-lettered records back into the pipeline, and forget them once delivered.

Runs in the CLI process against the configured log, while the daemon runs. Each entry's record is
checked again with its source's current settings (a fixed key mapping, say); what now passes is
published to the source's topic as a batch of sync type "replay", which consumers never skip as a
duplicate. An entry is removed only after the consumer group has committed past its batch (the
sink took it) and only if it did not fail again meanwhile (its last_seen did not move).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import msgspec

from conflux.config import Config
from conflux.errors import ConfigError, PageFormatError
from conflux.ipc.codec import encode_batch
from conflux.ipc.messages import DeadLetter, Position
from conflux.log.base import DeadLetterStore, LogBackend, OutgoingMessage
from conflux.workers.batching import Columns, RecordSchema, publish_limit_bytes, split_by_partition

POLL_S = 0.2


def replay(config: Config, backend: LogBackend, store: DeadLetterStore, entries: list[DeadLetter], *,
           timeout_s: float, started: float) -> dict:
    """Replay ``entries``; the report counts each outcome. ``skipped_reasons`` (entry id -> why) names the
    entries that could not be replayed at all; they stay in the DLQ, and the others still go."""
    outcome = asyncio.run(_publish(config, backend, store, entries))
    published = outcome.published
    pending = _wait_for_commits(backend, published, timeout_s)
    delivered_ids = [entry_id for entry_id, positions in published.items() if not positions & pending]
    removed = store.remove(delivered_ids, unless_seen_after=started)
    return {"entries": len(entries), "replayed": len(published), "still_invalid": outcome.still_invalid,
            "skipped": len(outcome.skipped), "skipped_ids": sorted(outcome.skipped),
            "delivered": removed, "failed_again": len(delivered_ids) - removed,
            "pending": len([1 for positions in published.values() if positions & pending]),
            "skipped_reasons": outcome.skipped}


@dataclass
class _Outcome:
    published: dict[str, set[Position]] = field(default_factory=dict)
    still_invalid: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


async def _publish(config: Config, backend: LogBackend, store: DeadLetterStore, entries: list[DeadLetter]) -> _Outcome:
    producer = backend.producer()
    outcome = _Outcome()
    try:
        for entry in entries:
            try:
                topic, columns = _recheck(config, entry)
            except (ConfigError, PageFormatError) as exc:
                outcome.skipped[entry.id] = str(exc)
                continue
            if columns.dead:
                outcome.still_invalid += 1
                store.add([msgspec.structs.replace(entry, reason=columns.dead[0][2], last_seen=time.time(),
                                                   attempts=1)])
                continue
            batches = split_by_partition(columns, entry.source, "replay", producer.partitions_for(topic),
                                         max_batch_bytes=publish_limit_bytes(config.workers.ring_bytes, topic))
            positions = await producer.publish([OutgoingMessage(topic, partition, batch.keys[0].encode(),
                                                                encode_batch(batch)) for partition, batch in batches])
            outcome.published[entry.id] = set(positions)
    finally:
        await producer.close()
    return outcome


def _recheck(config: Config, entry: DeadLetter) -> tuple[str, Columns]:
    """The entry's topic and its record checked again with the source's current settings."""
    try:
        source = config.source(entry.source)
    except KeyError:
        raise ConfigError(f"its source {entry.source!r} is no longer in the config") from None
    schema = RecordSchema(source)
    records, fields = schema.body_records(bytes(entry.record))
    return config.topic_of(source), schema.columns(records, fields)


def _wait_for_commits(backend: LogBackend, published: dict[str, set[Position]], timeout_s: float) -> set[Position]:
    """Positions the group has not committed past when the deadline comes (empty: all delivered)."""
    pending = {position for positions in published.values() for position in positions}
    deadline = time.monotonic() + timeout_s
    while pending:
        committed = backend.committed_offsets()
        pending = {p for p in pending if committed.get((p.topic, p.partition), 0) <= p.offset}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return pending
