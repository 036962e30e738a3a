"""Defective bars over loopback HTTP: every kind appears, exactly where `defective_ts` says.

Each answer is walked alongside the ground truth: a bar `defective_ts` names must arrive
spoiled in its documented way, every other bar exactly as generated.
"""

from __future__ import annotations

import msgspec
import pytest
import trio

from daemon.simulator.data import RawBar, ground_truth
from daemon.simulator.defects import DEFECT_KINDS, defect_kind, defective_ts
from tests.test_simulator import JAN_FROM, JAN_TO, SEED, aggs_path, fetch, start, tf

RATE = 0.2
FROM, TO = JAN_FROM, JAN_FROM + 14 * 86_400_000 - 1  # two weeks of 5m bars: ~1900 bars


async def served(port: int, ticker: str, label: str = "5m", *, descending: bool = False,
                 from_ms: int = FROM, to_ms: int = TO) -> list[dict[str, object]]:
    target = aggs_path(ticker, label, from_ms, to_ms, apiKey="k", limit=50000,
                       sort="desc" if descending else "asc")
    reply = await fetch(port, target)
    assert reply is not None and reply.status == 200
    body = reply.json()
    assert "next_url" not in body and body["count"] == body["resultsCount"]
    results: list[dict[str, object]] = body.get("results", [])  # type: ignore[assignment]
    assert len(results) == body["count"]
    return results


def check_answer(bars: list[dict[str, object]], truth: list[RawBar], spoiled: dict[int, str], *,
                 from_ms: int, to_ms: int, descending: bool = False) -> dict[str, int]:
    """Assert `bars` is `truth` with exactly the `spoiled` bars spoiled; count the kinds."""
    seen = dict.fromkeys(DEFECT_KINDS, 0)
    i = 0
    for good in truth:
        kind = spoiled.get(int(good["t"]))
        got = bars[i]
        i += 1
        if kind is None:
            assert got == good
            continue
        seen[kind] += 1
        rest = dict(got)  # the spoiled bar with its spoiled fields put back: must be `good`
        if kind == "high_below_low":
            assert float(got["h"]) < float(got["l"])  # type: ignore[arg-type]
            rest.update(h=good["h"], l=good["l"])
        elif kind == "open_outside":
            assert got["o"] > good["h"]  # type: ignore[operator]
            rest["o"] = good["o"]
        elif kind == "close_outside":
            assert not good["l"] <= got["c"] <= good["h"]  # type: ignore[operator]
            rest["c"] = good["c"]
        elif kind == "negative_volume":
            assert got["v"] < 0  # type: ignore[operator]
            rest["v"] = good["v"]
        elif kind == "string_price":
            assert got["o"] == f"{good['o']}x"
            rest["o"] = good["o"]
        elif kind == "missing_t":
            assert "t" not in got
            rest["t"] = good["t"]
        elif kind == "missing_c":
            assert "c" not in got
            rest["c"] = good["c"]
        elif kind == "t_outside_range":
            assert got["t"] == (from_ms - 1 if descending else to_ms + 1)
            rest["t"] = good["t"]
        elif kind == "duplicate_t":
            assert bars[i] == got  # the same bar again, right after
            i += 1
        elif kind == "negative_trades":
            assert got["n"] == (-good["n"] if "n" in good else -1)
            del rest["n"]
            if "n" in good:
                rest["n"] = good["n"]
        assert rest == good, kind
    assert i == len(bars)  # nothing else was served
    return seen


async def test_every_defect_kind_appears_exactly_where_defective_ts_says(
        nursery: trio.Nursery) -> None:
    port = await start(nursery, defects={"AAPL": RATE, "X:BTCUSD": 0.05})
    truth = ground_truth(SEED, "AAPL", tf("5m"), FROM, TO)
    spoiled = defective_ts(SEED, "AAPL", tf("5m"), FROM, TO, RATE)
    assert 0.15 < len(spoiled) / len(truth) < 0.25
    seen = check_answer(await served(port, "AAPL"), truth, spoiled, from_ms=FROM, to_ms=TO)
    assert all(seen.values()), seen
    assert sum(seen.values()) == len(spoiled)
    # descending answers spoil the same bars; t_outside_range goes below `from` then
    desc = await served(port, "AAPL", descending=True)
    check_answer(desc, truth[::-1], spoiled, from_ms=FROM, to_ms=TO, descending=True)
    # another timeframe of the same ticker has its own defects; another ticker its own rate
    hourly = ground_truth(SEED, "AAPL", tf("1h"), FROM, TO)
    check_answer(await served(port, "AAPL", "1h"), hourly,
                 defective_ts(SEED, "AAPL", tf("1h"), FROM, TO, RATE), from_ms=FROM, to_ms=TO)
    btc = ground_truth(SEED, "X:BTCUSD", tf("15m"), FROM, TO)
    btc_spoiled = defective_ts(SEED, "X:BTCUSD", tf("15m"), FROM, TO, 0.05)
    assert 0.02 < len(btc_spoiled) / len(btc) < 0.08
    check_answer(await served(port, "X:BTCUSD", "15m"), btc, btc_spoiled, from_ms=FROM, to_ms=TO)
    # a ticker without a rate is clean
    assert await served(port, "MSFT") == ground_truth(SEED, "MSFT", tf("5m"), FROM, TO)
    hourly_spoiled = defective_ts(SEED, "AAPL", tf("1h"), FROM, TO, RATE)
    stats = (await fetch(port, "/__stats")).json()  # type: ignore[union-attr]
    assert stats["defects_served"] == 2 * len(spoiled) + len(hourly_spoiled) + len(btc_spoiled)
    assert stats["defects_served"] == sum(stats["defects"].values())


