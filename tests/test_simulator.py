"""The simulator: deterministic valid data, and the real API's protocol over loopback HTTP.

Time-dependent behaviour (the 429 window, latency) runs under trio's MockClock with autojump,
so a minute of rate limiting takes milliseconds. Those tests talk raw HTTP/1.1 with
`Connection: close` so that no client-side timer competes with the virtual clock.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import subprocess
import sys

import attrs
import httpx
import msgspec
import pytest
import trio
from massive import RESTClient

from daemon.bars import Bar, check_bars
from daemon.market_calendar import et_date, et_midnight_ms, is_trading_day
from daemon.simulator.data import bars_between, ground_truth, page
from daemon.simulator.server import (
    FAULT_KINDS,
    RATE_LIMIT_ERROR,
    SimulatorOptions,
    serve_simulator,
)
from daemon.timeframes import Timeframe, parse_timeframe

D = dt.date
SEED = 5
TICKERS = ("AAPL", "BRK.A", "X:BTCUSD", "I:SPX")
JAN_FROM = et_midnight_ms(D(2024, 1, 2))
JAN_TO = et_midnight_ms(D(2024, 2, 1)) - 1
SUNDAY_BEFORE = et_midnight_ms(D(2023, 12, 31))  # where January's week and month bars start


def tf(label: str) -> Timeframe:
    return parse_timeframe(label)


def et_ms(day: dt.date, hour: int, minute: int = 0) -> int:
    return et_midnight_ms(day) + (hour * 60 + minute) * 60_000


def minute_of_day(t: int) -> int:
    return (t - et_midnight_ms(et_date(t))) // 60_000


async def start(nursery: trio.Nursery, **options: object) -> int:
    options.setdefault("now_ms", et_midnight_ms(D(2025, 6, 1)))
    opts = SimulatorOptions(port=0, seed=SEED, **options)  # type: ignore[arg-type]
    return int(await nursery.start(serve_simulator, opts))


def aggs_path(ticker: str, label: str, from_: object, to: object, **query: object) -> str:
    t = tf(label)
    path = f"/v2/aggs/ticker/{ticker}/range/{t.multiplier}/{t.timespan}/{from_}/{to}"
    return path + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool  # the body is as long as Content-Length said

    def json(self) -> dict[str, object]:
        return msgspec.json.decode(self.body)  # type: ignore[no-any-return]


async def fetch(port: int, target: str, headers: dict[str, str] | None = None, *,
                method: str = "GET") -> Reply | None:
    """One raw HTTP/1.1 request on its own connection; None if closed without an answer."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    if method == "POST":
        lines.append("Content-Length: 0")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = bytearray()
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        with trio.fail_after(1000):
            while chunk := await stream.receive_some(1 << 16):
                data += chunk
    if not data:
        return None
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    complete = int(hdrs.get("content-length", len(body))) == len(body)
    return Reply(int(status_line.split()[1]), hdrs, body, complete)


# --- data ----------------------------------------------------------------------------------


