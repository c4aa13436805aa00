"""Duplicate suppression in a consumer: message ids already processed, and content already delivered.

Both memories only learn from messages the sink has acknowledged, so skipping is always safe: a
record is dropped only if this exact content (its xxh3 hash covers the updated timestamp too) has
already reached the sink for that key. Keys are remembered by their 64-bit hash; a false skip would
need the key hash and the content hash to collide at once.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import compress
from operator import ne


class Deduplicator:
    def __init__(self, *, max_message_ids: int = 100_000) -> None:
        self._message_ids: OrderedDict[str, None] = OrderedDict()
        self._max_message_ids = max_message_ids
        # source -> key hash -> content hash last delivered. Per source: two systems may well hold the
        # same key with byte-identical content, and one must not hide the other.
        self._delivered: dict[str, dict[int, str]] = {}

    def seen_message(self, message_id: str) -> bool:
        return message_id in self._message_ids

    def fresh_indices(self, key_hashes: list[int], hashes: list[str], source: str = "") -> list[int] | None:
        """Indices of records whose content differs from what was delivered; None means all of them."""
        delivered = self._delivered.get(source)
        if not delivered:
            return None
        # C-level all the way: look every key up, compare with the new content, keep the differing indices.
        differs = map(ne, map(delivered.get, key_hashes), hashes)
        fresh = list(compress(range(len(key_hashes)), differs))
        return None if len(fresh) == len(key_hashes) else fresh

    def remember(self, message_id: str, key_hashes: list[int], hashes: list[str], source: str = "") -> None:
        """The sink acknowledged this message: its id and its records' content are now known."""
        ids = self._message_ids
        ids[message_id] = None
        if len(ids) > self._max_message_ids:
            ids.popitem(last=False)
        self._delivered.setdefault(source, {}).update(zip(key_hashes, hashes, strict=False))

    @property
    def keys_known(self) -> int:
        return sum(len(keys) for keys in self._delivered.values())
