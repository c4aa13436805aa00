"""daemon/status.build_status: what /status shows, here its redaction of sync errors (they quote URLs)."""

from __future__ import annotations

import time

from conflux.config import Config, SourceConfig
from conflux.daemon.pool import Slot
from conflux.daemon.status import DaemonFacts, build_status
from conflux.ipc.messages import SourceReport


def test_a_failed_syncs_error_shows_no_secret_from_the_url_it_quotes() -> None:
    config = Config(sources=[SourceConfig(name="crm", url="https://crm.example/api")])
    result = ("failed: crm: giving up on https://bob:pw-userinfo@crm.example/api?api_key=k-query&page=3 "
              "after 8 attempts")
    facts = DaemonFacts(config=config, config_path="c.toml", started_at=time.time(), generation=1,
                        backend="embedded", state="running", log_reachable=True, slots=[Slot("fetcher", 0)],
                        sources={"crm": SourceReport(source="crm", last_sync_result=result)}, lags={})
    shown = build_status(facts)["sources"]["crm"]["last_sync_result"]
    assert shown == "failed: crm: giving up on https://***@crm.example/api?api_key=***&page=3 after 8 attempts"
