"""deploy/prometheus and deploy/grafana: promtool checks the rules and runs their unit tests, the
dashboard is valid JSON whose queries parse as PromQL, and every series either names is one Conflux
exports. promtool comes from Debian's prometheus package; without it these tests fail, never skip."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from conflux import metrics
from tests.support import REPO

RULES_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "conflux.json"
SERIES_NAME = re.compile(r"\bconflux_[a-z0-9_]+\b")
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$instance": ".*", "$source": ".*"}


def exported_series() -> set[str]:
    """Every series name daemon.metrics can put on /metrics."""
    names: set[str] = set()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            family = metric.describe()[0]
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
            names.update(family.name + suffix for suffix in suffixes)
    return names


def promtool(*args: str) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed; install Debian's prometheus package (apt-get install prometheus), "
                    "as .ci/run does")
    return subprocess.run([path, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=60)


def dashboard_queries() -> list[str]:
    def walk(panels: list[dict]):
        for panel in panels:
            yield from (target["expr"] for target in panel.get("targets", []))
            yield from walk(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    variables = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return list(walk(dashboard["panels"])) + variables


def test_the_documented_series_are_all_exported():
    documented = {
        "conflux_records_fetched_total", "conflux_records_delivered_total", "conflux_messages_processed_total",
        "conflux_messages_failed_total", "conflux_processing_duration_seconds_bucket", "conflux_dedup_skipped_total",
        "conflux_dlq_records_total", "conflux_sync_lag_seconds", "conflux_last_sync_timestamp_seconds",
        "conflux_consumer_lag", "conflux_upstream_request_duration_seconds_bucket",
        "conflux_sink_request_duration_seconds_bucket", "conflux_circuit_state", "conflux_worker_restarts_total",
        "conflux_workers", "conflux_queue_depth",
    }
    assert documented <= exported_series()


def test_promtool_check_rules_accepts_the_alerts():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests_pass():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_encode_the_old_systems_thresholds():
    text = (RULES_DIR / "alerts.yml").read_text()
    for expected in ("conflux_sync_lag_seconds > 300", "conflux:error_ratio:rate5m > 0.05",
                     "conflux:error_ratio:rate5m > 0.10", "conflux_consumer_lag > 1000",
                     "conflux_upstream_request_duration_seconds_bucket[5m]))) > 1"):
        assert expected in text


@pytest.mark.parametrize("path", [RULES_DIR / "alerts.yml", RULES_DIR / "alerts_test.yml", DASHBOARD],
                         ids=lambda path: path.name)
def test_rules_and_dashboard_name_only_exported_series(path: Path):
    unknown = set(SERIES_NAME.findall(path.read_text())) - exported_series()
    assert not unknown, f"{path.name} names series Conflux does not export: {sorted(unknown)}"


def test_dashboard_queries_parse_as_promql(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rules = []
    for number, query in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        if query.startswith("label_values("):  # Grafana's own function; check the series selector inside
            query = query[len("label_values("):].rsplit(",", 1)[0]
        rules.append({"record": f"dashboard:query_{number}", "expr": query})
    # JSON is YAML, so promtool reads this file as it is.
    (tmp_path / "dashboard_rules.yml").write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(tmp_path / "dashboard_rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