async def test_stats_count_each_defect_served(nursery: trio.Nursery) -> None:
    port = await start(nursery, defects={"AAPL": RATE})
    spoiled = defective_ts(SEED, "AAPL", tf("5m"), FROM, TO, RATE)
    for _ in range(2):  # the second answer comes from the page cache: still counted
        await served(port, "AAPL")
    stats = (await fetch(port, "/__stats")).json()  # type: ignore[union-attr]
    per_kind = {kind: 2 * list(spoiled.values()).count(kind) for kind in DEFECT_KINDS}
    assert stats["defects"] == per_kind
    assert stats["defects_served"] == 2 * len(spoiled)
    assert stats["bars_served"] == 2 * (len(ground_truth(SEED, "AAPL", tf("5m"), FROM, TO))
                                        + per_kind["duplicate_t"] // 2)


async def test_rate_zero_corrects_the_vendor_and_a_new_rate_applies_at_once(
        nursery: trio.Nursery) -> None:
    port = await start(nursery, defects={"AAPL": RATE})
    truth = ground_truth(SEED, "AAPL", tf("5m"), FROM, TO)
    assert await served(port, "AAPL") != truth
    reply = await fetch(port, "/__control/defects?ticker=AAPL&rate=0", method="POST")
    assert reply is not None and reply.status == 200
    assert reply.json()["defects"] == {"AAPL": 0.0}
    assert await served(port, "AAPL") == truth  # corrected: clean, though cached before
    await fetch(port, "/__control/defects?ticker=AAPL&rate=0.5", method="POST")
    check_answer(await served(port, "AAPL"), truth,
                 defective_ts(SEED, "AAPL", tf("5m"), FROM, TO, 0.5), from_ms=FROM, to_ms=TO)
    for bad in ("rate=2", "rate=x", "ticker=&rate=0.1", "ticker=AAPL"):
        target = "/__control/defects?" + (bad if "ticker" in bad else f"ticker=AAPL&{bad}")
        refused = await fetch(port, target, method="POST")
        assert refused is not None and refused.status == 400, bad
        assert refused.json()["status"] == "ERROR"


async def test_daily_and_weekly_bars_are_spoiled_too(nursery: trio.Nursery) -> None:
    port = await start(nursery, defects={"I:SPX": 1.0})
    for label, lo in (("1d", JAN_FROM), ("1w", JAN_FROM - 2 * 86_400_000)):
        truth = ground_truth(SEED, "I:SPX", tf(label), lo, JAN_TO)
        spoiled = defective_ts(SEED, "I:SPX", tf(label), lo, JAN_TO, 1.0)
        assert set(spoiled) == {b["t"] for b in truth}  # rate 1: every bar
        check_answer(await served(port, "I:SPX", label, from_ms=lo, to_ms=JAN_TO), truth,
                     spoiled, from_ms=lo, to_ms=JAN_TO)


def test_defects_are_a_pure_function_growing_with_the_rate() -> None:
    args = (SEED, "AAPL", tf("5m"), FROM, TO)
    low, high = defective_ts(*args, 0.05), defective_ts(*args, 0.3)
    assert low == defective_ts(*args, 0.05)
    assert low.items() <= high.items()  # a bar spoiled at 5 % is spoiled the same way at 30 %
    assert defective_ts(*args, 0) == {} and defect_kind(SEED, "AAPL", tf("5m"), FROM, 0) is None
    assert len(defective_ts(*args, 1.0)) == len(ground_truth(*args))
    assert defective_ts(SEED + 1, *args[1:], 0.3) != high
    # a sub-range holds exactly the defects of the whole that fall inside it
    mid = FROM + 7 * 86_400_000
    assert defective_ts(SEED, "AAPL", tf("5m"), FROM, mid, 0.3) == {
        t: k for t, k in high.items() if t <= mid}


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_each_kind_is_refused_by_the_daemon_decoder_or_validator(kind: str) -> None:
    """Every kind is one the daemon must catch: a typed decode error or a validation error."""
    from daemon.bars import Bar, check_bars
    from daemon.simulator.defects import spoil

    truth = ground_truth(SEED, "AAPL", tf("5m"), FROM, FROM + 86_400_000 - 1)
    t = next(int(b["t"]) for b in truth
             if defect_kind(SEED, "AAPL", tf("5m"), int(b["t"]), 0.9) == kind)
    bars = [b for b in truth if int(b["t"]) == t]
    answer, counts = spoil(bars, SEED, "AAPL", tf("5m"), 0.9, from_ms=FROM,
                           to_ms=FROM + 86_400_000 - 1, descending=False)
    assert counts[kind] >= 1
    encoded = msgspec.json.encode(answer)
    try:
        typed = msgspec.json.decode(encoded, type=list[Bar])
    except msgspec.ValidationError:
        return
    assert check_bars(typed, FROM, FROM + 86_400_000 - 1)[1] != []
