"""deploy/examples/twelve-systems.toml as shipped (only the upstream, sink and state locations swapped
for the test's): twelve systems sync to twelve topics with equal checksums, and a thirteenth is
added with a config change and SIGHUP without disturbing the others."""

from __future__ import annotations

import re
import signal
import time
import tomllib

import requests

from tests.fixtures.daemon import source, wait_converged, write_config
from tests.support import REPO, wait_until

EXAMPLE = REPO / "deploy" / "examples" / "twelve-systems.toml"
EXAMPLE_UPSTREAM, EXAMPLE_SINK = "http://127.0.0.1:8081", "http://127.0.0.1:8082"
OLD_TOPICS = {"customers": "customer_data", "products": "inventory_data", "orders": "order_data",
              "shipments": "shipment_data", "payments": "payment_data", "analytics": "analytics_data",
              "crm_events": "crm_events", "erp_updates": "erp_updates", "warehouse": "warehouse_data",
              "supplier": "supplier_data", "marketing": "marketing_data", "support_tickets": "support_tickets"}
RECORDS_EACH = 5000


def example_for(upstream_url: str) -> tuple[list[dict], dict]:
    """The example's sources and the sections the test keeps (log layout, sink batching, workers)."""
    example = tomllib.loads(EXAMPLE.read_text())
    sources = [{**s, "url": s["url"].replace(EXAMPLE_UPSTREAM, upstream_url)} for s in example["sources"]]
    assert example["sink"]["url"].startswith(EXAMPLE_SINK)
    sink = {k: v for k, v in example["sink"].items() if k != "url"}
    log = {k: v for k, v in example["log"].items() if k != "path"}
    return sources, {"log": log, "sink": sink, "workers": example["workers"]}


def _page_requests(upstream) -> dict[str, int]:
    collections = requests.get(f"{upstream.url}/stats", timeout=10).json()["collections"]
    return {name: sum(c["requests"].get(style, 0) for style in ("page", "offset", "cursor", "link", "keyset"))
            for name, c in collections.items()}


def test_twelve_systems_by_configuration_and_a_thirteenth_by_sighup(upstream_factory, analytics, daemon_factory):
    upstream = upstream_factory(customers=RECORDS_EACH, products=RECORDS_EACH, systems=11,
                                records_per_system=RECORDS_EACH)
    sources, sections = example_for(upstream.url)
    assert {s["name"]: s["topic"] for s in sources} == OLD_TOPICS
    started = time.monotonic()
    daemon = daemon_factory(sources=sources, sink_url=analytics.url, **sections)
    twelve = {name: name for name in OLD_TOPICS}
    converged = wait_converged(upstream.url, analytics.url, twelve, timeout_s=180)
    elapsed_s = time.monotonic() - started
    total = sum(count for _checksum, count in converged.values())
    assert total == 12 * RECORDS_EACH
    print(f"\ntwelve systems: {total} records in {elapsed_s:.2f} s from daemon start to equal checksums "
          f"= {total / elapsed_s:,.0f} records/s")
    status = daemon.status()
    assert {name: status["sources"][name]["topic"] for name in OLD_TOPICS} == OLD_TOPICS

    # The thirteenth system: one more [[sources]] table, then SIGHUP.
    generation, requests_before = status["daemon"]["generation"], _page_requests(upstream)
    settings = dict(daemon.settings)
    settings["sources"] = [*sources, source("system_11", upstream.url, topic="system_11_data", page_size=1000)]
    write_config(daemon.directory, settings)
    reloaded_at = time.time()
    daemon.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.status()["daemon"]["generation"] == generation + 1, timeout_s=60,
               message="a new generation")
    wait_converged(upstream.url, analytics.url, {**twelve, "system_11": "system_11"}, timeout_s=120)
    for name in OLD_TOPICS:  # each resumed from its checkpoint: its first sync after the reload is incremental
        report = wait_until(lambda n=name: daemon.sync_ok(n, after=reloaded_at), timeout_s=60,
                            message=f"{name} syncing in the new generation")
        assert report["last_sync_type"] == "incremental", (name, report)
    assert daemon.sync_ok("system_11")["records_synced"] == RECORDS_EACH
    after_reload = daemon.log().split("reload: config is valid", 1)[1]
    assert re.findall(r"(\w+): full sync ok", after_reload) == ["system_11"]
    requests_after = _page_requests(upstream)
    # A second full sync alone would re-read every page; an incremental one with nothing new reads 1.
    full_sync_pages = RECORDS_EACH // 1000
    assert all(requests_after[name] - requests_before[name] < full_sync_pages for name in OLD_TOPICS), (
        requests_before, requests_after)
    assert daemon.stop() == 0
