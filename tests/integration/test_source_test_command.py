"""`conflux source test` against the real demo upstream: every paging style walked to the end, --pages,
--since, a shaped source (the records exactly as the sink would get them, deletes included), dead
letters with their reasons, the source's rate limit, auth failures named with a non-zero exit, --json,
and nothing written: no log file, no state directory, no watermark."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import requests

from conflux.config import to_toml
from tests.support import REPO

STYLES = {"page": "customers", "offset": "customers/offset", "cursor": "customers/cursor",
          "link": "customers/link", "watermark": "customers/keyset"}
# What each style's pages say about the next one (every page but the last).
NEXT = {"page": "total", "offset": "total", "cursor": "next_cursor", "link": "link", "watermark": "has_more"}


def write_config(directory: Path, upstream_url: str, **source) -> Path:
    path = directory / "conflux.toml"
    path.write_text(to_toml({
        "log": {"path": str(directory / "var" / "conflux.db")},
        "daemon": {"state_dir": str(directory / "var")},
        "sources": [{"name": "customers", "url": f"{upstream_url}/api/{STYLES[source.get('pagination', 'page')]}",
                     "page_size": 100, **source}]}))
    return path


def source_test(path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conflux", "source", "test", "-c", str(path), "--source",
                           "customers", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=120)


def pages_of(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stdout + result.stderr
    return [msgspec.json.decode(line) for line in result.stdout.splitlines()]


def upstream_records(upstream_url: str) -> list[dict]:
    """Every record the upstream lists, read independently of Conflux."""
    body = requests.get(f"{upstream_url}/api/customers", params={"page": 1, "size": 1000}, timeout=10).json()
    return body["data"]


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_paging_style_is_walked_to_the_end_and_nothing_is_written(style, upstream_factory, tmp_path):
    upstream = upstream_factory(customers=250, products=0)
    path = write_config(tmp_path, upstream.url, pagination=style)
    pages = pages_of(source_test(path, "--pages", "0", "--json", "--records", "3"))
    assert [page["page"] for page in pages] == [1, 2, 3] and {page["status"] for page in pages} == {200}
    assert [page["records"] for page in pages] == [100, 100, 50]
    assert sum(page["upserts"] for page in pages) == 250 and all(page["bytes"] > 1000 for page in pages)
    assert all(NEXT[style] in page["next"] for page in pages[:-1]), [page["next"] for page in pages]
    assert "next_cursor" not in pages[-1]["next"] and "link" not in pages[-1]["next"]
    assert all(page["time_s"] > 0 for page in pages)
    keys = {str(record["id"]) for record in upstream_records(upstream.url)}
    samples = pages[0]["sink_records"]
    assert len(samples) == 3 and {record["key"] for record in samples} <= keys
    assert all(record["op"] == "upsert" and record["data"]["id"] == int(record["key"]) for record in samples)
    assert not (tmp_path / "var").exists()  # no log, no checkpoint, no key index


def test_pages_stops_the_walk_and_the_report_reads_as_text(upstream_factory, tmp_path):
    upstream = upstream_factory(customers=250, products=0)
    result = source_test(write_config(tmp_path, upstream.url, pagination="cursor"), "--pages", "2", "--records", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("page ")] == ["page 1", "page 2"]
    assert "page 1: 200, 100 records (100 upserts, 0 deletes, 0 to the DLQ)" in result.stdout
    assert "next: next_cursor=" in lines[1]
    assert "stopped after 2 pages (--pages): 200 records, 200 to the sink (0 deletes), 0 to the DLQ" in result.stdout
    assert "the first records as the sink would get them:" in result.stdout
    requests_made = requests.get(f"{upstream.url}/stats", timeout=10).json()["collections"]["customers"]["requests"]
    assert sum(requests_made.values()) == 2, requests_made  # the third page was never asked for


def test_since_syncs_incrementally_from_that_instant(upstream_factory, tmp_path):
    upstream = upstream_factory(customers=250, products=0)
    records = sorted(upstream_records(upstream.url), key=lambda record: record["updated_at"])
    since = records[200]["updated_at"]
    expected = sum(record["updated_at"] >= since for record in records)
    pages = pages_of(source_test(write_config(tmp_path, upstream.url), "--since", since, "--json", "--pages", "0"))
    assert "updated_since=" in pages[0]["url"]
    assert sum(page["records"] for page in pages) == expected < 250
    bad = source_test(write_config(tmp_path, upstream.url), "--since", "yesterday")
    assert bad.returncode == 2 and "--since: 'yesterday' is not an ISO 8601 instant" in bad.stderr


def test_a_shaped_source_shows_records_as_the_sink_gets_them(upstream_factory, tmp_path):
    upstream = upstream_factory(customers=150, products=0)
    path = write_config(tmp_path, upstream.url, fields={"select": ["id", "name", "updated_at"],
                                                        "rename": {"name": "full_name"}},
                        filter={"field": "tier", "in": ["gold"]})
    pages = pages_of(source_test(path, "--json", "--pages", "0", "--records", "150"))
    sink = [record for page in pages for record in page["sink_records"]]
    by_key = {str(record["id"]): record for record in upstream_records(upstream.url)}
    assert len(sink) == 150 and {record["key"] for record in sink} == set(by_key)
    for record in sink:
        original = by_key[record["key"]]
        if original["tier"] == "gold":
            assert record["op"] == "upsert" and record["data"] == {"id": original["id"], "full_name": original["name"],
                                                                   "updated_at": original["updated_at"]}
        else:  # outside the filter: a delete of its key, without data
            assert record["op"] == "delete" and record["data"] is None
    assert sum(page["deletes"] for page in pages) == sum(r["tier"] != "gold" for r in by_key.values()) > 0


def test_records_that_would_be_dead_letters_are_shown_with_their_reasons(upstream_factory, tmp_path):
    upstream = upstream_factory(customers=300, products=0, malformed_rate=0.05)
    malformed = requests.get(f"{upstream.url}/admin/malformed", timeout=10).json()["customers"]
    result = source_test(write_config(tmp_path, upstream.url), "--json", "--pages", "0")
    dead = [entry for page in pages_of(result) for entry in page["dead_letters"]]
    assert len(dead) == len(malformed) > 0
    reasons = {entry["reason"] for entry in dead}
    assert "missing key field 'id'" in reasons
    assert any("'updated_at' is not an ISO 8601 timestamp" in reason for reason in reasons), reasons
    assert sorted(map(str, (entry["record"] for entry in dead))) == sorted(map(str, (m["record"] for m in malformed)))
    text = source_test(write_config(tmp_path, upstream.url), "--pages", "0")
    assert "records that would go to the DLQ:" in text.stdout and "missing key field 'id'" in text.stdout
    assert text.returncode == 0  # dead letters are data, not an error of the test


def test_auth_failures_are_named_and_exit_non_zero(upstream_factory, tmp_path):
    upstream = upstream_factory(customers=120, products=0, require_token="tok-right-5e1")
    path = write_config(tmp_path, upstream.url, auth={"type": "bearer", "token_env": "CRM_TOKEN"})
    wrong = source_test(path, env={"CRM_TOKEN": "tok-wrong"})
    assert wrong.returncode == 1 and "UpstreamError" in wrong.stderr and "answered 401" in wrong.stderr, wrong.stderr
    assert "tok-wrong" not in wrong.stderr + wrong.stdout
    as_json = source_test(path, "--json", env={"CRM_TOKEN": "tok-wrong"})
    assert as_json.returncode == 1 and "answered 401" in msgspec.json.decode(as_json.stdout.splitlines()[-1])["error"]
    unset = source_test(path, env={"CRM_TOKEN": ""})
    assert unset.returncode == 3 and "environment variable CRM_TOKEN is not set" in unset.stderr
    right = source_test(path, "--json", env={"CRM_TOKEN": "tok-right-5e1"})
    assert [page["records"] for page in pages_of(right)] == [100, 20]


def test_the_source_rate_limit_applies(upstream_factory, tmp_path):
    upstream = upstream_factory(customers=250, products=0)
    path = write_config(tmp_path, upstream.url, page_size=50, rate_limit_rps=5)
    started = time.monotonic()
    pages = pages_of(source_test(path, "--json", "--pages", "0"))
    assert len(pages) == 5
    arrivals = requests.get(f"{upstream.url}/stats", params={"timestamps": 1},
                            timeout=10).json()["collections"]["customers"]["timestamps"]
    assert len(arrivals) == 5 and arrivals[-1] - arrivals[0] >= 0.7, arrivals  # 5 requests at 5/s: >= 0.8 s
    assert time.monotonic() - started >= 0.7


def test_an_unknown_source_is_named(tmp_path):
    path = write_config(tmp_path, "http://127.0.0.1:9")
    result = subprocess.run([sys.executable, "-m", "conflux", "source", "test", "-c", str(path), "--source", "crm"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and "no source named 'crm'" in result.stderr and "(sources: customers)" in \
        result.stderr


def test_a_page_in_another_shape_is_named_and_exits_non_zero(upstream_factory, tmp_path):
    upstream = upstream_factory(customers=50, products=0)
    path = write_config(tmp_path, upstream.url, pagination_fields={"records_path": "items"})
    result = source_test(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "PageFormatError: page is not JSON with a list of records at 'items'" in result.stderr, result.stderr
