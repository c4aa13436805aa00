"""Plugins: paginators, auth methods and sinks found through entry-point groups, checked against the
plugin API's version, with config keys validated by a msgspec Struct each plugin declares.

The groups are ``conflux.paginators``, ``conflux.auth`` and ``conflux.sinks``. An entry point's name is
the name users write (``pagination = "NAME"``, ``[sources.auth] type = "NAME"``, ``[[sinks]] type =
"NAME"``) and its value is the plugin class. Conflux's own styles, auth methods and sinks are
registered in the same groups (setup.cfg), so there is no special case for them. A plugin class says
which version of the interface it was written for (``api_version``; this is version ``API_VERSION``)
and, when it takes config keys, their Struct (``Options``). Loading happens when a config names the
plugin, in the process that needs it; a plugin that cannot be loaded, or was written for another
version, is a config error naming the field.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import Any

import msgspec

from conflux.errors import ConfigError

API_VERSION = 1
GROUPS = {"paginators": "conflux.paginators", "auth": "conflux.auth", "sinks": "conflux.sinks"}


@cache
def names(group: str) -> tuple[str, ...]:
    """Every registered name of a group (built-ins and installed plugins)."""
    return tuple(sorted({entry.name for entry in entry_points(group=GROUPS[group])}))


def load(group: str, name: str, where: str) -> Any:
    """The plugin class registered as ``name`` in ``group``; ConfigError (naming ``where``) if there is none,
    it cannot be imported, or it was written for another version of the interface."""
    found = [entry for entry in entry_points(group=GROUPS[group]) if entry.name == name]
    if not found:
        known = ", ".join(names(group)) or "none"
        raise ConfigError(f"{where}: unknown {_singular(group)} {name!r} (known: {known})")
    try:
        plugin = found[0].load()
    except Exception as exc:  # whatever a broken plugin raises, it is the config's problem, named as such
        raise ConfigError(f"{where}: the {_singular(group)} plugin {name!r} ({found[0].value}) cannot be "
                          f"loaded: {type(exc).__name__}: {exc}") from None
    version = getattr(plugin, "api_version", None)
    if version != API_VERSION:
        raise ConfigError(f"{where}: the {_singular(group)} plugin {name!r} was written for plugin API version "
                          f"{version!r}; this Conflux speaks version {API_VERSION}")
    return plugin


def options(plugin: Any, raw: dict[str, Any], where: str) -> Any:
    """``raw`` validated by the plugin's ``Options`` Struct (an empty Struct when it declares none);
    errors name the field as ``where.field``."""
    options_type = getattr(plugin, "Options", None) or NoOptions
    try:
        return msgspec.convert(raw, options_type, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(describe(str(exc), where)) from None


def describe(text: str, where: str) -> str:
    """msgspec's 'Expected `int`, got `str` - at `$.a.b`' as 'WHERE.a.b: Expected `int`, got `str`'."""
    message, _, at = text.partition(" - at `$")
    path = at.rstrip("`").lstrip(".")
    for prefix, what in (("Object contains unknown field `", "unknown key"),
                         ("Object missing required field `", "missing required key")):
        if message.startswith(prefix):
            path = ".".join(part for part in (path, message[len(prefix):].rstrip("`")) if part)
            message = what
    return f"{where}.{path}: {message}" if path else f"{where}: {message}"


class NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """A plugin that takes no config keys refuses any."""


def _singular(group: str) -> str:
    return {"paginators": "pagination style", "auth": "auth type", "sinks": "sink type"}[group]
