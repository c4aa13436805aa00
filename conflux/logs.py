"""Logging for every Conflux process: text or one JSON object per line, each tagged with role and pid.

Set up by the supervisor at start and again by each worker right after fork (so the pid and role
are the child's own). A redacting filter replaces every known secret value with '***' in the
final line, whatever code logged it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from conflux.redact import redact_text, secret_name

_json = msgspec.json.Encoder()
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class _Context(logging.Filter):
    """Stamps role and pid on every record; both change after fork, so they are read per record."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        record.pid = os.getpid()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(role)s[%(pid)d] %(name)s: %(message)s")
        self._secrets = [s for s in secrets if len(s) >= 4]

    def format(self, record: logging.LogRecord) -> str:
        return _redact(super().format(record), self._secrets)


class JsonFormatter(logging.Formatter):
    """Redacts each string before JSON encoding: a secret with a quote or a newline (a PEM key) would no
    longer match once escaped."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if len(s) >= 4]

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": getattr(record, "role", "?"),
            "pid": getattr(record, "pid", os.getpid()),
            "logger": record.name,
        }
        said = {"msg": record.getMessage()}  # what the caller wrote: the only part that may quote a secret
        said.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and k not in entry})
        if record.exc_info:
            said["exc"] = self.formatException(record.exc_info)
        entry.update(_redact_values(said, self._secrets))
        return _json.encode(entry).decode()


def _redact(line: str, secrets: list[str]) -> str:
    """Known secret values first (the config's tokens, wherever they appear), then every secret-bearing
    form (URL userinfo and query values, secret headers, PEM keys) by conflux.redact's rules."""
    for secret in secrets:
        if secret in line:
            line = line.replace(secret, "***")
    return redact_text(line)


def _redact_values(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return _redact(value, secrets)
    if isinstance(value, dict):  # extra={"api_key": ...}: the name says it is a secret
        return {key: "***" if item and isinstance(item, str) and secret_name(str(key))
                else _redact_values(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_values(item, secrets) for item in value]
    return value


def setup(role: str, *, fmt: str = "text", level: str = "info", secrets: Iterable[str] = ()) -> None:
    """Replace the root handlers with one stderr handler for this process."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context(role))
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json" else TextFormatter(secrets))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
