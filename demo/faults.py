"""Fault injection for the demo upstream's page responses: latency, 500s, 429s, empty listings.

Used by the upstream process's page handlers. Settings come from the command line and can be
replaced at run time through ``POST /admin/faults``; both paths validate through the same Struct,
so an error names the field. Decisions come from an RNG seeded from ``--seed``, so a test that sends
the same requests in the same order sees the same faults.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated

import msgspec

if TYPE_CHECKING:
    from conflux.demo.datagen import Key
    from conflux.demo.store import Collection

Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]


class FaultSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the upstream does wrong on purpose; every field is optional in ``POST /admin/faults``."""

    latency_ms: NonNegative = 0.0
    latency_jitter_ms: NonNegative = 0.0
    error_rate: Fraction = 0.0
    throttle_rate: Fraction = 0.0
    retry_after_s: Annotated[int, msgspec.Meta(ge=0)] = 1
    # An upstream that briefly lists nothing: every page of every style is an empty last page.
    empty_pages: bool = False

    def updated(self, changes: Mapping[str, object]) -> FaultSettings:
        """A copy with ``changes`` applied; raises ValueError naming the offending field."""
        try:
            return msgspec.convert({**msgspec.structs.asdict(self), **changes}, FaultSettings)
        except msgspec.ValidationError as exc:
            raise ValueError(str(exc)) from None


class Fault(enum.Enum):
    THROTTLE = 429
    ERROR = 500


class FaultInjector:
    """Draws the fault of each page request from a seeded RNG."""

    def __init__(self, settings: FaultSettings, *, seed: int) -> None:
        self.settings = settings
        self._rng = random.Random(f"{seed}:faults")

    def update(self, changes: Mapping[str, object]) -> FaultSettings:
        self.settings = self.settings.updated(changes)
        return self.settings

    def delay_s(self) -> float:
        """How long this response waits before it is sent (0 when no latency is configured)."""
        latency_ms = self.settings.latency_ms
        if self.settings.latency_jitter_ms:
            latency_ms += self._rng.uniform(0.0, self.settings.latency_jitter_ms)
        return latency_ms / 1000.0

    def draw(self) -> Fault | None:
        """The fault of one page request, if any. One draw decides both, so each rate is a fraction of
        all page requests: throttling takes the first ``throttle_rate`` of [0, 1), errors the next."""
        settings = self.settings
        if not (settings.throttle_rate or settings.error_rate):
            return None
        roll = self._rng.random()
        if roll < settings.throttle_rate:
            return Fault.THROTTLE
        if roll < settings.throttle_rate + settings.error_rate:
            return Fault.ERROR
        return None


class EmptyListing:
    """A collection as an upstream that briefly lists nothing shows it (the ``empty_pages`` fault): handed
    to a paging style in place of the collection, every style answers one empty last page. Lookups by key
    and the checksum still see the records."""

    def __init__(self, collection: Collection) -> None:
        self.collection = collection
        self.name = collection.name
        self.layout = collection.layout

    def __len__(self) -> int:
        return 0

    def index_since(self, _since_us: int | None) -> int:
        return 0

    def index_after(self, _sort_us: int, _key: Key) -> int:
        return 0

    def entries(self, _start: int, _stop: int) -> list:
        return []

    def parse_key(self, text: str) -> Key:
        return self.collection.parse_key(text)

    def is_key(self, value: object) -> bool:
        return self.collection.is_key(value)
