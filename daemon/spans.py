"""Sets of half-open millisecond intervals: the Python side of PostgreSQL's `int8multirange`.

A series' coverage is the set of instants `t` for which every bar with that start is committed;
it is stored as an `int8multirange` and grows by `covered + range` in each page's transaction.
What to fetch is always `requested - covered`, which serves the first backfill, a resume after
kill -9, a hole, a history start moved backwards and parallel sub-ranges alike.

`Spans` is an immutable, normalised tuple of `(lo, hi)` pairs, `lo < hi`, sorted and disjoint,
adjacent pairs merged (as PostgreSQL normalises multiranges), so equal sets compare equal.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["EMPTY", "Span", "Spans", "spans"]

Span = tuple[int, int]  # [lo, hi)


class Spans(tuple[Span, ...]):
    """An immutable normalised interval set. Build with `spans(...)`."""

    __slots__ = ()

    def __or__(self, other: object) -> Spans:
        if not isinstance(other, tuple):
            return NotImplemented
        return spans([*self, *other])

    def __sub__(self, other: Spans) -> Spans:
        out: list[Span] = []
        cuts = list(other)
        j = 0
        for lo, hi in self:
            while j < len(cuts) and cuts[j][1] <= lo:
                j += 1
            k = j
            while lo < hi and k < len(cuts) and cuts[k][0] < hi:
                clo, chi = cuts[k]
                if clo > lo:
                    out.append((lo, clo))
                lo = max(lo, chi)
                k += 1
            if lo < hi:
                out.append((lo, hi))
        return Spans(out)

    def __and__(self, other: Spans) -> Spans:
        return self - (self - other)

    def contains(self, t: int) -> bool:
        return any(lo <= t < hi for lo, hi in self)

    @property
    def total(self) -> int:
        """Milliseconds covered."""
        return sum(hi - lo for lo, hi in self)

    def clip(self, lo: int, hi: int) -> Spans:
        return self & Spans([(lo, hi)]) if lo < hi else EMPTY


def spans(items: Iterable[Span]) -> Spans:
    """Normalise any iterable of `(lo, hi)` pairs (empty and inverted ones are dropped)."""
    merged: list[list[int]] = []
    for lo, hi in sorted((int(a), int(b)) for a, b in items if a < b):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return Spans((lo, hi) for lo, hi in merged)


EMPTY = Spans()
