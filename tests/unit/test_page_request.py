"""How page requests go out (workers/page_request.py): GET query parameters, POST bodies with placeholders,
and a child source's url filled with its parent's fields."""

from __future__ import annotations

from urllib.parse import parse_qsl

import msgspec
import pytest

from conflux.config import PaginationConfig, SourceConfig
from conflux.workers.page_request import PageRequests, render_url

URL = "http://upstream.test/api/search"


def requests_of(body: dict | None = None, **options) -> PageRequests:
    fields = options.pop("fields", {})
    return PageRequests(SourceConfig(name="crm", url=URL, method="POST" if body is not None else "GET",
                                     body=body or {}, pagination_options=PaginationConfig(**fields), **options))


def test_get_sends_every_parameter_in_the_query_string() -> None:
    outgoing = requests_of().outgoing({"page": "2", "size": "100"})
    assert (outgoing.method, outgoing.params, outgoing.body) == ("GET", {"page": "2", "size": "100"}, None)


def test_post_fills_placeholders_with_typed_values_and_keeps_the_rest_in_the_query() -> None:
    body = {"query": {"status": "open", "changed_after": "{updated_since}"},
            "page": {"number": "{page}", "size": "{limit}"}, "label": "page {page} of the export"}
    outgoing = requests_of(body).outgoing({"page": "3", "size": "50", "updated_since": "2024-05-01T00:00:00Z",
                                           "debug": "1"})
    assert outgoing.method == "POST" and outgoing.content_type == "application/json"
    assert msgspec.json.decode(outgoing.body) == {
        "query": {"status": "open", "changed_after": "2024-05-01T00:00:00Z"},
        "page": {"number": 3, "size": 50}, "label": "page 3 of the export"}
    # Only what no placeholder stands for stays in the query string.
    assert outgoing.params == {"debug": "1"}


def test_a_member_whose_placeholder_has_no_value_is_left_out() -> None:
    body = {"cursor": "{cursor}", "limit": "{limit}", "filter": ["since:{updated_since}", "active"]}
    first = requests_of(body).outgoing({"limit": "100"})
    assert msgspec.json.decode(first.body) == {"limit": 100, "filter": ["active"]}
    later = requests_of(body).outgoing({"limit": "100", "cursor": "abc", "updated_since": "T"})
    assert msgspec.json.decode(later.body) == {"cursor": "abc", "limit": 100, "filter": ["since:T", "active"]}
    assert later.params == {}


def test_placeholders_follow_the_configured_parameter_names_and_plugins_use_their_own() -> None:
    body = {"from": "{offset}", "count": "{limit}", "skip": "{skip}", "raw": "{not_a_placeholder}"}
    requests = requests_of(body, fields={"offset_param": "start", "limit_param": "rows"})
    outgoing = requests.outgoing({"start": "40", "rows": "20", "skip": "7"})
    assert msgspec.json.decode(outgoing.body) == {"from": 40, "count": 20, "skip": "7", "raw": "{not_a_placeholder}"}


def test_updated_since_is_a_number_in_an_epoch_format() -> None:
    body = {"since": "{updated_since}"}
    outgoing = requests_of(body, updated_since_format="epoch_ms").outgoing({"updated_since": "1714557607000"})
    assert msgspec.json.decode(outgoing.body) == {"since": 1714557607000}


def test_a_form_body_is_urlencoded_text() -> None:
    body = {"q": "status:open", "page": "{page}", "tags": ["a", "b"], "archived": False}
    outgoing = requests_of(body, body_type="form").outgoing({"page": "2", "size": "10"})
    assert outgoing.content_type == "application/x-www-form-urlencoded"
    assert parse_qsl(outgoing.body.decode()) == [("q", "status:open"), ("page", "2"), ("tags", "a"), ("tags", "b"),
                                                 ("archived", "false")]
    assert outgoing.params == {"size": "10"}


def test_a_parent_field_fills_the_body_with_its_json_type() -> None:
    requests = requests_of({"project": "{parent.id}", "path": "{parent.meta.slug}/x"}, parent="projects")
    outgoing = requests.outgoing({}, {"id": 7, "meta.slug": "acme"})
    assert msgspec.json.decode(outgoing.body) == {"project": 7, "path": "acme/x"}


@pytest.mark.parametrize(("fields", "expected"), [
    ({"id": 7, "org.slug": "a b/c"}, "http://h/orgs/a%20b%2Fc/projects/7/issues?x={x}"),
    ({"id": 7}, None),                        # a field the url needs is missing
    ({"id": 7, "org.slug": None}, None),      # or null
    ({"id": {"a": 1}, "org.slug": "a"}, None),  # or not a scalar
])
def test_render_url_quotes_parent_fields_and_refuses_a_missing_one(fields: dict, expected: str | None) -> None:
    assert render_url("http://h/orgs/{parent.org.slug}/projects/{parent.id}/issues?x={x}", fields) == expected
