"""The simulator's scripted partial failures over loopback HTTP: entitlements, outages, opt-in
fault kinds, the options that script them, and the child-process plumbing.

Outage windows run under MockClock (autojump): their edges are asserted to the millisecond of
virtual time, and a half-minute outage takes no real time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import pytest
import trio

from daemon.simulator.data import ground_truth
from daemon.simulator.faults import ALL_FAULT_KINDS, FAULT_KINDS, NOT_ENTITLED_MESSAGE
from daemon.simulator.options import (
    SimulatorOptions,
    add_simulate_arguments,
    options_from_args,
)
from daemon.simulator.process import control_url, simulate_arguments, simulator_process
from daemon.simulator.splits import Split
from tests.test_simulator import JAN_FROM, JAN_TO, SEED, Reply, aggs_path, fetch, start, tf

DAY_PATH = aggs_path("AAPL", "1d", "2024-01-02", "2024-01-05", apiKey="k")


async def get(port: int, target: str, **kw: object) -> Reply:
    reply = await fetch(port, target, **kw)  # type: ignore[arg-type]
    assert reply is not None
    return reply


async def post(port: int, target: str) -> Reply:
    return await get(port, target, method="POST")


# --- entitlements ----------------------------------------------------------------------------


async def test_not_entitled_ticker_is_403_while_the_key_works_for_others(
        nursery: trio.Nursery) -> None:
    port = await start(nursery, not_entitled={"AAPL", "X:BTCUSD"}, api_key="right")
    denied = await get(port, aggs_path("AAPL", "5m", "2024-01-02", "2024-01-03", apiKey="right"))
    assert denied.status == 403
    body = denied.json()
    assert list(body) == ["status", "request_id", "message"]
    assert body["status"] == "NOT_AUTHORIZED" and body["message"] == NOT_ENTITLED_MESSAGE
    assert body["message"] == ("You are not entitled to this data. Please upgrade your plan at "
                               "https://polygon.io/pricing")
    assert (await get(port, aggs_path("X:BTCUSD", "1d", JAN_FROM, JAN_TO,
                                      apiKey="right"))).status == 403
    ok = await get(port, aggs_path("MSFT", "5m", "2024-01-02", "2024-01-03", apiKey="right",
                                   limit=50000))
    assert ok.status == 200
    assert ok.json()["results"] == ground_truth(SEED, "MSFT", tf("5m"), JAN_FROM,
                                                JAN_FROM + 2 * 86_400_000 - 1)
    # a wrong key is still "Unknown API Key", for the denied ticker too: auth comes first
    wrong = await get(port, aggs_path("AAPL", "1d", "2024-01-02", "2024-01-03", apiKey="nope"))
    assert wrong.status == 401 and wrong.json()["message"] == "Unknown API Key"
    stats = (await get(port, "/__stats")).json()
    assert stats["not_entitled"] == 2 and stats["unauthorized"] == 1 and stats["ok"] == 1


@pytest.mark.parametrize(("tickers", "timespans", "expected"), [
    # (ticker, timespan) -> refused?
    ((), ("minute", "hour"), {("AAPL", "5m"): True, ("AAPL", "1h"): True, ("AAPL", "1d"): False,
                              ("MSFT", "1m"): True}),
    (("AAPL",), ("minute",), {("AAPL", "5m"): True, ("AAPL", "1h"): False,
                              ("AAPL", "1d"): False, ("MSFT", "1m"): False}),
    (("AAPL",), (), {("AAPL", "5m"): True, ("AAPL", "1w"): True, ("MSFT", "1m"): False}),
])
async def test_not_entitled_timespans(nursery: trio.Nursery, tickers: tuple[str, ...],
                                      timespans: tuple[str, ...],
                                      expected: dict[tuple[str, str], bool]) -> None:
    port = await start(nursery, not_entitled=tickers, not_entitled_timespans=timespans)
    for (ticker, label), refused in expected.items():
        reply = await get(port, aggs_path(ticker, label, "2024-01-02", "2024-01-03", apiKey="k"))
        assert reply.status == (403 if refused else 200), (ticker, label)


# --- outages ---------------------------------------------------------------------------------


async def test_outage_window_from_options_is_exact(nursery: trio.Nursery,
                                                   autojump_clock: trio.abc.Clock) -> None:
    t0 = trio.current_time()
    port = await start(nursery, outages=[(10, 5), (100, 1)], outage_retry_after=7)

    async def status_at(offset: float, target: str = DAY_PATH) -> Reply:
        await trio.sleep_until(t0 + offset)
        reply = await get(port, target)
        assert trio.current_time() == t0 + offset  # answering took no virtual time
        return reply

    seen = {offset: (await status_at(offset)).status
            for offset in (0, 9.999, 10, 12, 14.999, 15, 99.999, 100, 100.999, 101)}
    assert seen == {0: 200, 9.999: 200, 10: 503, 12: 503, 14.999: 503, 15: 200,
                    99.999: 200, 100: 503, 100.999: 503, 101: 200}
    # a third window, to look at an outage answer closely
    await post(port, "/__control/outage?seconds=1")
    during = await get(port, DAY_PATH)
    assert during.status == 503 and during.headers["content-type"].startswith("text/html")
    assert b"503 Service Temporarily Unavailable" in during.body and b"nginx" in during.body
    assert during.headers["retry-after"] == "7"
    # the splits endpoint is down too; the stats and control endpoints are not
    assert (await get(port, "/v3/reference/splits?apiKey=k")).status == 503
    assert (await get(port, "/__control")).status == 200
    stats = await get(port, "/__stats")
    assert stats.status == 200
    assert stats.json()["outage"] == 7  # five in `seen`, `during`, the splits request
    assert stats.json()["requests"] == 12 and stats.json()["ok"] == 5


async def test_outage_control_endpoint_starts_and_ends_an_outage(
        nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    t0 = trio.current_time()
    port = await start(nursery)
    await trio.sleep_until(t0 + 50)
    assert (await get(port, DAY_PATH)).status == 200
    started = await post(port, "/__control/outage?seconds=30")
    assert started.status == 200
    assert started.json()["outages"] == [{"start": 50.0, "end": 80.0}]
    assert (await get(port, DAY_PATH)).status == 503  # at once
    assert "retry-after" not in (await get(port, DAY_PATH)).headers
    await trio.sleep_until(t0 + 79.999)
    assert (await get(port, DAY_PATH)).status == 503
    await trio.sleep_until(t0 + 80)
    assert (await get(port, DAY_PATH)).status == 200
    # a second one, ended early with seconds=0
    await post(port, "/__control/outage?seconds=600")
    await trio.sleep_until(t0 + 90)
    assert (await get(port, DAY_PATH)).status == 503
    ended = await post(port, "/__control/outage?seconds=0")
    assert ended.json()["outages"][-1] == {"start": 80.0, "end": 90.0}
    assert (await get(port, DAY_PATH)).status == 200
    # refused control requests change nothing
    assert (await post(port, "/__control/outage?seconds=-1")).status == 400
    assert (await post(port, "/__control/outage")).status == 400
    assert (await get(port, "/__control/outage?seconds=5")).status == 405
    assert (await get(port, DAY_PATH)).status == 200
    state = (await get(port, "/__control")).json()
    assert len(state["outages"]) == 2
    assert (await get(port, "/__stats")).json()["outage"] == 4


# --- opt-in fault kinds ------------------------------------------------------------------


async def test_opt_in_fault_kinds_answer_200_with_an_error_body(nursery: trio.Nursery) -> None:
    port = await start(nursery, fault_rate=1.0,
                       fault_kinds=("status_error", "status_not_authorized"))
    seen = {"status_error": 0, "status_not_authorized": 0}
    for _ in range(40):
        reply = await get(port, DAY_PATH)
        assert reply.status == 200
        body = reply.json()
        assert "results" not in body and body["request_id"]
        if body["status"] == "ERROR":
            assert body["error"] and "message" not in body
            seen["status_error"] += 1
        else:
            assert body["status"] == "NOT_AUTHORIZED"
            assert body["message"].startswith("You are not entitled to this data")
            seen["status_not_authorized"] += 1
    assert all(seen.values()), seen
    stats = (await get(port, "/__stats")).json()
    assert stats["faults"] == seen and stats["faults_total"] == 40 and stats["ok"] == 0


async def test_default_rotation_is_unchanged_and_all_kinds_can_be_drawn(
        nursery: trio.Nursery) -> None:
    path = aggs_path("AAPL", "1d", "2024-01-02", "2024-01-03", apiKey="k")
    default = await start(nursery, fault_rate=0.5)
    explicit = await start(nursery, fault_rate=0.5, fault_kinds=FAULT_KINDS)
    for port in (default, explicit):
        for _ in range(60):
            await fetch(port, path)
    stats = [(await get(p, "/__stats")).json()["faults"] for p in (default, explicit)]
    assert stats[0] == stats[1] and set(stats[0]) == set(FAULT_KINDS)
    everything = await start(nursery, fault_rate=1.0, fault_kinds=ALL_FAULT_KINDS)
    for _ in range(150):
        await fetch(everything, path)
    drawn = (await get(everything, "/__stats")).json()["faults"]
    assert set(drawn) == set(ALL_FAULT_KINDS) and all(drawn.values()), drawn


def test_fault_kinds_must_be_known() -> None:
    with pytest.raises(ValueError, match="fault_kinds"):
        SimulatorOptions(fault_kinds=("http_500", "meteor_strike"))
    with pytest.raises(ValueError, match="fault_kinds"):
        SimulatorOptions(fault_kinds=())


# --- statistics by path --------------------------------------------------------------------


async def test_stats_count_requests_per_path_kind(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    await get(port, DAY_PATH)
    await get(port, DAY_PATH)
    await get(port, "/v3/reference/splits?apiKey=k")
    await get(port, "/v2/nothing?apiKey=k")
    await get(port, "/__control")
    stats = (await get(port, "/__stats")).json()
    assert stats["requests_by_path"] == {"aggs": 2, "splits": 1, "stats": 1, "control": 1,
                                         "other": 1}
    assert stats["requests"] == 4 and stats["splits_requests"] == 1 and stats["not_found"] == 1


async def test_max_connections_option_reaches_the_server(nursery: trio.Nursery) -> None:
    port = await start(nursery, max_connections=1)
    held = await trio.open_tcp_stream("127.0.0.1", port)
    async with held:
        await held.send_all(f"GET {DAY_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (await held.receive_some(1 << 16)).startswith(b"HTTP/1.1 200 ")
        refused = await get(port, DAY_PATH)
    assert refused.status == 503 and refused.headers["retry-after"] == "1"


# --- options and the command line --------------------------------------------------------------


def parse(*argv: str) -> SimulatorOptions:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    return options_from_args(parser.parse_args(argv))


def test_command_line_sets_every_new_option() -> None:
    options = parse(
        "--not-entitled", "AAPL,X:BTCUSD", "--not-entitled", "MSFT",
        "--not-entitled-timespans", "minute,hour", "--outage", "30:10", "--outage", "100:2.5",
        "--outage-retry-after", "5", "--defects", "X:BTCUSD:0.25", "--defects", "AAPL:0",
        "--fault-kinds", "http_500,status_error", "--split", "NVDA:2024-06-10:1:10",
        "--split", "X:BTCUSD:2024-09-03:5:1:hidden", "--cache-mb", "8", "--max-connections", "50",
    )
    assert options.not_entitled == {"AAPL", "X:BTCUSD", "MSFT"}
    assert options.not_entitled_timespans == {"minute", "hour"}
    assert options.outages == ((30.0, 10.0), (100.0, 2.5)) and options.outage_retry_after == 5
    assert options.defects == {"X:BTCUSD": 0.25, "AAPL": 0.0}
    assert options.fault_kinds == ("http_500", "status_error")
    assert options.splits == (Split("NVDA", "2024-06-10", 1, 10),
                              Split("X:BTCUSD", "2024-09-03", 5, 1, hidden=True))
    assert options.cache_bytes == 8 * 2**20 and options.max_connections == 50
    defaults = parse()
    assert defaults == SimulatorOptions()
    assert defaults.fault_kinds == FAULT_KINDS and not defaults.refuses("AAPL", "minute")


@pytest.mark.parametrize("argv", [
    ("--not-entitled-timespans", "fortnight"), ("--outage", "10"), ("--outage", "10:0"),
    ("--defects", "AAPL"), ("--defects", "AAPL:1.5"), ("--fault-kinds", "nope"),
    ("--split", "NVDA:2024-06-10:1"), ("--split", "NVDA:2024-13-10:1:10"),
    ("--split", "NVDA:2024-06-10:0:10"),
])
def test_command_line_refuses_bad_values(argv: tuple[str, ...],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert "expected" in capsys.readouterr().err


def test_simulate_arguments_round_trip_through_the_command_line() -> None:
    argv = simulate_arguments(
        requests_per_minute=150, latency_ms="10-20", fault_rate=0.1, seed=9, api_key="key",
        now="2025-01-01T00:00Z", window_seconds=6, retry_after=False,
        fault_kinds=["truncated", "status_not_authorized"], not_entitled=["AAPL", "X:BTCUSD"],
        not_entitled_timespans=["minute"], outages=[(5, 10), (60, 0.5)], outage_retry_after=3,
        defects={"MSFT": 0.01}, splits=[Split("NVDA", "2024-06-10", 1, 10, hidden=True),
                                        "TSLA:2022-08-25:1:3"],
        cache_mb=1.5, max_connections=20)
    options = parse(*argv)
    assert options == SimulatorOptions(
        requests_per_minute=150, latency_ms=(10, 20), fault_rate=0.1, seed=9, api_key="key",
        now_ms=1735689600000, window_seconds=6, retry_after=False,
        fault_kinds=("truncated", "status_not_authorized"), not_entitled={"AAPL", "X:BTCUSD"},
        not_entitled_timespans={"minute"}, outages=((5, 10), (60, 0.5)), outage_retry_after=3,
        defects={"MSFT": 0.01}, splits=(Split("NVDA", "2024-06-10", 1, 10, hidden=True),
                                        Split("TSLA", "2022-08-25", 1, 3)),
        cache_bytes=int(1.5 * 2**20), max_connections=20)


def test_simulator_process_passes_the_options_to_the_child() -> None:
    with simulator_process(seed=SEED, not_entitled=["AAPL"], outages=[(3600, 60)],
                           splits=["NVDA:2024-01-10:1:10:hidden"], defects={"MSFT": 1.0},
                           now="2025-01-01T00:00Z") as url, httpx.Client(
            base_url=url, headers={"Authorization": "Bearer k"}) as client:
        assert client.get(aggs_path("AAPL", "1d", "2024-01-02", "2024-01-05")).status_code == 403
        assert client.get(aggs_path("BRK.A", "1d", "2024-01-02", "2024-01-05")).status_code == 200
        splits = client.get("/__control/splits").json()["splits"]
        assert [(s["ticker"], s["hidden"]) for s in splits] == [("NVDA", True)]
        assert client.post(control_url(url, "splits/announce", ticker="NVDA")).status_code == 200
        listed = client.get("/v3/reference/splits").json()["results"]
        assert [s["execution_date"] for s in listed] == ["2024-01-10"]
        assert client.get(aggs_path("MSFT", "1d", "2024-01-02", "2024-01-05")).json()[
            "resultsCount"] >= 4
        assert client.get("/__stats").json()["defects_served"] >= 4


def test_control_url() -> None:
    assert control_url("http://h:1/", "defects", ticker="X:BTCUSD", rate=0.5) == (
        "http://h:1/__control/defects?ticker=X%3ABTCUSD&rate=0.5")
    assert control_url("http://h:1", "outage") == "http://h:1/__control/outage"


def test_procs_helpers_script_a_child_simulator(tmp_path: Path) -> None:
    from tests.integration.procs import control, scripted_simulator, simulator_stats, truth

    hidden = "NVDA:2024-01-10:1:10:hidden"
    with scripted_simulator(tmp_path, seed=SEED, splits=[hidden], now="2025-01-01T00:00Z",
                            outages=[(3600, 1)]) as url, httpx.Client(
            base_url=url, headers={"Authorization": "Bearer k"}) as client:

        def rows(adjusted: bool) -> list[tuple[object, ...]]:
            body = client.get(aggs_path("NVDA", "1d", JAN_FROM, JAN_TO,
                                        adjusted=str(adjusted).lower())).json()
            return [(b["t"], b["o"], b["h"], b["l"], b["c"], b["v"], b.get("vw"), b.get("n"))
                    for b in body["results"]]

        assert rows(True) == truth(SEED, ["NVDA"], ["1d"], JAN_FROM, JAN_TO,
                                         splits=[hidden])[("NVDA", "1d")]
        assert control(url, "splits/announce", ticker="NVDA")["announced"][0]["hidden"] is False
        assert rows(True) == truth(SEED, ["NVDA"], ["1d"], JAN_FROM, JAN_TO)[("NVDA", "1d")]
        assert rows(False) == truth(SEED, ["NVDA"], ["1d"], JAN_FROM, JAN_TO,
                                          splits=[hidden], adjusted=False)[("NVDA", "1d")]
        control(url, "outage", seconds=60)
        assert client.get(aggs_path("NVDA", "1d", JAN_FROM, JAN_TO)).status_code == 503
        stats = simulator_stats(url)
        assert stats["outage"] == 1 and stats["requests_by_path"]["control"] == 2
