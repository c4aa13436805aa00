"""Which sources a fetcher process syncs: fixed by the supervisor, or decided by Kafka's group protocol.

With the embedded log one host runs everything, and the supervisor's assignment is final
(``StaticOwnership``). With Kafka, several ``conflux run`` instances share the work
(``KafkaOwnership``): every fetcher process is offered every source and is a member of the consumer
group ``<group>.fetchers`` on the topic ``<prefix>conflux.sources``, whose partitions stand for
sources (a source's partition is a stable hash of its name). The group coordinator, not Conflux,
decides who holds which partition, so each source has exactly one live fetcher, and a dead one's
sources move to a survivor when its session times out. No messages are ever written to that topic.

Both run as one task in the fetcher's event loop and tell their ``Owner`` (the fetcher) which
sources it gains and loses.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Protocol

from xxhash import xxh3_64_intdigest

from conflux.log.base import LogBackend, TopicPartition

logger = logging.getLogger(__name__)

# How often the group member is polled: rebalance callbacks run only inside poll.
POLL_INTERVAL_S = 0.1


class Owner(Protocol):
    def gain(self, sources: list[str]) -> None: ...

    def lose(self, sources: list[str]) -> None: ...


class SourceOwnership(Protocol):
    async def run(self, owner: Owner) -> None:
        """Runs until cancelled; calls ``owner.gain`` / ``owner.lose`` as ownership changes."""
        ...

    def close(self) -> None:
        """Give up every source (a Kafka member leaves its group, so a survivor takes over at once)."""
        ...


def source_partition(source: str, partitions: int) -> int:
    """The same in every instance and release: xxh3 of the name, not Python's per-process hash()."""
    return xxh3_64_intdigest(source.encode()) % partitions


def ownership_for(backend: LogBackend, sources: list[str], *, roots: dict[str, str] | None = None) -> SourceOwnership:
    """``roots``: each source's family root (``Config.root_of``); a family is owned as one, by its root's
    partition, because a child is walked from its parent's index in the same process."""
    if backend.name == "kafka":
        return KafkaOwnership(backend, sources, roots=roots)
    return StaticOwnership(sources)


class StaticOwnership:
    """The supervisor's assignment: everything offered is owned, for the life of the process."""

    def __init__(self, sources: list[str]) -> None:
        self.sources = list(sources)

    async def run(self, owner: Owner) -> None:
        owner.gain(self.sources)
        await asyncio.Future()  # until cancelled

    def close(self) -> None:
        pass


class KafkaOwnership:
    """A seat in the ``<group>.fetchers`` group; assigned partitions of the sources topic are owned sources."""

    def __init__(self, backend, sources: list[str], *, roots: dict[str, str] | None = None) -> None:
        self.member = backend.source_member()
        self.topic = backend.sources_topic
        self.sources = list(sources)
        self.roots = roots or {}
        self.by_partition: dict[int, list[str]] = {}
        self.owner: Owner | None = None

    async def run(self, owner: Owner) -> None:
        self.owner = owner
        self.member.start(self._on_assign, self._on_revoke)
        partitions = self.member.partition_count(self.topic)
        by_partition = defaultdict(list)
        for name in self.sources:
            by_partition[source_partition(self.roots.get(name, name), partitions)].append(name)
        self.by_partition = dict(by_partition)
        while True:
            self.member.poll(1, 0.0)
            await asyncio.sleep(POLL_INTERVAL_S)

    def _sources_of(self, partitions: list[TopicPartition]) -> list[str]:
        return [name for _, partition in partitions for name in self.by_partition.get(partition, [])]

    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        sources = self._sources_of(partitions)
        if sources:
            logger.info("now fetching %s", ", ".join(sources))
            self.owner.gain(sources)

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        sources = self._sources_of(partitions)
        if sources:
            logger.info("no longer fetching %s", ", ".join(sources))
            self.owner.lose(sources)

    def close(self) -> None:
        self.member.close()
