"""Credentials for upstream requests: bearer, static header, basic and OAuth2 client credentials.

Built in the fetcher process after fork, one per source (``UpstreamClient``). Secrets are read
there (``daemon.secrets``), never logged, and read again when SIGHUP replaces the fetchers with a
new generation, so a rotated token file takes effect on reload.

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

import aiohttp
import msgspec
from yarl import URL

from conflux.config import AuthConfig
from conflux.errors import UpstreamError
from conflux.secrets import read_secret
from conflux.workers.bodies import origin_of, read_capped, shown

logger = logging.getLogger(__name__)

REFRESH_BEFORE_EXPIRY_S = 30.0
MAX_TOKEN_ANSWER_BYTES = 1 << 20


class TokenUnavailable(UpstreamError):
    """The token endpoint could not be reached or failed (5xx): worth retrying like any request."""


class NoAuth:
    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        return {}

    async def refresh(self, session: aiohttp.ClientSession, used: dict[str, str]) -> bool:
        """After a 401 to a request sent with ``used``: renew the credentials once. False means there
        is nothing to renew, so the 401 stands."""
        return False


class StaticAuth(NoAuth):
    def __init__(self, header: str, value: str) -> None:
        self._headers = {header: value}

    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        return self._headers


class OAuth2ClientCredentials(NoAuth):
    """Fetches a token with the client-credentials grant, caches it, renews it before it expires."""

    def __init__(self, auth: AuthConfig, client_secret: str, where: str, *, ssl_context: ssl.SSLContext | bool,
                 timeout: aiohttp.ClientTimeout) -> None:
        self._auth = auth
        self._secret = client_secret
        self._where = where
        self._ssl = ssl_context
        self._timeout = timeout
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
        form = {"grant_type": "client_credentials", "client_id": self._auth.client_id,
                "client_secret": self._secret}
        if self._auth.scope:
            form["scope"] = self._auth.scope
        try:
            async with session.post(self._auth.token_url, data=form, ssl=self._ssl, timeout=self._timeout,
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
              timeout: aiohttp.ClientTimeout | None = None) -> NoAuth:
    """The credentials of one source; ``ssl_context`` and ``timeout`` also apply to its token requests."""
    if auth is None:
        return NoAuth()
    where = f"source {source_name!r} auth"
    if auth.type == "bearer":
        token = read_secret(env=auth.token_env, file=auth.token_file, what=where)
        return StaticAuth("Authorization", f"Bearer {token}")
    if auth.type == "header":
        return StaticAuth(auth.header, read_secret(env=auth.value_env, file=auth.value_file, what=where))
    if auth.type == "basic":
        password = read_secret(env=auth.password_env, file=auth.password_file, what=where)
        encoded = base64.b64encode(f"{auth.username}:{password}".encode()).decode()
        return StaticAuth("Authorization", f"Basic {encoded}")
    secret = read_secret(env=auth.client_secret_env, file=auth.client_secret_file, what=where)
    return OAuth2ClientCredentials(auth, secret, where, ssl_context=ssl_context,
                                   timeout=timeout or aiohttp.ClientTimeout(total=30.0))
