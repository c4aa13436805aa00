"""Limits that keep the control port serving while clients without credentials misbehave.

Runs in the control process's event loop. Every accepted connection is wrapped in a
``GuardedConnection`` that sits between the transport and aiohttp's protocol:

- beyond ``max_connections`` open connections a new one gets ``503`` and is closed at once;
- a connection must deliver a request's line and headers within ``header_timeout_s`` of connecting
  or of its previous request's answer, or it is closed (partial headers hold no slot for long; an
  idle keep-alive connection ends the same way, without counting as refused);
- ``BodyBudget`` caps the bytes of webhook bodies being read at once, over all connections, so
  stalled uploads cannot grow the process (the handler also reads each body under a deadline).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from conflux import metrics

BUSY_TEXT = b"too many connections to the control port\n"
BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
               b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(BUSY_TEXT), BUSY_TEXT))


class ConnectionLimits:
    """The open connections of the control port, by transport, and the limits they live under."""

    def __init__(self, *, max_connections: int, header_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.open: dict[asyncio.BaseTransport, GuardedConnection] = {}

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that wraps ``inner`` (aiohttp's server)."""
        return lambda: GuardedConnection(self, inner)

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        """The headers are in (aiohttp is calling a handler): the header deadline no longer applies."""
        connection = self.open.get(transport) if transport is not None else None
        if connection is not None:
            connection.disarm()

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        """The next request on this connection must arrive within the header deadline too."""
        connection = self.open.get(transport) if transport is not None else None
        if connection is not None:
            connection.request_finished()


class GuardedConnection(asyncio.Protocol):
    """One accepted connection: refuses it beyond the cap, else passes everything to aiohttp's protocol."""

    def __init__(self, limits: ConnectionLimits, inner_factory: Callable[[], asyncio.Protocol]) -> None:
        self.limits = limits
        self.inner_factory = inner_factory
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._answered = 0          # requests answered on this connection
        self._bytes_pending = False  # bytes received since the deadline was armed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if len(self.limits.open) >= self.limits.max_connections:
            metrics.control_refused.labels("connection_limit").inc()
            transport.write(BUSY_ANSWER)
            transport.close()
            return
        self.limits.open[transport] = self
        self.inner = self.inner_factory()
        self.arm()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._bytes_pending = True
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self.limits.open.pop(self.transport, None)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def request_finished(self) -> None:
        self._answered += 1
        self.arm()

    def arm(self) -> None:
        self.disarm()
        self._bytes_pending = False
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.limits.header_timeout_s, self._headers_overdue)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_overdue(self) -> None:
        self._timer = None
        if self._bytes_pending or not self._answered:  # not a keep-alive connection that merely went idle
            metrics.control_refused.labels("header_timeout").inc()
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # close would wait to flush to a client that may never read
        else:
            self.transport.close()  # a clean FIN: a keep-alive client sees its idle connection end


class BodyBudget:
    """Bytes of request bodies the control process may hold at once; a request reserves before reading."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.free_bytes = max_bytes

    def take(self, size_bytes: int) -> bool:
        if size_bytes > self.free_bytes:
            return False
        self.free_bytes -= size_bytes
        return True

    def give(self, size_bytes: int) -> None:
        self.free_bytes = min(self.max_bytes, self.free_bytes + size_bytes)
