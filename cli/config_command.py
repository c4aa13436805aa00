"""`conflux config check -c F`: validate a config file and print the effective config (secrets as ***)."""

from __future__ import annotations

import argparse


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate the file and print the effective config")
    check.add_argument("-c", "--config", required=True, help="TOML config file")
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    check.add_argument("--skip-secrets", action="store_true",
                       help="do not require the secrets' environment variables and files (on a machine without them)")


def run(args: argparse.Namespace) -> int:
    import msgspec

    from conflux.cli.main import load_config_or_report
    from conflux.config import redacted, to_toml
    from conflux.errors import ExitCode

    config = load_config_or_report(args.config, secrets="none" if args.skip_secrets else "all")
    if config is None:
        return ExitCode.CONFIG_ERROR
    data = redacted(config)
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(data)).decode())
    else:
        print(f"# {args.config}: valid\n")
        print(to_toml(data), end="")
    return 0
