"""`conflux check`: the integration check against a running deployment (the old integration_test.py).

1. health of the upstream, the daemon (/health and /ready) and the sink;
2. create a customer in the upstream;
3. trigger an incremental sync through the daemon's control API;
4. verify that the customer arrived at the sink, and report the end-to-end latency.
Exit status 0 when every step passed. ``-c conflux.toml`` finds the daemon's control address and
token; ``--json FILE`` also writes the report as JSON.
"""

from __future__ import annotations

import argparse
import time

import msgspec
import requests


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="the daemon's config (control address, token, sink URL)")
    parser.add_argument("--upstream", default="http://127.0.0.1:8081", help="demo upstream URL")
    parser.add_argument("--daemon", help="control URL (default: from -c, else http://127.0.0.1:9108)")
    parser.add_argument("--sink", help="analytics sink URL (default: from -c, else http://127.0.0.1:8082)")
    parser.add_argument("--source", default="customers", help="the source to check (customers)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the record (60)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")


def _endpoints(args) -> tuple[str, str, dict[str, str]]:
    daemon, sink, headers = args.daemon, args.sink, {}
    if args.config:
        from conflux.config import load_config
        from conflux.secrets import read_secret

        config = load_config(args.config)
        if not config.control.listen.endswith(":0"):  # port 0 is picked at start: not knowable from here
            daemon = daemon or f"http://{config.control.listen}"
        sink = sink or config.sink.url.rsplit("/ingest", 1)[0]
        token = read_secret(env=config.control.token_env, literal=config.control.token, what="control.token")
        if token:
            headers["Authorization"] = f"Bearer {token}"
    return daemon or "http://127.0.0.1:9108", sink or "http://127.0.0.1:8082", headers


def _step(report: list, name: str, action) -> object:
    started = time.monotonic()
    try:
        result = action()
        report.append({"step": name, "ok": True, "ms": round((time.monotonic() - started) * 1000, 1)})
        return result
    except Exception as exc:  # every failure becomes a failed step in the report, never a traceback
        report.append({"step": name, "ok": False, "error": str(exc)[:300]})
        return None


def _healthy(url: str, headers: dict | None = None) -> None:
    response = requests.get(url, headers=headers or {}, timeout=10)
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:200]}")


def run(args: argparse.Namespace) -> int:
    daemon, sink, headers = _endpoints(args)
    steps: list[dict] = []
    _step(steps, "upstream health", lambda: _healthy(f"{args.upstream}/health"))
    _step(steps, "daemon health", lambda: _healthy(f"{daemon}/health"))
    _step(steps, "daemon ready", lambda: _healthy(f"{daemon}/ready"))
    _step(steps, "sink health", lambda: _healthy(f"{sink}/health"))
    created_at = time.time()
    record = _step(steps, "create a customer", lambda: _create(args.upstream, args.source))
    if record is not None:
        _step(steps, "trigger an incremental sync", lambda: _trigger(daemon, args.source, headers))
        key = str(record.get("sku" if args.source == "products" else "id"))
        arrived = _step(steps, "customer arrived at the sink",
                        lambda: _await(sink, args.source, key, record["updated_at"], args.timeout))
        latency_ms = round((arrived - created_at) * 1000, 1) if arrived else None
    else:
        latency_ms = None
    ok = all(step["ok"] for step in steps)
    report = {"ok": ok, "steps": steps, "end_to_end_ms": latency_ms}
    print("conflux check")
    for step in steps:
        detail = f"{step['ms']} ms" if step["ok"] else step["error"]
        print(f"  [{'ok' if step['ok'] else 'FAIL'}] {step['step']}: {detail}")
    print(f"  end-to-end latency: {latency_ms} ms" if latency_ms is not None else "  end-to-end latency: -")
    if args.json:
        with open(args.json, "wb") as handle:
            handle.write(msgspec.json.format(msgspec.json.encode(report)))
    return 0 if ok else 1


def _create(upstream: str, source: str) -> dict:
    response = requests.post(f"{upstream}/api/{source}", json={"name": "Conflux Check", "email": "check@example.com",
                                                               "tier": "gold"}, timeout=10)
    response.raise_for_status()
    return response.json()


def _trigger(daemon: str, source: str, headers: dict) -> None:
    response = requests.post(f"{daemon}/sync/{source}", headers=headers, timeout=10)
    if response.status_code != 202:
        raise RuntimeError(f"sync request answered {response.status_code}: {response.text[:200]}")


def _await(sink: str, source: str, key: str, updated_at: str, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = requests.get(f"{sink}/records/{source}/{key}", timeout=10)
        if response.ok and response.json().get("updated_at", "") >= updated_at:
            return time.time()
        time.sleep(0.05)  # polling the sink across processes; there is no event to wait on
    raise RuntimeError(f"{source}/{key} did not reach the sink within {timeout_s:g} s")
