"""A parent and its children (and theirs) are synced by one fetcher, which keeps the parents' index:
the supervisor's static assignment and the Kafka ownership group both place a source by its family's root."""

from __future__ import annotations

import asyncio

from conflux.config import Config, SourceConfig, WorkersConfig
from conflux.daemon import topology
from conflux.workers.ownership import KafkaOwnership, source_partition


def family_config(fetchers: int) -> Config:
    def make(name: str, parent: str = "") -> SourceConfig:
        url = "http://u/api/{parent.id}/x" if parent else "http://u/api/x"
        return SourceConfig(name=name, url=url, parent=parent)

    return Config(sources=[make("a"), make("c"), make("b", "a"), make("e"), make("d", "b"), make("f", "e")],
                  workers=WorkersConfig(fetchers=fetchers, consumers=1, mergers=1, ring_bytes=1 << 16))


def test_the_static_assignment_keeps_a_family_in_one_fetcher() -> None:
    config = family_config(fetchers=3)
    assert [config.root_of(name) for name in "abcdef"] == ["a", "a", "c", "a", "e", "e"]
    built = topology.build(config, topology.source_topics(config), 1, static_assignment=True)
    try:
        assert built.fetcher_sources == [["a", "b", "d"], ["c"], ["e", "f"]]
    finally:
        built.destroy()


class FakeMember:
    def start(self, on_assign, on_revoke) -> None:
        self.on_assign, self.on_revoke = on_assign, on_revoke

    def partition_count(self, topic: str) -> int:
        return 64

    def poll(self, max_messages: int, timeout_s: float) -> list:
        return []


class FakeBackend:
    sources_topic = "conflux.sources"

    def source_member(self) -> FakeMember:
        return FakeMember()


class Owner:
    def __init__(self) -> None:
        self.owned: list[str] = []

    def gain(self, sources: list[str]) -> None:
        self.owned += sources

    def lose(self, sources: list[str]) -> None:
        self.owned = [name for name in self.owned if name not in sources]


def test_kafka_ownership_hands_a_family_over_with_its_roots_partition() -> None:
    config = family_config(fetchers=1)
    names = [source.name for source in config.sources]
    ownership = KafkaOwnership(FakeBackend(), names, roots={name: config.root_of(name) for name in names})
    owner = Owner()

    async def scenario() -> None:
        task = asyncio.create_task(ownership.run(owner))
        await asyncio.sleep(0.01)
        ownership._on_assign([("conflux.sources", source_partition("a", 64))])
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert sorted(owner.owned) == ["a", "b", "d"]
