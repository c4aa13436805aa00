"""Credentials for upstream requests: the auth-method plugin interface, and the built-in methods bearer,
header, basic and oauth2 (client credentials) written against it.

An auth method is a class registered in the ``conflux.auth`` entry-point group; its name there is the
``[sources.auth] type`` users write. The built-in methods are registered the same way (setup.cfg), so
a plugin is found, checked and configured exactly as they are. The interface, version 1
(``conflux.plugins.API_VERSION``):

- ``api_version = 1`` and ``Options``: a msgspec Struct of the method's keys (the ``[sources.auth]``
  table without ``type``), validated when the config is loaded, errors naming
  ``sources[i].auth.<field>``; a ``__post_init__`` ValueError starting with ``"<field>: "`` names that
  field. Options ending in ``_env`` / ``_file`` name secrets: the config check requires the variable
  set and the file readable, paths are taken relative to the config file, values are blanked from logs.
- ``__init__(options, context)``: runs in the fetcher after fork, once per source (and again when
  SIGHUP replaces the fetchers); reads secrets here (``conflux.secrets.read_secret``); raises
  ConfigError naming ``context.where`` when one is missing. ``context`` is an ``AuthContext``.
- ``async headers(session) -> dict``: the credentials for the next request (only ever sent to the
  source's own origin); ``async refresh(session, used) -> bool``: after a 401 to a request sent with
  ``used``, renew once and say True, or False when there is nothing to renew (the 401 stands). Raise
  ``TokenUnavailable`` for a failure worth retrying, UpstreamError for one that is not.

The client secret goes only to ``token_url`` itself: a redirect of the token request is never
followed (aiohttp would re-send the form, secret included, to wherever it points); it fails the
request, naming where it pointed, so the operator can correct token_url.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from typing import Any, ClassVar, NamedTuple

import aiohttp
import msgspec
from yarl import URL

from conflux import plugins
from conflux.config import AuthConfig
from conflux.errors import UpstreamError
from conflux.secrets import read_secret
from conflux.workers.bodies import origin_of, read_capped, shown

logger = logging.getLogger(__name__)

REFRESH_BEFORE_EXPIRY_S = 30.0
MAX_TOKEN_ANSWER_BYTES = 1 << 20


class TokenUnavailable(UpstreamError):
    """The token endpoint could not be reached or failed (5xx): worth retrying like any request."""


class AuthContext(NamedTuple):
    """What an auth method knows of its source besides its options."""

    source: str                          # the source's name
    where: str                           # how errors name this auth ("source 'crm' auth")
    ssl_context: ssl.SSLContext | bool   # the source's TLS settings, for the method's own requests
    timeout: aiohttp.ClientTimeout       # the source's request timeout, likewise


class _Options(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of the built-in methods' options: immutable, unknown keys are errors."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


class AuthMethod:
    """Base of every auth method: sends nothing, renews nothing. Also what a source without auth gets."""

    api_version: ClassVar[int] = plugins.API_VERSION
    Options: ClassVar[type] = plugins.NoOptions

    def __init__(self, options: Any = None, context: AuthContext | None = None) -> None:
        self.options = options
        self.context = context

    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        return {}

    async def refresh(self, session: aiohttp.ClientSession, used: dict[str, str]) -> bool:
        """After a 401 to a request sent with ``used``: renew the credentials once. False means there
        is nothing to renew, so the 401 stands."""
        return False


class StaticAuth(AuthMethod):
    """One header with a value read once (per fetcher generation)."""

    def __init__(self, header: str, value: str) -> None:
        super().__init__()
        self._headers = {header: value}

    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        return self._headers


class Bearer(StaticAuth):
    """``type = "bearer"``: ``Authorization: Bearer <token>``."""

    class Options(_Options):
        token_env: str = ""
        token_file: str = ""

        def __post_init__(self) -> None:
            _require(bool(self.token_env or self.token_file), "type 'bearer' needs token_env or token_file")

    def __init__(self, options: Options, context: AuthContext) -> None:
        token = read_secret(env=options.token_env, file=options.token_file, what=context.where)
        super().__init__("Authorization", f"Bearer {token}")


class Header(StaticAuth):
    """``type = "header"``: ``<header>: <value>`` (an API key)."""

    class Options(_Options):
        header: str = ""
        value_env: str = ""
        value_file: str = ""

        def __post_init__(self) -> None:
            _require(bool(self.value_env or self.value_file), "type 'header' needs value_env or value_file")
            _require(bool(self.header), "header: required for type 'header'")

    def __init__(self, options: Options, context: AuthContext) -> None:
        super().__init__(options.header, read_secret(env=options.value_env, file=options.value_file,
                                                     what=context.where))


class Basic(StaticAuth):
    """``type = "basic"``: ``Authorization: Basic base64(username:password)``."""

    class Options(_Options):
        username: str = ""
        password_env: str = ""
        password_file: str = ""

        def __post_init__(self) -> None:
            _require(bool(self.password_env or self.password_file),
                     "type 'basic' needs password_env or password_file")
            _require(bool(self.username), "username: required for type 'basic'")

    def __init__(self, options: Options, context: AuthContext) -> None:
        password = read_secret(env=options.password_env, file=options.password_file, what=context.where)
        super().__init__("Authorization", "Basic " + base64.b64encode(f"{options.username}:{password}".encode())
                         .decode())


class OAuth2ClientCredentials(AuthMethod):
    """``type = "oauth2"``: fetches a token with the client-credentials grant, caches it, renews it
    before it expires and once after a 401."""

    class Options(_Options):
        token_url: str = ""
        client_id: str = ""
        client_secret_env: str = ""
        client_secret_file: str = ""
        scope: str = ""

        def __post_init__(self) -> None:
            _require(bool(self.client_secret_env or self.client_secret_file),
                     "type 'oauth2' needs client_secret_env or client_secret_file")
            _require(bool(self.token_url and self.client_id), "type 'oauth2' needs token_url and client_id")

    def __init__(self, options: Options, context: AuthContext, *, client_secret: str | None = None) -> None:
        super().__init__(options, context)
        self._secret = client_secret if client_secret is not None else read_secret(
            env=options.client_secret_env, file=options.client_secret_file, what=context.where)
        self._where = context.where
        self._ssl = context.ssl_context
        self._timeout = context.timeout
        self._token = ""
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        if time.monotonic() >= self._refresh_at:
            async with self._lock:
                if time.monotonic() >= self._refresh_at:  # another request may have renewed it meanwhile
                    await self._fetch_token(session)
        return self._current()

    async def refresh(self, session: aiohttp.ClientSession, used: dict[str, str]) -> bool:
        async with self._lock:
            # Many pages in flight get the same 401; the first renews, the rest reuse its token.
            if used == self._current():
                await self._fetch_token(session)
        return True

    def _current(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    async def _fetch_token(self, session: aiohttp.ClientSession) -> None:
        form = {"grant_type": "client_credentials", "client_id": self.options.client_id,
                "client_secret": self._secret}
        if self.options.scope:
            form["scope"] = self.options.scope
        try:
            async with session.post(self.options.token_url, data=form, ssl=self._ssl, timeout=self._timeout,
                                    allow_redirects=False) as response:
                if 300 <= response.status < 400:
                    raise UpstreamError(f"{self._where}: token endpoint answered {response.status}, a redirect to "
                                        f"{_where_to(response)}; not followed: the client secret is sent only to "
                                        "token_url itself (set token_url to the final address)")
                raw = await read_capped(response, MAX_TOKEN_ANSWER_BYTES, what=f"{self._where}: the token answer")
            body = msgspec.json.decode(raw) if raw.strip() else None
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, RecursionError) as exc:
            raise TokenUnavailable(f"{self._where}: token request failed: {type(exc).__name__}") from None
        if response.status >= 500 or response.status == 429:
            raise TokenUnavailable(f"{self._where}: token endpoint answered {response.status}")
        if response.status != 200 or not isinstance(body, dict) or "access_token" not in body:
            raise UpstreamError(f"{self._where}: token endpoint answered {response.status}"
                                f"{_oauth_error(body)}")
        self._token = str(body["access_token"])
        ttl_s = float(body.get("expires_in") or 3600)
        # Renew REFRESH_BEFORE_EXPIRY_S early, or half-way through a lifetime shorter than that.
        self._refresh_at = time.monotonic() + max(ttl_s / 2, ttl_s - REFRESH_BEFORE_EXPIRY_S)
        logger.info("%s: obtained an access token valid for %.0f s", self._where, ttl_s)


def _where_to(response: aiohttp.ClientResponse) -> str:
    location = response.headers.get("Location", "")
    try:
        target = response.url.join(URL(location))
        return f"{shown(target)} (origin {origin_of(target)})"
    except ValueError:
        return repr(location[:200])


def _oauth_error(body: object) -> str:
    """RFC 6749 error codes (invalid_client, ...) name the problem and carry no secret."""
    error = body.get("error") if isinstance(body, dict) else None
    return f" ({error})" if isinstance(error, str) and error.isidentifier() else ""


def make_auth(auth: AuthConfig | None, source_name: str, *, ssl_context: ssl.SSLContext | bool = True,
              timeout: aiohttp.ClientTimeout | None = None) -> AuthMethod:
    """The credentials of one source, from its auth method's plugin class; ``ssl_context`` and ``timeout``
    also apply to the method's own requests (token requests)."""
    if auth is None:
        return AuthMethod()
    where = f"source {source_name!r} auth"
    method = plugins.load("auth", auth.type, where)
    context = AuthContext(source_name, where, ssl_context, timeout or aiohttp.ClientTimeout(total=30.0))
    return method(auth.options, context)


def auth_config(type: str, **options: Any) -> AuthConfig:
    """``[sources.auth]`` built in Python (tests, tools): the method's options validated as a file's are."""
    return AuthConfig(type=type, options=plugins.options(plugins.load("auth", type, "auth.type"), options, "auth"))
