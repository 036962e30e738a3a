"""Our client and the official `massive` client read the simulator and get the same bars.

That the official client can read the simulator at all is how we know the simulator speaks the
real protocol; that ours gets exactly what it gets is how we know ours reads it the same way.
"""

from __future__ import annotations

import datetime as dt

import trio
from massive import RESTClient

from daemon.config import PolygonConfig, RetryConfig, Secret
from daemon.market_calendar import et_midnight_ms
from daemon.polygon import PolygonClient
from daemon.ratelimit import RateLimiter
from daemon.simulator.server import SimulatorOptions, serve_simulator
from daemon.timeframes import parse_timeframe

FROM_MS = et_midnight_ms(dt.date(2024, 3, 1))
TO_MS = et_midnight_ms(dt.date(2024, 3, 29)) - 1  # across the DST change of 2024-03-10
SERIES = [("X:BTCUSD", "1h"), ("BRK.A", "15m"), ("I:SPX", "5m"), ("AAPL", "1d")]
LIMIT = 2000


def read_official(port: int, ticker: str, label: str) -> list[tuple[object, ...]]:
    tf = parse_timeframe(label)
    client = RESTClient(api_key="k", base=f"http://127.0.0.1:{port}", retries=0)
    aggs = client.list_aggs(ticker, tf.multiplier, tf.timespan, FROM_MS, TO_MS, limit=LIMIT)
    return [(a.timestamp, a.open, a.high, a.low, a.close, a.volume, a.vwap, a.transactions)
            for a in aggs]


async def test_our_client_reads_exactly_what_the_official_one_reads(
    nursery: trio.Nursery,
) -> None:
    port = await nursery.start(serve_simulator, SimulatorOptions(port=0, seed=5))
    config = PolygonConfig(base_url=f"http://127.0.0.1:{port}", api_key=Secret("k"),
                           requests_per_minute=0, page_limit=LIMIT)
    async with PolygonClient(config, RetryConfig(attempts=1),
                             limiter=RateLimiter(0, max_in_flight=4)) as ours:
        for ticker, label in SERIES:
            pages = [p async for p in ours.pages(ticker, parse_timeframe(label), FROM_MS, TO_MS)]
            got = [(b.t, b.o, b.h, b.l, b.c, b.v, b.vw, b.n) for p in pages for b in p.bars]
            theirs = await trio.to_thread.run_sync(read_official, port, ticker, label)
            assert got == theirs, (ticker, label)
            assert got, (ticker, label)
            if label != "1d":
                assert len(pages) > 2, (ticker, label)  # pagination exercised
