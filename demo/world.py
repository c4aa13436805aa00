"""The demo world as child processes: upstream, analytics sink and the daemon, wired together.

Used by `conflux demo`, `conflux bench` and `conflux check`. Each service is a real `conflux ...`
subprocess that announces its URL with a "listening on http://..." line; everything listens on
127.0.0.1 and everything is stopped when the world is closed.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

LISTENING = re.compile(rb"listening on (https?://\S+)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen
    url: str
    log_path: Path
    pump: threading.Thread | None = None

    def log_text(self) -> str:
        if self.pump is not None and self.proc.poll() is not None:
            self.pump.join(timeout=10)  # exited: its last lines may still be in the pipe, not yet in the file
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode


def start(name: str, args: list[str], log_path: Path, *, timeout_s: float = 120.0,
          env: dict[str, str] | None = None) -> ServiceProcess:
    """Run `conflux <args>` and wait for its listening line; its output goes to ``log_path``."""
    return launch(name, [sys.executable, "-m", "conflux", *args], log_path, timeout_s=timeout_s, env=env)


def launch(name: str, argv: list[str], log_path: Path, *, timeout_s: float = 120.0,
           env: dict[str, str] | None = None, cwd: Path | None = None,
           factory: type[ServiceProcess] = ServiceProcess) -> ServiceProcess:
    """Run ``argv`` in its own session and wait for its listening line; its output goes to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
    log = log_path.open("wb")
    url = _await_url(proc, log, timeout_s)
    if url is None:
        proc.kill()
        proc.wait()
        log.close()
        raise RuntimeError(f"{name} did not start; see {log_path}:\n{log_path.read_text(errors='replace')[-2000:]}")
    pump = threading.Thread(target=_pump, args=(proc, log), name=f"log-{name}", daemon=True)
    pump.start()
    return factory(name, proc, url, log_path, pump)


def _await_url(proc: subprocess.Popen, log, timeout_s: float) -> str | None:
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    seen = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not selector.select(timeout=0.5):
                if proc.poll() is not None:
                    return None
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            log.write(chunk)
            log.flush()
            seen += chunk
            match = LISTENING.search(seen)
            if match:
                return match.group(1).decode().rstrip("/")
        return None
    finally:
        selector.close()


def _pump(proc: subprocess.Popen, log) -> None:
    for line in iter(proc.stdout.readline, b""):
        log.write(line)
        log.flush()
    log.close()


@dataclass(frozen=True)
class PostgresTarget:
    """Where a PostgreSQL sink writes in a demo: the sources' tables are ``schema.<source>``."""

    dsn: str
    schema: str


@dataclass
class World:
    """The three services of a demo or benchmark run, stopped together. With ``postgres`` set, the sink's
    side is read from the tables there instead of the analytics sink's /stats."""

    directory: Path
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    postgres: PostgresTarget | None = None

    def add(self, service: ServiceProcess) -> ServiceProcess:
        self.services[service.name] = service
        return service

    def close(self) -> dict[str, int | None]:
        codes = {}
        for name in ("daemon", "upstream", "analytics"):
            if name in self.services:
                codes[name] = self.services[name].stop()
        return codes

    def sink_counts(self) -> dict[str, int]:
        if self.postgres is not None:
            from conflux.demo.pg_tables import live_count

            return {name: live_count(self.postgres.dsn, self.postgres.schema, name)
                    for name in self._collections()}
        stats = requests.get(f"{self.services['analytics'].url}/stats", timeout=10).json()
        return {name: value["count"] for name, value in stats["sources"].items()}

    def checksums(self, collections: list[str]) -> tuple[dict[str, tuple], dict[str, tuple]]:
        if self.postgres is not None:
            return self._postgres_checksums(collections)
        upstream_url = self.services["upstream"].url
        stats = requests.get(f"{self.services['analytics'].url}/stats", timeout=10).json()["sources"]
        upstream = {}
        for collection in collections:
            data = requests.get(f"{upstream_url}/api/{collection}/checksum", timeout=10).json()
            upstream[collection] = (data["checksum"], data["count"])
        sink = {c: (stats.get(c, {}).get("checksum"), stats.get(c, {}).get("count")) for c in collections}
        return upstream, sink


    def _postgres_checksums(self, collections: list[str]) -> tuple[dict[str, tuple], dict[str, tuple]]:
        """The upstream's canonical checksums (jsonb keeps parsed JSON, not the bytes) and the tables'."""
        from conflux.demo.pg_tables import table_checksum

        upstream_url = self.services["upstream"].url
        upstream, sink = {}, {}
        for collection in collections:
            data = requests.get(f"{upstream_url}/api/{collection}/checksum", params={"canonical": "true"},
                                timeout=10).json()
            upstream[collection] = (data["checksum"], data["count"])
            sink[collection] = table_checksum(self.postgres.dsn, self.postgres.schema, collection)
        return upstream, sink

    def _collections(self) -> list[str]:
        stats = requests.get(f"{self.services['upstream'].url}/stats", timeout=10).json()
        return list(stats["collections"])


def config_toml(directory: Path, *, upstream_url: str, sink_url: str, collections: dict[str, str],
                control_listen: str, webhook_secret: str = "", extra: str = "", sinks_toml: str = "") -> str:
    """A daemon config for the demo collections (name -> key field); ``sinks_toml`` ([[sinks]] tables)
    replaces the [sink] table of ``sink_url``."""
    sources = []
    for name, key in collections.items():
        webhook = f'webhook_secret = "{webhook_secret}"\n' if webhook_secret else ""
        sources.append(f'[[sources]]\nname = "{name}"\nurl = "{upstream_url}/api/{name}"\nkey = "{key}"\n'
                       f"page_size = 1000\npoll_interval_s = 5\n{webhook}")
    sinks = sinks_toml or f'[sink]\nurl = "{sink_url}/ingest"\n'
    return (f'[log]\npath = "{directory}/var/conflux.db"\npartitions = 4\n\n' + "\n".join(sources) +
            f'\n{sinks}\n[control]\nlisten = "{control_listen}"\n\n'
            f'[daemon]\nstate_dir = "{directory}/var"\n{extra}')
