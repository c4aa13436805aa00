"""The control port's rules as pure logic: the webhook signing scheme, header checks made before a body
is read, the bounded replay memory, the TLS context, and the [control] keys that guard unsafe binds."""

from __future__ import annotations

import hashlib
import hmac
import ssl
import tempfile
from pathlib import Path

import pytest

from conflux.config import Config, ControlConfig, load_config
from conflux.errors import ConfigError
from conflux.workers.control_security import (
    ReplayMemory,
    bearer_ok,
    header_problem,
    server_ssl_context,
    signature,
    signature_matches,
)
from tests.fixtures.tls import make_tls_files

BODY = b'{"id": 1, "updated_at": "2026-01-01T00:00:00Z"}'
NOW = 1_767_225_600


def load(text: str, environ: dict[str, str] | None = None, directory: Path | None = None) -> Config:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(directory or scratch) / "conflux.toml"
        path.write_text(text)
        return load_config(path, environ=environ or {})


def error(text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(text, environ)
    return str(caught.value)


# -- signing -------------------------------------------------------------------------------------------


def test_the_signature_covers_the_timestamp_a_dot_and_the_exact_body():
    expected = "sha256=" + hmac.new(b"s3", f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert signature("s3", str(NOW), BODY) == expected
    assert signature_matches("s3", str(NOW), BODY, expected)
    assert signature_matches("s3", str(NOW), BODY, expected.upper().replace("SHA256=", "sha256="))  # hex case
    assert not signature_matches("s3", str(NOW + 1), BODY, expected)  # a timestamp moved by a replayer
    assert not signature_matches("s3", str(NOW), BODY + b" ", expected)
    assert not signature_matches("other", str(NOW), BODY, expected)
    assert not signature_matches("", str(NOW), BODY, signature("", str(NOW), BODY))  # no secret: nothing passes


@pytest.mark.parametrize(("signature_header", "timestamp", "words"), [
    ("", str(NOW), "missing or malformed X-Conflux-Signature"),
    ("sha256=" + "a" * 63, str(NOW), "missing or malformed X-Conflux-Signature"),
    ("sha1=" + "a" * 64, str(NOW), "missing or malformed X-Conflux-Signature"),
    ("a" * 64, str(NOW), "missing or malformed X-Conflux-Signature"),
    ("sha256=" + "a" * 64, "", "missing or malformed X-Conflux-Timestamp"),
    ("sha256=" + "a" * 64, "1.5e9", "missing or malformed X-Conflux-Timestamp"),
    ("sha256=" + "a" * 64, "-5", "missing or malformed X-Conflux-Timestamp"),
    ("sha256=" + "a" * 64, "9" * 40, "missing or malformed X-Conflux-Timestamp"),
    ("sha256=" + "a" * 64, str(NOW - 301), "more than 300 s away"),
    ("sha256=" + "a" * 64, str(NOW + 301), "more than 300 s away"),
])
def test_headers_that_can_never_pass_are_refused_before_the_body(signature_header, timestamp, words):
    assert words in header_problem(signature_header, timestamp, now=NOW, tolerance_s=300)


def test_headers_within_the_tolerance_may_pass():
    for timestamp in (NOW - 300, NOW, NOW + 300):
        assert header_problem("sha256=" + "A" * 64, str(timestamp), now=NOW, tolerance_s=300) == ""


def test_the_bearer_token_must_match_exactly():
    assert bearer_ok("Bearer t0k", "t0k")
    assert not any(bearer_ok(header, "t0k") for header in ("", "t0k", "Bearer t0k ", "bearer t0k", "Bearer t0"))


# -- replay memory -------------------------------------------------------------------------------------


def test_a_signature_is_taken_once_per_source_until_its_timestamp_leaves_the_window():
    memory = ReplayMemory(tolerance_s=300)
    assert memory.claim("customers", "sha256=aa", NOW, now=NOW) == ""
    assert memory.claim("customers", "SHA256=AA", NOW, now=NOW + 10) == "replayed"
    assert memory.claim("products", "sha256=aa", NOW, now=NOW + 10) == ""  # each source has its own secret
    assert len(memory) == 2
    # Once the timestamp is out of the window the header check refuses it; the memory lets it go.
    assert memory.claim("orders", "sha256=bb", NOW + 301, now=NOW + 301) == ""
    assert len(memory) == 1


def test_a_released_claim_may_be_retried():
    memory = ReplayMemory(tolerance_s=300)
    assert memory.claim("customers", "sha256=aa", NOW, now=NOW) == ""
    memory.release("customers", "sha256=aa")  # the log was down: the request was not taken
    assert memory.claim("customers", "sha256=aa", NOW, now=NOW + 1) == ""
    assert memory.claim("customers", "sha256=aa", NOW, now=NOW + 2) == "replayed"


def test_a_full_memory_forgets_the_oldest_and_refuses_anything_signed_before_it():
    memory = ReplayMemory(tolerance_s=300, max_entries=3)
    for offset, sig in enumerate(("sha256=a0", "sha256=a1", "sha256=a2")):
        assert memory.claim("s", sig, NOW + offset, now=NOW + 5) == ""
    assert memory.claim("s", "sha256=a3", NOW + 3, now=NOW + 5) == ""  # pushes out a0
    assert len(memory) == 3 and memory.floor == NOW
    assert memory.claim("s", "sha256=a0", NOW, now=NOW + 6) == "too old"  # forgotten, yet still no replay
    assert memory.claim("s", "sha256=new", NOW, now=NOW + 6) == "too old"
    assert memory.claim("s", "sha256=a1", NOW + 1, now=NOW + 6) == "replayed"
    assert memory.claim("s", "sha256=a4", NOW + 4, now=NOW + 6) == ""


def test_many_releases_keep_the_memory_bounded():
    memory = ReplayMemory(tolerance_s=300, max_entries=10)
    for n in range(1000):
        assert memory.claim("s", f"sha256={n}", NOW, now=NOW) == ""
        memory.release("s", f"sha256={n}")
    assert len(memory) == 0 and len(memory._by_time) <= 21


# -- TLS -----------------------------------------------------------------------------------------------


def test_tls_context_loads_a_matching_pair_and_names_the_field_otherwise(tmp_path):
    files = make_tls_files(tmp_path)
    assert server_ssl_context(ControlConfig()) is None
    context = server_ssl_context(ControlConfig(tls_cert_file=str(files["cert"]), tls_key_file=str(files["key"])))
    assert isinstance(context, ssl.SSLContext) and context.minimum_version >= ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigError, match=r"^control\.tls_cert_file: .* not a usable certificate and key"):
        server_ssl_context(ControlConfig(tls_cert_file=str(files["cert"]), tls_key_file=str(files["ca_key"])))
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^control\.tls_cert_file: "):
        server_ssl_context(ControlConfig(tls_cert_file=str(tmp_path / "garbage.pem"), tls_key_file=str(files["key"])))


def test_tls_files_are_relative_to_the_config_file_and_must_exist(tmp_path):
    make_tls_files(tmp_path)
    config = load('[control]\ntls_cert_file = "server.pem"\ntls_key_file = "server.key"\n', directory=tmp_path)
    assert config.control.tls_cert_file == str(tmp_path / "server.pem")
    assert error('[control]\ntls_cert_file = "/nope/cert.pem"\ntls_key_file = "/nope/key.pem"\n') == (
        "control.tls_cert_file: file '/nope/cert.pem' does not exist")
    assert error('[control]\ntls_cert_file = "/nope/cert.pem"\n') == (
        "control: tls_cert_file and tls_key_file go together")


# -- unsafe binds and the other [control] keys ---------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:9108", "[::]:9108", "10.1.2.3:9108", "conflux.example:9108",
                                    "[2001:db8::1]:9108"])
