"""conflux.redact: the one set of rules that keeps secrets out of logs, /status, `config check` and dead
letters, form by form. Where each place applies them: tests/unit/test_logs.py, test_config.py,
test_batching.py, and tests/integration/test_redaction.py for a running daemon."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conflux.redact import (
    MASK,
    kafka_secret_key,
    redact_headers,
    redact_text,
    redact_url,
    secret_name,
    url_secrets,
)


@pytest.mark.parametrize(("url", "expected"), [
    ("https://bob:pw@h.example:8443/api", "https://***@h.example:8443/api"),
    ("https://ghp_tokentokentoken@h.example/x", "https://***@h.example/x"),
    ("http://h/api?api_key=k1&page=2", "http://h/api?api_key=***&page=2"),
    ("http://h/api?page=2&access_token=t1;sig=s1", "http://h/api?page=2&access_token=***;sig=***"),
    ("http://h/a?X-Amz-Signature=abc&X-Amz-Date=20240101", "http://h/a?X-Amz-Signature=***&X-Amz-Date=20240101"),
    ("http://h/cb?code=oauth-code&state=s", "http://h/cb?code=***&state=s"),
    ("http://h/a?apiKey=k2&password=p&client_secret=c&auth=a", "http://h/a?apiKey=***&password=***&client_secret=***&auth=***"),
    ("http://h/a?design=x&zipcode=1234&cursor=abc%3D", "http://h/a?design=x&zipcode=1234&cursor=abc%3D"),
    ("http://h/a#access_token=t2", "http://h/a#access_token=***"),
    ("http://h/a?api%5Fkey=k3", "http://h/a?api%5Fkey=***"),
    ("http://h/a?token=", "http://h/a?token="),
])
def test_urls_lose_userinfo_and_secret_query_values_and_keep_the_rest_byte_for_byte(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize("name", ["Authorization", "Proxy-Authorization", "Cookie", "Set-Cookie", "X-API-Key",
                                  "X-Signature-Key", "X-Conflux-Signature", "X-Auth-Token", "X-Client-Secret",
                                  "X-Password", "X-Session-Id", "X-Credential"])
def test_secret_header_names(name: str) -> None:
    assert secret_name(name) and secret_name(name.lower())
    assert redact_headers({name: "v", "Accept": "json", "X-Tenant": "acme"}) == {
        name: MASK, "Accept": "json", "X-Tenant": "acme"}


@pytest.mark.parametrize("name", ["Accept", "X-Tenant", "Content-Type", "User-Agent", "page", "updated_since",
                                  "token_env", "password_file", "zipcode"])
def test_ordinary_names_are_not_secret(name: str) -> None:
    assert not secret_name(name)


@pytest.mark.parametrize(("key", "secret"), [
    ("ssl.key.pem", True), ("ssl.certificate.pem", True), ("ssl.key.password", True), ("ssl.key.location", True),
    ("sasl.password", True), ("sasl.oauthbearer.client.secret", True), ("sasl.oauthbearer.config", True),
    ("ssl.keystore.password", True), ("sasl.password_env", False), ("ssl.key.pem_file", False),
    ("sasl.username", False), ("sasl.mechanism", False), ("linger.ms", False), ("ssl.ca.location", False),
])
def test_kafka_secret_keys(key: str, secret: bool) -> None:
    assert kafka_secret_key(key) is secret


@pytest.mark.parametrize(("text", "hidden", "kept"), [
    ("giving up on https://bob:pw-1@h/api?api_key=k-1&page=2 after 8 attempts", ["pw-1", "k-1"],
     "giving up on https://***@h/api?api_key=***&page=2 after 8 attempts"),
    ("headers {'Cookie': 'sid=c-1', 'Accept': 'json', \"X-Signature-Key\": \"s-1\"}", ["c-1", "s-1"],
     "headers {'Cookie': '***', 'Accept': 'json', \"X-Signature-Key\": \"***\"}"),
    ("Authorization: Bearer t-1\nX-Tenant: acme\nSet-Cookie: sid=c-2", ["t-1", "c-2"],
     "Authorization: Bearer ***\nX-Tenant: acme\nSet-Cookie: ***"),
    ("librdkafka: ssl.key.password=k-2 sasl.password=k-3 linger.ms=5", ["k-2", "k-3"],
     "librdkafka: ssl.key.password=*** sasl.password=*** linger.ms=5"),
    ("key -----BEGIN RSA PRIVATE KEY-----\nMII-k4\n-----END RSA PRIVATE KEY----- loaded", ["MII-k4"],
     "key *** loaded"),
    ("sources[0] (crm).auth.token_env: environment variable CRM_TOKEN is not set", [],
     "sources[0] (crm).auth.token_env: environment variable CRM_TOKEN is not set"),
    ("message m-1 at customers/0@5: 500 records, 500 routed in 1.2 ms", [],
     "message m-1 at customers/0@5: 500 records, 500 routed in 1.2 ms"),
])
def test_free_text_loses_every_secret_form_and_keeps_ordinary_text(text: str, hidden: list[str], kept: str) -> None:
    redacted = redact_text(text)
    assert redacted == kept and not any(secret in redacted for secret in hidden)


def test_url_secrets_are_what_a_log_line_could_quote() -> None:
    assert set(url_secrets("https://bob:p%40ss@h/x?api_key=a%2Bb&page=1")) == {
        "bob:p%40ss", "p%40ss", "p@ss", "a%2Bb", "a+b"}
    assert url_secrets("http://conflux@h/x?page=1") == []  # a user name alone is not a secret


@given(text=st.text(max_size=200))
def test_redact_text_never_fails_and_is_idempotent(text: str) -> None:
    once = redact_text(text)
    assert redact_text(once) == once
