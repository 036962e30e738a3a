"""Splits over loopback HTTP: /v3/reference/splits like the real API, and bars that follow.

The generated series is the fully adjusted price; raw bars before each split's execution date
are scaled by it, adjusted bars only by the splits not yet announced. Every served bar is
compared with `ground_truth(..., splits=..., adjusted=...)` and must still validate.
"""

from __future__ import annotations

import datetime as dt

import attrs
import httpx
import msgspec
import pytest
import trio
from massive import RESTClient

from daemon.bars import Bar, check_bars
from daemon.market_calendar import et_date, et_midnight_ms
from daemon.simulator.data import ground_truth
from daemon.simulator.splits import MIN_PRICE, Split, adjustment
from tests.test_simulator import SEED, aggs_path, fetch, start, tf

D = dt.date
NVDA_10_FOR_1 = Split("NVDA", "2024-06-10", 1, 10)
NVDA_1_FOR_5 = Split("NVDA", "2024-09-03", 5, 1)  # a reverse split
AAPL_4_FOR_1 = Split("AAPL", "2020-08-31", 1, 4)
TSLA_HIDDEN = Split("TSLA", "2024-03-01", 1, 3, hidden=True)
TSLA_LATER = Split("TSLA", "2024-05-01", 2, 3, hidden=True)
SPLITS = (NVDA_10_FOR_1, NVDA_1_FOR_5, AAPL_4_FOR_1, TSLA_HIDDEN, TSLA_LATER)
FROM = et_midnight_ms(D(2024, 5, 1))
TO = et_midnight_ms(D(2024, 10, 1)) - 1
AUTH = {"Authorization": "Bearer k"}


def client(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH)


async def all_bars(http: httpx.AsyncClient, ticker: str, label: str, *, adjusted: bool,
                   from_ms: int = FROM, to_ms: int = TO, limit: int = 50000) -> list[dict]:
    url = aggs_path(ticker, label, from_ms, to_ms, limit=limit,
                    adjusted="true" if adjusted else "false")
    bars: list[dict] = []
    while url:
        reply = await http.get(url)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["adjusted"] is adjusted
        bars += body.get("results", [])
        url = body.get("next_url", "")
    return bars


async def listing(http: httpx.AsyncClient, query: str = "") -> list[dict]:
    """Every split the listing returns, following next_url."""
    url, out = f"/v3/reference/splits{query}", []
    while url:
        reply = await http.get(url)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["status"] == "OK" and len(body["request_id"]) == 32
        out += body["results"]
        url = body.get("next_url", "")
        if url:
            assert url.startswith(str(http.base_url).rstrip("/") + "/v3/reference/splits?cursor=")
            assert "apikey" not in url.lower() and "&" not in url
    return out


def valid(bars: list[dict], from_ms: int, to_ms: int) -> None:
    typed = msgspec.convert(bars, list[Bar])
    assert check_bars(typed, from_ms, to_ms)[1] == []  # no impossible bar
    assert all(b.o >= MIN_PRICE and b.l >= MIN_PRICE for b in typed)


# --- the listing -----------------------------------------------------------------------------


async def test_splits_listing_filters_sorts_and_hides_the_hidden(nursery: trio.Nursery) -> None:
    port = await start(nursery, splits=SPLITS)
    async with client(port) as http:
        everything = await listing(http, "?limit=1000")
        assert everything == [s.as_json() for s in (AAPL_4_FOR_1, NVDA_10_FOR_1, NVDA_1_FOR_5)]
        assert everything[1] == {"execution_date": "2024-06-10", "split_from": 1,
                                 "split_to": 10, "ticker": "NVDA", "id": NVDA_10_FOR_1.id}
        assert everything[1]["id"].startswith("E") and len(everything[1]["id"]) == 65

        async def dates(query: str) -> list[str]:
            return [s["execution_date"] for s in await listing(http, query)]

        assert await dates("?ticker=NVDA") == ["2024-06-10", "2024-09-03"]
        assert await dates("?ticker=TSLA") == []  # hidden: not yet announced
        assert await dates("?execution_date=2024-06-10") == ["2024-06-10"]
        assert await dates("?execution_date.gte=2024-06-10") == ["2024-06-10", "2024-09-03"]
        assert await dates("?execution_date.gt=2024-06-10") == ["2024-09-03"]
        assert await dates("?execution_date.lte=2024-06-10") == ["2020-08-31", "2024-06-10"]
        assert await dates("?execution_date.lt=2024-06-10") == ["2020-08-31"]
        assert await dates("?execution_date.gt=2020-08-31&execution_date.lt=2024-09-03") == [
            "2024-06-10"]
        assert await dates("?order=desc") == ["2024-09-03", "2024-06-10", "2020-08-31"]
        assert await dates("?reverse_split=true") == ["2024-09-03"]
        assert await dates("?reverse_split=false&ticker=NVDA") == ["2024-06-10"]
        by_ticker = await listing(http, "?sort=ticker&order=desc")
        assert [(s["ticker"], s["execution_date"]) for s in by_ticker] == [
            ("NVDA", "2024-09-03"), ("NVDA", "2024-06-10"), ("AAPL", "2020-08-31")]
        none = (await http.get("/v3/reference/splits?ticker=ZZZZ")).json()
        assert none["results"] == [] and "next_url" not in none
        default = (await http.get("/v3/reference/splits")).json()  # limit 10 by default
        assert len(default["results"]) == 3 and "next_url" not in default


