"""The rendered-page cache: repeats cost nothing, answers stay exact, memory stays bounded."""

from __future__ import annotations

import trio

from daemon.simulator.cache import ByteLRU
from daemon.simulator.data import ground_truth
from tests.test_simulator import JAN_FROM, JAN_TO, SEED, Reply, aggs_path, fetch, start, tf


def results_bytes(reply: Reply) -> bytes:
    """The raw `results` array of an aggregates body, as sent."""
    head, _, rest = reply.body.partition(b'"results":')
    assert rest, reply.body[:200]
    array, sep, _ = rest.partition(b',"status":')
    assert sep
    return array


async def get(port: int, target: str) -> Reply:
    reply = await fetch(port, target)
    assert reply is not None and reply.status == 200
    return reply


async def stats(port: int) -> dict[str, object]:
    return (await get(port, "/__stats")).json()


async def test_a_repeated_request_is_the_same_bytes_with_a_new_request_id(
        nursery: trio.Nursery) -> None:
    port = await start(nursery)
    target = aggs_path("X:BTCUSD", "5m", JAN_FROM, JAN_TO, apiKey="k", limit=3000)
    first, second = await get(port, target), await get(port, target)
    assert results_bytes(first) == results_bytes(second)
    assert first.json()["request_id"] != second.json()["request_id"]
    assert {k: v for k, v in first.json().items() if k != "request_id"} == {
        k: v for k, v in second.json().items() if k != "request_id"}
    assert first.json()["results"] == ground_truth(SEED, "X:BTCUSD", tf("5m"), JAN_FROM,
                                                   JAN_TO)[:600]
    cache = (await stats(port))["cache"]
    assert cache["hits"] == 1 and cache["misses"] == 1 and cache["entries"] == 1  # type: ignore
    # what the cache key holds apart is not shared: another limit, order, adjusted, page
    for variant in (target.replace("limit=3000", "limit=2999"), target + "&sort=desc",
                    target + "&adjusted=false", first.json()["next_url"]):
        await fetch(port, variant if variant.startswith("/") else
                    variant.removeprefix(f"http://127.0.0.1:{port}"), {"Authorization": "Bearer k"})
    cache = (await stats(port))["cache"]
    assert cache["hits"] == 1 and cache["entries"] == 5  # type: ignore[index]
    served = await stats(port)
    assert served["ok"] == 6 and served["bars_served"] == 600 * 2 + 599 + 600 * 3


async def test_the_cache_stays_under_its_byte_bound(nursery: trio.Nursery) -> None:
    bound = 300_000
    port = await start(nursery, cache_bytes=bound)
    day = 86_400_000
    for i in range(30):  # 30 distinct pages of ~1 day of 1m bars, ~100 kB each
        start_ms = JAN_FROM + i * day
        reply = await get(port, aggs_path("X:BTCUSD", "1m", start_ms, start_ms + day - 1,
                                          apiKey="k", limit=50000))
        assert reply.json()["results"] == ground_truth(SEED, "X:BTCUSD", tf("1m"), start_ms,
                                                       start_ms + day - 1)
        cache = (await stats(port))["cache"]
        assert 0 < cache["bytes"] <= bound, cache  # type: ignore[index,operator]
    assert cache["evictions"] >= 25 and cache["max_bytes"] == bound  # type: ignore[index]
    # the most recent page is still there; the first is long gone
    before = cache["hits"]  # type: ignore[index]
    last = JAN_FROM + 29 * day
    await get(port, aggs_path("X:BTCUSD", "1m", last, last + day - 1, apiKey="k", limit=50000))
    await get(port, aggs_path("X:BTCUSD", "1m", JAN_FROM, JAN_FROM + day - 1, apiKey="k",
                              limit=50000))
    assert (await stats(port))["cache"]["hits"] == before + 1  # type: ignore[index]


async def test_cache_off_serves_the_same(nursery: trio.Nursery) -> None:
    on, off = await start(nursery), await start(nursery, cache_bytes=0)
    target = aggs_path("BRK.A", "15m", JAN_FROM, JAN_TO, apiKey="k", limit=1000)
    for _ in range(2):
        assert results_bytes(await get(on, target)) == results_bytes(await get(off, target))
    assert (await stats(off))["cache"]["entries"] == 0  # type: ignore[index]
    assert (await stats(on))["cache"]["hits"] == 1  # type: ignore[index]


def test_byte_lru_evicts_the_least_recently_used() -> None:
    cache: ByteLRU[str] = ByteLRU(100)
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # now b is the least recently used
    cache.put("c", "C", 40)
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C"
    cache.put("huge", "H", 101)  # larger than the bound: not kept, nothing evicted for it
    assert cache.get("huge") is None and cache.get("a") == "A"
    cache.put("a", "A2", 60)  # replacing counts the new size only
    s = cache.statistics()
    assert (s.entries, s.bytes, s.evictions) == (2, 100, 1)
    assert cache.get("a") == "A2"
    cache.put("d", "D", 1)
    s = cache.statistics()
    assert s.bytes <= 100 and s.evictions == 2 and cache.get("c") is None
