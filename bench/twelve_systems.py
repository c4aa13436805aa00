"""Throughput of deploy/examples/twelve-systems.toml as shipped: twelve collections, twelve topics.

    .venv/bin/python bench/twelve_systems.py 50000     # records per system (12 systems)

Starts `conflux upstream --systems 10` with that many records per collection and the demo sink, runs
the example config against them (only the URLs and the state location swapped), and prints the time
from daemon start to equal checksums for all twelve collections.
"""

from __future__ import annotations

import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from conflux.config import to_toml  # noqa: E402  (after the path set-up, so it runs from a checkout)
from conflux.demo.world import World, start  # noqa: E402

EXAMPLE = REPO / "deploy" / "examples" / "twelve-systems.toml"


def main(records_each: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="conflux-twelve-"))
    world = World(directory)
    try:
        upstream = world.add(start("upstream", [
            "upstream", "--port", "0", "--customers", str(records_each), "--products", str(records_each),
            "--systems", "10", "--records-per-system", str(records_each)], directory / "upstream.log", timeout_s=300))
        sink = world.add(start("analytics", ["analytics", "--port", "0"], directory / "analytics.log"))
        example = tomllib.loads(EXAMPLE.read_text())
        for source in example["sources"]:
            source["url"] = source["url"].replace("http://127.0.0.1:8081", upstream.url)
        example["sink"]["url"] = f"{sink.url}/ingest"
        example["log"]["path"] = str(directory / "var" / "conflux.db")
        example.setdefault("control", {})["listen"] = "127.0.0.1:0"
        example.setdefault("daemon", {})["state_dir"] = str(directory / "var")
        (directory / "conflux.toml").write_text(to_toml(example))
        names = [source["name"] for source in example["sources"]]
        started = time.monotonic()
        world.add(start("daemon", ["run", "-c", str(directory / "conflux.toml")], directory / "conflux.log"))
        while True:
            upstream_sums, sink_sums = world.checksums(names)
            if upstream_sums == sink_sums:
                break
            time.sleep(0.1)  # polling both services' checksums is the measurement
        elapsed_s = time.monotonic() - started
        total = sum(count for _checksum, count in upstream_sums.values())
        print(f"twelve systems: {total:,} records in {elapsed_s:.2f} s from daemon start to equal checksums "
              f"= {total / elapsed_s:,.0f} records/s (workers {example.get('workers')})")
    finally:
        world.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)
