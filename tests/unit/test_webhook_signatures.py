"""Vendor webhook signatures as pure logic: what each scheme reads from the headers before the body, what
its HMAC covers, tolerance and malformed headers, the untimed replay memory, and the config keys."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from conflux.config import SourceConfig, load_config, to_toml
from conflux.demo.upstream_webhooks import WebhookStyle, signed_headers
from conflux.errors import ConfigError
from conflux.workers.webhook_signatures import DeliveryMemory, scheme_for, verify

BODY = b'{"id": 1, "updated_at": "2026-01-01T00:00:00Z"}'
NOW = 1_767_225_600
SECRET = "whsec_test"


def source(**options) -> SourceConfig:
    return SourceConfig(name="crm", url="http://upstream/api/customers", **options)


def mac(message: bytes, secret: str = SECRET) -> bytes:
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


def check(src: SourceConfig, headers: dict[str, str], body: bytes = BODY, *, now: float = NOW,
          secret: str = SECRET) -> str:
    """"ok" when the headers pass and the body verifies, "wrong" when only the HMAC fails, else the
    problem found in the headers alone."""
    presented = scheme_for(src).presented(headers, now=now, tolerance_s=300)
    if isinstance(presented, str):
        return presented
    return "ok" if verify(secret, presented, body) else "wrong"


def test_github_signs_the_body_alone():
    github = source(webhook_signature="github")
    header = {"X-Hub-Signature-256": "sha256=" + mac(BODY).hex()}
    assert check(github, header) == "ok"
    assert check(github, {"X-Hub-Signature-256": "sha256=" + mac(BODY).hex().upper()}) == "ok"  # hex in any case
    assert check(github, header, BODY + b" ") == "wrong"
    assert check(github, header, secret="other") == "wrong"
    assert check(github, header, secret="") == "wrong"  # no secret: nothing passes
    for bad in ("", "sha1=" + "a" * 40, "sha256=" + "a" * 63, mac(BODY).hex()):
        assert "missing or malformed X-Hub-Signature-256" in check(github, {"X-Hub-Signature-256": bad})


def stripe_header(body: bytes, timestamp: int, *extra: str, secret: str = SECRET) -> dict[str, str]:
    signature = mac(f"{timestamp}.".encode() + body, secret).hex()
    return {"Stripe-Signature": ",".join([f"t={timestamp}", *extra, f"v1={signature}"])}


def test_stripe_signs_the_timestamp_a_dot_and_the_body_and_accepts_any_of_several_v1():
    stripe = source(webhook_signature="stripe")
    assert check(stripe, stripe_header(BODY, NOW)) == "ok"
    # During a secret rotation Stripe signs with both secrets; v0 (test mode) entries are ignored.
    assert check(stripe, stripe_header(BODY, NOW, "v1=" + "0" * 64, "v0=" + "1" * 64)) == "ok"
    assert check(stripe, stripe_header(BODY, NOW, secret="old"), secret=SECRET) == "wrong"
    moved = stripe_header(BODY, NOW)["Stripe-Signature"].replace(f"t={NOW}", f"t={NOW + 1}")
    assert check(stripe, {"Stripe-Signature": moved}) == "wrong"  # a replayer cannot refresh t
    assert check(stripe, stripe_header(BODY, NOW), BODY + b"\n") == "wrong"


@pytest.mark.parametrize(("value", "words"), [
    ("", "missing or malformed Stripe-Signature"),
    (f"t={NOW}", "missing or malformed Stripe-Signature"),
    ("v1=" + "a" * 64, "missing or malformed Stripe-Signature"),
    (f"t={NOW},t={NOW},v1=" + "a" * 64, "missing or malformed Stripe-Signature"),
    ("t=1.5e9,v1=" + "a" * 64, "missing or malformed Stripe-Signature"),
    (f"t={NOW},v1=" + "a" * 63, "missing or malformed Stripe-Signature"),
    (f"t={NOW - 301},v1=" + "a" * 64, "more than 300 s away"),
    (f"t={NOW + 301},v1=" + "a" * 64, "more than 300 s away"),
    (f"t={NOW}," + ",".join(["v1=" + "a" * 64] * 9), "more than 8 v1 signatures"),
])
def test_stripe_headers_that_can_never_pass_are_refused_before_the_body(value, words):
    assert words in check(source(webhook_signature="stripe"), {"Stripe-Signature": value})


def test_stripe_tolerance_is_inclusive_of_its_edges():
    stripe = source(webhook_signature="stripe")
    for timestamp in (NOW - 300, NOW + 300):
        assert check(stripe, stripe_header(BODY, timestamp)) == "ok"


@pytest.mark.parametrize(("encoding", "prefix", "written"), [
    ("hex", "sha256=", lambda digest: digest.hex()),
    ("hex", "", lambda digest: digest.hex().upper()),
    ("base64", "", lambda digest: base64.b64encode(digest).decode()),
    ("base64", "v1,", lambda digest: base64.b64encode(digest).decode()),
])
def test_generic_hmac_reads_its_header_prefix_and_encoding(encoding, prefix, written):
    generic = source(webhook_signature="hmac", webhook_signature_header="X-Shopify-Hmac-Sha256",
                     webhook_signature_prefix=prefix, webhook_signature_encoding=encoding)
    value = prefix + written(mac(BODY))
    assert check(generic, {"X-Shopify-Hmac-Sha256": value}) == "ok"
    assert check(generic, {"X-Shopify-Hmac-Sha256": value}, BODY[:-1]) == "wrong"
    assert "missing or malformed X-Shopify-Hmac-Sha256" in check(generic, {})
    assert "missing or malformed" in check(generic, {"X-Shopify-Hmac-Sha256": value[:-2]})
    assert "missing or malformed" in check(generic, {"X-Shopify-Hmac-Sha256": "x" + value})


def test_the_conflux_scheme_is_the_default_and_keeps_its_timestamp():
    headers = signed_headers(SECRET.encode(), BODY, "customers")
    now = int(headers["X-Conflux-Timestamp"])
    assert check(source(), headers, now=now) == "ok"
    assert "more than 300 s away" in check(source(), headers, now=now + 301)
    assert "missing or malformed X-Conflux-Signature" in check(source(), {"X-Hub-Signature-256": "sha256=" + "a" * 64})


@pytest.mark.parametrize("style", ["github", "stripe", "hmac"])
def test_the_demo_upstream_signs_each_style_the_way_the_receiver_checks(style):
    options = {"webhook_signature_header": "X-Signature", "webhook_signature_prefix": "sha256=",
               "webhook_signature_encoding": "base64"} if style == "hmac" else {}
    headers = signed_headers(SECRET.encode(), BODY, "customers",
                             WebhookStyle(signature=style, hmac_header="X-Signature", hmac_encoding="base64"))
    scheme = scheme_for(source(webhook_signature=style, **options))
    presented = scheme.presented(headers, now=NOW if style != "stripe" else float(headers["Stripe-Signature"][2:12]),
                                 tolerance_s=300)
    assert not isinstance(presented, str), presented
    assert verify(SECRET, presented, BODY)
    assert not verify(SECRET, presented, BODY + b" ")


def test_the_untimed_memory_refuses_a_signature_again_within_its_window_and_stays_bounded():
    memory = DeliveryMemory(window_s=60, max_entries=3)
    assert memory.claim("crm", "a", now=0) == ""
    assert memory.claim("crm", "a", now=59) == "replayed"
    assert memory.claim("erp", "a", now=59) == ""  # another source's
    assert memory.claim("crm", "a", now=61) == ""  # past the window: forgotten, then remembered again
    memory.release("crm", "a")
    assert memory.claim("crm", "a", now=62) == ""  # a released claim (the log was down) may come again
    for name in "bcdefg":
        memory.claim("crm", name, now=63)
    assert len(memory) == 3  # the oldest forgotten first


@pytest.mark.parametrize(("options", "words"), [
    ({"webhook_signature": "hmac"}, 'webhook_signature_header is required with webhook_signature = "hmac"'),
    ({"webhook_signature": "hmac", "webhook_signature_header": "X Sig"}, "is not an HTTP header name"),
    ({"webhook_signature": "hmac", "webhook_signature_header": "X-Sig", "webhook_signature_prefix": "é"},
     "webhook_signature_prefix must be at most 64 printable ASCII characters"),
    ({"webhook_signature": "github", "webhook_signature_header": "X-Sig"},
     "webhook_signature_header: only for webhook_signature = \"hmac\" (this source's is 'github')"),
    ({"webhook_signature_encoding": "base64"}, "webhook_signature_encoding: only for webhook_signature"),
    ({"webhook_records_path": "data..object"}, "webhook_records_path: 'data..object' is not a dotted path"),
])
def test_webhook_keys_that_cannot_work_are_config_errors(options, words, tmp_path):
    path = tmp_path / "conflux.toml"
    path.write_text(to_toml({"sources": [{"name": "crm", "url": "http://upstream/api/customers", **options}]}))
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert str(caught.value).startswith("sources[0]: ") and words in str(caught.value)
