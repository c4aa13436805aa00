"""Delivering merged batches to the sink: the analytics HTTP API.

Runs in merger processes. ``HttpSink.deliver`` keeps trying one batch (same batch_id, same body)
until the sink takes it or refuses it for good: timeouts, connection errors, 408, 429 and 5xx are
retried with backoff (honouring Retry-After) behind a circuit breaker; 207/422 name the records the
sink rejected; any other 4xx rejects the whole batch. Rejected records go to the dead-letter queue
with the sink's reason, so a bad record never blocks the offsets of good ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NamedTuple

import aiohttp
import msgspec

from conflux import metrics
from conflux.config import RetryConfig, SinkConfig
from conflux.secrets import read_secret
from conflux.workers.resilience import Backoff, CircuitBreaker, parse_retry_after

logger = logging.getLogger(__name__)

RETRYABLE_4XX = frozenset({408, 429})


class Rejection(msgspec.Struct):
    index: int
    reason: str = "rejected by the sink"


class RejectionBody(msgspec.Struct):
    rejected: list[Rejection] = []
    error: str = ""


_rejection_decoder = msgspec.json.Decoder(RejectionBody)


class Delivery(NamedTuple):
    """The outcome of one batch: which record indices the sink rejected, and why."""

    rejected: dict[int, str]
    status: int


class HttpSink:
    """One per merger process; the aiohttp session is created on first use, inside the running loop."""

    def __init__(self, config: SinkConfig, retry: RetryConfig, *, stopping: asyncio.Event | None = None) -> None:
        self.config = config
        self.retry = retry
        self.breaker = CircuitBreaker.from_config(retry, on_change=self._on_breaker_change)
        self._session: aiohttp.ClientSession | None = None
        self._stopping = stopping
        self._token = ""
        self.failing_since: float | None = None

    async def start(self) -> None:
        token = read_secret(env=self.config.token_env, literal=self.config.token, what="sink.token")
        self._token = token
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s, connect=min(5.0, self.config.timeout_s))
        connector = aiohttp.TCPConnector(limit=self.config.max_in_flight * 2, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        metrics.circuit_state.labels("sink").set(0)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def deliver(self, batch_id: str, body: bytes, count: int) -> Delivery | None:
        """Deliver until taken or refused for good; None only if the process is stopping quickly."""
        backoff = Backoff.from_config(self.retry)
        while True:
            if not self.breaker.allow():
                if not await self._pause(max(self.breaker.wait_s(), backoff.floor_s)):
                    return None
                continue
            outcome, retry_after_s = await self._attempt(batch_id, body, count)
            if outcome is not None:
                self.breaker.record_success()
                self.failing_since = None
                return outcome
            self.breaker.record_failure()
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            if not await self._pause(backoff.next_delay_s(retry_after_s)):
                return None

    async def _attempt(self, batch_id: str, body: bytes, count: int) -> tuple[Delivery | None, float | None]:
        headers = {"Content-Type": "application/json", "Idempotency-Key": batch_id}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        started = time.perf_counter()
        try:
            async with self._session.post(self.config.url, data=body, headers=headers) as response:
                text = await response.read()
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            metrics.sink_request_duration.labels("error").observe(time.perf_counter() - started)
            metrics.sink_retries.labels(type(exc).__name__).inc()
            logger.warning("sink unreachable (%s); batch %s will be retried", type(exc).__name__, batch_id)
            return None, None
        metrics.sink_request_duration.labels(str(status)).observe(time.perf_counter() - started)
        return self._interpret(status, text, count, batch_id), retry_after

    def _interpret(self, status: int, text: bytes, count: int, batch_id: str) -> Delivery | None:
        if 200 <= status < 300 or status == 422:
            # A 200 "duplicate" repeats the rejections of the first delivery, which may have been lost.
            return Delivery(_rejections(text, count, status), status)
        if status in RETRYABLE_4XX or status >= 500:
            metrics.sink_retries.labels(str(status)).inc()
            logger.warning("sink answered %d for batch %s; retrying", status, batch_id)
            return None
        reason = f"sink refused the batch with {status}: {text[:300].decode('utf-8', 'replace')}"
        logger.error("%s (batch %s, %d records go to the dead-letter queue)", reason, batch_id, count)
        return Delivery(dict.fromkeys(range(count), reason), status)

    async def _pause(self, delay_s: float) -> bool:
        """Sleep, but wake at once on a quick stop; False if we are stopping quickly."""
        if self._stopping is None:
            await asyncio.sleep(delay_s)
            return True
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=delay_s)
        except TimeoutError:
            return True
        return False

    def _on_breaker_change(self, state: str) -> None:
        metrics.circuit_state.labels("sink").set(metrics.CIRCUIT_VALUES[state])
        logger.warning("sink circuit breaker is now %s", state)


def _rejections(text: bytes, count: int, status: int) -> dict[int, str]:
    """207/422 bodies (and a duplicate's 200) list rejected indices; a 422 that names none rejects all."""
    if status not in (207, 422) and b'"rejected"' not in text:
        return {}
    try:
        body = _rejection_decoder.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError):
        body = RejectionBody()
    rejected = {item.index: item.reason for item in body.rejected if 0 <= item.index < count}
    if status == 422 and not rejected:
        reason = body.error or "sink answered 422 without naming records"
        rejected = dict.fromkeys(range(count), reason)
    return rejected
