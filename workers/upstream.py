"""HTTP requests against one upstream source, with every protection a polite, persistent client needs.

Runs in fetcher processes, one ``UpstreamClient`` per source, shared by every request to it: the
pages of scheduled and manual (POST /sync) syncs and all their retries. A request first takes a
slot of the source's ``max_concurrency``, then its credentials, then a token of its
``rate_limit_rps`` bucket, and is sent right after the token, so waiting for a slot or a token
never bunches requests up. It carries the source's static headers, gives up after ``timeout_s``,
and is retried on timeouts, connection errors, 408, 429 and 5xx with exponential backoff and full
jitter. A Retry-After pauses the source's whole bucket. A 401 renews the credentials once (OAuth2)
before the request counts as failed. A circuit breaker per source stops hammering an upstream that
keeps failing; while it is open, only this source waits; the others go on.

Credentials and static headers go only to the source's own origin (scheme, host, port of its
``url``). Redirects are followed here, not by aiohttp (which keeps API-key headers and cookies across
origins), at most MAX_REDIRECTS deep; a redirect or next link to another origin is refused with
OriginRefused unless ``allowed_origins`` names it, and then it is requested without them. Bodies are
read in chunks up to ``max_page_bytes`` after decompression.

Pages are GETs, or POSTs with a body for search APIs (``workers.page_request``); a 307 or 308 redirect
of a POST is followed with its method and body, a 301, 302 or 303 as a GET without them (what browsers
and the RFC's note do).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import NamedTuple

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from conflux import metrics
from conflux.config import RetryConfig, SourceConfig
from conflux.errors import ConfigError, UpstreamError
from conflux.workers.auth import TokenUnavailable, make_auth
from conflux.workers.bodies import OriginRefused, origin_of, read_capped, shown
from conflux.workers.page_request import Outgoing
from conflux.workers.ratelimit import TokenBucket
from conflux.workers.resilience import MAX_RETRY_AFTER_S, Backoff, CircuitBreaker, parse_retry_after

logger = logging.getLogger(__name__)

RETRYABLE = frozenset({408, 429})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
ERROR_BODY_BYTES = 64 << 10  # of a non-2xx answer: enough to show what the upstream said
KEEP_METHOD = frozenset({307, 308})


class UpstreamAnswered(UpstreamError):
    """A final answer that is not a success (4xx other than 408/429): ``status`` says which."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


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
    credentials: dict[str, str]        # the credentials this try sent ({} to an allowed foreign origin)


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
        self.origin = origin_of(URL(source.url))
        self.allowed_origins = frozenset(origin_of(URL(text)) for text in source.allowed_origins)
        metrics.circuit_state.labels(f"upstream:{source.name}").set(0)

    async def get(self, url: str, params: dict[str, str] | None = None, *,
                  accept: frozenset[int] = frozenset()) -> Response:
        """One successful (2xx) response, or one whose status is in ``accept`` (a by-key lookup's 404),
        or UpstreamError after the retries are spent."""
        return await self.send(url, Outgoing("GET", params), accept=accept)

    async def send(self, url: str, outgoing: Outgoing, *, accept: frozenset[int] = frozenset()) -> Response:
        """``get`` for any request: a page's POST with its body, say."""
        backoff = Backoff.from_config(self.retry)
        refreshed_auth = False
        last_problem = "no attempt made"
        for attempt_number in range(1, self.retry.max_attempts + 1):
            while not self.breaker.allow():
                await asyncio.sleep(max(self.breaker.wait_s(), backoff.floor_s))
            attempt = await self._attempt(url, outgoing)
            if _status(attempt) == 401 and attempt.credentials and not refreshed_auth:
                refreshed_auth = True
                if await self.auth.refresh(self.session, attempt.credentials):
                    self.breaker.record_success()  # the server answered; the credentials were stale
                    attempt = await self._attempt(url, outgoing)
            if self._settled(attempt, url, accept):
                return attempt.response
            self.breaker.record_failure()
            last_problem = attempt.problem
            if attempt_number < self.retry.max_attempts:
                await self._wait_to_retry(attempt, backoff)
        raise UpstreamError(f"{self.source.name}: giving up on {url} after {self.retry.max_attempts} attempts "
                            f"({last_problem})")

    def _settled(self, attempt: Attempt, url: str, accept: frozenset[int] = frozenset()) -> bool:
        """True on success; raises for an answer no retry can change; False when worth retrying."""
        response = attempt.response
        if attempt.reason == "tls":  # a certificate that does not verify will not verify next time
            raise UpstreamError(f"{self.source.name}: {url}: {attempt.problem}")
        if response is None or _retryable(response.status):
            return False
        self.breaker.record_success()
        if 200 <= response.status < 300 or response.status in accept:
            return True
        raise UpstreamAnswered(f"{self.source.name}: {url} answered {response.status}: "
                               f"{response.body[:200].decode('utf-8', 'replace')}", response.status)

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

    async def _attempt(self, url: str, outgoing: Outgoing) -> Attempt:
        """One try, following redirects itself so each hop gets only what its origin may see."""
        async with self.slots:
            try:
                credentials = await self.auth.headers(self.session)
            except TokenUnavailable as exc:
                return Attempt(None, str(exc), "token", {})
            target = self._checked(url, "a request to")
            for _hop in range(MAX_REDIRECTS + 1):
                own = origin_of(target) == self.origin
                headers = {**self.source.headers, **credentials} if own else {}
                attempt = await self._exchange(target, outgoing, headers, credentials if own else {})
                location = _redirect_location(attempt)
                if location is None:
                    return attempt
                target = self._checked(location, "a redirect to", base=target)
                keep = outgoing.method != "GET" and _status(attempt) in KEEP_METHOD
                outgoing = outgoing._replace(params=None) if keep else Outgoing("GET")
        raise UpstreamError(f"{self.source.name}: more than {MAX_REDIRECTS} redirects from {shown(URL(url))}")

    def _checked(self, location: str, what: str, *, base: URL | None = None) -> URL:
        """``location`` (relative to ``base``) as the URL to request next; OriginRefused when it leaves
        the source's origin for one that ``allowed_origins`` does not name."""
        try:
            target = base.join(URL(location)) if base is not None else URL(location)
            origin = origin_of(target)
        except ValueError as exc:
            raise OriginRefused(f"{self.source.name}: {what} {location[:200]!r} refused: {exc}") from None
        if origin != self.origin and origin not in self.allowed_origins:
            raise OriginRefused(
                f"{self.source.name}: {what} {shown(target)} refused: origin {origin} is neither the source's own "
                f"({self.origin}) nor in allowed_origins (the source's credentials go only to its own origin)")
        return target

    async def _exchange(self, target: URL, outgoing: Outgoing, headers: dict[str, str],
                        sent: dict[str, str]) -> Attempt:
        """One HTTP request (one hop of a redirect chain), after a token of the rate limit."""
        await self.limiter.acquire()
        started = time.perf_counter()
        self.requests += 1
        extra: dict[str, object] = {}
        if outgoing.body is not None:
            headers = {**headers, "Content-Type": outgoing.content_type}
            extra["data"] = outgoing.body
        send = self.session.get if outgoing.method == "GET" else self.session.post
        try:
            async with send(target, params=outgoing.params, headers=headers, timeout=self.timeout, ssl=self.ssl,
                            allow_redirects=False, **extra) as raw:
                response = Response(raw.status, raw.headers, await self._read(raw, target), str(raw.url))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            reason = _reason(exc)
            metrics.upstream_request_duration.labels(self.source.name, reason).observe(
                time.perf_counter() - started)
            return Attempt(None, self._describe(exc, reason), reason, sent)
        metrics.upstream_request_duration.labels(self.source.name, str(response.status)).observe(
            time.perf_counter() - started)
        return Attempt(response, f"status {response.status}", f"http_{response.status}", sent)

    async def _read(self, raw: aiohttp.ClientResponse, target: URL) -> bytes:
        if raw.status in REDIRECTS:
            return b""
        if 200 <= raw.status < 300:
            return await read_capped(raw, self.source.max_page_bytes,
                                     what=f"{self.source.name}: the response of {shown(target)}")
        return await read_capped(raw, ERROR_BODY_BYTES, what="an error answer", truncate=True)

    def _describe(self, exc: BaseException, reason: str) -> str:
        if reason == "timeout":  # aiohttp's timeout errors often have an empty message
            return f"timed out after {self.source.timeout_s:g} s ({type(exc).__name__})"
        return f"{type(exc).__name__}: {exc}"

    def _on_breaker_change(self, state: str) -> None:
        metrics.circuit_state.labels(f"upstream:{self.source.name}").set(metrics.CIRCUIT_VALUES[state])
        logger.warning("%s: circuit breaker is now %s", self.source.name, state)


def _status(attempt: Attempt) -> int | None:
    return attempt.response.status if attempt.response is not None else None


def _redirect_location(attempt: Attempt) -> str | None:
    """Where a redirect points; None for any other answer (a 3xx without Location fails as itself)."""
    response = attempt.response
    if response is None or response.status not in REDIRECTS:
        return None
    return response.headers.get("Location")


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