async def test_limit_1_pages_through_every_split(nursery: trio.Nursery) -> None:
    many = [Split("AAA", D(2020, 1, 1) + dt.timedelta(days=30 * i), 1, 2) for i in range(12)]
    port = await start(nursery, splits=[*many, *SPLITS])
    async with client(port) as http:
        whole = await listing(http, "?limit=1000")
        assert len(whole) == 15
        pages = []
        url = "/v3/reference/splits?limit=1"
        while url:
            body = (await http.get(url)).json()
            assert len(body["results"]) == 1
            pages += body["results"]
            url = body.get("next_url", "")
        assert pages == whole
        assert await listing(http, "?limit=4&order=desc") == whole[::-1]
        assert await listing(http, "?limit=2&ticker=AAA&execution_date.gte=2020-06-01") == [
            s.as_json() for s in many if s.execution_date >= D(2020, 6, 1)]
        assert await listing(http, "?limit=3&sort=ticker") == sorted(
            whole, key=lambda s: (s["ticker"], s["execution_date"]))


@pytest.mark.parametrize("query", [
    "limit=0", "limit=1001", "limit=x", "order=up", "sort=price", "execution_date=2024-13-01",
    "execution_date.gte=yesterday", "reverse_split=maybe", "cursor=%%%",
])
async def test_bad_listing_parameters_are_400(nursery: trio.Nursery, query: str) -> None:
    port = await start(nursery, splits=SPLITS)
    reply = await fetch(port, f"/v3/reference/splits?{query}", AUTH)
    assert reply is not None and reply.status == 400
    assert reply.json()["status"] == "ERROR" and reply.json()["error"]


