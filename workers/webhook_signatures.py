"""How vendors sign webhooks: Conflux's own scheme, GitHub's, Stripe's, and a generic HMAC header.

Runs in the control process for every POST /webhook/{source}, in two steps: ``Scheme.presented`` reads
the headers before the body is read (a request whose headers can never pass costs nothing), and
``verify`` checks the HMAC-SHA256 over the exact body once it is in. Digests are compared as bytes
with ``hmac.compare_digest``, every candidate of a header that carries several (Stripe's ``v1``).

Replays: a scheme that signs its send time (conflux, stripe) is refused outside
``[control] webhook_tolerance_s`` and its accepted signatures are remembered for that window
(``control_security.ReplayMemory``). GitHub and the generic scheme sign no time, so an accepted
signature is remembered for ``UNTIMED_WINDOW_S`` (``DeliveryMemory``), and the same signed body is
refused as a replay (409) within it; an older replay is accepted, and loses to every newer version
of its records anyway (versions are ordered by ``updated_at``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import NamedTuple

from conflux.config import SourceConfig
from conflux.workers.control_security import SIGNATURE_HEADER, TIMESTAMP_HEADER, header_problem

GITHUB_HEADER = "X-Hub-Signature-256"
STRIPE_HEADER = "Stripe-Signature"
HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
TIMESTAMP = re.compile(r"[0-9]{1,12}")
MAX_STRIPE_SIGNATURES = 8   # v1 entries read from one header: a key rotation needs two
UNTIMED_WINDOW_S = 86_400.0
UNTIMED_ENTRIES = 100_000   # about 200 bytes each: 20 MB at most


class Presented(NamedTuple):
    """What a request's headers claim: the digest(s), what the HMAC covers before the body, and the
    signed send time (None for schemes that sign none)."""

    digests: tuple[bytes, ...]
    signed_prefix: bytes
    timestamp: int | None


class Scheme:
    """One signing scheme; ``presented`` gives a Presented or why the headers can never pass."""

    name = ""
    header = ""
    wrong = ""          # the refusal when the HMAC does not match
    stale = ""          # the refusal when a timestamp is older than the replay memory

    def presented(self, headers: Mapping[str, str], *, now: float, tolerance_s: float) -> Presented | str:
        raise NotImplementedError


class ConfluxScheme(Scheme):
    """``X-Conflux-Signature: sha256=<hex of HMAC("<X-Conflux-Timestamp>." + body)>``."""

    name, header = "conflux", SIGNATURE_HEADER
    wrong = f"wrong {SIGNATURE_HEADER} for this body and {TIMESTAMP_HEADER}"
    stale = f"{TIMESTAMP_HEADER} is older than the replay memory; sign it again"

    def presented(self, headers: Mapping[str, str], *, now: float, tolerance_s: float) -> Presented | str:
        signature, timestamp = headers.get(SIGNATURE_HEADER, ""), headers.get(TIMESTAMP_HEADER, "")
        problem = header_problem(signature, timestamp, now=now, tolerance_s=tolerance_s)
        if problem:
            return problem
        return Presented((bytes.fromhex(signature[7:]),), timestamp.encode("ascii") + b".", int(timestamp))


class GitHubScheme(Scheme):
    """``X-Hub-Signature-256: sha256=<hex of HMAC(body)>``, as GitHub (and Gitea, Forgejo) send it."""

    name, header = "github", GITHUB_HEADER
    wrong = f"wrong {GITHUB_HEADER} for this body"

    def presented(self, headers: Mapping[str, str], *, now: float, tolerance_s: float) -> Presented | str:
        value = headers.get(GITHUB_HEADER, "").strip()
        if not (value[:7].lower() == "sha256=" and HEX_DIGEST.fullmatch(value[7:])):
            return f"missing or malformed {GITHUB_HEADER} (expected sha256=<64 hex digits>)"
        return Presented((bytes.fromhex(value[7:]),), b"", None)


class StripeScheme(Scheme):
    """``Stripe-Signature: t=<unix seconds>,v1=<hex of HMAC("<t>." + body)>[,v1=...]``; other schemes
    (v0) in the header are ignored, as Stripe's own libraries do."""

    name, header = "stripe", STRIPE_HEADER
    wrong = f"no v1 signature in {STRIPE_HEADER} matches this body and its t"
    stale = f"the t of {STRIPE_HEADER} is older than the replay memory; sign it again"

    def presented(self, headers: Mapping[str, str], *, now: float, tolerance_s: float) -> Presented | str:
        timestamps, digests = [], []
        for item in headers.get(STRIPE_HEADER, "").split(","):
            name, _, value = item.strip().partition("=")
            if name == "t":
                timestamps.append(value)
            elif name == "v1" and HEX_DIGEST.fullmatch(value):
                digests.append(bytes.fromhex(value))
        if len(timestamps) != 1 or not TIMESTAMP.fullmatch(timestamps[0]) or not digests:
            return f"missing or malformed {STRIPE_HEADER} (expected t=<unix seconds>,v1=<64 hex digits>)"
        if len(digests) > MAX_STRIPE_SIGNATURES:
            return f"{STRIPE_HEADER} carries more than {MAX_STRIPE_SIGNATURES} v1 signatures"
        if abs(now - int(timestamps[0])) > tolerance_s:
            return f"the t of {STRIPE_HEADER} is more than {tolerance_s:g} s away from the receiver's clock"
        return Presented(tuple(digests), timestamps[0].encode("ascii") + b".", int(timestamps[0]))


