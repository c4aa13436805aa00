"""The control port's connection guard and body budget, driven on a real event loop with a fake transport:
the cap, the header deadline (partial headers and silent connections count as refused, an idle keep-alive
connection just ends), and everything else passed through to the protocol behind it."""

from __future__ import annotations

import asyncio

from conflux import metrics
from conflux.workers.control_limits import BodyBudget, ConnectionLimits

TIMEOUT_S = 0.05


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.ended = asyncio.get_running_loop().create_future()
        self.pending_bytes = 0

    def write(self, data: bytes) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return self.pending_bytes

    def close(self) -> None:
        if not self.ended.done():
            self.ended.set_result("close")

    def abort(self) -> None:
        if not self.ended.done():
            self.ended.set_result("abort")


class Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.events: list[object] = []

    def connection_made(self, transport) -> None:
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.events.append(data)

    def connection_lost(self, exc) -> None:
        self.events.append("lost")


def refused(reason: str) -> float:
    return metrics.control_refused.labels(reason)._value.get()


def open_connection(limits: ConnectionLimits, inners: list[Inner]):
    def make() -> Inner:
        inners.append(Inner())
        return inners[-1]

    protocol = limits.factory(make)()
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


def test_beyond_the_cap_a_connection_gets_503_and_never_reaches_the_protocol():
    async def scenario():
        limits, inners = ConnectionLimits(max_connections=2, header_timeout_s=60), []
        first, _ = open_connection(limits, inners)
        open_connection(limits, inners)
        before = refused("connection_limit")
        third, transport = open_connection(limits, inners)
        assert transport.written.startswith(b"HTTP/1.1 503 ") and await transport.ended == "close"
        assert len(inners) == 2 and refused("connection_limit") == before + 1
        third.data_received(b"GET / HTTP/1.1\r\n\r\n")  # ignored: there is no protocol behind it
        first.connection_lost(None)  # a slot frees up
        _, fourth = open_connection(limits, inners)
        assert fourth.written == b"" and len(inners) == 3 and inners[0].events[-1] == "lost"
        for transport in list(limits.open):
            limits.open[transport].disarm()

    asyncio.run(scenario())


def test_the_header_deadline_counts_partial_and_silent_connections_but_not_idle_keep_alive():
    async def scenario():
        limits, inners = ConnectionLimits(max_connections=10, header_timeout_s=TIMEOUT_S), []
        before = refused("header_timeout")
        partial, partial_transport = open_connection(limits, inners)
        partial.data_received(b"GET /status HTTP/1.1\r\n")
        assert await partial_transport.ended == "close" and inners[0].events == ["made", b"GET /status HTTP/1.1\r\n"]
        _, silent_transport = open_connection(limits, inners)
        assert await silent_transport.ended == "close"
        assert refused("header_timeout") == before + 2

        kept, kept_transport = open_connection(limits, inners)
        kept.data_received(b"GET /health HTTP/1.1\r\n\r\n")
        limits.request_started(kept_transport)  # a handler runs: no deadline while it does
        limits.request_finished(kept_transport)  # answered; the next request gets a fresh deadline
        assert await kept_transport.ended == "close" and refused("header_timeout") == before + 2

        _, slow_transport = open_connection(limits, inners)
        slow_transport.pending_bytes = 1 << 20  # an answer it never reads: do not wait to flush it
        assert await slow_transport.ended == "abort"

    asyncio.run(scenario())


def test_the_body_budget_is_shared_and_given_back():
    budget = BodyBudget(100)
    assert budget.take(60) and not budget.take(50) and budget.take(40)
    budget.give(60)
    assert budget.free_bytes == 60 and budget.take(60)
    budget.give(1000)
    assert budget.free_bytes == 100  # never more than the configured total
