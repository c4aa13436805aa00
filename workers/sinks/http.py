"""The HTTP sink: the analytics ingest API (``[sink]``, or ``[[sinks]]`` with ``type = "http"``).

Runs in merger processes. ``HttpSink.deliver`` keeps trying one batch (same batch_id, same body)
until the sink acknowledges it or refuses it as bad. Only the sink's acknowledgement counts as delivery:
a 2xx whose body is a JSON object naming the request's ``batch_id`` (207/422 list the records the sink
rejected). Redirects are never followed (aiohttp would turn the POST into a GET, e.g. to an ingress
login page). Only answers that mean "this batch is bad" dead-letter records: 400 (the whole batch), 413
(the merger splits the batch; a single record that still gets 413 is dead-lettered), 422 and 207 (the
records they name). Everything else is an outage: timeouts, connection errors, 3xx, 401, 403, 404,
408, 429, 5xx and a 2xx that is not the acknowledgement are retried with backoff (honouring
Retry-After) behind a circuit breaker, so the backlog waits in the log instead of in the DLQ.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import msgspec
import yarl

from conflux import metrics
from conflux.config import RetryConfig, SinkConfig
from conflux.secrets import read_secret
from conflux.workers.resilience import parse_retry_after
from conflux.workers.sinks.base import TOO_LARGE, Chunk, Delivery, Retry, Sink

logger = logging.getLogger(__name__)

BAD_BATCH = 400
UNPROCESSABLE = 422
EXCERPT_BYTES = 160
# msgspec raises these two outside its own hierarchy (bad UTF-8 in a string, nesting too deep).
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)


class Rejection(msgspec.Struct):
    index: int
    reason: str = "rejected by the sink"


class Acknowledgement(msgspec.Struct):
    """What a 2xx from the sink must be: a JSON object naming the batch (other fields are ignored)."""

    batch_id: str
    rejected: list[Rejection] = []


class RejectionBody(msgspec.Struct):
    rejected: list[Rejection] = []
    error: str = ""


_ack_decoder = msgspec.json.Decoder(Acknowledgement)
_rejection_decoder = msgspec.json.Decoder(RejectionBody)


class HttpSink(Sink):
    """One per merger process and configured HTTP sink; the aiohttp session is made in ``start``."""

    kind = "http"
    Options = SinkConfig

    def __init__(self, name: str, options: SinkConfig, retry: RetryConfig, *,
                 stopping: asyncio.Event | None = None, context: Any = None) -> None:
        super().__init__(name, options, retry, stopping=stopping, context=context)
        self.config = options
        self._session: aiohttp.ClientSession | None = None
        self._token = ""

    async def start(self) -> None:
        await super().start()
        self._token = read_secret(env=self.config.token_env, literal=self.config.token, what=f"{self._label()}.token")
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s, connect=min(5.0, self.config.timeout_s))
        connector = aiohttp.TCPConnector(limit=self.config.max_in_flight * 2, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def attempt(self, chunk: Chunk) -> Delivery | Retry:
        return await self._attempt(chunk.batch_id, chunk.body, len(chunk))

    async def _attempt(self, batch_id: str, body: bytes, count: int) -> Delivery | Retry:
        headers = {"Content-Type": "application/json", "Idempotency-Key": batch_id}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        started = time.perf_counter()
        try:
            # Never follow a redirect: aiohttp would re-send the POST as a GET (to a login page, say)
            # and a 200 from there is not the sink taking the batch.
            async with self._session.post(self.config.url, data=body, headers=headers,
                                          allow_redirects=False) as response:
                text = await response.read()
                status = response.status
                response_headers = response.headers
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            metrics.sink_request_duration.labels("error", self.name).observe(time.perf_counter() - started)
            self.last_status = 0
            return Retry(type(exc).__name__, f"sink unreachable ({type(exc).__name__}: {exc})")
        metrics.sink_request_duration.labels(str(status), self.name).observe(time.perf_counter() - started)
        self.last_status = status
        outcome = interpret(status, text, count, batch_id, location=response_headers.get("Location", ""))
        if isinstance(outcome, Retry):
            return outcome._replace(retry_after_s=parse_retry_after(response_headers.get("Retry-After")))
        if status in (BAD_BATCH, UNPROCESSABLE):
            logger.error("%s refused %d records of batch %s with %d: %s", self._label(), len(outcome.rejected),
                         batch_id, status, next(iter(outcome.rejected.values())))
        return outcome


def interpret(status: int, text: bytes, count: int, batch_id: str, *, location: str = "") -> Delivery | Retry:
    """The sink's answer to a batch of ``count`` records: final (a Delivery) or to be retried (a Retry)."""
    if 200 <= status < 300:
        ack = _acknowledgement(text, batch_id)
        if isinstance(ack, str):
            return Retry("not_acknowledged", f"sink answered {status} without its acknowledgement: {ack}")
        # A 200 "duplicate" repeats the rejections of the first delivery, which may have been lost.
        return Delivery(_valid_indices(ack.rejected, count), status)
    if status == UNPROCESSABLE:
        return Delivery(_refused_records(text, count), status)
    if status in (BAD_BATCH, TOO_LARGE):
        reason = f"sink refused the batch with {status}: {_excerpt(text)}"
        return Delivery(dict.fromkeys(range(count), reason), status)
    if 300 <= status < 400:
        return Retry("redirect", f"sink answered {status} redirecting to {_redirect_target(location)}; "
                                 "redirects are never followed (check [sink] url)")
    return Retry(str(status), f"sink answered {status}{_HINTS.get(status, '')}: {_excerpt(text)}")


_HINTS = {401: " (check [sink] token)", 403: " (check [sink] token)", 404: " (check [sink] url)"}


def _redirect_target(location: str) -> str:
    """The Location for the log, without what may carry a secret: user info, query, fragment."""
    try:
        url = yarl.URL(location)
        if url.is_absolute():
            url = url.with_user(None)
        return str(url.with_query(None).with_fragment(None))[:200] or "nowhere"
    except (TypeError, ValueError):
        return "an unparseable Location"


def _acknowledgement(text: bytes, batch_id: str) -> Acknowledgement | str:
    """The sink's acknowledgement of ``batch_id``, or what is wrong with the answer."""
    try:
        ack = _ack_decoder.decode(text)
    except _DECODE_ERRORS as exc:
        return f"the body is not a JSON object with a batch_id ({exc}): {_excerpt(text)}"
    if ack.batch_id != batch_id:
        return f"it names batch {ack.batch_id[:80]!r}"
    return ack


def _valid_indices(rejected: list[Rejection], count: int) -> dict[int, str]:
    return {item.index: item.reason for item in rejected if 0 <= item.index < count}


def _refused_records(text: bytes, count: int) -> dict[int, str]:
    """A 422 lists the records it refuses; one that names none (or is not JSON) refuses them all."""
    try:
        body = _rejection_decoder.decode(text)
    except _DECODE_ERRORS:
        body = RejectionBody(error=f"sink answered 422: {_excerpt(text)}")
    rejected = _valid_indices(body.rejected, count)
    return rejected or dict.fromkeys(range(count), body.error or "sink answered 422 without naming records")


def _excerpt(text: bytes) -> str:
    shown = text[:EXCERPT_BYTES].decode("utf-8", "replace").replace("\n", " ").strip()
    return (shown + "...") if len(text) > EXCERPT_BYTES else (shown or "(empty body)")
