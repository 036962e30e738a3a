"""A least-recently-used cache bounded by bytes: rendered pages, so repeats cost nothing.

Retries after a fault, a daemon re-reading its overlap window, a benchmark run twice: each asks
for a page already rendered. Generating and encoding 50,000 bars costs ~0.1 s of a core the
demo shares with the daemon and PostgreSQL; a hit costs a dict lookup. The bound is on the
bytes held (each entry's `size`, counted by the caller), not the entry count, because pages
range from a few hundred bytes to several megabytes.

Error handling: none raised; an entry larger than the whole bound is simply not kept.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Generic, TypeVar

import attrs

__all__ = ["ByteLRU", "CacheStatistics"]

V = TypeVar("V")


@attrs.frozen
class CacheStatistics:
    hits: int
    misses: int
    entries: int
    bytes: int
    max_bytes: int
    evictions: int


class ByteLRU(Generic[V]):
    """`get`/`put` by key; the least recently used entries go once `max_bytes` is exceeded."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[Hashable, tuple[V, int]] = (
            collections.OrderedDict())
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0

    def get(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._entries[key] = (value, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped
            self._evictions += 1

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(self._hits, self._misses, len(self._entries), self._bytes,
                               self.max_bytes, self._evictions)
