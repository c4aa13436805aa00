"""HTTP GETs against one upstream source, with every protection a polite, persistent client needs.

Runs in fetcher processes, one ``UpstreamClient`` per source, shared by every request to it: the
pages of scheduled and manual (POST /sync) syncs and all their retries. A request first takes a
slot of the source's ``max_concurrency``, then its credentials, then a token of its
``rate_limit_rps`` bucket, and is sent right after the token, so waiting for a slot or a token
never bunches requests up. It carries the source's static headers, gives up after ``timeout_s``,
and is retried on timeouts, connection errors, 408, 429 and 5xx with exponential backoff and full
jitter. A Retry-After pauses the source's whole bucket. A 401 renews the credentials once (OAuth2)
before the request counts as failed. A circuit breaker per source stops hammering an upstream that
keeps failing; while it is open, only this source waits; the others go on.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import NamedTuple

import aiohttp
from multidict import CIMultiDictProxy

from conflux import metrics
from conflux.config import RetryConfig, SourceConfig
from conflux.errors import ConfigError, UpstreamError
from conflux.workers.auth import TokenUnavailable, make_auth
from conflux.workers.ratelimit import TokenBucket
from conflux.workers.resilience import MAX_RETRY_AFTER_S, Backoff, CircuitBreaker, parse_retry_after

logger = logging.getLogger(__name__)

RETRYABLE = frozenset({408, 429})


class Response(NamedTuple):
    status: int
    headers: CIMultiDictProxy
    body: bytes
    url: str


class Attempt(NamedTuple):
    """One try: the response, or why there is none (``problem`` for logs, ``reason`` a metric label)."""

    response: Response | None
    problem: str
    reason: str
    credentials: dict[str, str]


class UpstreamClient:
    def __init__(self, source: SourceConfig, retry: RetryConfig, session: aiohttp.ClientSession) -> None:
        self.source = source
        self.retry = retry
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=source.timeout_s, sock_connect=source.connect_timeout_s)
        self.ssl = tls_context(source)
        self.auth = make_auth(source.auth, source.name, ssl_context=self.ssl, timeout=self.timeout)
        self.limiter = TokenBucket(source.rate_limit_rps, burst=1.0)
        self.slots = asyncio.Semaphore(source.max_concurrency)
        self.breaker = CircuitBreaker.from_config(retry, on_change=self._on_breaker_change)
        self.requests = 0
        metrics.circuit_state.labels(f"upstream:{source.name}").set(0)

    async def get(self, url: str, params: dict[str, str] | None = None) -> Response:
        """One successful (2xx) response, or UpstreamError after the retries are spent."""
        backoff = Backoff.from_config(self.retry)
        refreshed_auth = False
        last_problem = "no attempt made"
        for attempt_number in range(1, self.retry.max_attempts + 1):
            while not self.breaker.allow():
                await asyncio.sleep(max(self.breaker.wait_s(), backoff.floor_s))
            attempt = await self._attempt(url, params)
            if _status(attempt) == 401 and not refreshed_auth:
                refreshed_auth = True
                if await self.auth.refresh(self.session, attempt.credentials):
                    self.breaker.record_success()  # the server answered; the credentials were stale
                    attempt = await self._attempt(url, params)
            if self._settled(attempt, url):
                return attempt.response
            self.breaker.record_failure()
            last_problem = attempt.problem
            if attempt_number < self.retry.max_attempts:
                await self._wait_to_retry(attempt, backoff)
        raise UpstreamError(f"{self.source.name}: giving up on {url} after {self.retry.max_attempts} attempts "
                            f"({last_problem})")

    def _settled(self, attempt: Attempt, url: str) -> bool:
        """True on success; raises for an answer no retry can change; False when worth retrying."""
        response = attempt.response
        if attempt.reason == "tls":  # a certificate that does not verify will not verify next time
            raise UpstreamError(f"{self.source.name}: {url}: {attempt.problem}")
        if response is None or _retryable(response.status):
            return False
        self.breaker.record_success()
        if 200 <= response.status < 300:
            return True
        raise UpstreamError(f"{self.source.name}: {url} answered {response.status}: "
                            f"{response.body[:200].decode('utf-8', 'replace')}")

    async def _wait_to_retry(self, attempt: Attempt, backoff: Backoff) -> None:
        retry_after_s = None
        if attempt.response is not None:
            retry_after_s = parse_retry_after(attempt.response.headers.get("Retry-After"))
        if retry_after_s is not None:
            # The server asked the whole client to wait, not this one request: pause the source.
            self.limiter.pause(min(retry_after_s, MAX_RETRY_AFTER_S))
        metrics.upstream_retries.labels(self.source.name, attempt.reason).inc()
        delay_s = backoff.next_delay_s(retry_after_s)
        logger.info("%s: %s; retrying in %.2f s", self.source.name, attempt.problem, delay_s)
        await asyncio.sleep(delay_s)

    async def _attempt(self, url: str, params: dict[str, str] | None) -> Attempt:
        async with self.slots:
            try:
                credentials = await self.auth.headers(self.session)
            except TokenUnavailable as exc:
                return Attempt(None, str(exc), "token", {})
            await self.limiter.acquire()
            started = time.perf_counter()
            self.requests += 1
            try:
                async with self.session.get(url, params=params, headers={**self.source.headers, **credentials},
                                            timeout=self.timeout, ssl=self.ssl) as raw:
                    response = Response(raw.status, raw.headers, await raw.read(), str(raw.url))
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                reason = _reason(exc)
                metrics.upstream_request_duration.labels(self.source.name, reason).observe(
                    time.perf_counter() - started)
                return Attempt(None, self._describe(exc, reason), reason, credentials)
        metrics.upstream_request_duration.labels(self.source.name, str(response.status)).observe(
            time.perf_counter() - started)
        return Attempt(response, f"status {response.status}", f"http_{response.status}", credentials)

    def _describe(self, exc: BaseException, reason: str) -> str:
        if reason == "timeout":  # aiohttp's timeout errors often have an empty message
            return f"timed out after {self.source.timeout_s:g} s ({type(exc).__name__})"
        return f"{type(exc).__name__}: {exc}"

    def _on_breaker_change(self, state: str) -> None:
        metrics.circuit_state.labels(f"upstream:{self.source.name}").set(metrics.CIRCUIT_VALUES[state])
        logger.warning("%s: circuit breaker is now %s", self.source.name, state)


def _status(attempt: Attempt) -> int | None:
    return attempt.response.status if attempt.response is not None else None


def _retryable(status: int) -> bool:
    return status in RETRYABLE or status >= 500


def _reason(exc: BaseException) -> str:
    """A small, fixed set of metric labels: timeout, tls, connection."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
        return "tls"
    return "connection"


def tls_context(source: SourceConfig) -> ssl.SSLContext | bool:
    """How https requests of ``source`` (pages and token requests) verify the server: the system's
    CAs (True), ``ca_file``'s, or not at all when ``verify_tls = false``."""
    if not source.verify_tls:
        return False
    if not source.ca_file:
        return True
    try:
        return ssl.create_default_context(cafile=source.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"source {source.name!r}: ca_file {source.ca_file!r}: {exc}") from None
