"""The analytics sink's wire format: the ingest body, its decoding and the per-record checks.

Pure functions, no I/O; the sink's request handlers (demo/analytics_http.py) call them on the event
loop for every ``POST /ingest``, and demo/analytics_db.py when it replays the journal. Decoders are
built once at import and reused.

A body that does not decode is refused whole (400). A record that decodes but fails a check is refused
on its own: an empty key, an updated_at that is not ISO 8601, a ``hash`` other than the 16 lowercase hex
digits of xxh3-64 over the exact ``data`` bytes (checked for deletes too: the hash describes ``data``
whatever the op), an upsert whose ``data`` is not a JSON object, or a (source, key) that --reject-rate
picks. The checks depend only on the record and the rate, so a retried batch is refused the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec
import xxhash

from conflux.demo.checksum import record_digest

REASON_EMPTY_KEY = "key is empty"
REASON_BAD_UPDATED_AT = "updated_at is not an ISO 8601 timestamp"
REASON_BAD_HASH = "hash does not match xxh3-64 of data"
REASON_NOT_OBJECT = "data is not a JSON object"
REASON_REJECT_RATE = "rejected by --reject-rate"


class WireRecord(msgspec.Struct, gc=False):
    """One record of an ingest body; ``data`` keeps the exact bytes the producer sent. ``seq`` (optional,
    0 when absent) orders versions with the same updated_at: the greater one is the later observation."""

    source: str
    key: str
    op: Literal["upsert", "delete"]
    updated_at: str
    hash: str
    data: msgspec.Raw
    seq: Annotated[int, msgspec.Meta(ge=0)] = 0


class WireBatch(msgspec.Struct, gc=False):
    """The body of ``POST /ingest``."""

    batch_id: Annotated[str, msgspec.Meta(min_length=1)]
    records: list[WireRecord]


class Change(msgspec.Struct, gc=False):
    """A record that passed every check, with its parsed instant and its checksum digest."""

    record: WireRecord
    updated: datetime
    digest: int


class Rejection(msgspec.Struct, gc=False):
    """A record refused individually; ``index`` points into the batch's ``records`` list."""

    index: int
    reason: str


class MalformedBody(ValueError):
    """The whole body is unusable (not JSON, wrong shape, missing field); nothing is applied."""


_batch_decoder = msgspec.json.Decoder(WireBatch)


def decode_batch(body: bytes) -> WireBatch:
    """Decode an ingest body or raise MalformedBody with a reason that names the offending field."""
    try:
        return _batch_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedBody(f"malformed body: {exc}") from None
    # msgspec lets these two through: a string that is not UTF-8, and nesting too deep to walk (even
    # inside ``data``, which it still has to skip over).
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"malformed body: invalid UTF-8 at byte {exc.start} in a string") from None
    except RecursionError:
        raise MalformedBody("malformed body: JSON nested too deeply") from None


def parse_instant(text: str) -> datetime | None:
    """The instant an ISO 8601 timestamp names (timezone-aware), or None if it is not one.

    A timestamp without an offset is taken as UTC. Aware datetimes compare by instant, so
    ``...T12:00:00Z`` equals ``...T14:00:00.000+02:00``; digits beyond microseconds are dropped.
    """
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def rejected_by_rate(source: str, key: str, rate: float) -> bool:
    """Whether ``--reject-rate rate`` refuses (source, key); tests call this to predict rejections."""
    if rate <= 0.0:
        return False
    point = xxhash.xxh3_64_intdigest(f"{source}\x00{key}".encode())
    return point < rate * 2.0**64


def check_batch(batch: WireBatch, reject_rate: float) -> tuple[list[Change], list[Rejection]]:
    """Split a batch into applicable changes and per-record rejections, in record order.

    Deterministic: the same batch under the same reject rate is always split the same way.
    """
    changes: list[Change] = []
    rejected: list[Rejection] = []
    hexdigest = xxhash.xxh3_64_hexdigest
    for index, record in enumerate(batch.records):
        updated = parse_instant(record.updated_at)
        # One copy serves every check: hashing bytes is cheaper than hashing a Raw, and a Raw holds
        # the value from its first character, so an object starts with '{'.
        data = bytes(record.data)
        if (updated is not None and record.key and hexdigest(data) == record.hash
                and (data[:1] == b"{" or record.op == "delete")
                and not (reject_rate > 0.0 and rejected_by_rate(record.source, record.key, reject_rate))):
            digest = record_digest(record.key, data) if record.op == "upsert" else 0
            changes.append(Change(record, updated, digest))
        else:
            rejected.append(Rejection(index, _record_problem(record, updated, data, reject_rate)))
    return changes, rejected


def _record_problem(record: WireRecord, updated: datetime | None, data: bytes, reject_rate: float) -> str:
    """Why check_batch refused a record; the checks in the order their reasons take precedence."""
    if not record.key:
        return REASON_EMPTY_KEY
    if updated is None:
        return REASON_BAD_UPDATED_AT
    if xxhash.xxh3_64_hexdigest(data) != record.hash:
        return REASON_BAD_HASH
    if record.op == "upsert" and data[:1] != b"{":
        return REASON_NOT_OBJECT
    if rejected_by_rate(record.source, record.key, reject_rate):
        return REASON_REJECT_RATE
    raise AssertionError(f"record {record.key!r} passed every check")
