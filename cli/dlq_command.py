"""`conflux dlq list|show|replay|purge -c F`: inspect and act on dead-letter entries.

Works on the log the config names (embedded file or Kafka DLQ topics), whether or not the daemon is
running. ``replay`` publishes the entries' records back into their source topics (sync type
"replay"), waits until the consumers have committed past them (the sink took them), and then removes
the entries that did not fail again meanwhile. An entry that cannot be replayed at all (its record is
not an object, its source is gone) is skipped, named on stderr and counted in the report.
"""

from __future__ import annotations

import argparse
import sys
import time

import msgspec


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("list", "one JSON object per entry"), ("show", "one entry in full"),
                       ("replay", "re-inject entries and remove them once delivered"),
                       ("purge", "delete entries (needs --yes)")):
        action = sub.add_parser(name, help=text)
        action.add_argument("-c", "--config", required=True, help="TOML config file")
        action.add_argument("--source", help="only entries of this source")
        if name == "list":
            action.add_argument("--json", action="store_true", help="JSON lines (the default is also JSON lines)")
        if name in ("show", "replay"):
            action.add_argument("ids", nargs="*", help="entry ids (replay: default all)")
        if name == "replay":
            action.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for delivery")
        if name == "purge":
            action.add_argument("--yes", action="store_true", help="really delete")


def run(args: argparse.Namespace) -> int:
    from conflux.cli.main import load_config_or_report
    from conflux.errors import ExitCode, LogError
    from conflux.log import open_log

    # No dlq action calls an upstream or the sink: only the log's own secrets (Kafka's) must be there.
    config = load_config_or_report(args.config, secrets="log")
    if config is None:
        return ExitCode.CONFIG_ERROR
    backend = open_log(config)
    try:
        store = backend.dead_letters()
    except LogError as exc:
        print(f"conflux: cannot open the log: {exc}", file=sys.stderr)
        return 1
    try:
        return ACTIONS[args.action](args, config, backend, store)
    finally:
        store.close()


def _as_json(entry) -> dict:
    """The entry as plain data; the record as the JSON it was received as, or as text if it is not JSON
    or nested too deeply to decode (such records are why some entries are here)."""
    data = msgspec.structs.asdict(entry)
    try:
        data["record"] = msgspec.json.decode(bytes(entry.record))
    except (msgspec.DecodeError, RecursionError):
        data["record"] = bytes(entry.record).decode("utf-8", "replace")
    return data


def _list(args, config, backend, store) -> int:
    for entry in store.list(args.source):
        print(msgspec.json.encode(_as_json(entry)).decode())
    return 0


def _show(args, config, backend, store) -> int:
    status = 0
    for entry_id in args.ids:
        entry = store.get(entry_id)
        if entry is None:
            print(f"conflux: no dead-letter entry {entry_id}", file=sys.stderr)
            status = 1
            continue
        print(msgspec.json.format(msgspec.json.encode(_as_json(entry))).decode())
    return status


def _purge(args, config, backend, store) -> int:
    if not args.yes:
        count = len(store.list(args.source))
        print(f"conflux: this would delete {count} entries; add --yes to do it", file=sys.stderr)
        return 2
    removed = store.purge(args.source)
    print(f"purged {removed} entries")
    return 0


def _replay(args, config, backend, store) -> int:
    from conflux.cli.replay import replay

    entries = [e for e in store.list(args.source) if not args.ids or e.id in args.ids]
    if not entries:
        print("nothing to replay")
        return 0
    started = time.time()
    report = replay(config, backend, store, entries, timeout_s=args.timeout, started=started)
    for entry_id, reason in report.pop("skipped_reasons").items():
        print(f"conflux: skipped dead letter {entry_id}: {reason}", file=sys.stderr)
    print(msgspec.json.encode(report).decode())
    return 0 if report["pending"] == 0 else 1


ACTIONS = {"list": _list, "show": _show, "purge": _purge, "replay": _replay}
