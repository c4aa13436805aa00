"""Who does what in one generation of workers: topics, source and partition assignments, rings.

Computed by the supervisor from the config (at start and on every reload) before any worker is
forked. With the embedded log the supervisor assigns partitions to consumers and sources to
fetchers itself; with Kafka both come from consumer-group membership at run time, so the
assignments here are empty and the workers report what they own.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from conflux.config import Config
from conflux.ipc.shm import RingSpec, create_ring, destroy_ring
from conflux.log.base import TopicPartition

SHM_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
SHM_PREFIX = "conflux-"


@dataclass
class Topology:
    generation: int
    topics: dict[str, int]
    fetcher_sources: list[list[str]]
    consumer_partitions: list[list[TopicPartition]]
    ring_dir: Path
    data_rings: dict[tuple[int, int], RingSpec] = field(default_factory=dict)   # (consumer, merger)
    ack_rings: dict[tuple[int, int], RingSpec] = field(default_factory=dict)    # (merger, consumer)

    @property
    def consumers(self) -> int:
        return len(self.consumer_partitions)

    @property
    def mergers(self) -> int:
        return len({merger for _, merger in self.data_rings})

    def consumer_rings(self, consumer: int) -> tuple[tuple[RingSpec, ...], tuple[RingSpec, ...]]:
        """(inbound ack rings from each merger, outbound data rings to each merger)."""
        mergers = range(self.mergers)
        return (tuple(self.ack_rings[(m, consumer)] for m in mergers),
                tuple(self.data_rings[(consumer, m)] for m in mergers))

    def merger_rings(self, merger: int) -> tuple[tuple[RingSpec, ...], tuple[RingSpec, ...]]:
        """(inbound data rings from each consumer, outbound ack rings to each consumer)."""
        consumers = range(self.consumers)
        return (tuple(self.data_rings[(c, merger)] for c in consumers),
                tuple(self.ack_rings[(merger, c)] for c in consumers))

    def destroy(self) -> None:
        for spec in [*self.data_rings.values(), *self.ack_rings.values()]:
            destroy_ring(spec)
        shutil.rmtree(self.ring_dir, ignore_errors=True)


def source_topics(config: Config) -> dict[str, int]:
    return {config.topic_of(source): config.log.partitions for source in config.sources}


def build(config: Config, topics: dict[str, int], generation: int, *, static_assignment: bool) -> Topology:
    """Assign work and create the rings for one generation (supervisor, before fork)."""
    workers = config.workers
    fetchers: list[list[str]] = [[] for _ in range(workers.fetchers)]
    # A child goes to its family root's fetcher, which holds the parents' index (workers.parents).
    families = list(dict.fromkeys(config.root_of(source.name) for source in config.sources))
    for source in config.sources:
        if static_assignment:
            position = families.index(config.root_of(source.name))
            fetchers[position % workers.fetchers].append(source.name)
        else:  # every fetcher is offered every source; the ownership group decides (workers.ownership)
            for offered in fetchers:
                offered.append(source.name)
    consumers: list[list[TopicPartition]] = [[] for _ in range(workers.consumers)]
    if static_assignment:
        wanted = source_topics(config)
        partitions = [(topic, p) for topic in sorted(wanted) for p in range(topics.get(topic, wanted[topic]))]
        for position, tp in enumerate(partitions):
            consumers[position % workers.consumers].append(tp)
    ring_dir = SHM_ROOT / f"{SHM_PREFIX}{os.getpid()}-g{generation}"
    ring_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    topology = Topology(generation, topics, fetchers, consumers, ring_dir)
    for c in range(workers.consumers):
        for m in range(workers.mergers):
            topology.data_rings[(c, m)] = create_ring(ring_dir, f"data-c{c}-m{m}", workers.ring_bytes)
            # Acks are tiny; a small ring is plenty and keeps /dev/shm use down.
            topology.ack_rings[(m, c)] = create_ring(ring_dir, f"ack-m{m}-c{c}", max(1 << 16, workers.ring_bytes // 16))
    return topology


def remove_stale_ring_dirs() -> None:
    """Ring directories of supervisors that died without cleaning up (kill -9)."""
    for directory in SHM_ROOT.glob(f"{SHM_PREFIX}*-g*"):
        try:
            pid = int(directory.name[len(SHM_PREFIX):].split("-g")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
