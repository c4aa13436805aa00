"""`conflux source test -c F --source NAME [--pages N] [--since ISO] [--json]`: try a source before running it.

Pages the real upstream with the source's config (auth, rate limit, paging style, shaping) through the
fetcher's own code (``cli/source_probe.py``), and prints per page the answer's status, its records, its
bytes, the time it took and what it says about the next page; then the first records as they would
reach the sink, and every record that would go to the dead-letter queue with its reason. Writes
nothing: not the log, not the sink, not the watermark. Exit codes: 0 when every page was fetched and
read (dead letters included), 1 when a request or a page failed (the error is named), 2 for a source
or option that does not exist, 3 for an invalid config.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

EXIT_FAILED = 1
EXIT_USAGE = 2
_encoder = msgspec.json.Encoder()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    test = sub.add_parser("test", help="page the upstream with a source's config; write nothing",
                          description=__doc__.splitlines()[0])
    test.add_argument("-c", "--config", required=True, help="TOML config file")
    test.add_argument("--source", required=True, metavar="NAME", help="the source to try")
    test.add_argument("--pages", type=_count, default=3, metavar="N",
                      help="stop after N pages (default %(default)s; 0 walks to the end)")
    test.add_argument("--since", metavar="ISO", help="an incremental sync from this instant (ISO 8601); "
                                                     "default: a full sync")
    test.add_argument("--records", type=_count, default=5, metavar="N",
                      help="show the first N records as the sink would get them (default %(default)s)")
    test.add_argument("--json", action="store_true", help="one JSON object per page (and one for an error)")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    import uvloop

    from conflux.cli.main import load_config_or_report
    from conflux.errors import ExitCode

    # Only this source's secrets are needed; reading them (auth) names any that is missing.
    config = load_config_or_report(args.config, secrets="none")
    if config is None:
        return ExitCode.CONFIG_ERROR
    try:
        source = config.source(args.source)
    except KeyError:
        names = ", ".join(source.name for source in config.sources) or "none"
        print(f"conflux: source test: no source named {args.source!r} in {args.config} (sources: {names})",
              file=sys.stderr)
        return EXIT_USAGE
    printer = Printer(source.name, json=args.json, show_records=args.records)
    try:
        since = _since(source, args.since)
    except ValueError as exc:
        printer.error(f"--since: {exc}")
        return EXIT_USAGE
    printer.start(source, args.pages, since)
    return uvloop.run(_test(config, source, args.pages, since, printer))


def _since(source, text: str | None) -> str | None:
    from conflux.cli.source_probe import since_text

    if text is None:
        return None
    try:
        return since_text(source, text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 instant (such as 2026-01-31T12:00:00Z)") from None


async def _test(config, source, max_pages: int, since: str | None, printer: Printer) -> int:
    from conflux.cli.source_probe import probe
    from conflux.errors import ConfigError, ExitCode, PageFormatError, UpstreamError

    try:
        sync = await probe(config, source, max_pages=max_pages, since=since, on_page=printer.page)
    except ConfigError as exc:  # a secret the source's auth reads is missing
        printer.error(f"config error: {exc}")
        return ExitCode.CONFIG_ERROR
    except (UpstreamError, PageFormatError) as exc:  # named by kind, whichever subclass the fetcher raised
        printer.error(f"{'UpstreamError' if isinstance(exc, UpstreamError) else 'PageFormatError'}: {exc}")
        return EXIT_FAILED
    printer.finish(sync)
    return 0


class Printer:
    """Prints as pages arrive: a line per page and, at the end, sample records and dead letters; or, with
    --json, one object per page carrying them."""

    def __init__(self, source: str, *, json: bool, show_records: int) -> None:
        self.source = source
        self.json = json
        self.left = show_records
        self.samples: list[dict[str, Any]] = []
        self.dead: list[Any] = []

    def start(self, source, max_pages: int, since: str | None) -> None:
        if self.json:
            return
        limit = f"at most {max_pages} pages" if max_pages else "every page"
        kind = f"incremental since {since}" if since else "full"
        print(f"source {source.name}: {source.pagination} pagination, page_size {source.page_size}, "
              f"{kind} sync, {limit}; nothing is written")

    def page(self, report) -> None:
        samples = report.sink_records(self.source)[:self.left]
        self.left -= len(samples)
        dead = [_dead_letter(entry) for entry in report.dead]
        if self.json:
            print(_encoder.encode({"page": report.page, "status": report.status, "url": report.url,
                                   "records": report.records, "upserts": report.upserts, "deletes": report.deletes,
                                   "dead": len(report.dead), "bytes": report.bytes,
                                   "time_s": round(report.time_s, 6), "next": report.next,
                                   "sink_records": samples, "dead_letters": dead}).decode(), flush=True)
            return
        self.samples += samples
        self.dead += dead
        token = " ".join(f"{name}={_encoder.encode(value).decode()}" for name, value in report.next.items())
        print(f"page {report.page}: {report.status}, {report.records} records ({report.upserts} upserts, "
              f"{report.deletes} deletes, {len(report.dead)} to the DLQ), {report.bytes} bytes, "
              f"{report.time_s:.3f} s, next: {token or 'none'}", flush=True)

    def finish(self, sync) -> None:
        if self.json:
            return
        end = f"stopped after {sync.fetched} pages (--pages)" if sync.stopped else f"the end after {sync.fetched} pages"
        print(f"{end}: {sync.records} records, {sync.valid} to the sink ({sync.deletes} deletes), "
              f"{len(sync.dead)} to the DLQ")
        if self.samples:
            print("\nthe first records as the sink would get them:")
            for record in self.samples:
                print("  " + _encoder.encode(record).decode())
        if self.dead:
            print("\nrecords that would go to the DLQ:")
            for entry in self.dead:
                print(f"  key {entry['key']!r}: {entry['reason']}\n    {_encoder.encode(entry['record']).decode()}")

    def error(self, message: str) -> None:
        print(f"conflux: source test: {self.source}: {message}", file=sys.stderr, flush=True)
        if self.json:
            print(_encoder.encode({"error": message}).decode(), flush=True)


def _dead_letter(entry) -> dict[str, Any]:
    """A dead letter as the report shows it: its key, why, and the record (as JSON when it is)."""
    try:
        record: Any = msgspec.json.decode(bytes(entry.record))
    except (msgspec.DecodeError, RecursionError):
        record = bytes(entry.record).decode("utf-8", "replace")
    return {"key": entry.key, "reason": entry.reason, "record": record}
