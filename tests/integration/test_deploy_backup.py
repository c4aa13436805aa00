"""The backup and restore recipes of docs/OPERATIONS.md, run exactly as written (only their
DB/BACKUP/PYTHON variables set): a backup taken from a running daemon on the embedded log, restored
into a new daemon, resumes with an incremental sync and the sink converges, changes made after the
backup included."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.fixtures.daemon import both_sources, wait_converged
from tests.support import REPO, wait_until

OPERATIONS = REPO / "docs" / "OPERATIONS.md"
BOTH = {"customers": "customers", "products": "products"}


def recipe(name: str) -> str:
    """The ```sh block that follows `<!-- recipe: NAME -->` in the operations guide."""
    text = OPERATIONS.read_text()
    marker = f"<!-- recipe: {name} -->\n```sh\n"
    assert marker in text, f"docs/OPERATIONS.md has no '{name}' recipe"
    start = text.index(marker) + len(marker)
    return text[start:text.index("\n```\n", start)]


def run_recipe(name: str, **variables: str) -> str:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", recipe(name)], env={**os.environ, **variables},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"the {name} recipe failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _touch(upstream_url: str, keys: range, tier: str) -> None:
    for key in keys:
        requests.put(f"{upstream_url}/api/customers/{key}", json={"tier": tier}, timeout=10).raise_for_status()


def _checkpoints(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[0] for row in conn.execute("SELECT source FROM checkpoints")}


@pytest.mark.slow
def test_a_backup_of_a_running_daemon_restores_into_one_that_resumes_incrementally(
        upstream_factory, analytics, daemon_factory, tmp_path):
    upstream = upstream_factory(customers=3000, products=3000)
    sources = both_sources(upstream.url, poll_interval_s=0.5)
    original = daemon_factory(sources=sources, sink_url=analytics.url)
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=90)
    for name in BOTH:  # past the full sync: the watermarks are checkpointed
        wait_until(lambda name=name: original.sync_ok(name, sync_type="incremental"), timeout_s=30,
                   message=f"an incremental sync of {name}")

    # The daemon keeps polling and writing while the backup runs.
    _touch(upstream.url, range(1, 51), "before-backup")
    backup = tmp_path / "backups" / "conflux.db"
    run_recipe("backup", DB=original.settings["log"]["path"], BACKUP=str(backup), PYTHON=sys.executable)
    assert sorted(path.name for path in backup.parent.iterdir()) == ["conflux.db"], "leftovers beside the backup"
    assert _checkpoints(backup) == set(BOTH)

    _touch(upstream.url, range(51, 81), "after-backup")
    assert original.stop() == 0, original.log()[-3000:]

    restored_db = tmp_path / "restored" / "conflux.db"
    restored_db.parent.mkdir()
    (restored_db.parent / "conflux.db-wal").write_bytes(b"stale")  # must be moved aside, not replayed
    run_recipe("restore", DB=str(restored_db), BACKUP=str(backup))
    assert [p.name for p in restored_db.parent.glob("conflux.db.replaced-*/*")] == ["conflux.db-wal"]

    restored = daemon_factory(sources=sources, sink_url=analytics.url, log={"path": str(restored_db)})
    wait_converged(upstream.url, analytics.url, BOTH, timeout_s=90)
    report = wait_until(lambda: restored.sync_ok("customers"), timeout_s=30, message="a sync after the restore")
    assert report["last_sync_type"] == "incremental" and report["last_sync_records"] < 3000
    assert "full sync" not in restored.log(), restored.log()[-3000:]
    assert restored.stop() == 0
