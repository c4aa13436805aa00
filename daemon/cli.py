"""The `conflux` command line. Each subcommand lives in the module that owns it.

A subcommand module exposes ``configure_parser(parser)`` and ``run(args) -> int``; modules are
imported only when their command runs, so `conflux --help` stays fast and a broken optional
dependency only breaks the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("daemon.run_command", "run the supervisor and its worker pools"),
    "config": ("daemon.config_command", "validate a config file and print the effective config"),
    "dlq": ("daemon.dlq_command", "list, show, replay or purge dead-letter entries"),
    "status": ("daemon.status_command", "print the running daemon's sources, workers and partitions"),
    "top": ("daemon.status_command", "a live view of the running daemon (q quits)"),
    "metrics": ("daemon.metrics_command", "sample a /metrics endpoint and write a JSON time series"),
    "demo": ("demo.demo_command", "run the whole demo: upstream, analytics sink and daemon"),
    "upstream": ("demo.upstream", "serve the demo upstream CRM/inventory APIs"),
    "analytics": ("demo.analytics", "serve the demo analytics sink"),
    "bench": ("demo.bench_command", "end-to-end benchmark with its limit and old-style baseline"),
    "loadtest": ("demo.loadtest_command", "drive creates and updates through the upstream (throughput | burst)"),
    "check": ("demo.check_command", "integration check of a running deployment: health, create, sync, verify"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to configure its arguments."""
    parser = argparse.ArgumentParser(prog="conflux", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        if name == command:
            _configure(module_name, sub_parser)
    return parser


def _configure(module_name: str, parser: argparse.ArgumentParser) -> None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        parser.set_defaults(_missing=True)
        return
    module.configure_parser(parser)


def load_config_or_report(path: str | None):
    """For commands: the validated config, or None after printing the error (exit with CONFIG_ERROR)."""
    from daemon.config import load_config
    from daemon.errors import ConfigError

    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"conflux: config error: {exc}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    if getattr(args, "_missing", False):
        print(f"conflux: '{args.command}' is not available in this build", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
