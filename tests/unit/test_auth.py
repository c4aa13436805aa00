"""Upstream access as pure logic: the credentials each auth type sends, OAuth2 renewal (before expiry,
and once after a 401, coalesced across concurrent requests), the client's 401 and Retry-After
handling against a fake session, the rate limiter's Retry-After pause, and the demo upstream's
credential checks. No sockets; clocks are faked."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json

import msgspec
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from conflux.config import RetryConfig, SourceConfig
from conflux.demo.upstream_auth import AuthGate, AuthSettings
from conflux.errors import ConfigError, UpstreamError
from conflux.workers import auth as auth_module
from conflux.workers.auth import AuthContext, OAuth2ClientCredentials, auth_config, make_auth
from conflux.workers.ratelimit import TokenBucket
from conflux.workers.upstream import UpstreamClient

OAUTH2 = auth_config("oauth2", token_url="http://idp/oauth/token", client_id="conflux",
                    client_secret_env="SECRET", scope="read")
CONTEXT = AuthContext("crm", "crm", True, None)


class FakeContent:
    def __init__(self, body: bytes) -> None:
        self._body = body

    async def iter_chunked(self, size: int):
        for start in range(0, len(self._body), size):
            yield self._body[start:start + size]


class FakeResponse:
    def __init__(self, status: int, body: object = None, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self._body = json.dumps(body if body is not None else {"data": []}).encode()
        self.content = FakeContent(self._body)
        self.headers = CIMultiDictProxy(CIMultiDict(headers or {}))
        self.url = "http://upstream/api/customers"

    async def read(self) -> bytes:
        return self._body

    async def json(self, content_type=None) -> object:
        return json.loads(self._body)


class FakeSession:
    """Answers GETs and token POSTs from scripted status lists and records what was sent."""

    def __init__(self, *, pages: list[int] = (), tokens: list[int] = (), retry_after: str | None = None) -> None:
        self.pages, self.tokens = list(pages), list(tokens)
        self.retry_after = retry_after
        self.sent: list[dict[str, str]] = []
        self.forms: list[dict[str, str]] = []

    @contextlib.asynccontextmanager
    async def get(self, url, *, headers, **_options):
        self.sent.append(headers)
        status = self.pages.pop(0) if self.pages else 200
        yield FakeResponse(status, headers={"Retry-After": self.retry_after} if self.retry_after else None)

    @contextlib.asynccontextmanager
    async def post(self, url, *, data, **_options):
        self.forms.append(data)
        await asyncio.sleep(0)  # let concurrent requests pile up behind the renewal
        status = self.tokens.pop(0) if self.tokens else 200
        body = {"access_token": f"token-{len(self.forms)}", "expires_in": 60} if status == 200 else \
            {"error": "invalid_client"}
        yield FakeResponse(status, body)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_static_credentials_come_from_env_or_file(monkeypatch, tmp_path):
    monkeypatch.setenv("CRM_TOKEN", "t-env")
    (tmp_path / "key").write_text("k-file\n")
    cases = [
        (auth_config("bearer", token_env="CRM_TOKEN"), {"Authorization": "Bearer t-env"}),
        (auth_config("header", header="X-API-Key", value_file=str(tmp_path / "key")), {"X-API-Key": "k-file"}),
        (auth_config("basic", username="sync", password_env="CRM_TOKEN"),
         {"Authorization": "Basic " + base64.b64encode(b"sync:t-env").decode()}),
    ]
    for config, expected in cases:
        assert asyncio.run(make_auth(config, "crm").headers(FakeSession())) == expected
    monkeypatch.delenv("CRM_TOKEN")
    with pytest.raises(ConfigError, match="source 'crm' auth: environment variable CRM_TOKEN is not set"):
        make_auth(cases[0][0], "crm")


def test_oauth2_caches_the_token_and_renews_it_before_it_expires(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(auth_module.time, "monotonic", clock)
    oauth = OAuth2ClientCredentials(OAUTH2.options, CONTEXT, client_secret="s3cret")
    session = FakeSession()

    async def headers_at(*moments: float) -> list[str]:
        seen = []
        for moment in moments:
            clock.now = 1000.0 + moment
            seen.append((await oauth.headers(session))["Authorization"])
        return seen

    # expires_in 60: renewed at max(60 / 2, 60 - 30) = 30 s, well before it expires.
    assert asyncio.run(headers_at(0, 10, 29.9, 30.0, 59)) == ["Bearer token-1"] * 3 + ["Bearer token-2"] * 2
    assert session.forms[0] == {"grant_type": "client_credentials", "client_id": "conflux",
                                "client_secret": "s3cret", "scope": "read"}


def test_concurrent_401s_renew_the_token_once():
    oauth = OAuth2ClientCredentials(OAUTH2.options, CONTEXT, client_secret="s3cret")
    session = FakeSession()

    async def scenario() -> None:
        stale = await oauth.headers(session)
        assert all(await asyncio.gather(*(oauth.refresh(session, stale) for _ in range(5))))

    asyncio.run(scenario())
    assert len(session.forms) == 2  # the first token, then one renewal for all five 401s


def _client(session: FakeSession, **source_options) -> UpstreamClient:
    source = SourceConfig(name="crm", url="http://upstream/api/customers", **source_options)
    return UpstreamClient(source, RetryConfig(base_s=0.01, max_s=0.02, max_attempts=4), session)


def test_a_401_renews_once_and_then_counts_as_failed(monkeypatch):
    monkeypatch.setenv("SECRET", "s3cret")
    session = FakeSession(pages=[401, 401, 401])
    client = _client(session, auth=OAUTH2)
    with pytest.raises(UpstreamError, match="answered 401"):
        asyncio.run(client.get(client.source.url))
    assert len(session.sent) == 2 and len(session.forms) == 2
    assert [h["Authorization"] for h in session.sent] == ["Bearer token-1", "Bearer token-2"]


def test_a_401_with_fresh_credentials_goes_through(monkeypatch):
    monkeypatch.setenv("SECRET", "s3cret")
    session = FakeSession(pages=[401, 200])
    client = _client(session, auth=OAUTH2, headers={"X-Tenant": "acme"})
    assert asyncio.run(client.get(client.source.url)).status == 200
    assert session.sent[-1] == {"X-Tenant": "acme", "Authorization": "Bearer token-2"}


def test_a_refused_renewal_fails_the_request_without_retrying(monkeypatch):
    monkeypatch.setenv("SECRET", "s3cret")
    session = FakeSession(pages=[401], tokens=[200, 401])
    client = _client(session, auth=OAUTH2)
    with pytest.raises(UpstreamError, match=r"token endpoint answered 401 \(invalid_client\)"):
        asyncio.run(client.get(client.source.url))
    assert len(session.sent) == 1 and len(session.forms) == 2


def test_retry_after_pauses_the_whole_source(monkeypatch):
    session = FakeSession(pages=[429], retry_after="7")
    client = _client(session)
    paused: list[float] = []
    monkeypatch.setattr(client.limiter, "pause", paused.append)
    monkeypatch.setattr("conflux.workers.upstream.asyncio.sleep", _no_sleep)
    assert asyncio.run(client.get(client.source.url)).status == 200
    assert paused == [7.0] and len(session.sent) == 2


async def _no_sleep(_delay_s: float) -> None:
    return None


def test_the_bucket_hands_out_no_token_while_paused():
    clock = Clock()
    for rate in (0.0, 5.0):
        bucket = TokenBucket(rate, clock=clock)
        bucket.pause(2.0)
        bucket.pause(0.5)  # a shorter pause never cuts a longer one short
        assert bucket.delay_for_next_s() == pytest.approx(2.0)
        clock.now += 2.0
        assert bucket.delay_for_next_s() == 0.0


def test_the_demo_upstream_accepts_each_credential_and_expires_issued_tokens():
    clock = Clock()
    gate = AuthGate(AuthSettings(require_token="tok-1a2b", basic_user="sync", client_secret="cs-9f8e",
                                 token_ttl_s=10), clock=clock)
    basic = "Basic " + base64.b64encode(b"sync:tok-1a2b").decode()
    for headers in ({"Authorization": "Bearer tok-1a2b"}, {"X-API-Key": "tok-1a2b"}, {"Authorization": basic}):
        assert gate.check(headers) is None, headers
    assert gate.check({}).reason == "missing"
    assert gate.check({"Authorization": "Basic " + base64.b64encode(b"root:tok-1a2b").decode()}).reason == "invalid"
    assert gate.issue({"grant_type": "client_credentials", "client_id": "conflux", "client_secret": "x"}).status == 401
    answer = gate.issue({"grant_type": "client_credentials", "client_id": "conflux", "client_secret": "cs-9f8e"})
    issued = {"Authorization": f"Bearer {answer.body['access_token']}"}
    assert answer.status == 200 and answer.body["expires_in"] == 10 and gate.check(issued) is None
    clock.now += 10
    assert gate.check(issued).reason == "expired"
    view = gate.view()
    shown = msgspec.json.encode(view).decode()
    assert view["token_requests"] == 2 and view["token_refused"] == 1
    assert "tok-1a2b" not in shown and "cs-9f8e" not in shown


def test_the_demo_upstream_rotates_and_revokes():
    gate = AuthGate(AuthSettings(require_token="old", client_secret="S"))
    token = gate.issue({"grant_type": "client_credentials", "client_id": "conflux", "client_secret": "S"})
    issued = {"Authorization": f"Bearer {token.body['access_token']}"}
    gate.update({"require_token": "new", "revoke_tokens": True})
    assert gate.check({"Authorization": "Bearer old"}).reason == "invalid"
    assert gate.check(issued).reason == "invalid" and gate.check({"Authorization": "Bearer new"}) is None
    with pytest.raises(ValueError, match="token_ttl_s"):
        gate.update({"token_ttl_s": 0})


def test_the_built_in_methods_are_plugins_found_through_the_entry_point_group():
    from conflux import plugins

    for name in ("bearer", "header", "basic", "oauth2"):
        method = plugins.load("auth", name, "auth.type")
        assert method.api_version == plugins.API_VERSION and issubclass(method, auth_module.AuthMethod)
        assert method.__module__ == "conflux.workers.auth" and isinstance(method.Options(**{
            "bearer": {"token_env": "T"}, "header": {"header": "X", "value_env": "T"},
            "basic": {"username": "u", "password_env": "T"},
            "oauth2": {"token_url": "http://idp", "client_id": "c", "client_secret_env": "T"}}[name]), msgspec.Struct)


def test_an_options_message_that_starts_with_its_field_names_the_field():
    from conflux import plugins

    with pytest.raises(ConfigError) as caught:
        plugins.options(auth_module.Header, {"value_env": "T"}, "sources[2].auth")
    assert str(caught.value) == "sources[2].auth.header: required for type 'header'"
    with pytest.raises(ConfigError) as caught:
        plugins.options(auth_module.Bearer, {}, "sources[2].auth")
    assert str(caught.value) == "sources[2].auth: type 'bearer' needs token_env or token_file"
