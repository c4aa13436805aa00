"""`conflux status -c F` prints the running daemon's state as tables; `conflux top -c F` keeps it live.

Both run in the operator's shell, not in the daemon: they read the control address (``[control]
listen``) and token from the config, ask the daemon's ``GET /status`` over HTTP and render the answer.
`top` redraws every ``--interval`` seconds until q, Ctrl-C or TERM (handled explicitly, so it stops even
when started with SIGINT ignored, as background jobs are); ``--once`` and ``--iterations N`` stop on their
own (scripts, tests). When stdout is not a terminal, frames are printed one after another. With ``[control]
tls_cert_file`` set they use https; ``--cacert`` names the CA to trust (default: the system's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from datetime import datetime

import requests

from conflux.cli.stop_signals import StopSignals

REQUEST_TIMEOUT_S = 5.0
CIRCUIT = ("closed", "half_open", "open")


class StatusError(Exception):
    """The daemon could not be asked (not running, wrong address, refused token)."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="TOML config file; its [control] listen and token are used")
    parser.add_argument("--url", help="control URL, e.g. http://127.0.0.1:9108 (default: from the config)")
    parser.add_argument("--cacert", metavar="FILE", help="CA certificate(s) to trust for an https control port")
    if parser.prog.endswith(" top"):
        parser.add_argument("--interval", dest="interval_s", type=float, default=2.0, metavar="SECONDS",
                            help="seconds between refreshes (default %(default)s)")
        parser.add_argument("--once", action="store_true", help="draw one frame and exit")
        parser.add_argument("--iterations", type=int, default=0, metavar="N",
                            help="exit after N frames (default: until q)")
    else:
        parser.add_argument("--json", action="store_true", help="print the /status JSON as it is")


def run(args: argparse.Namespace) -> int:
    try:
        client = StatusClient.from_args(args)
        if args.command == "top":
            return top(client, frames=1 if args.once else args.iterations, interval_s=args.interval_s)
        return print_status(client, as_json=args.json)
    except StatusError as exc:
        print(f"conflux {args.command}: {exc}", file=sys.stderr)
        return 1


