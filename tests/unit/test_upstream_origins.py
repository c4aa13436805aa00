"""Where an upstream request may go (workers/upstream.py, workers/bodies.py), as pure logic against a
scripted session: redirects are followed by the client itself, credentials and static headers only
to the source's own origin, another origin refused unless allowed (and then sent nothing), and bodies
capped. The same rules against real servers: tests/integration/test_upstream_hostile.py."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from conflux.config import RetryConfig, SourceConfig
from conflux.errors import UpstreamError
from conflux.workers.auth import auth_config
from conflux.workers.bodies import OriginRefused, ResponseTooLarge, origin_of
from conflux.workers.upstream import UpstreamClient

SOURCE_URL = "http://api.test:8081/v1/customers"
CREDENTIALS = {"Authorization": "Bearer s3cret", "X-Tenant": "acme"}


class Content:
    def __init__(self, body: bytes) -> None:
        self.body = body

    async def iter_chunked(self, size: int):
        for start in range(0, len(self.body), size):
            yield self.body[start:start + size]


class Answer:
    def __init__(self, url: URL, status: int, location: str | None, body: bytes) -> None:
        self.url, self.status = url, status
        self.headers = CIMultiDictProxy(CIMultiDict({"Location": location} if location else {}))
        self.content = Content(body)


class ScriptedSession:
    """Answers each GET from ``script``: path -> (status, Location or None, body); records what was sent."""

    def __init__(self, script: dict[str, tuple[int, str | None, bytes]]) -> None:
        self.script = script
        self.sent: list[tuple[str, dict[str, str], bool]] = []

    @contextlib.asynccontextmanager
    async def get(self, url, *, params=None, headers, allow_redirects=True, **_options):
        url = URL(url).update_query(params or {})
        self.sent.append((str(url), dict(headers), allow_redirects))
        status, location, body = self.script.get(f"{url.host}:{url.port}{url.path}", (404, None, b"{}"))
        yield Answer(url, status, location, body)


def client(session: ScriptedSession, monkeypatch: pytest.MonkeyPatch, **options) -> UpstreamClient:
    monkeypatch.setenv("CRM_TOKEN", "s3cret")
    source = SourceConfig(name="crm", url=SOURCE_URL, headers={"X-Tenant": "acme"},
                          auth=auth_config("bearer", token_env="CRM_TOKEN"), **options)
    return UpstreamClient(source, RetryConfig(base_s=0.01, max_s=0.02, max_attempts=2), session)


def get(upstream: UpstreamClient, url: str = SOURCE_URL):
    return asyncio.run(upstream.get(url, {"page": "1"}))


def test_a_redirect_within_the_origin_is_followed_by_the_client_with_credentials(monkeypatch) -> None:
    session = ScriptedSession({"api.test:8081/v1/customers": (302, "/v2/customers?page=1", b""),
                               "api.test:8081/v2/customers": (200, None, b'{"data": []}')})
    response = get(client(session, monkeypatch))
    assert response.status == 200 and response.url == "http://api.test:8081/v2/customers?page=1"
    assert [(url, headers) for url, headers, _ in session.sent] == [
        ("http://api.test:8081/v1/customers?page=1", CREDENTIALS),
        ("http://api.test:8081/v2/customers?page=1", CREDENTIALS)]
    assert {follow for _url, _headers, follow in session.sent} == {False}  # never aiohttp's own following


@pytest.mark.parametrize("location", [
    "http://localhost:8081/v2/customers",      # another host name for the same machine
    "http://api.test:8082/v2/customers",       # another port
    "https://api.test:8081/v2/customers",      # another scheme
    "//evil.test/steal",                       # scheme-relative
    "http://api.test:8081@evil.test/steal",    # user info
])
def test_a_redirect_to_another_origin_is_refused_before_anything_is_sent_there(location, monkeypatch) -> None:
    session = ScriptedSession({"api.test:8081/v1/customers": (307, location, b"")})
    with pytest.raises(OriginRefused, match=r"refused: origin .* is neither the source's own"):
        get(client(session, monkeypatch))
    assert len(session.sent) == 1


def test_a_next_link_to_another_origin_is_refused_before_it_is_requested(monkeypatch) -> None:
    session = ScriptedSession({})
    with pytest.raises(OriginRefused, match=r"a request to http://cdn.test/page2 refused"):
        get(client(session, monkeypatch), "http://cdn.test/page2?api_key=abc")
    assert session.sent == []


def test_an_allowed_origin_is_requested_without_credentials_or_static_headers(monkeypatch) -> None:
    session = ScriptedSession({"api.test:8081/v1/customers": (302, "https://cdn.test/files/1", b""),
                               "cdn.test:443/files/1": (200, None, b'{"data": []}')})
    upstream = client(session, monkeypatch, allowed_origins=["https://cdn.test"])
    assert get(upstream).status == 200
    assert [headers for _url, headers, _ in session.sent] == [CREDENTIALS, {}]
    assert get(upstream, "https://cdn.test:443/files/1").status == 200
    assert session.sent[-1][1] == {}


def test_a_redirect_chain_longer_than_five_fails(monkeypatch) -> None:
    session = ScriptedSession({"api.test:8081/v1/customers": (301, "/v1/customers", b"")})
    with pytest.raises(UpstreamError, match="more than 5 redirects"):
        get(client(session, monkeypatch))
    assert len(session.sent) == 6


def test_a_page_past_max_page_bytes_is_refused_and_an_error_body_only_truncated(monkeypatch) -> None:
    big = b'{"data": []}' + b" " * 5000
    session = ScriptedSession({"api.test:8081/v1/customers": (200, None, big)})
    with pytest.raises(ResponseTooLarge, match="larger than 4096 bytes"):
        get(client(session, monkeypatch, max_page_bytes=4096))
    session = ScriptedSession({"api.test:8081/v1/customers": (400, None, b"x" * 200_000)})
    with pytest.raises(UpstreamError, match=r"answered 400: x{200}$"):
        get(client(session, monkeypatch, max_page_bytes=4096))


def test_origins_compare_scheme_host_and_port() -> None:
    same = ["http://api.test/a", "HTTP://API.test:80/b?c", "http://api.test:80"]
    assert len({origin_of(URL(url)) for url in same}) == 1
    others = ["http://api.test:8080/", "https://api.test/", "http://127.0.0.1/", "http://localhost/"]
    assert len({origin_of(URL(url)) for url in same[:1] + others}) == 5
    assert str(origin_of(URL("https://[::1]/x"))) == "https://[::1]:443"
    with pytest.raises(ValueError):
        origin_of(URL("/relative"))
