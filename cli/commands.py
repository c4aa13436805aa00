"""The daemon's own commands, registered in the ``conflux.commands`` entry-point group like any other.

Each entry is ``name -> (module, one-line help)``; the module exposes ``configure_parser(parser)`` and
``run(args) -> int`` and is imported only when its command runs.
"""

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("conflux.cli.run_command", "run the supervisor and its worker pools"),
    "config": ("conflux.cli.config_command", "validate a config file and print the effective config"),
    "dlq": ("conflux.cli.dlq_command", "list, show, replay or purge dead-letter entries"),
    "status": ("conflux.cli.status_command", "print the running daemon's sources, workers and partitions"),
    "top": ("conflux.cli.status_command", "a live view of the running daemon (q quits)"),
    "metrics": ("conflux.cli.metrics_command", "sample a /metrics endpoint and write a JSON time series"),
    "source": ("conflux.cli.source_command", "try a source against its upstream without writing anything (test)"),
}
