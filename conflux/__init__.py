"""Conflux: keeps analytics in sync with business APIs through a partitioned log.

This root package is the ground floor (errors, config, metrics, logs, secrets). The floors above it
are installed from the repository's own folders: ``conflux.ipc`` (ipc/), ``conflux.log`` (log/),
``conflux.workers`` (workers/), ``conflux.daemon`` (daemon/), ``conflux.cli`` (cli/) and
``conflux.demo`` (demo/).
"""
