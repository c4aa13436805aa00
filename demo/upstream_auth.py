"""Credentials of the demo upstream: `--require-token`, and a client-credentials `POST /oauth/token`.

Runs in the upstream process, on its event loop (one thread, so no locks). With --require-token T
or --client-secret S set, every /api request needs one of the credentials documented in
``demo/upstream.py``, or it is answered 401 with a WWW-Authenticate challenge. Issued tokens expire
after --token-ttl-s, so tests can watch a client renew them; ``POST /admin/auth`` rotates the static
token or the client secret and revokes issued tokens, so tests can watch it cope with rotation.
Secrets are compared in constant time and never appear in /stats or /admin/auth.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import time
from collections import Counter
from collections.abc import Mapping
from typing import Annotated

import msgspec

REALM = 'realm="conflux-upstream"'
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0.0)]


class AuthSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    require_token: str = ""
    api_key_header: str = "X-API-Key"
    basic_user: str = ""
    client_id: str = "conflux"
    client_secret: str = ""
    token_ttl_s: PositiveSeconds = 3600.0

    @property
    def required(self) -> bool:
        return bool(self.require_token or self.client_secret)


class Denied(msgspec.Struct, frozen=True):
    """Why a request was refused: ``reason`` is counted in /stats, ``challenge`` is WWW-Authenticate."""

    reason: str
    challenge: str


class TokenAnswer(msgspec.Struct, frozen=True):
    """The answer of ``POST /oauth/token``: the HTTP status and its JSON body."""

    status: int
    body: dict[str, object]


class AuthGate:
    """Checks /api credentials and issues client-credentials tokens."""

    def __init__(self, settings: AuthSettings, *, clock=time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._issued: dict[str, float] = {}  # access token -> expiry on ``clock``
        self.counts: Counter[str] = Counter()

    # -- /api requests ------------------------------------------------------------------------------

    def check(self, headers: Mapping[str, str]) -> Denied | None:
        """None when the request may pass (and which credential it used is counted)."""
        if not self.settings.required:
            return None
        scheme, denied = self._verify(headers)
        if denied is None:
            self.counts[f"accepted_{scheme}"] += 1
        else:
            self.counts[f"rejected_{denied.reason}"] += 1
        return denied

    def _verify(self, headers: Mapping[str, str]) -> tuple[str, Denied | None]:
        settings = self.settings
        api_key = headers.get(settings.api_key_header)
        if api_key is not None and settings.require_token:
            return "api_key", None if _same(api_key, settings.require_token) else _invalid("invalid API key")
        kind, _, credentials = headers.get("Authorization", "").strip().partition(" ")
        kind, credentials = kind.lower(), credentials.strip()
        if kind == "bearer":
            return self._verify_bearer(credentials)
        if kind == "basic":
            return "basic", self._verify_basic(credentials)
        if api_key is not None or kind:
            return "", _invalid("unsupported credentials")
        return "", Denied("missing", f"Bearer {REALM}, Basic {REALM}")

    def _verify_bearer(self, token: str) -> tuple[str, Denied | None]:
        if self.settings.require_token and _same(token, self.settings.require_token):
            return "bearer", None
        expires_at = self._issued.get(token)
        if expires_at is None:
            return "oauth2", _invalid("unknown token")
        if self._clock() >= expires_at:
            return "oauth2", Denied("expired", f'Bearer {REALM}, error="invalid_token", '
                                               'error_description="the access token expired"')
        return "oauth2", None

    def _verify_basic(self, credentials: str) -> Denied | None:
        refused = Denied("invalid", f"Basic {REALM}, Bearer {REALM}")
        try:
            user, sep, password = base64.b64decode(credentials, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return refused
        if not sep or not self.settings.require_token:
            return refused
        user_ok = not self.settings.basic_user or _same(user, self.settings.basic_user)
        return None if user_ok and _same(password, self.settings.require_token) else refused

    # -- POST /oauth/token -------------------------------------------------------------------------

    def issue(self, form: Mapping[str, str], authorization: str = "") -> TokenAnswer:
        """The client-credentials grant (RFC 6749 4.4); client credentials in the form or as Basic."""
        settings = self.settings
        self.counts["token_requests"] += 1
        if not settings.client_secret:
            return TokenAnswer(404, {"error": "oauth: not enabled; start the upstream with --client-secret"})
        if form.get("grant_type") != "client_credentials":
            self.counts["token_refused"] += 1
            return TokenAnswer(400, {"error": "unsupported_grant_type"})
        client_id, client_secret = _client_credentials(form, authorization)
        if not (_same(client_id, settings.client_id) and _same(client_secret, settings.client_secret)):
            self.counts["token_refused"] += 1
            return TokenAnswer(401, {"error": "invalid_client"})
        now = self._clock()
        self._issued = {token: expiry for token, expiry in self._issued.items() if expiry > now}
        token = secrets.token_urlsafe(24)
        self._issued[token] = now + settings.token_ttl_s
        self.counts["tokens_issued"] += 1
        ttl = settings.token_ttl_s
        body: dict[str, object] = {"access_token": token, "token_type": "Bearer",
                                   "expires_in": int(ttl) if ttl == int(ttl) else ttl}
        if form.get("scope"):
            body["scope"] = form["scope"]
        return TokenAnswer(200, body)

    # -- administration ----------------------------------------------------------------------------

    def update(self, changes: dict[str, object]) -> None:
        """``POST /admin/auth``: new settings and/or ``revoke_tokens``; ValueError names the field."""
        revoke = changes.pop("revoke_tokens", False)
        if not isinstance(revoke, bool):
            raise ValueError(f"revoke_tokens: must be true or false, got {revoke!r}")
        try:
            settings = msgspec.convert({**msgspec.structs.asdict(self.settings), **changes}, AuthSettings)
        except msgspec.ValidationError as exc:
            raise ValueError(str(exc)) from None
        self.settings = settings
        if revoke:
            self._issued.clear()

    def view(self) -> dict[str, object]:
        """What /stats and /admin/auth show: counters and settings, never a secret."""
        now = self._clock()
        return {"required": self.settings.required, "api_key_header": self.settings.api_key_header,
                "basic_user": self.settings.basic_user, "client_id": self.settings.client_id,
                "token_ttl_s": self.settings.token_ttl_s,
                "tokens_active": sum(1 for expiry in self._issued.values() if expiry > now),
                **{name: self.counts[name] for name in ("token_requests", "tokens_issued", "token_refused")},
                "accepted": _prefixed(self.counts, "accepted_"), "rejected": _prefixed(self.counts, "rejected_")}


def _same(supplied: str, expected: str) -> bool:
    return hmac.compare_digest(supplied.encode(), expected.encode())


def _invalid(description: str) -> Denied:
    return Denied("invalid", f'Bearer {REALM}, error="invalid_token", error_description="{description}"')


def _client_credentials(form: Mapping[str, str], authorization: str) -> tuple[str, str]:
    kind, _, encoded = authorization.partition(" ")
    if kind.lower() == "basic":
        try:
            client_id, _, secret = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return "", ""
        return client_id, secret
    return form.get("client_id", ""), form.get("client_secret", "")


def _prefixed(counts: Counter[str], prefix: str) -> dict[str, int]:
    return {name[len(prefix):]: n for name, n in sorted(counts.items()) if name.startswith(prefix)}
