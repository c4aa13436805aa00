"""Example Conflux plugins (plugin API version 1): ``skip_take``, a paginator, and ``jsonl``, a sink."""
