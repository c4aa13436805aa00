"""Credentials for upstream requests: bearer, static header, basic and OAuth2 client credentials.

Secrets are read in the fetcher process after fork (``daemon.secrets``), never put in logs, and
re-read when the fetcher is replaced after SIGHUP, so a rotated token file takes effect on reload.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time

import aiohttp

from daemon.config import AuthConfig
from daemon.errors import UpstreamError
from daemon.secrets import read_secret

logger = logging.getLogger(__name__)

REFRESH_BEFORE_EXPIRY_S = 30.0


class NoAuth:
    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        return {}

    async def refresh(self, session: aiohttp.ClientSession) -> bool:
        """After a 401: try new credentials once. False means there is nothing to refresh."""
        return False


class StaticAuth(NoAuth):
    def __init__(self, header: str, value: str) -> None:
        self._headers = {header: value}

    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        return self._headers


class OAuth2ClientCredentials(NoAuth):
    """Fetches a token with the client-credentials grant, caches it, renews it before it expires."""

    def __init__(self, auth: AuthConfig, client_secret: str, where: str) -> None:
        self._auth = auth
        self._secret = client_secret
        self._where = where
        self._token = ""
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        if time.monotonic() >= self._refresh_at:
            async with self._lock:
                if time.monotonic() >= self._refresh_at:  # another request may have renewed it meanwhile
                    await self._fetch_token(session)
        return {"Authorization": f"Bearer {self._token}"}

    async def refresh(self, session: aiohttp.ClientSession) -> bool:
        async with self._lock:
            await self._fetch_token(session)
        return True

    async def _fetch_token(self, session: aiohttp.ClientSession) -> None:
        form = {"grant_type": "client_credentials", "client_id": self._auth.client_id,
                "client_secret": self._secret}
        if self._auth.scope:
            form["scope"] = self._auth.scope
        try:
            async with session.post(self._auth.token_url, data=form) as response:
                body = await response.json(content_type=None)
                if response.status != 200 or "access_token" not in body:
                    raise UpstreamError(f"{self._where}: token endpoint answered {response.status}")
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise UpstreamError(f"{self._where}: token request failed: {type(exc).__name__}") from None
        self._token = str(body["access_token"])
        ttl_s = float(body.get("expires_in") or 3600)
        # Renew REFRESH_BEFORE_EXPIRY_S early, or half-way through a lifetime shorter than that.
        self._refresh_at = time.monotonic() + max(ttl_s / 2, ttl_s - REFRESH_BEFORE_EXPIRY_S)
        logger.info("%s: obtained an access token valid for %.0f s", self._where, ttl_s)


def make_auth(auth: AuthConfig | None, source_name: str) -> NoAuth:
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
    return OAuth2ClientCredentials(auth, secret, where)
