"""Webhook delivery of the demo upstream: each changed record is POSTed, signed, to a configured URL.

Runs in the upstream process's event loop. ``offer`` never waits: changes go into a bounded queue
and a few sender tasks deliver them with retries, so a slow or dead receiver costs dropped or
failed deliveries (counted in ``/stats``), never API latency. Like real webhooks, deliveries may
arrive out of order; receivers should compare ``updated_at``. When changes queue up faster than
they are delivered, a sender coalesces up to ``max_batch`` changes of one collection into one POST
whose body is a JSON list (a lone change is still a single object), as busy webhook providers do.

Each attempt is signed afresh, in one of the styles Conflux receives (``WebhookStyle``):

- conflux: ``X-Conflux-Timestamp`` is the current unix second and ``X-Conflux-Signature`` is ``sha256=``
  HMAC-SHA256 of ``f"{timestamp}."`` followed by the body, so a receiver can refuse stale and replayed
  deliveries;
- github: ``X-Hub-Signature-256: sha256=<hex HMAC of the body>``, with ``X-GitHub-Event`` and a fresh
  ``X-GitHub-Delivery`` id;
- stripe: ``Stripe-Signature: t=<unix second>,v1=<hex HMAC of f"{t}." + body>``;
- hmac: ``<header>: <prefix><hex or base64 HMAC of the body>``.

An envelope (``none``, ``stripe``, ``github``) wraps each change as that vendor's event: Stripe's
``{"id": "evt_...", "type": "customer.updated" | "customer.deleted", "data": {"object": RECORD}}``,
GitHub's ``{"action": "edited" | "deleted", "customer": RECORD, "sender": {...}}``. Events are never
coalesced: each goes alone, as those vendors send them. A 409 answer means the receiver already took
this exact signed delivery (an earlier attempt's answer was lost): it counts as delivered.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import time
import uuid
from collections import Counter
from typing import NamedTuple

import aiohttp

SIGNATURE_HEADER = "X-Conflux-Signature"
TIMESTAMP_HEADER = "X-Conflux-Timestamp"
SIGNATURE_STYLES = ("conflux", "github", "stripe", "hmac")
ENVELOPES = ("none", "stripe", "github")


class WebhookStyle(NamedTuple):
    """How deliveries are signed and wrapped (`conflux upstream --webhook-style/--webhook-envelope`)."""

    signature: str = "conflux"
    envelope: str = "none"
    hmac_header: str = "X-Signature"
    hmac_prefix: str = "sha256="
    hmac_encoding: str = "hex"


CONFLUX_STYLE = WebhookStyle()


def signature(secret: bytes, body: bytes, timestamp: str) -> str:
    """The signature header value: ``sha256=<hex HMAC-SHA256 of "<timestamp>." + the exact body>``."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def signed_headers(secret: bytes, body: bytes, collection: str, style: WebhookStyle = CONFLUX_STYLE) -> dict[str, str]:
    """The headers of one attempt, signed now in ``style``."""
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-Conflux-Collection": collection}
    if style.signature == "github":
        return {**headers, "X-Hub-Signature-256": "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest(),
                "X-GitHub-Event": singular(collection), "X-GitHub-Delivery": str(uuid.uuid4())}
    if style.signature == "stripe":
        digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        return {**headers, "Stripe-Signature": f"t={timestamp},v1={digest}"}
    if style.signature == "hmac":
        digest = hmac.new(secret, body, hashlib.sha256).digest()
        written = digest.hex() if style.hmac_encoding == "hex" else base64.b64encode(digest).decode()
        return {**headers, style.hmac_header: style.hmac_prefix + written}
    return {**headers, TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature(secret, body, timestamp)}


def singular(collection: str) -> str:
    """'customers' -> 'customer': how vendors name one object in event types and envelopes."""
    return collection[:-1] if collection.endswith("s") else collection


