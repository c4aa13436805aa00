"""The `conflux` command line: the top floor of the daemon, above the supervisor it starts."""
