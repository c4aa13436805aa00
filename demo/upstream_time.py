"""Timestamps of the demo upstream: integer microseconds since the Unix epoch inside, ISO 8601 UTC
strings (``2026-01-05T10:11:12Z``) on the wire.

Used by the upstream process when it generates records, stamps changes and parses ``updated_since``.
Integers keep ordering and ``updated_since`` comparisons exact, which float seconds would not be.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

# precision name -> microseconds per unit
PRECISION_UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1}
_TIMESPEC = {"s": "seconds", "ms": "milliseconds", "us": "microseconds"}

_EPOCH_NAIVE = datetime(1970, 1, 1)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
# An unencoded '+' in a query string arrives as a space: "…T10:11:12 01:00" means "+01:00".
_SPACE_OFFSET = re.compile(r"(T\d\d:\d\d(?::\d\d(?:\.\d+)?)?) (\d\d:?\d\d)$")


def now_us() -> int:
    return time.time_ns() // 1000


def truncate_us(us: int, precision: str) -> int:
    """``us`` rounded down to the precision the upstream serves, so stamps and their strings agree."""
    return us - us % PRECISION_UNIT_US[precision]


def format_us(us: int, precision: str) -> str:
    """``2026-01-05T10:11:12Z`` (``s``), ``…12.345Z`` (``ms``) or ``…12.345678Z`` (``us``)."""
    moment = _EPOCH_NAIVE + timedelta(microseconds=us)
    return moment.isoformat(timespec=_TIMESPEC[precision]) + "Z"


def parse_iso_us(text: str) -> int:
    """Microseconds since the epoch for an ISO 8601 string; naive times are UTC. Raises ValueError."""
    text = _SPACE_OFFSET.sub(r"\1+\2", text.strip())
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH_UTC) // _ONE_US
