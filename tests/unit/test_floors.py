"""The floors of the package, read from the source: nothing imports from a floor above its own, no module
imports itself in a circle, and every import names the installed package (``conflux.…``).

Lowest first: ipc; the ground (errors, config, metrics, logs, secrets); log; workers; daemon; cli; demo.
Imports inside functions and under TYPE_CHECKING count too: a lazy import upwards is still an arrow upwards.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# package -> the repository folder it is installed from (setup.cfg's package_dir)
FOLDERS = {"conflux": "conflux", "conflux.ipc": "ipc", "conflux.log": "log", "conflux.workers": "workers",
           "conflux.daemon": "daemon", "conflux.cli": "cli", "conflux.demo": "demo"}
FLOORS = ["conflux.ipc", "conflux.ground", "conflux.log", "conflux.workers", "conflux.daemon", "conflux.cli",
          "conflux.demo"]
GROUND = {"conflux.errors", "conflux.config", "conflux.metrics", "conflux.logs", "conflux.secrets", "conflux.redact",
          "conflux.plugins"}
BARE = {"daemon", "workers", "ipc", "log", "demo", "cli"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            if package == "conflux" and parts and f"conflux.{parts[0]}" in FOLDERS:
                continue
            found[name] = path
    return found


def imports_of(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, wherever it stands."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, node.lineno))
            out += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return out


def floor_of(module: str) -> int | None:
    if module in GROUND or any(module.startswith(g + ".") for g in GROUND):
        return FLOORS.index("conflux.ground")
    for index, floor in enumerate(FLOORS):
        if module == floor or module.startswith(floor + "."):
            return index
    return None


ALL = modules()


def internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in ALL}
    for name, path in ALL.items():
        for target, _line in imports_of(name, path):
            if target in ALL and target != name:
                edges[name].add(target)
    return edges


def test_every_module_of_the_root_package_has_a_floor():
    unplaced = [name for name in ALL if floor_of(name) is None and name not in ("conflux", "conflux.__main__")]
    assert not unplaced, f"modules on no floor (add them to GROUND or a package): {unplaced}"


def test_the_tree_is_where_setup_cfg_says():
    assert {"conflux.config", "conflux.daemon.supervisor", "conflux.workers.consumer", "conflux.ipc.shm",
            "conflux.cli.main", "conflux.demo.upstream"} <= set(ALL)


@pytest.mark.parametrize("name", sorted(ALL))
def test_no_import_reaches_a_floor_above(name):
    own = floor_of(name)
    upwards = [f"line {line}: {target} ({FLOORS[floor_of(target)]})" for target, line in imports_of(name, ALL[name])
               if target.startswith("conflux.") and floor_of(target) is not None and own is not None
               and floor_of(target) > own]
    assert not upwards, f"{name} ({FLOORS[own]}) imports from above its floor: " + "; ".join(upwards)


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_import_names_the_installed_package(name):
    bare = [f"line {line}: {target}" for target, line in imports_of(name, ALL[name]) if target.split(".")[0] in BARE]
    assert not bare, f"{name} imports a folder by its bare name: " + "; ".join(bare)


def test_no_module_imports_itself_in_a_circle():
    circles = [component for component in strongly_connected(internal_edges()) if len(component) > 1]
    assert not circles, f"import circles: {circles}"


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that reach each other through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def test_the_checker_sees_an_upward_import(tmp_path):
    """The floor check must be able to fail: a made-up upward arrow is reported."""
    assert floor_of("conflux.daemon.supervisor") > floor_of("conflux.workers.fetcher")
    assert floor_of("conflux.config") < floor_of("conflux.log")
    assert ("conflux.cli.main", 3) in imports_of("conflux.ipc.x", _file(tmp_path, "from conflux.cli.main import m"))
    assert ("conflux.ipc.codec", 3) in imports_of("conflux.ipc.shm", _file(tmp_path, "from . import codec"))
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"], ["c"]]


def _file(tmp_path: Path, line: str) -> Path:
    path = tmp_path / "mod.py"
    path.write_text(f'"""doc"""\n\n{line}\n')
    return path
