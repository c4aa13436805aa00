"""The distribution as a user installs it: one `conflux` package, no top-level names that collide with
python-daemon (or PyPI's `daemon`, `ipc`, `workers`, `demo`), and `python -m conflux` beside `conflux`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the tree: a build leaves build/ and *.egg-info behind, and an egg-info in the checkout
    # would shadow the installed metadata (entry points) of every process started there.
    source = tmp_path_factory.mktemp("source") / "conflux"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "build", "dist", "*.egg-info", "var", "__pycache__", "examples", "node_modules"))
    # No build isolation: the test venv already has setuptools and wheel, and the build needs no network.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (found,) = out.glob("conflux_daemon-*.whl")
    return found


def test_the_wheel_holds_one_conflux_package_and_nothing_else_at_the_top(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"conflux"}
    for module in ("conflux/config.py", "conflux/daemon/supervisor.py", "conflux/workers/consumer.py",
                   "conflux/ipc/shm.py", "conflux/log/kafka/consumer.py", "conflux/cli/main.py",
                   "conflux/demo/upstream.py", "conflux/__main__.py"):
        assert module in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "conflux = conflux.cli.main:main" in text and "[conflux.commands]" in text


def test_installed_beside_python_daemon_import_daemon_stays_python_daemons(wheel, tmp_path):
    """pip install of the wheel next to python-daemon (a test dependency, so it is in this venv)."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    probe = ("import daemon, daemon.daemon, conflux, conflux.daemon.supervisor, conflux.config;"
             "print(daemon.__file__); print(conflux.daemon.supervisor.__file__); print(conflux.config.__file__)")
    # From an empty directory, so the repository's own folders are not on sys.path.
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=60, check=True)
    python_daemon, supervisor, config = out.stdout.split()
    assert "site-packages" in python_daemon and not python_daemon.startswith(str(target))
    assert supervisor.startswith(str(target)) and config.startswith(str(target))
    assert not (target / "daemon").exists() and not (target / "workers").exists()


@pytest.mark.parametrize("argv", [[sys.executable, "-m", "conflux", "--help"],
                                  [str(Path(sys.executable).parent / "conflux"), "--help"]])
def test_both_entry_points_list_every_command(argv, tmp_path):
    out = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=60, check=True)
    for command in ("run", "config", "dlq", "status", "top", "metrics",              # the CLI's own
                    "demo", "upstream", "analytics", "bench", "loadtest", "check"):  # registered by the demo
        assert f"\n    {command}" in out.stdout, out.stdout
