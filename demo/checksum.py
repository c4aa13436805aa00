"""The collection checksum shared by the demo upstream and the demo analytics sink.

A record's digest is xxh3-64 over its key (as a string), a NUL byte and the record's JSON bytes exactly
as the upstream served them. The checksum of a collection is the sum of its records' digests modulo
2**64, so it does not depend on order and can be kept up to date one record at a time. The sink
hashes the ``data`` bytes it receives, so the checksums match only if Conflux forwarded every record
unchanged and kept the latest version of each.

A sink that stores parsed JSON (PostgreSQL's jsonb reorders members and drops whitespace) cannot give
the bytes back; the *canonical* checksum digests each record re-encoded with sorted members and no
whitespace instead, which the upstream computes on request (``GET /api/{c}/checksum?canonical=true``).
"""

from __future__ import annotations

import msgspec
import xxhash

MASK_64 = (1 << 64) - 1


def record_digest(key: str, data: bytes | memoryview) -> int:
    """Digest of one record; ``data`` is the record's JSON bytes as served by the upstream."""
    hasher = xxhash.xxh3_64(key.encode())
    hasher.update(b"\x00")
    hasher.update(data)
    return hasher.intdigest()


def canonical_json(data: bytes | memoryview | str) -> bytes:
    """The record as canonical JSON: members sorted by name at every level, no whitespace, numbers as
    Python reads them (1.50 -> 1.5), so jsonb's text and the upstream's bytes give the same result."""
    return msgspec.json.encode(msgspec.json.decode(data), order="sorted")


def canonical_digest(key: str, data: bytes | memoryview | str) -> int:
    return record_digest(key, canonical_json(data))


class Checksum:
    """An order-independent running checksum: add and remove record digests in any order."""

    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.total = 0
        self.count = 0

    def add(self, digest: int) -> None:
        self.total = (self.total + digest) & MASK_64
        self.count += 1

    def remove(self, digest: int) -> None:
        self.total = (self.total - digest) & MASK_64
        self.count -= 1

    def replace(self, old_digest: int, new_digest: int) -> None:
        self.total = (self.total - old_digest + new_digest) & MASK_64

    def hexdigest(self) -> str:
        return f"{self.total:016x}"

    def as_dict(self) -> dict[str, object]:
        return {"checksum": self.hexdigest(), "count": self.count}
