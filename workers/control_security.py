"""Who may do what on the control port: the admin bearer token, webhook signatures, replay memory, TLS.

Runs in the control process (and ``server_ssl_context`` also in the supervisor, which checks the TLS
files once at boot so a bad pair stops the daemon with a config error instead of crash-looping the
control process). Two separate rights:

- the admin token (``Authorization: Bearer <[control] token>``) for /status, /sync and, when asked,
  /metrics;
- a webhook needs only its source's signature: ``X-Conflux-Signature: sha256=<hex>`` where hex is
  HMAC-SHA256(webhook secret, f"{timestamp}.".encode() + body) and ``timestamp`` is the exact text of
  ``X-Conflux-Timestamp`` (unix seconds). A timestamp off by more than the tolerance is refused, and
  so is a signature already accepted within it (a replay). A source's ``webhook_signature`` may pick a
  vendor's scheme instead (GitHub, Stripe, a generic HMAC header): ``workers/webhook_signatures.py``.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
import ssl

from conflux.config import ControlConfig
from conflux.errors import ConfigError

SIGNATURE_HEADER = "X-Conflux-Signature"
TIMESTAMP_HEADER = "X-Conflux-Timestamp"
SIGNATURE_FORMAT = re.compile(r"sha256=[0-9a-fA-F]{64}")
TIMESTAMP_FORMAT = re.compile(r"[0-9]{1,12}")
# About 250 bytes each: 25 MB at most, and tens of seconds of history even at thousands of webhooks/s.
REPLAY_MEMORY_ENTRIES = 100_000


def bearer_ok(header: str, token: str) -> bool:
    """``Authorization`` carries exactly ``Bearer <token>`` (compared in constant time)."""
    return hmac.compare_digest(header.encode(), f"Bearer {token}".encode())


def signed_message(timestamp: str, body: bytes) -> bytes:
    """What the HMAC covers: the timestamp header's text, a dot, then the body's exact bytes."""
    return timestamp.encode("ascii") + b"." + body


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Conflux-Signature`` value a sender computes."""
    return "sha256=" + hmac.new(secret.encode(), signed_message(timestamp, body), hashlib.sha256).hexdigest()


def header_problem(signature_header: str, timestamp_header: str, *, now: float, tolerance_s: float) -> str:
    """Why these headers can never be accepted ("" if they may be), decided before the body is read."""
    if not SIGNATURE_FORMAT.fullmatch(signature_header):
        return f"missing or malformed {SIGNATURE_HEADER} (expected sha256=<64 hex digits>)"
    if not TIMESTAMP_FORMAT.fullmatch(timestamp_header):
        return f"missing or malformed {TIMESTAMP_HEADER} (expected unix seconds)"
    if abs(now - int(timestamp_header)) > tolerance_s:
        return f"{TIMESTAMP_HEADER} is more than {tolerance_s:g} s away from the receiver's clock"
    return ""


def signature_matches(secret: str, timestamp: str, body: bytes, signature_header: str) -> bool:
    if not secret:
        return False
    expected = signature(secret, timestamp, body)
    return hmac.compare_digest(expected.encode(), signature_header.strip().lower().encode())


class ReplayMemory:
    """Signatures accepted within the tolerance window, so that each signed request is taken once.

    An entry is kept until its timestamp leaves the window (after that the timestamp check refuses it
    anyway). When the memory is full the entry with the oldest timestamp is forgotten and ``floor``
    rises to that timestamp: anything signed at or before ``floor`` is refused from then on, so a
    forgotten signature can never be replayed; senders retry with a fresh timestamp.
    """

    def __init__(self, *, tolerance_s: float, max_entries: int = REPLAY_MEMORY_ENTRIES) -> None:
        self.tolerance_s = tolerance_s
        self.max_entries = max_entries
        self.floor = float("-inf")
        self._seen: dict[tuple[str, str], int] = {}
        self._by_time: list[tuple[int, tuple[str, str]]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def claim(self, source: str, signature_header: str, timestamp: int, *, now: float) -> str:
        """"" and remembered if this signature is new; otherwise why it is refused ("replayed" or "too old")."""
        self._forget_expired(now)
        key = (source, signature_header.lower())
        if key in self._seen:
            return "replayed"
        if timestamp <= self.floor:
            return "too old"
        while len(self._seen) >= self.max_entries:
            self._forget_oldest()
            if timestamp <= self.floor:
                return "too old"
        self._seen[key] = timestamp
        heapq.heappush(self._by_time, (timestamp, key))
        return ""

    def release(self, source: str, signature_header: str) -> None:
        """The claimed request failed before it was accepted (the log was down): its sender may retry it."""
        self._seen.pop((source, signature_header.lower()), None)
        if len(self._by_time) > 2 * self.max_entries:  # released entries linger in the heap; keep it bounded
            self._by_time = [(ts, key) for key, ts in self._seen.items()]
            heapq.heapify(self._by_time)

    def _forget_expired(self, now: float) -> None:
        while self._by_time and self._by_time[0][0] < now - self.tolerance_s:
            timestamp, key = heapq.heappop(self._by_time)
            if self._seen.get(key) == timestamp:
                del self._seen[key]

    def _forget_oldest(self) -> None:
        timestamp, key = heapq.heappop(self._by_time)
        if self._seen.get(key) == timestamp:
            del self._seen[key]
            self.floor = max(self.floor, timestamp)


def server_ssl_context(control: ControlConfig) -> ssl.SSLContext | None:
    """The control port's TLS context (None without tls_cert_file); a bad file or pair is a config error."""
    if not control.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(control.tls_cert_file, control.tls_key_file)
    except FileNotFoundError as exc:
        raise ConfigError(f"control.tls_cert_file: cannot read {exc.filename!r}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"control.tls_cert_file: {control.tls_cert_file!r} and tls_key_file "
                          f"{control.tls_key_file!r} are not a usable certificate and key: {exc}") from None
    return context
