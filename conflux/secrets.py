"""Secrets come from the environment or from files, are read where they are used, and are never logged.

Reading happens after fork in the process that needs the value (and again on SIGHUP), so a rotated
file takes effect on reload. ``known_secrets`` collects every value the config points at, so the
log formatter can blank them out wherever they might appear.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from conflux.config import Config, secret_sources
from conflux.errors import ConfigError
from conflux.redact import kafka_secret_key, secret_name, url_secrets


def read_secret(*, env: str = "", file: str = "", literal: str = "", what: str = "secret") -> str:
    """The value from ``env``, else from ``file`` (trailing newline stripped), else ``literal``."""
    if env:
        value = os.environ.get(env, "")
        if not value:
            raise ConfigError(f"{what}: environment variable {env} is not set")
        return value
    if file:
        try:
            return Path(file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {file}: {exc.strerror}") from None
    return literal


def known_secrets(config: Config) -> list[str]:
    """Every secret value this config refers to, for log redaction. Unreadable ones are skipped."""
    values = [config.sink.token, config.control.token, *url_secrets(config.sink.url)]
    names = [config.sink.token_env, config.control.token_env]
    files: list[str] = []
    for spec in config.sinks:
        _sink_secrets(spec.options, values, names, files)
    for source in config.sources:
        values.append(source.webhook_secret)
        names.append(source.webhook_secret_env)
        values.extend(v for k, v in source.headers.items() if secret_name(k))
        values.extend(url_secrets(source.url))
        if source.auth is not None:
            _auth_secrets(source.auth.options, values, names, files)
    for settings in (config.kafka.producer, config.kafka.consumer, config.kafka.admin):
        _kafka_secrets(settings, values, names, files)
    values.extend(os.environ.get(name, "") for name in names if name)
    for file in files:
        if file:
            with contextlib.suppress(OSError):
                values.append(Path(file).read_text().rstrip("\r\n"))
    return sorted({value for value in values if value}, key=len, reverse=True)


def _auth_secrets(options: object, values: list[str], names: list[str], files: list[str]) -> None:
    """Any auth method's secrets, built-in or plugin: its *_env and *_file options, the values of options
    named like secrets, and the secrets in its URLs (an oauth2 token_url's query, say)."""
    for field, value in secret_sources(options):
        (names if field.endswith("_env") else files).append(value)
    for field in getattr(options, "__struct_fields__", ()):
        value = getattr(options, field)
        if isinstance(value, str) and "://" in value:
            values.extend(url_secrets(value))
        elif isinstance(value, str) and secret_name(field):
            values.append(value)


def _sink_secrets(options: object, values: list[str], names: list[str], files: list[str]) -> None:
    """A sink's secret sources, whatever its type: tokens, DSNs (their passwords), librdkafka keys."""
    for field in ("token", "dsn"):
        values.append(getattr(options, field, ""))
    values.extend(url_secrets(getattr(options, "url", "")))
    names.extend(getattr(options, field, "") for field in ("token_env", "dsn_env"))
    files.append(getattr(options, "dsn_file", ""))
    _kafka_secrets(getattr(options, "producer", {}), values, names, files)


def _kafka_secrets(settings: dict, values: list[str], names: list[str], files: list[str]) -> None:
    for key, value in settings.items():
        if key.endswith("_env"):
            names.append(str(value))
        elif key.endswith("_file"):
            files.append(str(value))
        elif kafka_secret_key(key):
            values.append(str(value))