async def test_listing_needs_the_key_and_counts_against_the_rate(
        nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    port = await start(nursery, splits=SPLITS, api_key="right", requests_per_minute=2)
    assert (r := await fetch(port, "/v3/reference/splits")) and r.status == 401
    assert (r := await fetch(port, "/v3/reference/splits?apiKey=wrong")) and r.status == 401
    assert r.json()["message"] == "Unknown API Key"
    assert (r := await fetch(port, "/v3/reference/splits?apiKey=right")) and r.status == 200
    assert (r := await fetch(port, aggs_path("AAPL", "1d", "2024-01-02", "2024-01-03",
                                             apiKey="right"))) and r.status == 200
    limited = await fetch(port, "/v3/reference/splits?apiKey=right")
    assert limited is not None and limited.status == 429 and limited.headers["retry-after"]
    stats = (await fetch(port, "/__stats")).json()  # type: ignore[union-attr]
    assert stats["splits_requests"] == 4 and stats["rate_limited"] == 1


# --- the bars ------------------------------------------------------------------------------


async def test_raw_and_adjusted_bars_around_two_splits(nursery: trio.Nursery) -> None:
    port = await start(nursery, splits=SPLITS)
    async with client(port) as http:
        for label in ("1d", "1h", "15m", "1w", "1mo", "3d"):
            lo = FROM - 5 * 86_400_000 if label in ("1w", "1mo", "3d") else FROM
            adjusted = await all_bars(http, "NVDA", label, adjusted=True, from_ms=lo,
                                      limit=1000)
            raw = await all_bars(http, "NVDA", label, adjusted=False, from_ms=lo, limit=1000)
            # adjusted for every (visible) split: the generated series, untouched
            assert adjusted == ground_truth(SEED, "NVDA", tf(label), lo, TO), label
            assert adjusted == ground_truth(SEED, "NVDA", tf(label), lo, TO, splits=SPLITS)
            assert raw == ground_truth(SEED, "NVDA", tf(label), lo, TO, splits=SPLITS,
                                       adjusted=False), label
            valid(raw, lo, TO)
    day_raw = {b["t"]: b for b in ground_truth(SEED, "NVDA", tf("1d"), FROM, TO, splits=SPLITS,
                                               adjusted=False)}
    day_adj = {b["t"]: b for b in ground_truth(SEED, "NVDA", tf("1d"), FROM, TO)}
    for t, bar in day_adj.items():
        day = et_date(t)
        factor = 2.0 if day < D(2024, 6, 10) else 0.2 if day < D(2024, 9, 3) else 1.0
        assert day_raw[t]["c"] == pytest.approx(bar["c"] * factor, abs=1e-4), day
        assert day_raw[t]["v"] == pytest.approx(bar["v"] / factor, abs=1e-4), day
        assert day_raw[t].get("n") == bar.get("n")
        if factor == 1.0:
            assert day_raw[t] == bar  # after the last split: exactly as generated


async def test_a_week_straddling_a_split_aggregates_the_scaled_days(
        nursery: trio.Nursery) -> None:
    port = await start(nursery, splits=[NVDA_10_FOR_1])
    sunday = et_midnight_ms(D(2024, 6, 9))  # the week of Monday 2024-06-10
    async with client(port) as http:
        week = await all_bars(http, "NVDA", "1w", adjusted=False, from_ms=sunday,
                              to_ms=sunday + 86_400_000)
    days = ground_truth(SEED, "NVDA", tf("1d"), et_midnight_ms(D(2024, 6, 3)),
                        sunday + 7 * 86_400_000 - 1, splits=[NVDA_10_FOR_1], adjusted=False)
    inside = [d for d in days if d["t"] >= sunday]
    before = [d for d in days if d["t"] < sunday]
    assert [b["t"] for b in week] == [sunday]
    assert week[0]["o"] == inside[0]["o"] and week[0]["c"] == inside[-1]["c"]
    assert week[0]["h"] == max(d["h"] for d in inside)
    # the raw week before the split trades ten times higher than the split week's close
    assert before[-1]["c"] / inside[0]["c"] == pytest.approx(10, rel=0.1)


async def test_hidden_split_changes_adjusted_bars_when_announced(nursery: trio.Nursery) -> None:
    port = await start(nursery, splits=SPLITS)
    lo, hi = et_midnight_ms(D(2024, 2, 1)), et_midnight_ms(D(2024, 6, 1)) - 1
    plain = ground_truth(SEED, "TSLA", tf("1d"), lo, hi)
    async with client(port) as http:
        raw = await all_bars(http, "TSLA", "1d", adjusted=False, from_ms=lo, to_ms=hi)
        before = await all_bars(http, "TSLA", "1d", adjusted=True, from_ms=lo, to_ms=hi)
        # unannounced, a split is in raw and in "adjusted" bars alike: nothing adjusts for it
        assert before == raw == ground_truth(SEED, "TSLA", tf("1d"), lo, hi, splits=SPLITS)
        assert before != plain
        announced = await http.post("/__control/splits/announce?ticker=TSLA")
        assert announced.status_code == 200
        assert [s["execution_date"] for s in announced.json()["announced"]] == ["2024-03-01"]
        assert [s["execution_date"] for s in await listing(http, "?ticker=TSLA")] == [
            "2024-03-01"]
        now = [attrs.evolve(TSLA_HIDDEN, hidden=False), TSLA_LATER]
        after = await all_bars(http, "TSLA", "1d", adjusted=True, from_ms=lo, to_ms=hi)
        assert after == ground_truth(SEED, "TSLA", tf("1d"), lo, hi, splits=now)
        assert after != before
        march = et_midnight_ms(D(2024, 3, 1))
        assert [b for b in after if b["t"] < march] != [b for b in before if b["t"] < march]
        assert [b for b in after if b["t"] >= march] == [b for b in before if b["t"] >= march]
        # raw bars do not move when a split is announced
        assert await all_bars(http, "TSLA", "1d", adjusted=False, from_ms=lo, to_ms=hi) == raw
        # the next call announces the next one; then there is none left
        assert (await http.post("/__control/splits/announce?ticker=TSLA")).status_code == 200
        assert await all_bars(http, "TSLA", "1d", adjusted=True, from_ms=lo, to_ms=hi) == plain
        assert (await http.post("/__control/splits/announce?ticker=TSLA")).status_code == 404


async def test_announce_all_and_register_at_run_time(nursery: trio.Nursery) -> None:
    port = await start(nursery, splits=[TSLA_HIDDEN, TSLA_LATER])
    async with client(port) as http:
        reply = await http.post("/__control/splits/announce?ticker=TSLA&all=1")
        assert len(reply.json()["announced"]) == 2
        assert len(await listing(http, "?ticker=TSLA")) == 2
        added = await http.post("/__control/splits?ticker=X:BTCUSD&execution_date=2024-07-01"
                                "&split_from=1&split_to=2&hidden=1")
        assert added.status_code == 200 and added.json()["split"]["hidden"] is True
        registered = (await http.get("/__control/splits")).json()["splits"]
        assert [(s["ticker"], s["hidden"]) for s in registered] == [
            ("TSLA", False), ("TSLA", False), ("X:BTCUSD", True)]
        clash = await http.post("/__control/splits?ticker=TSLA&execution_date=2024-03-01"
                                "&split_from=1&split_to=2")
        assert clash.status_code == 400 and "already" in clash.json()["error"]
        for bad in ("execution_date=2024-02-30&split_from=1&split_to=2",
                    "execution_date=2024-02-03&split_from=0&split_to=2",
                    "execution_date=2024-02-03&split_from=1"):
            assert (await http.post(f"/__control/splits?ticker=Q&{bad}")).status_code == 400
        added = await http.post("/__control/splits?ticker=NVDA&execution_date=2024-06-10"
                                "&split_from=1&split_to=10")
        assert added.json()["split"]["hidden"] is False
        raw = await all_bars(http, "NVDA", "1d", adjusted=False)
        assert raw == ground_truth(SEED, "NVDA", tf("1d"), FROM, TO, splits=[NVDA_10_FOR_1],
                                   adjusted=False)


async def test_crypto_and_penny_prices_stay_valid_after_a_big_reverse_split(
        nursery: trio.Nursery) -> None:
    crushing = Split("X:DOGEUSD", "2024-06-01", 1000, 1)  # raw prices 1000x lower before it
    port = await start(nursery, splits=[crushing])
    async with client(port) as http:
        for label in ("1h", "1d"):
            raw = await all_bars(http, "X:DOGEUSD", label, adjusted=False, limit=5000)
            assert raw == ground_truth(SEED, "X:DOGEUSD", tf(label), FROM, TO,
                                       splits=[crushing], adjusted=False)
            valid(raw, FROM, TO)


def test_adjustment_factors() -> None:
    adj = adjustment(SPLITS, "NVDA", adjusted=False)
    june, sept = NVDA_10_FOR_1.boundary_ms, NVDA_1_FOR_5.boundary_ms
    assert adj.factor(june - 1) == pytest.approx(2.0) and adj.factor(june) == pytest.approx(0.2)
    assert adj.factor(sept - 1) == pytest.approx(0.2) and adj.factor(sept) == 1.0
    assert not adjustment(SPLITS, "NVDA", adjusted=True)  # every NVDA split is visible
    assert adjustment(SPLITS, "TSLA", adjusted=True).factor(0) == pytest.approx(4.5)
    assert ground_truth(SEED, "AAPL", tf("1d"), FROM, TO, splits=SPLITS, adjusted=False) == (
        ground_truth(SEED, "AAPL", tf("1d"), FROM, TO))  # AAPL's split is before the range


async def test_the_official_massive_client_lists_our_splits(nursery: trio.Nursery) -> None:
    port = await start(nursery, splits=SPLITS)

    def read(**query: object) -> list[tuple[object, ...]]:
        rest = RESTClient(api_key="k", base=f"http://127.0.0.1:{port}", retries=0)
        return [(s.ticker, s.execution_date, s.split_from, s.split_to, s.id)
                for s in rest.list_splits(**query)]  # type: ignore[arg-type]

    def expect(*splits: Split) -> list[tuple[object, ...]]:
        return [(s.ticker, s.execution_date.isoformat(), int(s.split_from), int(s.split_to),
                 s.id) for s in splits]

    # limit=1: the client follows next_url through every page
    got = await trio.to_thread.run_sync(lambda: read(execution_date_gte="2021-01-01", limit=1))
    assert got == expect(NVDA_10_FOR_1, NVDA_1_FOR_5)
    got = await trio.to_thread.run_sync(lambda: read(ticker="AAPL"))
    assert got == expect(AAPL_4_FOR_1)
    got = await trio.to_thread.run_sync(lambda: read(reverse_split=True, order="desc"))
    assert got == expect(NVDA_1_FOR_5)
    stats = (await fetch(port, "/__stats")).json()  # type: ignore[union-attr]
    assert stats["splits_requests"] == 4  # 2 pages, then 1 and 1
