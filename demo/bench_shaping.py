"""`conflux bench --shaping`: the same export with records shaped on the way, and its throughput as a
fraction of the plain run's.

The demo upstream is restarted serving the same records (same seed and counts) nested
(``--layout nested``: the key and updated_at in a ``meta`` object) with epoch-millisecond stamps; each
source reads its key as ``meta.<key>`` and its timestamp as ``epoch_ms`` from ``meta.updated_at``,
selects ``meta`` and every field but the last, and renames the first. The records the sink holds are
not the upstream's bytes any more, so the export counts as complete when the sink holds as many
records per source as the upstream lists, and a sample of them is compared field by field.
"""

from __future__ import annotations

import random
from pathlib import Path

import requests

from conflux.demo.datagen import CUSTOMERS, PRODUCTS, system_spec

SAMPLE_PER_SOURCE = 200
SINK_READ_S = 600.0
TIMESTAMP_FLAGS = ["--timestamp-precision", "ms", "--timestamp-format", "epoch_ms", "--layout", "nested"]


def shaping_options(collections: dict[str, str]) -> dict[str, dict]:
    """Per collection: a nested key, an epoch timestamp, select and rename."""
    options = {}
    for name, key in collections.items():
        columns = _columns(name)
        options[name] = {"key": f"meta.{key}", "updated": "meta.updated_at", "updated_format": "epoch_ms",
                         "fields": {"select": ["meta", *columns[:-1]], "rename": {columns[0]: "title"}}}
    return options


def _columns(name: str) -> list[str]:
    """The data fields of a demo collection, in the order the upstream writes them."""
    specs = {spec.name: spec for spec in (CUSTOMERS, PRODUCTS, *(system_spec(n) for n in range(1, 40)))}
    return [column for column, _generate in specs[name].columns]


def shaped(record: dict, name: str) -> dict:
    """What the sink should hold for an upstream record of ``name``."""
    columns = _columns(name)
    kept = {"meta": record["meta"], **{column: record[column] for column in columns[:-1] if column in record}}
    kept["title"] = kept.pop(columns[0])
    return kept


class ShapedExport:
    """The `exported` check of the shaping run: the sink holds as many records per source as the upstream
    lists; `sample_equal` then compares a sample of them with the upstream's, shaped."""

    def __init__(self, world, collections: dict[str, str]) -> None:
        self.world = world
        self.collections = collections

    def __call__(self) -> bool:
        upstream, sink = self.world.checksums(list(self.collections))
        return all(upstream[name][1] == sink[name][1] for name in self.collections)

    def sample_equal(self, sink_url: str, seed: int = 7) -> bool:
        """A random sample of each source's records, read from the upstream by position, equal in the sink."""
        upstream_url = self.world.services["upstream"].url
        rng = random.Random(seed)
        for name, key_field in self.collections.items():
            count = self.world.checksums([name])[0][name][1]
            for offset in rng.sample(range(count), min(SAMPLE_PER_SOURCE, count)):
                [record] = requests.get(f"{upstream_url}/api/{name}/offset", params={"offset": offset, "limit": 1},
                                        timeout=10).json()["data"]
                # The demo sink folds its journal before it answers the first of these: minutes for 1M records.
                stored = requests.get(f"{sink_url}/records/{name}/{record['meta'][key_field]}", timeout=SINK_READ_S)
                if stored.status_code != 200 or stored.json()["data"] != shaped(record, name):
                    return False
        return True


def start_shaped_upstream(world, directory: Path, count_flags: list[str], start) -> None:
    """Replace the plain upstream with one serving the same records nested, with epoch stamps."""
    world.services["upstream"].stop()
    world.add(start("upstream", ["upstream", "--port", "0", "--seed", "7", *TIMESTAMP_FLAGS, *count_flags],
                    directory / "upstream-shaped.log", timeout_s=300))
