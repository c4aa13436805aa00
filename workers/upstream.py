"""HTTP GETs against one upstream source, with every protection a polite, persistent client needs.

Runs in fetcher processes, one ``UpstreamClient`` per source. Each request takes a token from the
source's rate limiter and a slot of its concurrency limit, carries the source's headers and
credentials, and is retried on timeouts, connection errors, 408, 429 and 5xx with exponential
backoff and full jitter, honouring Retry-After. A circuit breaker per source stops hammering an
upstream that keeps failing; while it is open, only this source waits; the others go on.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import NamedTuple

import aiohttp
from multidict import CIMultiDictProxy

from daemon import metrics
from daemon.config import RetryConfig, SourceConfig
from daemon.errors import UpstreamError
from workers.auth import make_auth
from workers.ratelimit import TokenBucket
from workers.resilience import Backoff, CircuitBreaker, parse_retry_after

logger = logging.getLogger(__name__)

RETRYABLE = frozenset({408, 429})


class Response(NamedTuple):
    status: int
    headers: CIMultiDictProxy
    body: bytes
    url: str


class UpstreamClient:
    def __init__(self, source: SourceConfig, retry: RetryConfig, session: aiohttp.ClientSession) -> None:
        self.source = source
        self.retry = retry
        self.session = session
        self.auth = make_auth(source.auth, source.name)
        self.limiter = TokenBucket(source.rate_limit_rps, burst=1.0)
        self.slots = asyncio.Semaphore(source.max_concurrency)
        self.breaker = CircuitBreaker.from_config(retry, on_change=self._on_breaker_change)
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=source.connect_timeout_s,
                                             sock_read=source.timeout_s)
        self.ssl = _ssl_context(source)
        self.requests = 0
        metrics.circuit_state.labels(f"upstream:{source.name}").set(0)

    async def get(self, url: str, params: dict[str, str] | None = None) -> Response:
        """One successful (2xx) response, or UpstreamError after the retries are spent."""
        backoff = Backoff.from_config(self.retry)
        refreshed_auth = False
        last_problem = "no attempt made"
        for _attempt in range(self.retry.max_attempts):
            while not self.breaker.allow():
                await asyncio.sleep(max(self.breaker.wait_s(), backoff.floor_s))
            response, problem = await self._attempt(url, params)
            if response is not None and response.status == 401 and not refreshed_auth:
                refreshed_auth = True
                if await self.auth.refresh(self.session):
                    self.breaker.record_success()  # the server answered; the credentials were stale
                    response, problem = await self._attempt(url, params)
            if response is not None and 200 <= response.status < 300:
                self.breaker.record_success()
                return response
            if response is not None and not _retryable(response.status):
                self.breaker.record_success()
                raise UpstreamError(f"{self.source.name}: {url} answered {response.status}: "
                                    f"{response.body[:200].decode('utf-8', 'replace')}")
            self.breaker.record_failure()
            last_problem = problem or f"status {response.status}"
            retry_after_s = parse_retry_after(response.headers.get("Retry-After")) if response is not None else None
            metrics.upstream_retries.labels(self.source.name, last_problem.split(":")[0]).inc()
            delay_s = backoff.next_delay_s(retry_after_s)
            logger.info("%s: %s; retrying in %.2f s", self.source.name, last_problem, delay_s)
            await asyncio.sleep(delay_s)
        raise UpstreamError(f"{self.source.name}: giving up on {url} after {self.retry.max_attempts} attempts "
                            f"({last_problem})")

    async def _attempt(self, url: str, params: dict[str, str] | None) -> tuple[Response | None, str]:
        await self.limiter.acquire()
        async with self.slots:
            headers = {**self.source.headers, **await self.auth.headers(self.session)}
            started = time.perf_counter()
            self.requests += 1
            try:
                async with self.session.get(url, params=params, headers=headers, timeout=self.timeout,
                                            ssl=self.ssl) as raw:
                    body = await raw.read()
                    response = Response(raw.status, raw.headers, body, str(raw.url))
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                metrics.upstream_request_duration.labels(self.source.name, "error").observe(
                    time.perf_counter() - started)
                return None, f"{type(exc).__name__}: {exc}"
        metrics.upstream_request_duration.labels(self.source.name, str(response.status)).observe(
            time.perf_counter() - started)
        return response, ""

    def _on_breaker_change(self, state: str) -> None:
        metrics.circuit_state.labels(f"upstream:{self.source.name}").set(metrics.CIRCUIT_VALUES[state])
        logger.warning("%s: circuit breaker is now %s", self.source.name, state)


def _retryable(status: int) -> bool:
    return status in RETRYABLE or status >= 500


def _ssl_context(source: SourceConfig) -> ssl.SSLContext | bool:
    if not source.url.startswith("https://"):
        return True
    if not source.verify_tls:
        return False
    return ssl.create_default_context(cafile=source.ca_file or None)
