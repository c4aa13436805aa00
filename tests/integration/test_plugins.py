"""The plugin API end to end: the example plugin package (examples/conflux-example-plugin) pip-installed
into this venv, a daemon paging the demo upstream with its ``skip_take`` paginator into its ``jsonl``
sink (and the analytics sink beside it), and the errors a config gets for an unknown plugin, a bad
option (naming the field) and a plugin written for another plugin API version."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import requests

from conflux.demo.checksum import Checksum, record_digest
from tests.fixtures.daemon import config_settings, source, wait_converged, write_config
from tests.support import REPO, conflux_argv, wait_until

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "examples" / "conflux-example-plugin"
# A plugin written for a plugin API this Conflux does not speak.
OLD_PLUGIN = {
    "pyproject.toml": """\
        [build-system]
        requires = ["setuptools>=68", "wheel"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "conflux-old-plugin"
        version = "0.1.0"
        [project.entry-points."conflux.paginators"]
        old_style = "conflux_old_plugin:OldStyle"
        [tool.setuptools]
        py-modules = ["conflux_old_plugin"]
        """,
    "conflux_old_plugin.py": """\
        class OldStyle:
            api_version = 2

            async def walk(self, pages, url, since):
                return 0
        """,
}


def _pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def plugins_installed(tmp_path_factory) -> Iterator[None]:
    old = tmp_path_factory.mktemp("old-plugin")
    for name, text in OLD_PLUGIN.items():
        (old / name).write_text(textwrap.dedent(text))
    # No build isolation and no dependencies: the venv has setuptools, and Conflux is installed already.
    _pip("install", "-q", "--no-deps", "--no-build-isolation", "-e", str(EXAMPLE))
    _pip("install", "-q", "--no-deps", "--no-build-isolation", "-e", str(old))
    try:
        yield
    finally:
        _pip("uninstall", "-y", "-q", "conflux-example-plugin", "conflux-old-plugin")


class Line(msgspec.Struct):
    batch_id: str
    source: str
    key: str
    op: str
    updated_at: str
    seq: int
    data: msgspec.Raw


def _file_side(path: Path) -> tuple[str, int, int]:
    """(checksum, live count, deletes) of the records a JSON-lines file holds: the newest line per key."""
    newest: dict[str, Line] = {}
    lines = [msgspec.json.decode(line, type=Line) for line in path.read_bytes().splitlines()] if path.exists() else []
    for line in lines:
        held = newest.get(line.key)
        if held is None or (line.updated_at, line.seq) >= (held.updated_at, held.seq):
            newest[line.key] = line
    total = Checksum()
    for line in newest.values():
        if line.op == "upsert":
            total.add(record_digest(line.key, bytes(line.data)))
    return total.hexdigest(), total.count, sum(line.op == "delete" for line in lines)


def _upstream_side(upstream) -> tuple[str, int]:
    body = requests.get(f"{upstream.url}/api/customers/checksum", timeout=10).json()
    return body["checksum"], body["count"]


def test_a_plugin_paginator_into_a_plugin_sink(plugins_installed, upstream_factory, analytics, daemon_factory,
                                               tmp_path):
    upstream = upstream_factory(customers=1300, products=0, latency_ms=20)
    directory = tmp_path / "jsonl"
    daemon = daemon_factory(
        sources=[source("customers", upstream.url, path="customers/skip-take", pagination="skip_take",
                        page_size=100, records_path="", deleted="deleted", poll_interval_s=60,
                        pagination_options={"total_header": "X-Total-Count"})],
        sink_url=analytics.url, sinks=[{"name": "files", "type": "jsonl", "directory": str(directory),
                                        "batch_size": 250}])
    path = directory / "customers.jsonl"

    def same() -> bool:
        checksum, count = _upstream_side(upstream)
        return _file_side(path)[:2] == (checksum, count)

    wait_until(same, timeout_s=60, interval_s=0.25, message="the JSON-lines file to hold what the upstream holds")
    wait_converged(upstream.url, analytics.url, {"customers": "customers"}, timeout_s=30)
    stats = requests.get(f"{upstream.url}/stats", timeout=10).json()["collections"]["customers"]
    assert stats["requests"]["skip-take"] == 13 and stats["max_in_flight"] > 1   # the rest after the first: in parallel
    # A delete is a line too.
    requests.delete(f"{upstream.url}/api/customers/7", params={"style": "soft"}, timeout=10).raise_for_status()
    assert requests.post(f"{daemon.url}/sync/customers", timeout=10).status_code == 202
    wait_until(same, timeout_s=30, interval_s=0.25, message="the delete in the file")
    assert _file_side(path)[2] >= 1
    status = daemon.status()
    assert status["sources"]["customers"]["pagination"] == "skip_take"
    assert daemon.stop() == 0


def _check(tmp_path: Path, sources: list[dict], **sections) -> subprocess.CompletedProcess:
    settings = config_settings(tmp_path, sources=sources, sink_url="http://127.0.0.1:9", **sections)
    path = write_config(tmp_path, settings)
    return subprocess.run(conflux_argv("config", "check", "-c", str(path)), capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_plugin_config_errors_name_the_field(plugins_installed, tmp_path):
    url = "http://127.0.0.1:9"
    cases = [
        ([source("customers", url, pagination="skip_takes")], {},
         "sources[0] (customers).pagination: unknown pagination style 'skip_takes' (known: cursor, link, next_url, "
         "offset, old_style, page, skip_take, watermark)"),
        ([source("customers", url, pagination="skip_take", pagination_options={"take_param": 5})], {},
         "sources[0] (customers).pagination_options.take_param: Expected `str`, got `int`"),
        ([source("customers", url, pagination="skip_take", pagination_options={"skip_param": "n", "take_param": "n"})],
         {}, "sources[0] (customers).pagination_options.take_param: 'n' is also the skip_param"),
        ([source("customers", url, pagination="skip_take", pagination_options={"total": "X"})], {},
         "sources[0] (customers).pagination_options.total: unknown key"),
        ([source("customers", url, pagination="old_style")], {},
         "sources[0] (customers).pagination: the pagination style plugin 'old_style' was written for plugin API "
         "version 2; this Conflux speaks version 1"),
        ([source("customers", url)], {"sinks": [{"name": "files", "type": "jsonl", "directory": "d", "fsync": "yes"}]},
         "sinks[0].fsync: Expected `bool`, got `str`"),
        ([source("customers", url)], {"sinks": [{"name": "files", "type": "jsonl"}]},
         "sinks[0].directory: missing required key"),
        ([source("customers", url)], {"sinks": [{"name": "files", "type": "jsonls", "directory": "d"}]},
         "sinks[0].type: unknown sink type 'jsonls'"),
    ]
    for sources, sections, expected in cases:
        result = _check(tmp_path, sources, **sections)
        assert result.returncode == 3, (expected, result.stdout, result.stderr)
        assert expected in result.stderr, (expected, result.stderr)
    good = _check(tmp_path, [source("customers", url, pagination="skip_take", records_path="",
                                    pagination_options={"take_param": "top"})])
    assert good.returncode == 0, good.stderr
    assert 'take_param = "top"' in good.stdout and "[sources.pagination_options]" in good.stdout

