"""An example Conflux auth method: a token kept in a file that another tool rotates.

The built-in ``bearer`` reads its file once per fetcher generation, so a rotation needs a SIGHUP.
This method reads the file again when the upstream answers 401, and retries once if it changed.

    [sources.auth]
    type = "rotating_file"
    token_file = "secrets/crm-token"   # *_file: checked at load, relative to the config, kept out of logs
    header = "Authorization"
    scheme = "Bearer"                  # "" sends the token alone
"""

from __future__ import annotations

import re

import msgspec

from conflux.errors import ConfigError
from conflux.secrets import read_secret
from conflux.workers.auth import AuthContext, AuthMethod


class RotatingFileToken(AuthMethod):
    api_version = 1

    class Options(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
        token_file: str
        header: str = "Authorization"
        scheme: str = "Bearer"

        def __post_init__(self) -> None:
            if not re.fullmatch(r"[A-Za-z0-9-]*", self.scheme):
                raise ValueError(f"scheme: {self.scheme!r} must be one word (letters, digits, '-') or empty")

    def __init__(self, options: Options, context: AuthContext) -> None:
        super().__init__(options, context)
        self.reads = 0
        self._token = self._read()

    def _read(self) -> str:
        """ConfigError naming the source when the file cannot be read (at start: the fetcher stops with it)."""
        self.reads += 1
        return read_secret(file=self.options.token_file, what=self.context.where).strip()

    def _current(self) -> dict[str, str]:
        value = f"{self.options.scheme} {self._token}" if self.options.scheme else self._token
        return {self.options.header: value}

    async def headers(self, session) -> dict[str, str]:
        return self._current()

    async def refresh(self, session, used: dict[str, str]) -> bool:
        """After a 401: read the file again; retry once if the token changed (or another request already
        picked up a new one). A file that cannot be read now leaves the 401 standing."""
        if used == self._current():
            try:
                self._token = self._read()
            except ConfigError:
                return False
        return used != self._current()


class FromTheFuture(AuthMethod):
    """Written for a plugin API this Conflux does not speak: loading it is a config error."""

    api_version = 2
