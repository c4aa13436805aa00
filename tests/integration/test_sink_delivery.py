"""HttpSink (workers/sinks/http.py) against the real demo analytics sink: an answer that is not the sink's
acknowledgement (a redirect, an HTML page, 401/403/404) is an outage, retried behind the breaker until
the fault is lifted, and then the batch arrives exactly once."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from prometheus_client import REGISTRY

from conflux.config import RetryConfig, SinkConfig
from conflux.workers.sinks.base import Delivery
from conflux.workers.sinks.http import HttpSink
from tests.fixtures.analytics import batch_body, sink_record

RETRY = RetryConfig(base_s=0.02, max_s=0.1, breaker_failures=2, breaker_cooldown_s=0.2)
LIFTED = {"redirect_to": "", "html_200": False, "fail_status": 0}


async def poll(predicate, *, timeout_s: float = 20.0, message: str = "condition"):
    """Await until ``predicate()`` (a coroutine function) returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")


async def get_json(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url) as response:
        return await response.json()


def retries(reason: str) -> float:
    return REGISTRY.get_sample_value("conflux_sink_retries_total", {"reason": reason, "sink": "default"}) or 0.0


class FixedChunk:
    """A request body made by the test, delivered as the merger's chunks are (batch_id, body, length)."""

    def __init__(self, batch_id: str, body: bytes, count: int) -> None:
        self.batch_id, self.body, self.count = batch_id, body, count

    def __len__(self) -> int:
        return self.count


def http_sink(url: str) -> HttpSink:
    return HttpSink("default", SinkConfig(url=f"{url}/ingest", timeout_s=5.0), RETRY)


async def deliver_through_fault(url: str, fault_count: str, records: list[dict]) -> tuple[Delivery, list[str]]:
    """Deliver one batch while the sink's fault is on; lift it once the breaker opened; return the outcome
    and the breaker states seen."""
    sink = http_sink(url)
    seen: list[str] = []
    sink.breaker.on_change_hooks.append(seen.append)
    await sink.start()
    try:
        async with aiohttp.ClientSession() as admin:
            task = asyncio.create_task(sink.deliver(FixedChunk("b-1", batch_body("b-1", records), len(records))))
            await poll(lambda: _counted(admin, url, fault_count, 3), message=f"3 ingests answered by {fault_count}")
            await poll(lambda: _true(sink.breaker.state == "open"), message="the breaker to open")
            assert not task.done(), f"a fault answer counted as delivered: {task.result()}"
            stats = await get_json(admin, f"{url}/stats")
            assert stats["batches"] == 0 and stats["sources"] == {}, "the fault applied something"
            async with admin.post(f"{url}/admin/faults", json=LIFTED) as response:
                assert response.status == 200
            outcome = await asyncio.wait_for(task, timeout=20)
            stats = await get_json(admin, f"{url}/stats")
            assert stats["batches"] == 1 and stats["sources"]["crm.customers"]["count"] == len(records)
            return outcome, seen
    finally:
        await sink.close()


async def _counted(session: aiohttp.ClientSession, url: str, name: str, at_least: int) -> bool:
    return (await get_json(session, f"{url}/admin/faults"))["counts"][name] >= at_least


async def _true(value: bool) -> bool:
    return value


FAULTS = {
    "redirect": ({"redirect_to": "/login"}, "redirect", "redirect"),
    "html-200": ({"html_200": True}, "html_200", "not_acknowledged"),
    "401": ({"fail_status": 401}, "fail_status", "401"),
    "403": ({"fail_status": 403}, "fail_status", "403"),
    "404": ({"fail_status": 404}, "fail_status", "404"),
    "200-json-not-ack": ({"fail_status": 200}, "fail_status", "not_acknowledged"),
}


@pytest.mark.parametrize("case", FAULTS)
def test_a_non_acknowledgement_is_retried_behind_the_breaker_until_the_sink_takes_the_batch(analytics_factory, case):
    options, count_name, reason = FAULTS[case]
    service = analytics_factory(**options)
    records = [sink_record(f"k{i}", b'{"i":%d}' % i) for i in range(5)]
    before = retries(reason)
    outcome, breaker_states = asyncio.run(deliver_through_fault(service.url, count_name, records))
    assert outcome == Delivery({}, 200)
    assert retries(reason) - before >= 3
    assert breaker_states[0] == "open" and breaker_states[-1] == "closed"


def test_the_login_page_a_redirect_points_at_is_never_fetched(analytics_factory):
    """aiohttp would follow the 302 with a GET and see a 200 HTML page; the sink counts every request."""
    service = analytics_factory(redirect_to="/login")

    async def scenario() -> dict:
        sink = http_sink(service.url)
        await sink.start()
        try:
            records = [sink_record("k")]
            task = asyncio.create_task(sink.deliver(FixedChunk("b-1", batch_body("b-1", records), 1)))
            async with aiohttp.ClientSession() as admin:
                await poll(lambda: _counted(admin, service.url, "redirect", 3), message="3 redirected ingests")
                task.cancel()
                return await get_json(admin, f"{service.url}/stats")
        finally:
            await sink.close()

    stats = asyncio.run(scenario())
    assert stats["ingest_requests"] >= 3 and stats["login_requests"] == 0
