"""The gateway's job, done at the client, measured at the server: `rate_limit_rps` holds for every
request to a source (fetcher pages, manual syncs, retries, Retry-After pauses), `max_concurrency`
caps pages in flight, `headers` reach the upstream, and `timeout_s` gives up on slow pages."""

from __future__ import annotations

import time

import requests

from tests.fixtures.daemon import source, wait_converged
from tests.support import wait_until

RATE_RPS = 8.0
RETRY_AFTER_S = 1


def max_in_window(arrivals: list[float], window_s: float) -> int:
    """The most arrivals in any window [t, t + window_s) that starts at an arrival."""
    arrivals, most, start = sorted(arrivals), 0, 0
    for end, at in enumerate(arrivals):
        while at - arrivals[start] >= window_s:
            start += 1
        most = max(most, end - start + 1)
    return most


def _upstream_stats(upstream) -> dict:
    return requests.get(f"{upstream.url}/stats", params={"timestamps": 1}, timeout=10).json()["collections"]


def test_the_upstream_never_sees_more_than_the_rate_limit(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=1500, products=3000, latency_ms=20, count_header="X-Tenant")
    daemon = daemon_factory(sources=[
        source("customers", upstream.url, page_size=100, rate_limit_rps=RATE_RPS, max_concurrency=4,
               poll_interval_s=60, headers={"X-Tenant": "acme"}),
        source("products", upstream.url, page_size=100, max_concurrency=2, poll_interval_s=60),
    ], sink_url=analytics.url, retry={"max_attempts": 20})
    both = {"customers": "customers", "products": "products"}
    # Manual syncs asked for during the full sync share the same budget.
    wait_until(lambda: _upstream_stats(upstream)["customers"]["requests"].get("page", 0) >= 3, timeout_s=30,
               message="the full sync under way")
    for _ in range(3):
        assert requests.post(f"{daemon.url}/sync/customers", timeout=10).status_code == 202
    wait_converged(upstream.url, analytics.url, both, timeout_s=60)
    # Then a full pass while the upstream throttles: retries and Retry-After pauses count too.
    faults = {"throttle_rate": 0.2, "retry_after_s": RETRY_AFTER_S}
    requests.post(f"{upstream.url}/admin/faults", json=faults, timeout=10).raise_for_status()
    asked_at = time.time()
    assert requests.post(f"{daemon.url}/sync/customers", params={"full": "true"}, timeout=10).status_code == 202
    wait_until(lambda: daemon.sync_ok("customers", sync_type="full", after=asked_at), timeout_s=60,
               message="a full sync through the throttling")
    requests.post(f"{upstream.url}/admin/faults", json={"throttle_rate": 0.0}, timeout=10).raise_for_status()
    wait_converged(upstream.url, analytics.url, both, timeout_s=30)

    stats = _upstream_stats(upstream)
    customers, products = stats["customers"], stats["products"]
    arrivals = customers["timestamps"]
    assert len(arrivals) >= 2 * 15 + 1 and customers["status_codes"].get("429", 0) >= 1
    busiest = max_in_window(arrivals, 1.0)
    print(f"\nrate limit {RATE_RPS:g}/s: {len(arrivals)} requests, at most {busiest} in any 1 s window")
    assert busiest <= RATE_RPS + 1, f"{busiest} requests within one second"
    assert max_in_window(arrivals, 5.0) <= 5 * RATE_RPS + 1
    for throttled_at in customers["throttled_at"]:  # Retry-After paused the whole source
        early = [at for at in arrivals if throttled_at + 0.05 < at < throttled_at + RETRY_AFTER_S - 0.05]
        assert not early, f"requests {early} came within Retry-After of the 429 at {throttled_at}"
    assert 1 <= customers["max_in_flight"] <= 4 and products["max_in_flight"] == 2
    assert customers["headers"]["X-Tenant"] == {"acme": len(arrivals)}
    assert products["headers"]["X-Tenant"] == {"": products["requests"]["page"]}
    assert daemon.stop() == 0


def test_timeout_s_gives_up_on_slow_pages_and_retries_them(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=300, products=0, latency_ms=1500)
    daemon = daemon_factory(sources=[source("customers", upstream.url, timeout_s=0.4, poll_interval_s=0.5)],
                            sink_url=analytics.url,
                            retry={"max_attempts": 3, "base_s": 0.05, "max_s": 0.1, "breaker_cooldown_s": 0.5})
    report = wait_until(lambda: (r := daemon.status()["sources"]["customers"]).get("syncs_failed") and r,
                        timeout_s=30, message="a sync that timed out")
    assert "timed out after 0.4 s" in report["last_sync_result"]
    assert (daemon.metric("conflux_upstream_retries_total", source="customers", reason="timeout") or 0.0) >= 2
    assert (daemon.metric("conflux_upstream_request_duration_seconds_count", source="customers",
                   status="timeout") or 0.0) >= 3
    assert _upstream_stats(upstream)["customers"]["requests"]["page"] >= 3  # the retries reached the server
    requests.post(f"{upstream.url}/admin/faults", json={"latency_ms": 0}, timeout=10).raise_for_status()
    wait_converged(upstream.url, analytics.url, {"customers": "customers"}, timeout_s=30)