def test_a_listen_other_hosts_can_reach_needs_a_token_or_an_explicit_waiver(listen):
    message = error(f'[control]\nlisten = "{listen}"\n')
    assert message.startswith("control: listen ") and listen in message and "no token" in message
    assert "allow_unauthenticated = true" in message
    assert load(f'[control]\nlisten = "{listen}"\ntoken = "t"\n').control.listen == listen
    assert load(f'[control]\nlisten = "{listen}"\ntoken_env = "CTL"\n', {"CTL": "t"}).control.token_env == "CTL"
    assert load(f'[control]\nlisten = "{listen}"\nallow_unauthenticated = true\n').control.allow_unauthenticated
    # The container's way: both from the environment.
    env = {"CONFLUX_CONTROL_LISTEN": listen, "CONFLUX_CONTROL_TOKEN": "t"}
    assert load("", env).control.listen == listen
    assert error("", {"CONFLUX_CONTROL_LISTEN": listen}).startswith("control: listen ")


@pytest.mark.parametrize("listen", ["127.0.0.1:9108", "127.8.9.10:0", "[::1]:9108", "localhost:9108",
                                    "LOCALHOST:9108"])
def test_loopback_listens_need_no_token(listen):
    assert load(f'[control]\nlisten = "{listen}"\n').control.listen == listen


@pytest.mark.parametrize(("text", "words"), [
    ("metrics_require_token = true", "metrics_require_token needs token or token_env"),
    ("webhook_tolerance_s = 0", "webhook_tolerance_s must be between 1 and 86400"),
    ("header_timeout_s = 0", "header_timeout_s and body_timeout_s must be > 0"),
    ("body_timeout_s = -1", "header_timeout_s and body_timeout_s must be > 0"),
    ("max_connections = 0", "max_connections must be between 1 and 65536"),
    ("webhook_buffer_bytes = 1000", "webhook_buffer_bytes must be >= 65536"),
])
def test_bad_control_values_name_the_field(text, words):
    message = error(f"[control]\n{text}\n")
    assert message.startswith("control: ") and words in message


def test_the_webhook_buffer_must_hold_the_largest_webhook():
    source = '[[sources]]\nname = "crm"\nurl = "http://upstream/api/customers"\nwebhook_max_bytes = 200000\n'
    message = error("[control]\nwebhook_buffer_bytes = 100000\n" + source)
    assert message == ("control.webhook_buffer_bytes (100000) must be >= sources[0] (crm).webhook_max_bytes "
                       "(200000)")
    assert load("[control]\nwebhook_buffer_bytes = 200000\n" + source).control.webhook_buffer_bytes == 200000


def test_the_defaults_are_safe():
    control = ControlConfig()
    assert control.listen.startswith("127.0.0.1:") and not control.allow_unauthenticated
    assert (control.webhook_tolerance_s, control.header_timeout_s, control.body_timeout_s) == (300.0, 10.0, 30.0)
    assert control.max_connections == 256 and control.webhook_buffer_bytes == 64 << 20
