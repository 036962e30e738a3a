"""The progress line of `run`: a pure function of a snapshot, drawn only for a person at a
terminal (never under journald, never into a pipe), log lines still scrolling above it."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import attrs
import pytest
import trio
from loguru import logger
from rich.console import Console

from daemon import progress
from daemon.breaker import BreakerState, CircuitBreaker
from daemon.cycles import CycleSnapshot, SchedulerState
from daemon.errors import DatabaseUnavailable
from daemon.jobs import JobOutcome
from daemon.progress import CycleEstimate, RateMeter, render, renderable, should_draw

from .snapshots import cycle, job, snapshot
from .test_architecture import _graph


def running(requests: int = 0) -> CycleSnapshot:
    jobs = (job("A", JobOutcome.OK, bars=500), job("B", JobOutcome.OK, bars=250),
            job("C", None, bars=10))
    return attrs.evolve(cycle(number=2, jobs=jobs), requests=requests)


def test_a_running_cycle_shows_jobs_bars_rate_429s_circuit_and_eta() -> None:
    snap = snapshot(cycle=running(requests=40))
    snap = attrs.evolve(snap, api=attrs.evolve(snap.api, rate_limited_count=3))
    estimate = CycleEstimate(cycle=2, jobs=8, requests=100, baseline_requests=0)
    line = render(snap, estimate, rate=60.0)
    assert line.startswith("cycle 2  jobs 2/8  bars 760  ")
    assert "req/min 60/150" in line and "429s 3" in line and "circuit closed" in line
    assert line.endswith("ETA 1m")  # 60 requests left at 60 a minute


def test_the_eta_counts_from_the_estimate_s_baseline_and_falls_back_to_the_budget() -> None:
    snap = snapshot(cycle=running(requests=70))
    later = CycleEstimate(cycle=2, jobs=3, requests=100, baseline_requests=40)
    assert render(snap, later, rate=None).endswith("ETA 28s")  # 70 left at 150 a minute
    assert render(snap, attrs.evolve(later, requests=20), rate=None).endswith("ETA soon")
    # an estimate of another cycle, or none: the configured series, no ETA
    assert "jobs 2/20" in render(snap, attrs.evolve(later, cycle=1), rate=None)
    assert render(snap, None, rate=None).endswith("ETA -")


def test_unlimited_plans_and_an_open_circuit_read_as_such() -> None:
    snap = snapshot(cycle=running())
    snap = attrs.evolve(snap, limiter=attrs.evolve(snap.limiter, effective_per_minute=0.0),
                        breaker=attrs.evolve(CircuitBreaker().statistics(),
                                             state=BreakerState.OPEN))
    line = render(snap, None, rate=None)
    assert "req/min -/unlimited" in line and "circuit open" in line


def test_between_cycles_it_says_when_the_next_one_comes() -> None:
    last = cycle(number=4, finished=150.0, jobs=(job("A", JobOutcome.FAILED),))
    snap = snapshot(now=200.0, last_cycle=last, next_cycle_at=500.0, bars_written=1234)
    line = render(snap, None, rate=12.0)
    assert line.startswith("waiting: next cycle in 5m  last cycle 4: 1 jobs, 1 failed  "
                           "bars 1,234")
    assert render(snapshot(), None, None).startswith("starting")
    stopping = snapshot(state=SchedulerState.STOPPING)
    assert render(stopping, None, None).startswith("stopping")


def test_the_renderable_draws_a_bar_beside_the_line() -> None:
    snap = snapshot(cycle=running())
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(renderable(snap, None, None))
    text = out.getvalue()
    assert "cycle 2  jobs 2/20" in text and "━" in text


def test_the_rate_is_measured_over_the_last_minute() -> None:
    meter = RateMeter(window=60.0)
    assert meter.per_minute() is None
    meter.add(0.0, 0)
    meter.add(0.5, 10)
    assert meter.per_minute() is None  # not a second yet
    for t in range(1, 121):
        meter.add(float(t), 2 * t)  # 2 requests a second
    assert meter.per_minute() == pytest.approx(120.0)
    meter.add(180.0, 240)  # a minute with nothing sent
    assert meter.per_minute() == pytest.approx(0.0, abs=3.0)


def test_only_a_terminal_that_is_not_the_journal_gets_the_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert not should_draw(io.StringIO())
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
            assert should_draw(tty)
            st = os.fstat(slave)
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
            assert not should_draw(tty)  # systemd connected this very stream to the journal
    finally:
        os.close(master)
        os.close(slave)


def test_without_a_terminal_run_is_plain_trio_run() -> None:
    async def main() -> str:
        return "done"

    out = io.StringIO()
    assert progress.run(main, lambda: snapshot(), "postgresql://127.0.0.1:1/x",
                        stream=out) == "done"
    assert out.getvalue() == ""


def test_on_a_terminal_log_lines_scroll_above_the_line(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setattr(progress, "REFRESH_SECONDS", 0.05)
    master, slave = os.openpty()
    os.set_blocking(master, False)
    chunks: list[bytes] = []

    def drain() -> None:
        try:
            while data := os.read(master, 65536):
                chunks.append(data)
        except BlockingIOError:
            pass

    async def main() -> int:
        for i in range(3):
            logger.info("log line {}", i)
            await trio.sleep(0.1)
            await trio.to_thread.run_sync(drain)
        return 7

    try:
        with open(slave, "w", closefd=False) as tty:
            monkeypatch.setattr("sys.stderr", tty)
            result = progress.run(main, lambda: snapshot(cycle=running()),
                                  "postgresql://127.0.0.1:1/x", stream=tty)
            time.sleep(0.05)
            drain()
    finally:
        logger.remove()
        os.close(master)
        os.close(slave)
    text = b"".join(chunks).decode(errors="replace")
    assert result == 7
    assert all(f"log line {i}" in text for i in range(3))
    assert "cycle 2  jobs 2/20" in text
    # the progress line was drawn after the first log line: the logs print above it
    assert text.index("log line 0") < text.rindex("cycle 2")


def test_the_progress_line_reads_snapshots_never_the_parts() -> None:
    assert not _graph()["daemon.progress"] & {"daemon.compose", "daemon.app",
                                              "daemon.scheduler", "daemon.writer"}


def test_on_a_terminal_run_s_error_leaves_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` maps DatabaseError to exit 3: it must not come out wrapped in a group."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    master, slave = os.openpty()
    os.set_blocking(master, False)

    async def main() -> None:
        await trio.sleep(0.01)
        raise DatabaseUnavailable("cannot connect to PostgreSQL")

    try:
        with open(slave, "w", closefd=False) as tty:
            monkeypatch.setattr("sys.stderr", tty)
            with pytest.raises(DatabaseUnavailable):
                progress.run(main, lambda: snapshot(), "postgresql://127.0.0.1:1/x",
                             stream=tty)
    finally:
        logger.remove()
        os.close(master)
        os.close(slave)