def test_bars_are_deterministic_across_calls_and_processes() -> None:
    args = (SEED, "X:BTCUSD", tf("15m"), JAN_FROM, JAN_FROM + 5 * 86_400_000)
    first = ground_truth(*args)
    assert first == ground_truth(*args) == list(bars_between(*args))
    assert ground_truth(SEED + 1, *args[1:]) != first
    digest = hashlib.sha256(msgspec.json.encode(first)).hexdigest()
    code = ("import hashlib, msgspec; from daemon.simulator.data import ground_truth;"
            "from daemon.timeframes import Timeframe, parse_timeframe as p;"
            f"print(hashlib.sha256(msgspec.json.encode(ground_truth({SEED}, 'X:BTCUSD', "
            f"p('15m'), {args[3]}, {args[4]}))).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "random", "PATH": ""})
    assert out.stdout.strip() == digest


@pytest.mark.parametrize("ticker", TICKERS)
def test_every_bar_is_valid(ticker: str) -> None:
    for label in ("1m", "5m", "15m", "1h", "4h", "1d", "2d", "1w", "1mo"):
        bars = ground_truth(SEED, ticker, tf(label), SUNDAY_BEFORE, JAN_TO)
        assert bars, label
        typed = msgspec.convert(bars, list[Bar])
        assert check_bars(typed, SUNDAY_BEFORE, JAN_TO)[1] == []  # no impossible bar
        assert [b.t for b in typed] == sorted({b.t for b in typed})
        for raw in bars:
            assert set(raw) <= {"v", "vw", "o", "c", "h", "l", "t", "n"}
            assert all(type(raw[k]) is float for k in ("o", "h", "l", "c", "v"))
            assert type(raw["t"]) is int and type(raw.get("n", 0)) is int
            assert raw["v"] > 0 and raw["o"] > 0


def test_vw_and_n_are_sometimes_missing() -> None:
    bars = ground_truth(SEED, "X:BTCUSD", tf("5m"), JAN_FROM, JAN_TO)
    assert len(bars) > 8000
    no_vw = sum("vw" not in b for b in bars) / len(bars)
    no_n = sum("n" not in b for b in bars) / len(bars)
    assert 0.01 < no_vw < 0.03 and 0.01 < no_n < 0.03


def test_daily_bars_start_at_et_midnight_across_dst() -> None:
    bars = ground_truth(SEED, "AAPL", tf("1d"), et_midnight_ms(D(2024, 3, 1)),
                        et_midnight_ms(D(2024, 3, 29)))
    days = [et_date(b["t"]) for b in bars]
    assert all(b["t"] == et_midnight_ms(d) for b, d in zip(bars, days, strict=True))
    utc_hours = {d: dt.datetime.fromtimestamp(b["t"] / 1000, dt.UTC).hour
                 for b, d in zip(bars, days, strict=True)}
    assert {h for d, h in utc_hours.items() if d < D(2024, 3, 10)} == {5}
    assert {h for d, h in utc_hours.items() if d > D(2024, 3, 10)} == {4}
    # the DST Sunday itself: crypto has a 23-hour day of 23 hourly buckets at most
    sunday = ground_truth(SEED, "X:BTCUSD", tf("1h"), et_midnight_ms(D(2024, 3, 10)),
                          et_midnight_ms(D(2024, 3, 11)) - 1)
    assert 20 <= len(sunday) <= 23 and all(b["t"] % 3_600_000 == 0 for b in sunday)


@pytest.mark.parametrize("ticker", ["AAPL", "I:SPX", "BRK.A"])
def test_no_equity_bars_on_weekends_or_holidays_and_only_in_session(ticker: str) -> None:
    lo, hi = et_midnight_ms(D(2024, 3, 20)), et_midnight_ms(D(2024, 4, 10))  # Good Friday
    for label in ("1d", "4h", "1h", "5m"):
        bars = ground_truth(SEED, ticker, tf(label), lo, hi)
        assert all(is_trading_day(et_date(b["t"])) for b in bars)
        assert D(2024, 3, 29) not in {et_date(b["t"]) for b in bars}
        if label != "1d":
            assert all(4 * 60 <= minute_of_day(b["t"]) < 20 * 60 for b in bars), label
    crypto = ground_truth(SEED, "X:BTCUSD", tf("1d"), lo, hi - 1)
    assert len(crypto) == 21  # every calendar day


def test_intraday_gaps_are_likelier_outside_regular_hours() -> None:
    bars = ground_truth(SEED, "BRK.A", tf("1m"), JAN_FROM, JAN_TO)
    days = len({et_date(b["t"]) for b in bars})
    regular = sum(570 <= minute_of_day(b["t"]) < 960 for b in bars)
    extended = len(bars) - regular
    assert regular < days * 390 and extended < days * 570  # gaps exist in both
    assert extended / (days * 570) < regular / (days * 390)


def test_week_and_month_bars_aggregate_the_days() -> None:
    days = ground_truth(SEED, "AAPL", tf("1d"), JAN_FROM, JAN_TO)
    weeks = ground_truth(SEED, "AAPL", tf("1w"), SUNDAY_BEFORE, JAN_TO)
    assert [et_date(w["t"]).weekday() for w in weeks] == [6] * len(weeks)  # Sundays
    assert len(weeks) == 5
    for week in weeks[:-1]:  # the last week runs past January

        inside = [d for d in days if week["t"] <= d["t"] < week["t"] + 7 * 86_400_000]
        assert week["o"] == inside[0]["o"] and week["c"] == inside[-1]["c"]
        assert week["h"] == max(d["h"] for d in inside)
    months = ground_truth(SEED, "AAPL", tf("1mo"), SUNDAY_BEFORE, JAN_TO)
    assert [et_date(m["t"]) for m in months] == [D(2024, 1, 1)]


@pytest.mark.parametrize(("ticker", "label", "limit"), [
    ("AAPL", "5m", 500), ("X:BTCUSD", "1h", 600), ("BRK.A", "4h", 100), ("I:SPX", "1d", 3),
    ("AAPL", "1w", 4),
])
def test_pages_cover_the_ground_truth_exactly(ticker: str, label: str, limit: int) -> None:
    truth = ground_truth(SEED, ticker, tf(label), JAN_FROM, JAN_TO)
    for descending in (False, True):
        got, lo, hi, pages = [], JAN_FROM, JAN_TO, 0
        while True:
            bars, nxt = page(SEED, ticker, tf(label), lo, hi, limit, descending=descending)
            got += bars
            pages += 1
            if nxt is None:
                break
            assert bars  # a page before the last is never empty
            lo, hi = (lo, nxt) if descending else (nxt, hi)
        assert got == (truth[::-1] if descending else truth)
        assert pages > 2


# --- server --------------------------------------------------------------------------------


async def follow(client: httpx.AsyncClient, url: str, **kw: object) -> tuple[list[dict], int]:
    """Every bar by following next_url (re-sending the key, as the API requires)."""
    bars, pages = [], 0
    while url:
        reply = await client.get(url, **kw)  # type: ignore[arg-type]
        assert reply.status_code == 200, reply.text
        body = reply.json()
        pages += 1
        assert body["status"] == "OK" and len(body["request_id"]) == 32
        assert body["resultsCount"] == body["count"] == len(body.get("results", []))
        bars += body.get("results", [])
        url = body.get("next_url", "")
        if url:
            assert url.startswith(str(client.base_url).rstrip("/") + "/v2/aggs/ticker/")
            assert "cursor=" in url and "apikey" not in url.lower()
    return bars, pages


async def test_next_url_pagination_equals_ground_truth(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    auth = {"Authorization": "Bearer k"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for ticker, label in [("X:BTCUSD", "5m"), ("BRK.A", "15m"), ("I:SPX", "1h")]:
            url = aggs_path(ticker, label, JAN_FROM, JAN_TO, limit=2000)
            bars, pages = await follow(client, url, headers=auth)
            assert pages >= 3
            assert bars == ground_truth(SEED, ticker, tf(label), JAN_FROM, JAN_TO)
            desc, _ = await follow(client, url + "&sort=desc", headers=auth)
            assert desc == bars[::-1]
        # YYYY-MM-DD is the whole ET day, inclusive at both ends
        bars, _ = await follow(client, aggs_path("AAPL", "1d", "2024-01-02", "2024-01-05",
                                                 apiKey="k"))
        assert [et_date(b["t"]) for b in bars] == [D(2024, 1, d) for d in (2, 3, 4, 5)]
        weekend = (await client.get(aggs_path("AAPL", "1d", "2024-01-06", "2024-01-07",
                                              apiKey="k"))).json()
        assert "results" not in weekend and weekend["resultsCount"] == 0
        assert "next_url" not in weekend
        stats = (await client.get("/__stats")).json()
    assert stats["ok"] == stats["requests"] and stats["bars_served"] > 10_000


async def test_bars_from_now_on_do_not_exist(nursery: trio.Nursery) -> None:
    now = et_ms(D(2024, 1, 3), 12, 2)
    port = await start(nursery, now_ms=now)
    reply = await fetch(port, aggs_path("AAPL", "5m", "2024-01-02", "2024-01-05", apiKey="k",
                                        limit=50000))
    assert reply is not None
    bars = reply.json()["results"]
    assert bars == ground_truth(SEED, "AAPL", tf("5m"), JAN_FROM, now - 1)
    assert bars[-1]["t"] == et_ms(D(2024, 1, 3), 12)  # the bar in progress is served


async def test_no_bar_before_its_session_opens(nursery: trio.Nursery) -> None:
    monday_2am = et_ms(D(2024, 1, 8), 2)  # before the 04:00 pre-market
    port = await start(nursery, now_ms=monday_2am)
    for ticker, last_day in [("AAPL", D(2024, 1, 5)), ("X:BTCUSD", D(2024, 1, 8))]:
        for label in ("1d", "1h"):
            reply = await fetch(port, aggs_path(ticker, label, "2024-01-02", "2024-01-09",
                                                apiKey="k", limit=50000))
            assert reply is not None
            assert et_date(reply.json()["results"][-1]["t"]) == last_day, (ticker, label)


@pytest.mark.parametrize(("target", "status", "kind"), [
    ("/v2/aggs/ticker/AAPL/range/1/day/2024-01-02/2024-01-05?limit=50001", 400, "ERROR"),
    ("/v2/aggs/ticker/AAPL/range/1/day/2024-13-02/2024-01-05", 400, "ERROR"),
    ("/v2/aggs/ticker/AAPL/range/1/fortnight/2024-01-02/2024-01-05", 400, "ERROR"),
    ("/v2/aggs/ticker/AA$PL/range/1/day/2024-01-02/2024-01-05", 404, "NOT_FOUND"),
    ("/v2/nonsense", 404, "NOT_FOUND"),
    ("/%ff%fe/../..", 404, "NOT_FOUND"),
])
async def test_bad_requests_get_json_errors(nursery: trio.Nursery, target: str, status: int,
                                            kind: str) -> None:
    port = await start(nursery)
    reply = await fetch(port, target, {"Authorization": "Bearer k"})
    assert reply is not None and reply.status == status
    body = reply.json()
    assert body["status"] == kind and body["request_id"]


async def test_auth_by_query_or_bearer(nursery: trio.Nursery) -> None:
    port = await start(nursery, api_key="right")
    path = aggs_path("BRK.A", "1d", "2024-01-02", "2024-01-09")
    for headers, query, expected in [
        ({}, "", 401), ({}, "?apiKey=wrong", 401), ({"Authorization": "Bearer wrong"}, "", 401),
        ({}, "?apiKey=right", 200), ({"Authorization": "Bearer right"}, "", 200),
    ]:
        reply = await fetch(port, path + query, headers)
        assert reply is not None and reply.status == expected, (headers, query)
        if expected == 401:
            body = reply.json()
            assert body["status"] == "NOT_AUTHORIZED" and body["message"] and body["request_id"]
    any_key = await start(nursery)
    reply = await fetch(any_key, path + "?apiKey=whatever")
    assert reply is not None and reply.status == 200


async def test_429_sliding_window(nursery: trio.Nursery, autojump_clock: trio.abc.Clock
                                  ) -> None:
    port = await start(nursery, requests_per_minute=5)
    path = aggs_path("AAPL", "1d", "2024-01-02", "2024-01-03", apiKey="k")
    start_time = trio.current_time()

    async def status_at(offset: float) -> Reply:
        await trio.sleep_until(start_time + offset)
        reply = await fetch(port, path)
        assert reply is not None
        return reply

    for offset in (0, 10, 20, 30, 40):  # five spread over 40 s all pass
        assert (await status_at(offset)).status == 200
    limited = await status_at(50)
    assert limited.status == 429 and limited.headers["retry-after"] == "10"
    assert limited.json()["error"] == RATE_LIMIT_ERROR and limited.json()["status"] == "ERROR"
    assert (await status_at(59.5)).headers["retry-after"] == "1"  # 0.5 s left, rounded up
    assert (await status_at(60)).status == 200  # the request of t=0 left the window
    assert (await status_at(60)).status == 429
    # after a quiet minute, as fast as possible for two minutes: exactly 5 per minute pass
    await trio.sleep_until(start_time + 200)
    passed = 0
    with trio.move_on_after(120 - 1e-6):
        while True:
            reply = await fetch(port, path)
            assert reply is not None
            if reply.status == 200:
                passed += 1
            else:
                await trio.sleep(int(reply.headers["retry-after"]))
    assert passed == 10
    stats = (await fetch(port, "/__stats"))
    assert stats is not None and stats.json()["rate_limited"] >= 3


async def test_429_without_retry_after(nursery: trio.Nursery, autojump_clock: trio.abc.Clock
                                       ) -> None:
    port = await start(nursery, requests_per_minute=1, retry_after=False)
    path = aggs_path("AAPL", "1d", "2024-01-02", "2024-01-03", apiKey="k")
    assert (r := await fetch(port, path)) is not None and r.status == 200
    assert (r := await fetch(port, path)) is not None and r.status == 429
    assert "retry-after" not in r.headers
    # keys have separate windows
    assert (r := await fetch(port, path.replace("apiKey=k", "apiKey=other"))) is not None
    assert r.status == 200


async def test_latency_is_uniform_in_range(nursery: trio.Nursery,
                                           autojump_clock: trio.abc.Clock) -> None:
    port = await start(nursery, latency_ms=(1000, 3000))
    path = aggs_path("AAPL", "1d", "2024-01-02", "2024-01-03", apiKey="k")
    took = []
    for _ in range(20):
        before = trio.current_time()
        await fetch(port, path)
        took.append(trio.current_time() - before)
    assert all(1.0 <= t <= 3.0 for t in took)
    assert max(took) - min(took) > 0.5


async def test_every_fault_kind_at_fault_rate_1(nursery: trio.Nursery) -> None:
    port = await start(nursery, fault_rate=1.0)
    path = aggs_path("AAPL", "1d", "2024-01-02", "2024-01-12", apiKey="k")
    seen = dict.fromkeys(FAULT_KINDS, 0)
    for _ in range(120):
        reply = await fetch(port, path)
        if reply is None:
            seen["dropped"] += 1
        elif reply.status in (500, 502, 503):
            assert reply.headers["content-type"].startswith("text/html")
            assert b"<html>" in reply.body
            seen[f"http_{reply.status}"] += 1
        elif reply.status == 429:
            assert "retry-after" not in reply.headers
            seen["spurious_429"] += 1
        elif not reply.complete:
            assert reply.status == 200 and 0 < len(reply.body) < int(
                reply.headers["content-length"])
            seen["truncated"] += 1
        else:
            body = reply.json()
            assert reply.status == 200 and body["status"] == "OK" and body["results"] is None
            seen["null_results"] += 1
    assert all(seen.values()), seen
    stats = await fetch(port, "/__stats")
    assert stats is not None
    assert stats.json()["faults"] == seen and stats.json()["faults_total"] == 120
    assert stats.json()["ok"] == 0


async def test_faults_are_deterministic_and_near_the_rate(nursery: trio.Nursery) -> None:
    runs = []
    for _ in range(2):
        port = await start(nursery, fault_rate=0.2)
        path = aggs_path("AAPL", "1d", "2024-01-02", "2024-01-03", apiKey="k")
        runs.append([r.status if (r := await fetch(port, path)) else 0 for _ in range(100)])
    assert runs[0] == runs[1]
    assert 8 <= sum(s != 200 for s in runs[0]) <= 32


async def test_the_official_massive_client_reads_the_ground_truth(nursery: trio.Nursery) -> None:
    port = await start(nursery)

    def read(ticker: str, multiplier: int, timespan: str) -> list[tuple[object, ...]]:
        client = RESTClient(api_key="k", base=f"http://127.0.0.1:{port}", retries=0)
        aggs = client.list_aggs(ticker, multiplier, timespan, "2024-01-02", "2024-01-31",
                                limit=700)
        return [(a.timestamp, a.open, a.high, a.low, a.close, a.volume, a.vwap, a.transactions)
                for a in aggs]

    for ticker, mult, span, label in [("X:BTCUSD", 1, "hour", "1h"), ("BRK.A", 15, "minute", "15m"),
                                      ("AAPL", 1, "hour", "1h")]:
        got = await trio.to_thread.run_sync(read, ticker, mult, span)
        truth = ground_truth(SEED, ticker, tf(label), JAN_FROM, JAN_TO)
        assert len(truth) > 700 // (60 if span == "hour" else 15) * 3  # several pages
        assert got == [(b["t"], b["o"], b["h"], b["l"], b["c"], b["v"], b.get("vw"), b.get("n"))
                       for b in truth]
    stats = await fetch(port, "/__stats")
    assert stats is not None and stats.json()["requests"] > 9
