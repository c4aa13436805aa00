"""docs/OPERATIONS.md stays true to the repository: a runbook entry for every alert (and every
runbook_url lands on one), links that resolve, metric names that exist, deploy files that exist,
and a scaling table that keeps partitions >= instances x consumers."""

from __future__ import annotations

import re

import yaml

from tests.support import REPO

OPERATIONS = REPO / "docs" / "OPERATIONS.md"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
METRICS_SOURCE = REPO / "conflux" / "metrics.py"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
USER_CREATED = frozenset({"deploy/.env"})  # copied from deploy/.env.example by the operator


def doc() -> str:
    return OPERATIONS.read_text()


def headings(text: str) -> list[str]:
    in_code = False
    found = []
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.append(line.lstrip("#").strip())
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def runbook_section(text: str) -> str:
    return text[text.index("\n## Runbook\n"):]


def test_every_alert_has_a_runbook_entry():
    names = [rule["alert"] for rule in alert_rules()]
    assert names, "no alerts found in alerts.yml"
    runbook_headings = headings(runbook_section(doc()))
    missing = [name for name in names if name not in runbook_headings]
    assert not missing, f"alerts without a '### <name>' entry under '## Runbook': {missing}"
    for name in names:
        entry = runbook_section(doc()).split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        assert "**Fires:**" in entry and len(entry.split()) > 40, f"the {name} entry says too little"


def test_runbook_urls_point_at_their_entry():
    anchors = {slug(heading) for heading in headings(doc())}
    for rule in alert_rules():
        url = rule.get("annotations", {}).get("runbook_url")
        if url is None:
            continue
        path, _, anchor = url.partition("#")
        assert path.endswith("docs/OPERATIONS.md"), f"{rule['alert']}: runbook_url {url} is not OPERATIONS.md"
        assert anchor == slug(rule["alert"]) and anchor in anchors, f"{rule['alert']}: runbook_url {url}"


def test_links_inside_the_guide_resolve():
    anchors = {slug(heading) for heading in headings(doc())}
    links = re.findall(r"\]\(#([^)]+)\)", doc())
    assert links and not [link for link in links if link not in anchors]


def test_every_metric_the_guide_names_exists():
    defined = set(re.findall(r'"(conflux_[a-z_]+)"', METRICS_SOURCE.read_text()))
    named = set(re.findall(r"\bconflux_[a-z_]+", doc()))
    named = {next((n[: -len(s)] for s in HISTOGRAM_SUFFIXES if n.endswith(s) and n[: -len(s)] in defined), n)
             for n in named}
    assert named and named <= defined, f"unknown metrics: {sorted(named - defined)}"


def test_every_deploy_file_the_guide_names_exists():
    paths = set(re.findall(r"`(deploy/[\w./-]*[\w/])`", doc())) - USER_CREATED
    missing = [path for path in paths if not (REPO / path).exists()]
    assert paths and not missing, f"named in the guide but missing: {missing}"


def test_the_scaling_table_keeps_partitions_at_least_instances_times_consumers():
    rows = re.findall(r"^\| [^|]+ \| (\d+) \| (\d+) \| (\d+) \|", doc(), flags=re.MULTILINE)
    assert len(rows) >= 3
    for replicas, consumers, partitions in rows:
        assert int(partitions) >= int(replicas) * int(consumers), (replicas, consumers, partitions)
