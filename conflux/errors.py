"""Conflux's own small exception hierarchy and the worker exit-code contract.

Third-party errors (librdkafka, sqlite3, aiohttp) are translated into these at the wrapper that
calls the library, so the layers above catch a handful of meaningful types.
"""

from __future__ import annotations


class ConfluxError(Exception):
    """Base of every error Conflux raises on purpose."""


class ConfigError(ConfluxError):
    """The configuration is invalid; the message names the field."""


class LogError(ConfluxError):
    """The log (embedded or Kafka) failed an operation."""


class LogUnavailable(LogError):
    """The log cannot be reached right now; retry later."""


class UpstreamError(ConfluxError):
    """An upstream request failed after its retries."""


class PageFormatError(ConfluxError):
    """An upstream page is not in the configured shape; the message says what is wrong."""


class ExitCode:
    """How a worker process tells the supervisor why it stopped.

    A boot or config error halts the whole daemon instead of respawning forever (gunicorn's rule);
    any other non-zero exit is a crash and the slot is restarted with backoff.
    """

    OK = 0
    CRASH = 1
    CONFIG_ERROR = 3
    BOOT_ERROR = 4

    HALTING = frozenset({CONFIG_ERROR, BOOT_ERROR})
