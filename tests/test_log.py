"""The one stderr sink: journald prefixes, JSON lines, job context, no secrets.

Journald is detected the way systemd announces it: JOURNAL_STREAM holds the device and inode of
the stream it connected, so the tests point JOURNAL_STREAM at a real file's dev:ino and log
into that file.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from loguru import logger

from daemon.config import parse_config
from daemon.log import running_under_journald, setup_logging
from daemon.market_calendar import et_midnight_ms
from daemon.polygon import PolygonClient
from daemon.ratelimit import RateLimiter
from daemon.scheduler import Scheduler
from daemon.writer import open_writer_channel

from .writing import acknowledge

KEY = "sk_live_0123456789abcdef"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    logger.remove()
    logger.configure(patcher=None)
    logger.add(sys.stderr)  # loguru's default sink, as the other tests expect it


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, object]]:
    """A file that JOURNAL_STREAM names, opened as the sink's stream."""
    path = tmp_path / "journal"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        yield path, stream


def _boom() -> None:
    raise ValueError(f"GET https://api.massive.com/v2/aggs?apiKey={KEY} failed")


def test_journald_priority_prefixes_and_no_timestamps(journal) -> None:
    path, stream = journal
    assert running_under_journald(stream)
    setup_logging("DEBUG", stream=stream)
    logger.debug("debug line")
    logger.info("info line")
    logger.warning("warning line")
    logger.error("error line")
    logger.bind(symbol="BRK.A", timeframe="5m").info("job done: 10 bars in 1 pages")
    try:
        _boom()
    except ValueError:
        logger.exception("page failed")
    stream.flush()
    lines = path.read_text().splitlines()
    assert lines[:5] == [
        "<7>debug line",
        "<6>info line",
        "<4>warning line",
        "<3>error line",
        "<6>[BRK.A 5m] job done: 10 bars in 1 pages",
    ]
    assert lines[5] == "<3>page failed"
    # each traceback line is a journal entry of its own: each carries the priority
    assert len(lines) > 7 and all(line.startswith("<3>") for line in lines[6:])
    assert lines[-1].startswith("<3>ValueError: GET https://api.massive.com/v2/aggs?apiKey=***")
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines)
    assert KEY not in path.read_text()


def test_json_under_journald_keeps_the_priority_prefix(journal) -> None:
    path, stream = journal
    setup_logging("INFO", "json", stream=stream)
    logger.bind(symbol="AAPL", timeframe="1d").warning("attempt 1/5 failed")
    stream.flush()
    (line,) = path.read_text().splitlines()
    assert line.startswith("<4>{")
    record = json.loads(line[3:])
    assert (record["level"], record["symbol"], record["timeframe"]) == ("WARNING", "AAPL", "1d")


def test_journal_stream_of_another_file_is_not_journald(journal, tmp_path: Path) -> None:
    with open(tmp_path / "other", "w") as other:
        assert not running_under_journald(other)
        setup_logging("INFO", stream=other)
        logger.info("plain")
    text = (tmp_path / "other").read_text()
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} INFO    plain\n", text)


def test_json_lines_carry_job_context_and_no_secrets() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream=stream)
    logger.info("backfilld running")
    log = logger.bind(symbol="X:BTCUSD", timeframe="1h")
    log.warning("attempt 1/5 failed: HTTP 429; url https://api.polygon.io/x?apiKey=" + KEY)
    try:
        _boom()
    except ValueError:
        log.exception("job failed")
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["level"] for r in records] == ["INFO", "WARNING", "ERROR"]
    assert "symbol" not in records[0]
    assert all(r["symbol"] == "X:BTCUSD" and r["timeframe"] == "1h" for r in records[1:])
    assert records[1]["message"].endswith("apiKey=***")
    assert records[2]["exception"].startswith("GET https://api.massive.com/v2/aggs?apiKey=***")
    assert "Traceback" in records[2]["traceback"]
    assert KEY not in stream.getvalue()
    assert all(re.match(r"\d{4}-\d\d-\d\dT", r["ts"]) for r in records)


def test_terminal_text_has_time_level_and_context() -> None:
    stream = io.StringIO()
    setup_logging("INFO", stream=stream)
    logger.bind(symbol="AAPL", timeframe="1d").info("job stopped after its current page")
    logger.debug("not shown at INFO")
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d\.\d{3} INFO    \[AAPL 1d\] job stopped after its current page\n",
        stream.getvalue())


def test_tty_gets_colour() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    setup_logging("INFO", stream=stream)
    logger.warning("coloured")
    assert "\x1b[" in stream.getvalue()


def test_tracebacks_show_no_variable_values() -> None:
    stream = io.StringIO()
    setup_logging("INFO", stream=stream)

    def fetch(api_key: str) -> None:
        raise RuntimeError("request failed")

    try:
        fetch(KEY)
    except RuntimeError:
        logger.exception("failed")
    assert "RuntimeError: request failed" in stream.getvalue()
    assert KEY not in stream.getvalue()  # diagnose=False: no `api_key = '...'` annotations


async def test_every_line_about_a_job_names_symbol_and_timeframe(
    autojump_clock: object,
) -> None:
    # A real scheduler and client (MockTransport): a 503 retried, a bar rejected, a job done.
    stream = io.StringIO()
    setup_logging("DEBUG", "json", stream=stream)
    day = 86_400_000
    start = et_midnight_ms(dt.date(2024, 1, 2))
    answers = {"AAPL": [503, 200], "BRK.A": [200]}

    def handler(request: httpx.Request) -> httpx.Response:
        symbol = request.url.path.split("/")[4]
        status = answers[symbol].pop(0) if answers[symbol] else 200
        if status == 503:
            return httpx.Response(503, text="<html>down</html>")
        h, lo = (11.0, 9.0) if symbol == "AAPL" else (9.0, 11.0)  # BRK.A: high < low
        bar = {"o": 10.0, "h": h, "l": lo, "c": 10.0, "v": 1.0, "t": start + day}
        return httpx.Response(200, json={"status": "OK", "results": [bar], "resultsCount": 1,
                                         "queryCount": 1, "request_id": "r", "ticker": symbol})

    cfg = parse_config(
        f'[polygon]\napi_key = "{KEY}"\nbase_url = "https://api.test"\n'
        '[retry]\nmin_seconds = 1\n'
        '[backfill]\nsymbols = ["AAPL", "BRK.A"]\ntimeframes = ["1d"]\nstart = "2024-01-02"\n'
        'end = "2024-01-05"\n', env={})
    limiter = RateLimiter(0, max_in_flight=4)
    send, receive = open_writer_channel(4)

    async def no_coverage(symbol: str) -> dict:
        return {}

    async with PolygonClient(cfg.polygon, cfg.retry, limiter=limiter,
                             transport=httpx.MockTransport(handler)) as client:
        sched = Scheduler(cfg, client, send, series_state=no_coverage,
                          today=lambda: dt.date(2024, 1, 10))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(acknowledge, receive)
            await sched.run(once=True)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    about_jobs = [r for r in records if not r["message"].startswith("cycle ")]
    assert {r["message"].split(":")[0] for r in about_jobs} >= {
        "attempt 1/5 failed", "job done", "1 bar(s) quarantined (asked again next top-up)"}
    for r in about_jobs:
        assert (r.get("symbol"), r.get("timeframe")) in {("AAPL", "1d"), ("BRK.A", "1d")}, r
    assert KEY not in stream.getvalue()
