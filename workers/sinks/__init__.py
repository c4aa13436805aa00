"""Sinks: where merged records go. ``[sink]`` is the HTTP sink named "default"; ``[[sinks]]`` adds more,
each with a ``type``. A type is a ``workers.sinks.base.Sink`` subclass found through the ``conflux.sinks``
entry-point group: the built-in http, postgres and kafka types are registered there like any plugin.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import entry_points

from conflux.config import SINK_ENTRY_POINTS, Config
from conflux.errors import ConfigError
from conflux.workers.sinks.base import Chunk, Delivery, Retry, Sink

__all__ = ["Chunk", "Delivery", "Retry", "Sink", "make_sinks", "sink_class"]


def sink_class(kind: str) -> type[Sink]:
    """The class of a sink type; only that type's module is imported (postgres needs psycopg, say)."""
    for entry in entry_points(group=SINK_ENTRY_POINTS):
        if entry.name == kind:
            sink_type = entry.load()
            if not (isinstance(sink_type, type) and issubclass(sink_type, Sink)):
                raise ConfigError(f"sink type {kind!r}: {entry.value} is not a conflux Sink")
            return sink_type
    raise ConfigError(f"unknown sink type {kind!r}: no entry point in {SINK_ENTRY_POINTS}")


def make_sinks(config: Config, *, stopping: asyncio.Event | None = None, instance: str = "") -> dict[str, Sink]:
    """One instance of every configured sink, by name (opened by their ``start``). ``instance`` names the
    worker slot that runs them: a sink that needs a stable identity per slot (a Kafka transactional id)
    takes it from there."""
    sinks = {spec.name: sink_class(spec.type)(spec.name, spec.options, config.retry, stopping=stopping,
                                              context=config)
             for spec in config.sinks}
    for sink in sinks.values():
        sink.instance = instance
    return sinks
