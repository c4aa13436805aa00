"""The demo's commands, registered in the ``conflux.commands`` entry-point group (see setup.cfg):
the core CLI lists them without naming any demo module."""

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("conflux.demo.demo_command", "run the whole demo: upstream, analytics sink and daemon"),
    "upstream": ("conflux.demo.upstream", "serve the demo upstream CRM/inventory APIs"),
    "analytics": ("conflux.demo.analytics", "serve the demo analytics sink"),
    "bench": ("conflux.demo.bench_command", "end-to-end benchmark with its limit and old-style baseline"),
    "loadtest": ("conflux.demo.loadtest_command", "drive creates and updates through the upstream"),
    "check": ("conflux.demo.check_command", "integration check of a running deployment: health, create, sync, verify"),
}