def wrapped(envelope: str, collection: str, record: bytes, deleted: bool) -> bytes:
    """One change as a vendor's event around the record's exact bytes (``envelope`` "none": the record)."""
    name = singular(collection)
    if envelope == "stripe":
        kind = "deleted" if deleted else "updated"
        return (b'{"id":"evt_%s","object":"event","api_version":"2024-06-20","created":%d,"livemode":false,'
                b'"type":"%s.%s","data":{"object":%s}}'
                % (os.urandom(12).hex().encode(), int(time.time()), name.encode(), kind.encode(), record))
    if envelope == "github":
        action = b"deleted" if deleted else b"edited"
        return b'{"action":"%s","%s":%s,"sender":{"login":"conflux-upstream"}}' % (action, name.encode(), record)
    return record


class WebhookSender:
    """Delivers (collection, record JSON) pairs to ``url_template`` with ``{collection}`` filled in."""

    def __init__(self, *, url_template: str, secret: str, queue_size: int = 10_000, senders: int = 4,
                 attempts: int = 3, backoff_s: float = 0.2, timeout_s: float = 5.0, max_batch: int = 100,
                 style: WebhookStyle = CONFLUX_STYLE) -> None:
        self._style = style
        self._max_batch = max(1, max_batch) if style.envelope == "none" else 1  # a vendor event goes alone
        self._url_template = url_template
        self._secret = secret.encode()
        self._queue_size = queue_size
        self._senders = senders
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        self.counts: Counter[str] = Counter()
        self._queue: asyncio.Queue[tuple[str, bytes]] | None = None  # (collection, body as sent)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Create the queue, HTTP session and sender tasks; called from the app's start-up hook."""
        self._queue = asyncio.Queue(self._queue_size)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        self._tasks = [asyncio.create_task(self._send_forever(), name=f"webhook-{n}")
                       for n in range(self._senders)]

    async def close(self) -> None:
        """Stop sending; deliveries still queued are dropped (and counted)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue is not None:
            self.counts["dropped"] += self._queue.qsize()
        if self._session is not None:
            await self._session.close()

    def offer(self, collection: str, body: bytes, *, deleted: bool = False) -> None:
        """Queue one change (``deleted``: a delete, which an envelope's event type says)."""
        if self._queue is None:
            return
        try:
            self._queue.put_nowait((collection, wrapped(self._style.envelope, collection, body, deleted)))
            self.counts["queued"] += 1
        except asyncio.QueueFull:
            self.counts["dropped"] += 1

    def stats(self) -> dict[str, int]:
        pending = self._queue.qsize() if self._queue is not None else 0
        return {"queued": self.counts["queued"], "delivered": self.counts["delivered"],
                "retried": self.counts["retried"], "failed": self.counts["failed"],
                "dropped": self.counts["dropped"], "pending": pending}

    async def _send_forever(self) -> None:
        assert self._queue is not None
        while True:
            items = [await self._queue.get()]
            while len(items) < self._max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            by_collection: dict[str, list[bytes]] = {}
            for collection, body in items:
                by_collection.setdefault(collection, []).append(body)
            try:
                for collection, bodies in by_collection.items():
                    payload = bodies[0] if len(bodies) == 1 else b"[" + b",".join(bodies) + b"]"
                    await self._deliver(collection, payload, len(bodies))
            finally:
                for _ in items:
                    self._queue.task_done()

    async def _deliver(self, collection: str, body: bytes, changes: int = 1) -> None:
        assert self._session is not None
        url = self._url_template.replace("{collection}", collection)
        for attempt in range(self._attempts):
            if attempt:
                self.counts["retried"] += 1
                await asyncio.sleep(self._backoff_s * 2 ** (attempt - 1))
            try:
                headers = signed_headers(self._secret, body, collection, self._style)
                async with self._session.post(url, data=body, headers=headers) as response:
                    if response.status < 300 or response.status == 409:
                        self.counts["delivered"] += changes
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass  # a receiver that is down or slow is retried like one that answers 5xx
        self.counts["failed"] += changes
