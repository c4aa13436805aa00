"""`conflux run -c conflux.toml`: start the supervisor in the foreground."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="TOML config file (default: built-in defaults)")


def run(args: argparse.Namespace) -> int:
    from conflux import logs
    from conflux.cli.main import load_config_or_report
    from conflux.errors import ConfigError, ExitCode
    from conflux.secrets import known_secrets

    # Checking the config imports the plugins it names (a sink plugin brings prometheus-client in), and
    # prometheus-client picks multiprocess mode when it is imported: pick it now; the directory, which
    # the config says, is read when the first series is made (below, after it is set).
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", "")
    config = load_config_or_report(args.config)
    if config is None:
        return ExitCode.CONFIG_ERROR
    logs.setup("supervisor", fmt=config.daemon.log_format, level=config.daemon.log_level,
               secrets=known_secrets(config))
    # prometheus-client picks multiprocess mode when it is first imported, and the supervisor's
    # import brings it in: without this line every process would keep its metrics to itself.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(Path(config.daemon.state_dir) / "metrics")
    from conflux.daemon.supervisor import Supervisor

    try:
        return Supervisor(config, args.config).run()
    except ConfigError as exc:
        print(f"conflux: config error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