class StatusClient:
    def __init__(self, url: str, token: str = "", *, cacert: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        # Per request, not on the session: REQUESTS_CA_BUNDLE in the environment would win over session.verify.
        self.verify: str | bool = cacert or True
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StatusClient:
        from conflux.config import load_config
        from conflux.errors import ConfigError
        from conflux.secrets import read_secret

        try:
            config = load_config(args.config, secrets="none")  # only the control token, read below
            token = read_secret(env=config.control.token_env, literal=config.control.token, what="control.token")
        except ConfigError as exc:
            raise StatusError(f"config error: {exc}") from None
        url = args.url or control_url(config.control.listen, tls=bool(config.control.tls_cert_file))
        return cls(url, token, cacert=args.cacert)

    def status(self) -> dict:
        try:
            response = self.session.get(f"{self.url}/status", timeout=REQUEST_TIMEOUT_S, verify=self.verify)
        except requests.RequestException as exc:
            raise StatusError(f"cannot reach the daemon at {self.url}: {type(exc).__name__}") from None
        if response.status_code == 401:
            raise StatusError(f"{self.url} refused the request: check [control] token")
        if response.status_code != 200:
            raise StatusError(f"{self.url}/status answered {response.status_code}: {response.text[:200]}")
        return response.json()


def control_url(listen: str, *, tls: bool = False) -> str:
    """``[control] listen`` as a URL to connect to: a wildcard address means this host."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if port == "0":
        raise StatusError("control.listen has port 0 (chosen at start-up); pass --url")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def print_status(client: StatusClient, *, as_json: bool) -> int:
    status = client.status()
    if as_json:
        import json

        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(render(status))
    return 0


# -- rendering ---------------------------------------------------------------------------------------------


def render(status: dict, *, rates: bool = False) -> str:
    """The status as text: a summary line, then sources, workers and partitions as tables."""
    now = status.get("generated_at") or time.time()
    sections = [summary(status), "", "SOURCES", *source_table(status, now, rates=rates), "",
                "WORKERS", *worker_table(status), "", "PARTITIONS", *partition_table(status)]
    return "\n".join(sections)


def summary(status: dict) -> str:
    daemon, ready = status.get("daemon", {}), status.get("ready", {})
    readiness = "ready" if ready.get("ready") else "NOT READY: " + "; ".join(ready.get("reasons", []))
    lag = sum(p.get("lag") or 0 for p in status.get("partitions", []))
    return (f"conflux {daemon.get('state', '?')} · {readiness} · pid {daemon.get('pid')} · "
            f"{daemon.get('backend')} log · generation {daemon.get('generation')} · "
            f"up {duration(daemon.get('uptime_s'))} · consumer lag {lag}")


def source_table(status: dict, now: float, *, rates: bool) -> list[str]:
    throughput = status.get("throughput", {}).get("sources", {})
    headers = ["SOURCE", "LAST SYNC", "TYPE", "RESULT", "RECORDS", "SUCCESS", "WATERMARK", "SYNC LAG", "BREAKER"]
    if rates:
        headers[5:5] = ["FETCHED/S", "DELIVERED/S"]
    rows = []
    for name, source in status.get("sources", {}).items():
        result = "syncing" if source.get("syncing") else (source.get("last_sync_result") or "-")
        row = [name, ago(source.get("last_sync_at"), now), source.get("last_sync_type") or "-", result,
               source.get("records_synced", 0), percent(source.get("success_rate")), source.get("watermark") or "-",
               duration(sync_lag_s(source.get("watermark"), now)), source.get("breaker", "-")]
        if rates:
            per_s = throughput.get(name, {})
            row[5:5] = [per_s.get("fetched_per_s", 0.0), per_s.get("delivered_per_s", 0.0)]
        rows.append(row)
    return table(headers, rows)


def worker_table(status: dict) -> list[str]:
    headers = ["WORKER", "ROLE", "PID", "STATE", "RESTARTS", "PARTITIONS", "HEARTBEAT", "DETAIL"]
    rows = []
    for worker in status.get("workers", []):
        partitions = " ".join(f"{topic}/{partition}" for topic, partition in worker.get("partitions", []))
        age = worker.get("heartbeat_age_s")
        rows.append([worker["name"], worker["role"], str(worker.get("pid") or "-"), worker["state"],
                     worker.get("restarts", 0), partitions or "-", "-" if age is None else f"{age:.1f} s ago",
                     detail(worker)])
    return table(headers, rows)


def partition_table(status: dict) -> list[str]:
    rows = [[p["topic"], p["partition"], p.get("owner") or "-", _or_dash(p.get("committed")), _or_dash(p.get("end")),
             _or_dash(p.get("lag"))] for p in status.get("partitions", [])]
    return table(["TOPIC", "PARTITION", "OWNER", "COMMITTED", "END", "LAG"], rows)


def detail(worker: dict) -> str:
    stats = dict(worker.get("stats") or {})
    parts = [f"sources {', '.join(worker['sources'])}"] if worker.get("sources") else []
    stats.pop("sources", None)
    circuit = stats.pop("sink_circuit", None)
    parts += [f"{key.replace('_', ' ')} {value:g}" for key, value in stats.items()]
    if circuit is not None:
        parts.append(f"sink breaker {CIRCUIT[int(circuit)]}")
    if worker.get("last_exit"):
        parts.append(f"last exit: {worker['last_exit']}")
    return ", ".join(parts)


def table(headers: list[str], rows: list[list]) -> list[str]:
    """Left-aligned text, right-aligned numbers, two spaces between columns."""
    cells = [[_text(value) for value in row] for row in rows]
    numeric = [all(isinstance(row[i], int | float) for row in rows) and bool(rows) for i in range(len(headers))]
    widths = [max([len(headers[i])] + [len(row[i]) for row in cells]) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return [line(headers).rstrip()] + [line(row).rstrip() for row in cells] if rows else [line(headers), "(none)"]


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _or_dash(value: object) -> object:
    return "-" if value is None else value


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f} %"


def sync_lag_s(watermark: str | None, now: float) -> float | None:
    if not watermark:
        return None
    try:
        return now - datetime.fromisoformat(watermark).timestamp()
    except ValueError:
        return None


def ago(timestamp: float | None, now: float) -> str:
    return f"{duration(now - timestamp)} ago" if timestamp else "never"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# -- top ---------------------------------------------------------------------------------------------------


def top(client: StatusClient, *, frames: int, interval_s: float) -> int:
    """Redraw until q, Ctrl-C (or TERM) or ``frames`` frames (0: no limit)."""
    shown = 0
    with StopSignals() as stop, Screen(stop) as screen:
        while not stop.stopped:
            try:
                body = render(client.status(), rates=True)
            except StatusError as exc:
                body = f"{exc} (retrying)"
            stamp = time.strftime("%H:%M:%S")
            screen.draw(f"conflux top · {client.url} · {stamp} · every {interval_s:g} s · q quits\n\n{body}")
            shown += 1
            if (frames and shown >= frames) or screen.quit_pressed(interval_s):
                break
    return 0


class Screen:
    """The terminal for `top`: alternate screen and single-key input on a TTY, plain frames otherwise."""

    def __init__(self, stop: StopSignals) -> None:
        self.stop = stop
        self.tty_out = sys.stdout.isatty()
        self.tty_in = sys.stdin.isatty()
        self._saved_mode: list | None = None

    def __enter__(self) -> Screen:
        if self.tty_in:
            import termios
            import tty

            self._saved_mode = termios.tcgetattr(sys.stdin.fileno())
            tty.setcbreak(sys.stdin.fileno())
        if self.tty_out:
            sys.stdout.write("\x1b[?1049h\x1b[?25l")  # alternate screen, hide the cursor
        return self

    def __exit__(self, *exc_info) -> None:
        if self.tty_out:
            sys.stdout.write("\x1b[?25h\x1b[?1049l")
            sys.stdout.flush()
        if self._saved_mode is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved_mode)

    def draw(self, text: str) -> None:
        if not self.tty_out:
            print(text + "\n", flush=True)
            return
        width, height = shutil.get_terminal_size()
        lines = [line[:width] + "\x1b[K" for line in text.splitlines()[:height - 1]]
        sys.stdout.write("\x1b[H" + "\n".join(lines) + "\x1b[J")
        sys.stdout.flush()

    def quit_pressed(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the next refresh; True if q was pressed (or a stop signal came)."""
        fds = [sys.stdin.fileno()] if self.tty_in else []
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0 and not self.stop.stopped:
            if self.stop.wait(left, fds) and os.read(fds[0], 1) in (b"q", b"Q", b""):  # b"": the terminal went away
                return True
        return self.stop.stopped