class HmacScheme(Scheme):
    """``<webhook_signature_header>: <webhook_signature_prefix><hex or base64 of HMAC(body)>``."""

    name = "hmac"

    def __init__(self, header: str, prefix: str, encoding: str) -> None:
        self.header, self.prefix, self.encoding = header, prefix, encoding
        self.wrong = f"wrong {header} for this body"
        form = "64 hex digits" if encoding == "hex" else "the base64 of 32 bytes"
        self.malformed = f"missing or malformed {header} (expected {prefix}<{form}>)"

    def presented(self, headers: Mapping[str, str], *, now: float, tolerance_s: float) -> Presented | str:
        value = headers.get(self.header, "").strip()
        if not value.startswith(self.prefix):
            return self.malformed
        digest = _decoded(value[len(self.prefix):], self.encoding)
        return self.malformed if digest is None else Presented((digest,), b"", None)


def _decoded(text: str, encoding: str) -> bytes | None:
    """32 bytes of digest written in ``encoding``, or None."""
    if encoding == "hex":
        return bytes.fromhex(text) if HEX_DIGEST.fullmatch(text) else None
    try:
        digest = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    return digest if len(digest) == 32 else None


def scheme_for(source: SourceConfig) -> Scheme:
    """The signing scheme of a source's webhooks (``webhook_signature``)."""
    if source.webhook_signature == "hmac":
        return HmacScheme(source.webhook_signature_header, source.webhook_signature_prefix,
                          source.webhook_signature_encoding)
    return {"conflux": ConfluxScheme, "github": GitHubScheme, "stripe": StripeScheme}[source.webhook_signature]()


def verify(secret: str, presented: Presented, body: bytes) -> str:
    """The hex of the valid signature (what identifies this signed request) when one of the presented
    digests is the HMAC-SHA256 of the signed prefix and ``body`` under ``secret``; "" otherwise."""
    if not secret:
        return ""
    expected = hmac.new(secret.encode(), presented.signed_prefix + body, hashlib.sha256).digest()
    matched = False
    for digest in presented.digests:  # every candidate compared: the time taken says nothing about which
        matched |= hmac.compare_digest(expected, digest)
    return expected.hex() if matched else ""


class DeliveryMemory:
    """Signatures accepted within ``window_s``, at most ``max_entries`` (the oldest forgotten first), for
    the schemes that sign no send time: the same signed body again within the window is a replay."""

    def __init__(self, *, window_s: float = UNTIMED_WINDOW_S, max_entries: int = UNTIMED_ENTRIES) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def claim(self, source: str, signature: str, *, now: float) -> str:
        """"" and remembered if this signature is new; "replayed" if it was accepted within the window."""
        while self._seen and next(iter(self._seen.values())) < now - self.window_s:
            self._seen.popitem(last=False)
        key = (source, signature)
        if key in self._seen:
            return "replayed"
        while len(self._seen) >= self.max_entries:
            self._seen.popitem(last=False)
        self._seen[key] = now
        return ""

    def release(self, source: str, signature: str) -> None:
        """The claimed request failed before it was accepted (the log was down): its sender may retry it."""
        self._seen.pop((source, signature), None)
