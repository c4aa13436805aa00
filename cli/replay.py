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

from conflux.config import Config
from conflux.errors import ConfigError
from conflux.ipc.codec import encode_batch
from conflux.ipc.messages import DeadLetter, Position
from conflux.log.base import DeadLetterStore, LogBackend, OutgoingMessage
from conflux.workers.batching import RecordSchema, split_by_partition

POLL_S = 0.2


def replay(config: Config, backend: LogBackend, store: DeadLetterStore, entries: list[DeadLetter], *,
           timeout_s: float, started: float) -> dict[str, int]:
    published, still_invalid = asyncio.run(_publish(config, backend, store, entries))
    pending = _wait_for_commits(backend, published, timeout_s)
    delivered_ids = [entry_id for entry_id, positions in published.items() if not positions & pending]
    removed = store.remove(delivered_ids, unless_seen_after=started)
    return {"entries": len(entries), "replayed": len(published), "still_invalid": still_invalid,
            "delivered": removed, "failed_again": len(delivered_ids) - removed,
            "pending": len([1 for positions in published.values() if positions & pending])}


async def _publish(config: Config, backend: LogBackend, store: DeadLetterStore,
                   entries: list[DeadLetter]) -> tuple[dict[str, set[Position]], int]:
    producer = backend.producer()
    published: dict[str, set[Position]] = {}
    still_invalid = 0
    try:
        for entry in entries:
            try:
                source = config.source(entry.source)
            except KeyError:
                raise ConfigError(f"dead letter {entry.id} belongs to source {entry.source!r}, "
                                  "which the config no longer has") from None
            schema = RecordSchema(source)
            records, fields = schema.body_records(bytes(entry.record))
            columns = schema.columns(records, fields)
            if columns.dead:
                still_invalid += 1
                now = time.time()
                store.add([DeadLetter(id=entry.id, source=entry.source, reason=columns.dead[0][2], stage=entry.stage,
                                      record=entry.record, key=entry.key, origin=entry.origin,
                                      first_seen=entry.first_seen, last_seen=now)])
                continue
            topic = config.topic_of(source)
            batches = split_by_partition(columns, source.name, "replay", producer.partitions_for(topic))
            positions = await producer.publish([OutgoingMessage(topic, partition, batch.keys[0].encode(),
                                                                encode_batch(batch)) for partition, batch in batches])
            published[entry.id] = set(positions)
    finally:
        await producer.close()
    return published, still_invalid


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
