"""Fault injection for the analytics sink: error rate, latency, outages, apply-then-fail, reject rate,
and answers that are not acknowledgements (a redirect, an HTML page, any status).

Set from the command line at start and changed at run time through ``POST /admin/faults`` and
``POST /admin/outage``; the sink's request handlers consult one ``Faults`` object on the event loop.
Random choices come from one RNG seeded with ``--seed``, so a run with the same requests in the same
order injects the same faults; ``--reject-rate`` does not use it (see demo.analytics_wire).
"""

from __future__ import annotations

import math
import random
import time
from typing import Annotated

import msgspec

Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
# Finite bounds: an infinite latency or outage would hang the sink rather than test anything.
LatencyMs = Annotated[float, msgspec.Meta(ge=0.0, le=600_000.0)]
OutageSeconds = Annotated[float, msgspec.Meta(ge=0.0, le=86_400.0)]


class FaultSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The adjustable faults; ``POST /admin/faults`` accepts any subset of these fields.

    The last three stand for what sits between a client and a real sink: an ingress that redirects to
    its login page, a proxy that answers 200 with an HTML page, an expired token (401) or a wrong path
    (404). Each answers every ingest without applying it.
    """

    error_rate: Fraction = 0.0
    latency_ms: LatencyMs = 0.0
    apply_then_fail_rate: Fraction = 0.0
    reject_rate: Fraction = 0.0
    redirect_to: str = ""        # answer 302 with this Location ("" = off)
    html_200: bool = False       # answer 200 with an HTML page
    fail_status: int = 0         # answer with this status, 200..599 (0 = off)

    def __post_init__(self) -> None:
        if self.fail_status != 0 and not 200 <= self.fail_status <= 599:
            raise ValueError("fail_status must be 0 (off) or an HTTP status between 200 and 599")


class OutageRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /admin/outage``: be down for ``seconds`` from now (0 ends an admin outage)."""

    seconds: OutageSeconds


class OutageWindow(msgspec.Struct, frozen=True):
    start_s: float
    duration_s: float


class FaultSpecError(ValueError):
    """A fault setting is invalid; the message names the flag or field."""


_patch_decoder = msgspec.json.Decoder(dict[str, object])
# msgspec raises these two outside its own hierarchy (bad UTF-8 in a string, nesting too deep).
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)
_outage_decoder = msgspec.json.Decoder(OutageRequest)


def parse_outage_spec(spec: str) -> list[OutageWindow]:
    """``"10:20,60:5"`` -> down from t=10 s for 20 s and from t=60 s for 5 s after start."""
    windows = []
    for part in filter(None, (piece.strip() for piece in spec.split(","))):
        start_text, _, duration_text = part.partition(":")
        try:
            window = OutageWindow(float(start_text), float(duration_text))
        except ValueError:
            window = None
        if window is None or not (0 <= window.start_s < math.inf and 0 < window.duration_s < math.inf):
            raise FaultSpecError(f"--outage-s: {part!r} is not START:SECONDS (e.g. 10:20)")
        windows.append(window)
    return windows


def settings_from_flags(**values: object) -> FaultSettings:
    """FaultSettings from command-line values; the error names the flag (``error_rate`` -> --error-rate)."""
    try:
        return msgspec.convert(values, FaultSettings)
    except msgspec.ValidationError as exc:
        text = str(exc)  # "... - at `$.field`", or a __post_init__ message that starts with the field
        field = text.rpartition("$.")[2].rstrip("`") if "$." in text else text.split(" ", 1)[0]
        raise FaultSpecError(f"--{field.replace('_', '-')}: {exc}") from None


def patched_settings(current: FaultSettings, body: bytes) -> FaultSettings:
    """``current`` with the fields of a ``POST /admin/faults`` JSON body applied and validated."""
    try:
        patch = _patch_decoder.decode(body)
        merged = {**msgspec.structs.asdict(current), **patch}
        return msgspec.convert(merged, FaultSettings)
    except _DECODE_ERRORS as exc:
        raise FaultSpecError(f"fault settings: {exc}") from None


def decode_outage_request(body: bytes) -> OutageRequest:
    try:
        return _outage_decoder.decode(body)
    except _DECODE_ERRORS as exc:
        raise FaultSpecError(f"outage: {exc}") from None


class Faults:
    """The sink's current faults and how often each was injected."""

    def __init__(self, *, settings: FaultSettings, windows: list[OutageWindow], seed: int | None) -> None:
        self.settings = settings
        self.windows = windows
        self._rng = random.Random(seed)
        self._started = time.monotonic()
        self._admin_outage_until = 0.0
        self.counts = {"error_rate": 0, "latency": 0, "outage": 0, "apply_then_fail": 0, "reject_rate": 0,
                       "redirect": 0, "html_200": 0, "fail_status": 0}

    def start_outage(self, seconds: float) -> None:
        """Be down from now for ``seconds``; 0 ends an outage started here (not --outage-s windows)."""
        self._admin_outage_until = time.monotonic() + seconds

    def outage_remaining_s(self) -> float:
        """Seconds left of the current outage, 0.0 when up."""
        now = time.monotonic()
        remaining = max(0.0, self._admin_outage_until - now)
        elapsed_s = now - self._started
        for window in self.windows:
            if window.start_s <= elapsed_s < window.start_s + window.duration_s:
                remaining = max(remaining, window.start_s + window.duration_s - elapsed_s)
        return remaining

    def draw_error(self) -> bool:
        """Whether this ingest fails with 500 before applying (--error-rate)."""
        return self._draw(self.settings.error_rate, "error_rate")

    def draw_apply_then_fail(self) -> bool:
        """Whether this ingest is applied and then answered 500 (--apply-then-fail-rate)."""
        return self._draw(self.settings.apply_then_fail_rate, "apply_then_fail")

    def forced_answer(self) -> str | None:
        """Which non-acknowledgement answers this ingest, if one is set: "redirect", "html_200" or
        "fail_status" (in that order of precedence); counted here."""
        settings = self.settings
        for name, on in (("redirect", bool(settings.redirect_to)), ("html_200", settings.html_200),
                         ("fail_status", settings.fail_status != 0)):
            if on:
                self.counts[name] += 1
                return name
        return None

    def _draw(self, rate: float, name: str) -> bool:
        # Draw only when the fault is on, so enabling one fault does not shift another's choices.
        if rate <= 0.0 or self._rng.random() >= rate:
            return False
        self.counts[name] += 1
        return True

    def as_dict(self) -> dict[str, object]:
        return {
            **msgspec.structs.asdict(self.settings),
            "outage_windows": [f"{w.start_s:g}:{w.duration_s:g}" for w in self.windows],
            "outage_remaining_s": round(self.outage_remaining_s(), 3),
        }
