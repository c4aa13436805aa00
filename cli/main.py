"""The `conflux` command line. Each subcommand lives in the module that owns it.

A subcommand module exposes ``configure_parser(parser)`` and ``run(args) -> int``; modules are
imported only when their command runs, so `conflux --help` stays fast and a broken optional
dependency only breaks the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

COMMAND_GROUP = "conflux.commands"


def discover_commands() -> dict[str, tuple[str, str]]:
    """Every registered command: name -> (module, one-line help). Each entry point of the group names a
    ``COMMANDS`` table (the daemon's own, the demo's, a plugin's); loading one imports only that table."""
    commands: dict[str, tuple[str, str]] = {}
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda entry: (entry.name != "core", entry.name)):
        for name, spec in entry.load().items():
            commands.setdefault(name, spec)
    return commands


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to configure its arguments."""
    parser = argparse.ArgumentParser(prog="conflux", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in discover_commands().items():
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


def load_config_or_report(path: str | None, *, secrets: str = "all"):
    """For commands: the validated config, or None after printing the error (exit with CONFIG_ERROR).
    ``secrets``: which secret sources must exist (``conflux.config.load_config``)."""
    from conflux.config import load_config
    from conflux.errors import ConfigError

    try:
        return load_config(path, secrets=secrets)
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


