"""`conflux analytics`: the demo analytics sink that receives Conflux's merged batches.

It stands in for a real analytics API: ``POST /ingest`` applies batches of upserts and deletes
last-writer-wins by ``updated_at``, keeps a per-source checksum (demo/checksum.py) that the demo and the
tests compare with the upstream's, remembers applied batch ids so retries are idempotent, and persists
everything in SQLite. Faults can be injected to exercise Conflux's retries. One process, one uvloop
event loop; modules: analytics_wire (body format and record checks), analytics_store (state),
analytics_db (SQLite), analytics_faults (fault injection), analytics_http (routes).

A delete is a version like any other: it leaves a tombstone (key, updated_at, seq), so a late, older
upsert never brings the key back, while a newer one recreates it. A repeated delete changes nothing,
and a delete of a key the sink never held is not an error: it stores the tombstone. Checksums cover
live records only, so they match the upstream's when the same keys are live with the same content.

Exit codes: 0 after a clean stop; 2 for a bad flag, an unusable --db or an address in use; 3 when SQLite
fails mid-run (memory is then ahead of the file, and a restart reloads the last committed state).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sqlite3
import sys
import time

import uvloop
from aiohttp import web

from conflux.demo.analytics_db import Database
from conflux.demo.analytics_faults import Faults, FaultSpecError, parse_outage_spec, settings_from_flags
from conflux.demo.analytics_http import Sink
from conflux.demo.analytics_store import Store

log = logging.getLogger("conflux.analytics")

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_STORE_FAILED = 3
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
SHUTDOWN_TIMEOUT_S = 5.0
# Folding what is left of the journal on stop is a convenience (a restart folds the rest), so a large
# backlog must not hold up TERM for long.
FOLD_ON_STOP_S = 5.0

FAULTS_HELP = """\
fault injection (also adjustable at run time: GET/POST /admin/faults with a JSON object of
error_rate, latency_ms, apply_then_fail_rate, reject_rate, redirect_to, html_200, fail_status;
POST /admin/outage {"seconds": N} starts an outage now, {"seconds": 0} ends it). During an outage
every route but /admin/* answers 503 with Retry-After: 1, /health included, so it looks like a real
outage. Random choices use --seed."""

ENDPOINTS_HELP = """\
endpoints:
  POST /ingest                {"batch_id", "records": [{"source", "key", "op": "upsert"|"delete",
                              "updated_at", "hash", "data"}]} with Idempotency-Key: <batch_id>;
                              200 applied | duplicate, 207 partial, 422 all rejected, 400 malformed,
                              413 too large; 200/207/422 answer a JSON object with the batch_id
  GET  /stats, /stats/SOURCE  per source: count and checksum of the live records (demo/checksum.py),
                              tombstones held (deleted keys, kept so an older upsert stays dead) and
                              deletes_applied since start; counters, fault counts
  GET  /records/SOURCE/KEY    the stored record (data byte for byte), 404 if absent or deleted
  GET  /health                {"status": "ok"}
  GET  /login                 an HTML sign-in page (where --redirect-to /login sends ingests)
  GET  /freshness             percentiles of (apply time - updated_at) since POST /admin/freshness
                              {"enabled": true}: the delay from an upstream change to the sink
  GET|POST /admin/faults, POST /admin/outage   see "faults" above
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ENDPOINTS_HELP
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8082,
                        help="port; 0 picks a free one (default %(default)s)")
    parser.add_argument("--db", default=":memory:",
                        help="SQLite file for records, tombstones and applied batch ids; an existing "
                             "file is loaded on start (default: in memory only)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger ingest bodies get 413 (default %(default)s)")
    faults = parser.add_argument_group("faults", FAULTS_HELP)
    faults.add_argument("--error-rate", type=float, default=0.0, metavar="F",
                        help="fraction of ingests answered 500 without applying them")
    faults.add_argument("--latency-ms", type=float, default=0.0, metavar="N",
                        help="delay every ingest response by N milliseconds")
    faults.add_argument("--outage-s", default="", metavar="SPEC",
                        help="outage windows relative to start, START:SECONDS[,...]; "
                             "'10:20' = down from t=10 s for 20 s")
    faults.add_argument("--apply-then-fail-rate", type=float, default=0.0, metavar="F",
                        help="fraction of ingests applied (durably) and then answered 500, like a sink "
                             "that times out after committing; a retry gets 200 duplicate")
    faults.add_argument("--reject-rate", type=float, default=0.0, metavar="F",
                        help="also reject this fraction of records, chosen by xxh3 of (source, key) "
                             "(see demo.analytics_wire.rejected_by_rate)")
    faults.add_argument("--redirect-to", default="", metavar="URL",
                        help="answer every ingest 302 to URL without applying it, like an ingress sending "
                             "clients to its login page (e.g. /login)")
    faults.add_argument("--html-200", action="store_true",
                        help="answer every ingest 200 with an HTML page without applying it")
    faults.add_argument("--fail-status", type=int, default=0, metavar="N",
                        help="answer every ingest with HTTP status N (200-599) without applying it, "
                             "e.g. 401, 403, 404 (default 0: off)")
    faults.add_argument("--seed", type=int, default=0, help="seed of the fault RNG (default %(default)s)")


def build_faults(args: argparse.Namespace) -> Faults:
    """The Faults the flags ask for; raises FaultSpecError naming the bad flag."""
    settings = settings_from_flags(error_rate=args.error_rate, latency_ms=args.latency_ms,
                                   apply_then_fail_rate=args.apply_then_fail_rate,
                                   reject_rate=args.reject_rate, redirect_to=args.redirect_to,
                                   html_200=args.html_200, fail_status=args.fail_status)
    return Faults(settings=settings, windows=parse_outage_spec(args.outage_s), seed=args.seed)


def run(args: argparse.Namespace) -> int:
    """Entry point of `conflux analytics`: serve until SIGTERM/SIGINT, then persist and exit 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        faults = build_faults(args)
    except FaultSpecError as exc:
        print(f"conflux analytics: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.max_body_bytes <= 0:
        print("conflux analytics: --max-body-bytes must be positive", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return uvloop.run(SinkServer(args=args, faults=faults).run())


class SinkServer:
    """The sink process on its event loop: load the db, listen, serve until a signal, drain, fold, close.

    The first TERM/INT drains requests and folds the journal (to FOLD_ON_STOP_S); a second one cuts the
    fold short. Either way every acknowledged batch is already durable in the journal.
    """

    def __init__(self, *, args: argparse.Namespace, faults: Faults) -> None:
        self.args = args
        self.faults = faults
        self.exit_code = EXIT_OK
        self._stop = asyncio.Event()
        self._quick = asyncio.Event()

    async def run(self) -> int:
        try:
            store = Store(db=Database(path=self.args.db))
        except (OSError, sqlite3.Error) as exc:
            print(f"conflux analytics: cannot use --db {self.args.db}: {exc}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        sink = Sink(store=store, faults=self.faults, max_body_bytes=self.args.max_body_bytes,
                    on_fatal=self._fatal)
        runner = web.AppRunner(sink.build_app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        folder = asyncio.create_task(store.fold_when_idle(), name="fold-when-idle")
        folder.add_done_callback(self._on_folder_done)
        try:
            await self._listen(runner)
            await self._stop.wait()
            log.info("stopping: draining requests, then folding the journal into %s", self.args.db)
        except OSError as exc:
            print(f"conflux analytics: cannot listen on {self.args.host}:{self.args.port}: {exc}",
                  file=sys.stderr)
            self.exit_code = EXIT_CONFIG_ERROR
        finally:
            await runner.cleanup()
            folder.cancel()
            await self._fold_before_exit(store)
            store.close()
        return self.exit_code

    async def _listen(self, runner: web.AppRunner) -> None:
        site = web.TCPSite(runner, self.args.host, self.args.port, backlog=1024)
        await site.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal)
        host, port = runner.addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        print(f"conflux-analytics listening on http://{host}:{port}", flush=True)

    def _on_signal(self) -> None:
        if self._stop.is_set():
            self._quick.set()
        self._stop.set()

    def _fatal(self) -> None:
        self.exit_code = EXIT_STORE_FAILED
        self._stop.set()

    def _on_folder_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("folding the journal failed: %r; stopping (the journal is intact)", task.exception())
            self._fatal()

    async def _fold_before_exit(self, store: Store) -> None:
        """Fold what is left so the db file holds plain rows; a restart folds whatever this leaves."""
        folding = asyncio.create_task(store.fold_all(deadline_monotonic=time.monotonic() + FOLD_ON_STOP_S))
        quick = asyncio.create_task(self._quick.wait())
        await asyncio.wait({folding, quick}, return_when=asyncio.FIRST_COMPLETED)
        folding.cancel()
        quick.cancel()
        if folding.done() and not folding.cancelled() and folding.exception() is not None:
            log.error("folding the journal on stop failed: %r (the journal is intact)", folding.exception())
