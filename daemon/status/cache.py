"""Cached database-backed answers: fresh for a while, then served stale while one refresh runs.

Why: a load test or a dashboard polling hard must cost PostgreSQL at most one query per
`ttl` per endpoint, and no request should wait on the database unless the answer it would get
is far too old. One fetch is in flight at a time, however many ask.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import attrs
import trio
from loguru import logger

__all__ = ["STALE_FACTOR", "Cached", "Outcome"]

# Up to this many multiples of its ttl, an answer is served while a background fetch refreshes it.
STALE_FACTOR = 10

T = TypeVar("T")


@attrs.frozen
class Outcome(Generic[T]):
    """What a database-backed fetch produced: a value, or the reason there is none."""

    value: T | None
    error: str | None


class Cached(Generic[T]):
    """The last outcome of `fetch`: fresh for `ttl` seconds, then served while a background
    refresh runs (up to `ttl * STALE_FACTOR`), then fetched while the caller waits.

    `nursery` runs the background refreshes; None makes every caller wait for its own fetch.
    """

    def __init__(self, ttl: float, fetch: Callable[[], Awaitable[Outcome[T]]],
                 nursery: trio.Nursery | None) -> None:
        self._ttl = ttl
        self._fetch = fetch
        self._nursery = nursery
        self._lock = trio.Lock()
        self._outcome: Outcome[T] | None = None
        self._at = -float("inf")
        self._refreshing = False

    async def get(self) -> Outcome[T]:
        age = trio.current_time() - self._at
        if self._outcome is not None and age < self._ttl:
            return self._outcome
        if (self._outcome is not None and self._nursery is not None
                and age < self._ttl * STALE_FACTOR):
            if not self._refreshing:
                self._refreshing = True
                self._nursery.start_soon(self._refresh)
            return self._outcome
        async with self._lock:
            if self._outcome is None or trio.current_time() - self._at >= self._ttl:
                return await self._update()
            return self._outcome

    async def _refresh(self) -> None:
        try:
            async with self._lock:
                await self._update()
        except Exception:  # a bug here must not take the status server (or daemon) down
            logger.exception("refreshing a cached status answer failed")
        finally:
            self._refreshing = False

    async def _update(self) -> Outcome[T]:
        self._outcome = outcome = await self._fetch()
        self._at = trio.current_time()
        return outcome
