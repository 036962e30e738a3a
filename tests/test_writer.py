"""The writer against a real PostgreSQL: COPY + upsert + checkpoint in one transaction."""

from __future__ import annotations

import attrs
import msgspec
import psycopg
import pytest
import trio

from daemon import db
from daemon.bars import Bar
from daemon.jobs import JobOutcome
from daemon.spans import spans
from daemon.writer import Message, Writer, WriterStatistics, open_writer_channel

from .writing import Job, write_all, write_queued

DAY = 86_400_000
T0 = 1_700_000_000_000  # 2023-11-14


def bar(t: int, close: float = 10.0, vw: float | None = 10.0, n: int | None = 5) -> Bar:
    return Bar(t=t, o=10.0, h=12.0, l=9.0, c=close, v=1.5e4, vw=vw, n=n)


def rows(url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT symbol, timeframe, ts, open, high, low, close, volume, vwap, trades "
            "FROM bars ORDER BY symbol, timeframe, ts"
        ).fetchall()


async def test_page_and_checkpoint_commit_together(database: str) -> None:
    job = Job("BRK.A", "1d", T0, T0 + 10 * DAY)
    bars = [bar(T0 + i * DAY) for i in range(3)]
    writer = await write_all(database, [job.page(bars), job.done()])
    assert job.receipt.finished.is_set() and job.receipt.outcome is JobOutcome.OK
    assert job.receipt.bars_written == 3 and job.receipt.pages_written == 1
    got = rows(database)
    assert [db.to_ms(r[2]) for r in got] == [b.t for b in bars]
    assert got[0][:2] == ("BRK.A", "1d")
    assert got[0][3:] == (10.0, 12.0, 9.0, 10.0, 15000.0, 10.0, 5)
    assert db.read_coverage(database) == {("BRK.A", "1d"): spans([(T0, T0 + 2 * DAY + 1)])}
    assert writer.statistics().bars_written == 3


async def test_rewrite_is_idempotent_and_applies_revisions(database: str) -> None:
    job = Job("X:BTCUSD", "1h", T0, T0 + DAY)
    first = [bar(T0), bar(T0 + 3_600_000, vw=None, n=None)]
    revised = [bar(T0), bar(T0 + 3_600_000, close=11.5)]
    await write_all(database, [job.page(first), job.page(first),
                               job.page(revised), job.done()])
    got = rows(database)
    assert len(got) == 2
    assert got[1][6] == 11.5 and got[1][8] == 10.0 and got[1][9] == 5
    # nulls stay nulls when the API sends none
    job2 = Job("AAPL", "1h", T0, T0 + DAY)
    await write_all(database, [job2.page([bar(T0, vw=None, n=None)])])
    assert rows(database)[0][8:] == (None, None)


async def test_partitions_created_across_years(database: str) -> None:
    job = Job("I:SPX", "1d", 0, 2**62)
    years = [1_072_915_200_000, 1_704_067_200_000, 1_735_689_600_000]  # 2004, 2024, 2025
    await write_all(database, [job.page([bar(t) for t in years]), job.done()])
    with psycopg.connect(database) as conn:
        parts = sorted(r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'bars'::regclass"))
    assert parts == [f"bars_y{y}" for y in range(2004, 2026)]
    assert len(rows(database)) == 3


async def test_coverage_is_a_set_of_spans_in_any_order(database: str) -> None:
    a = Job("A", "1d", T0, T0 + 100 * DAY)
    # two sub-ranges of one series, committed out of order, leave a hole between them
    await write_all(database, [a.page([bar(T0 + 60 * DAY)], (T0 + 50 * DAY, T0 + 70 * DAY)),
                               a.page([bar(T0 + 10 * DAY)], (T0, T0 + 20 * DAY))])
    assert db.read_coverage(database)[("A", "1d")] == spans(
        [(T0, T0 + 20 * DAY), (T0 + 50 * DAY, T0 + 70 * DAY)])
    # an empty page still proves its span (no trades there); overlaps merge
    await write_all(database, [a.page([], (T0 + 15 * DAY, T0 + 55 * DAY))])
    assert db.read_coverage(database)[("A", "1d")] == spans([(T0, T0 + 70 * DAY)])
    # history extended backwards: a span before the rest is simply one more interval
    await write_all(database, [a.page([bar(T0 - 50 * DAY)], (T0 - 50 * DAY, T0 - 40 * DAY))])
    assert db.read_coverage(database)[("A", "1d")] == spans(
        [(T0 - 50 * DAY, T0 - 40 * DAY), (T0, T0 + 70 * DAY)])
    assert [db.to_ms(r[2]) for r in rows(database)] == [
        T0 - 50 * DAY, T0 + 10 * DAY, T0 + 60 * DAY]


async def test_rejected_page_fails_job_and_drops_later_pages(database: str) -> None:
    job = Job("A", "1d", T0, T0 + 10 * DAY)
    ok = [bar(T0)]
    # a bar PostgreSQL cannot store (its year is past timestamptz): the page is rejected
    bad = [Bar(t=2**50, o=1, h=1, l=1, c=1, v=1)]  # past timestamptz: rejected
    later = [bar(T0 + 2 * DAY)]
    writer = await write_all(database, [job.page(ok), job.page(bad),
                                        job.page(later), job.done()])
    assert job.receipt.finished.is_set() and job.receipt.outcome is JobOutcome.FAILED
    assert job.receipt.write_error is not None and "rejected" in job.receipt.write_error
    assert [db.to_ms(r[2]) for r in rows(database)] == [T0]
    # the rejected page's span stays uncovered: the next plan asks for it again
    assert db.read_coverage(database)[("A", "1d")] == spans([(T0, T0 + 1)])
    assert writer.statistics().write_errors == 1


async def test_writer_survives_losing_its_connection(database: str) -> None:
    job = Job("A", "1d", T0, T0 + 10 * DAY)
    send, receive = open_writer_channel(4)
    writer = Writer(database, receive)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await send.send(job.page([bar(T0)]))
        await send.send(job.done())
        await job.receipt.finished.wait()
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        again = Job("A", "1d", T0, T0 + 10 * DAY)
        await send.send(again.page([bar(T0 + DAY)]))
        await send.send(again.done())
        await send.aclose()
    assert again.receipt.outcome is JobOutcome.OK and again.receipt.bars_written == 1
    assert len(rows(database)) == 2
    assert writer.statistics().reconnects == 1


@pytest.mark.parametrize("n", [50_000])
async def test_large_page(database: str, n: int) -> None:
    job = Job("SPY", "5m", T0, T0 + n * 300_000)
    bars = [bar(T0 + i * 300_000) for i in range(n)]
    await write_all(database, [job.page(bars), job.done()])
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM bars").fetchone() == (n,)


async def test_quarantined_spots_stay_out_of_coverage_until_a_good_answer(
        database: str) -> None:
    from daemon.bars import Quarantined
    from daemon.writer import QuarantinedSpan

    job = Job("A", "1d", T0, T0 + 10 * DAY)
    span = (T0, T0 + 3 * DAY)
    bad = QuarantinedSpan((T0 + DAY, T0 + DAY + 1),
                          Quarantined(T0 + DAY, '{"t":1,"h":1,"l":2}', "high 1.0 < low 2.0"))
    first = job.page([bar(T0), bar(T0 + 2 * DAY)], span)
    await write_all(database, [attrs.evolve(first, quarantined=(bad,))])
    assert db.read_coverage(database)[("A", "1d")] == spans(
        [(T0, T0 + DAY), (T0 + DAY + 1, T0 + 3 * DAY)])
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT t, reason, times_seen FROM quarantined_bars").fetchall() == [
            (T0 + DAY, "high 1.0 < low 2.0", 1)]
    # asked again, still bad: seen twice, still a hole
    await write_all(database, [attrs.evolve(first, quarantined=(bad,))])
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT times_seen FROM quarantined_bars").fetchall() == [(2,)]
    # the vendor corrected it: the bar is written, the entry goes, the hole closes
    await write_all(database, [job.page([bar(T0), bar(T0 + DAY), bar(T0 + 2 * DAY)], span)])
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM quarantined_bars").fetchall() == [(0,)]
    assert db.read_coverage(database)[("A", "1d")] == spans([(T0, T0 + 3 * DAY)])
    assert [db.to_ms(r[2]) for r in rows(database)] == [T0, T0 + DAY, T0 + 2 * DAY]


async def test_a_new_split_rescales_history_in_one_transaction_and_uncovers_it(
        database: str) -> None:
    import datetime as dt

    from daemon.jobs import Receipt
    from daemon.market_calendar import et_date, et_midnight_ms
    from daemon.splits import Split, SplitsFound

    job = Job("NVDA", "1d", T0, T0 + 10 * DAY)
    other = Job("MSFT", "1d", T0, T0 + 10 * DAY)
    days = [T0 + i * DAY for i in range(6)]
    await write_all(database, [job.page([bar(t) for t in days]),
                               other.page([bar(t) for t in days])])
    execution = et_date(T0 + 3 * DAY)
    ten_for_one = Split(execution, "NVDA", 1, 10, "E1")
    baseline = Receipt()
    # the first check ever: recorded, nothing applied (the data was fetched knowing it)
    await write_all(database, [SplitsFound((ten_for_one,), execution, True,
                                           frozenset({"NVDA", "MSFT"}), baseline)])
    assert rows(database)[0][3] == 10.0 and baseline.finished.is_set()
    reverse = Split(execution + dt.timedelta(days=1), "NVDA", 5, 1, "E2")
    await write_all(database, [SplitsFound((ten_for_one, reverse), execution, False,
                                           frozenset({"NVDA", "MSFT"}), Receipt())])
    got = {(r[0], db.to_ms(r[2])): r for r in rows(database)}
    before = et_midnight_ms(reverse.execution_date)
    for t in days:
        nvda, msft = got[("NVDA", t)], got[("MSFT", t)]
        if t < before:  # prices x 5, volumes / 5 (only the new split applies)
            assert nvda[3:] == (50.0, 60.0, 45.0, 50.0, 3000.0, 50.0, 5)
        else:
            assert nvda[3:] == msft[3:]
        assert msft[3:] == (10.0, 12.0, 9.0, 10.0, 15000.0, 10.0, 5)
    # the history before it leaves coverage: the next plan fetches it again, exactly
    assert db.read_coverage(database)[("NVDA", "1d")] == spans([(before, T0 + 5 * DAY + 1)])
    assert db.read_coverage(database)[("MSFT", "1d")] == spans([(T0, T0 + 5 * DAY + 1)])
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT id, applied_at IS NOT NULL FROM splits ORDER BY id"
                            ).fetchall() == [("E1", False), ("E2", True)]
        dirty = conn.execute("SELECT symbol, from_ts FROM features_dirty"
                             " WHERE symbol = 'NVDA'").fetchall()
    assert dirty == [("NVDA", db.from_ms(T0))]  # features from the first rescaled bar


async def test_coverage_summary_counts_the_holes_between_spans(database: str) -> None:
    from daemon.monitoring import CoverageSummary, read_coverage_summary
    job = Job("HOLE", "1d", T0, T0 + 10 * DAY)
    first = job.page([bar(T0)], span=(T0, T0 + 2 * DAY))
    second = job.page([bar(T0 + 5 * DAY)], span=(T0 + 5 * DAY, T0 + 7 * DAY))
    await write_all(database, [first, second, job.done()])
    assert read_coverage_summary(database) == {
        ("HOLE", "1d"): CoverageSummary(T0, T0 + 7 * DAY, 1)}


async def test_copy_straight_into_bars_and_the_upsert_give_identical_tables(
        database: str) -> None:
    # The same final bars by both paths: NEW's page finds nothing stored in its span and is
    # copied straight into `bars`; OLD's final page overlaps an earlier version of itself and
    # goes through the stage and the upsert (nulls, both years and revisions included).
    final = [bar(T0 + i * 7 * DAY, close=10.0 + i / 8, vw=None if i % 3 == 0 else 10.0,
                 n=None if i % 4 == 1 else i) for i in range(12)]  # 2023-11 .. 2024-01
    earlier = [msgspec.structs.replace(b, c=9.5, vw=9.0) for b in final[::2]]
    new, old = (Job(symbol, "1d", T0, T0 + 100 * DAY) for symbol in ("NEW", "OLD"))
    direct = await write_all(database, [new.page(final), new.done()])
    assert direct.statistics().plain_pages == 1
    upsert = await write_all(database, [old.page(earlier), old.page(final), old.done()])
    assert upsert.statistics().plain_pages == 1  # only the first page: the second overlaps
    by_symbol: dict[object, list[tuple[object, ...]]] = {"NEW": [], "OLD": []}
    for r in rows(database):
        by_symbol[r[0]].append(r[1:])
    assert len(by_symbol["NEW"]) == len(final)
    assert by_symbol["NEW"] == by_symbol["OLD"]
    assert db.read_coverage(database)[("NEW", "1d")] == db.read_coverage(database)[("OLD", "1d")]


async def test_rows_encoded_for_another_series_are_refused_whole(database: str) -> None:
    job = Job("A", "1d", T0, T0 + 10 * DAY)
    other = Job("B", "1d", T0, T0 + 10 * DAY).page([bar(T0), bar(T0 + DAY)])
    mislabelled = attrs.evolve(other, series=job.series, receipt=job.receipt)
    writer = await write_all(database, [mislabelled, job.done()])
    assert job.receipt.outcome is JobOutcome.FAILED
    assert job.receipt.write_error is not None and "not of A 1d" in job.receipt.write_error
    assert rows(database) == [] and db.read_coverage(database) == {}
    assert writer.statistics().write_errors == 1


async def test_a_statement_refused_after_the_copy_leaves_nothing_of_the_page(
        database: str) -> None:
    """The statements after the COPY go in one pipelined round trip with the COMMIT: one of
    them refused (here the quarantine row: PostgreSQL's text holds no NUL byte) rolls the
    whole page back, bars and coverage too, and the writer goes on with the next job."""
    from daemon.bars import Quarantined
    from daemon.writer import QuarantinedSpan

    job = Job("A", "1d", T0, T0 + 10 * DAY)
    refused = QuarantinedSpan((T0 + DAY, T0 + DAY + 1),
                              Quarantined(T0 + DAY, "{\x00}", "a reason"))
    page = attrs.evolve(job.page([bar(T0), bar(T0 + 2 * DAY)], (T0, T0 + 3 * DAY)),
                        quarantined=(refused,))
    other = Job("B", "1d", T0, T0 + 10 * DAY)
    writer = await write_all(database, [page, job.done(), other.page([bar(T0)]), other.done()])
    assert job.receipt.outcome is JobOutcome.FAILED
    assert job.receipt.write_error is not None and "rejected" in job.receipt.write_error
    assert [(r[0], db.to_ms(r[2])) for r in rows(database)] == [("B", T0)]
    assert ("A", "1d") not in db.read_coverage(database)
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM quarantined_bars").fetchone() == (0,)
        assert conn.execute("SELECT symbol FROM features_dirty").fetchall() == [("B",)]
    assert other.receipt.outcome is JobOutcome.OK
    assert writer.statistics().write_errors == 1


def features_dirty(url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT symbol, from_ts FROM features_dirty ORDER BY symbol"
                            ).fetchall()


async def test_queued_pages_commit_in_one_transaction_as_if_written_one_by_one(
        database: str, second_database: str) -> None:
    """Pages queued behind one another share a transaction: new pages of three series, then
    revisions of two stored ones (both through the stage, one after the other in one
    transaction), each batch followed by the jobs' own transactions. The bars, coverage,
    features markers and receipts equal those of the same pages written one at a time."""
    def messages() -> tuple[list[Job], list[Message]]:
        jobs = [Job(symbol, "1d", T0, T0 + 30 * DAY) for symbol in ("A", "B", "C")]
        first = [job.page([bar(T0 + i * DAY) for i in range(3)], (T0, T0 + 3 * DAY))
                 for job in jobs]
        second = [job.page([bar(T0 + i * DAY) for i in range(5, 8)], (T0 + 5 * DAY,
                                                                     T0 + 8 * DAY))
                  for job in jobs]
        return jobs, [*first, *second, *(job.done() for job in jobs)]

    def revisions() -> tuple[list[Job], list[Message]]:
        jobs = [Job(symbol, "1d", T0, T0 + 30 * DAY) for symbol in ("A", "B")]
        pages = [job.page([bar(T0 + DAY, close=9.5 + k), bar(T0 + 2 * DAY)], (T0, T0 + 3 * DAY))
                 for k, job in enumerate(jobs)]
        return jobs, [*pages, *(job.done() for job in jobs)]

    batched: dict[str, tuple[WriterStatistics, WriterStatistics]] = {}
    for url, write in ((database, write_queued), (second_database, write_all)):
        jobs, queued = messages()
        writer = await write(url, queued)
        revised, again = revisions()
        later = await write(url, again)
        assert all(job.receipt.outcome is JobOutcome.OK for job in [*jobs, *revised])
        assert [job.receipt.bars_written for job in jobs] == [6, 6, 6]
        assert [job.receipt.pages_written for job in revised] == [1, 1]
        batched[url] = (writer.statistics(), later.statistics())
    new_pages, revised_pages = batched[database]
    assert (new_pages.pages_written, new_pages.transactions) == (6, 1 + 3)
    assert (revised_pages.pages_written, revised_pages.transactions) == (2, 1 + 2)
    assert new_pages.plain_pages == 6 and revised_pages.plain_pages == 0
    assert rows(database) == rows(second_database)
    closes = {r[0]: r[6] for r in rows(database) if db.to_ms(r[2]) == T0 + DAY}
    assert closes == {"A": 9.5, "B": 10.5, "C": 10.0}
    assert db.read_coverage(database) == db.read_coverage(second_database)
    assert features_dirty(database) == features_dirty(second_database)
    assert [(r[0], db.to_ms(r[1])) for r in features_dirty(database)] == [
        ("A", T0), ("B", T0), ("C", T0)]


async def test_a_page_refused_in_a_batch_fails_its_job_alone(database: str) -> None:
    """One page the database refuses rolls the batch back whole; its pages are then written
    one by one: the other jobs' pages all land, the refused job keeps the pages before the
    refused one and drops those after it."""
    a, b, c = (Job(symbol, "1d", T0, T0 + 10 * DAY) for symbol in ("A", "B", "C"))
    bad = [Bar(t=2**50, o=1, h=1, l=1, c=1, v=1)]  # past timestamptz: rejected
    writer = await write_queued(database, [
        a.page([bar(T0)]), b.page([bar(T0)]), b.page(bad), a.page([bar(T0 + 2 * DAY)]),
        b.page([bar(T0 + 3 * DAY)]), c.page([bar(T0)]), a.done(), b.done(), c.done()])
    assert [job.receipt.outcome for job in (a, b, c)] == [
        JobOutcome.OK, JobOutcome.FAILED, JobOutcome.OK]
    assert b.receipt.write_error is not None and "rejected" in b.receipt.write_error
    assert [(r[0], db.to_ms(r[2])) for r in rows(database)] == [
        ("A", T0), ("A", T0 + 2 * DAY), ("B", T0), ("C", T0)]
    assert db.read_coverage(database)[("B", "1d")] == spans([(T0, T0 + 1)])
    stats = writer.statistics()
    assert stats.write_errors == 1 and stats.pages_written == 4


async def test_a_page_overlapping_one_queued_before_it_is_written_after_that_one(
        database: str) -> None:
    """Two versions of one span queued back to back go in separate transactions, in order:
    the second finds the first committed, goes through the upsert, and its revision wins."""
    job = Job("A", "1d", T0, T0 + 10 * DAY)
    first = job.page([bar(T0), bar(T0 + DAY)], (T0, T0 + 2 * DAY))
    revised = job.page([bar(T0), bar(T0 + DAY, close=11.0)], (T0, T0 + 2 * DAY))
    other = Job("B", "1d", T0, T0 + 10 * DAY)
    writer = await write_queued(database, [first, other.page([bar(T0)]), revised, job.done(),
                                           other.done()])
    assert [(r[0], r[6]) for r in rows(database)] == [("A", 10.0), ("A", 11.0), ("B", 10.0)]
    stats = writer.statistics()
    assert stats.transactions == 2 + 2 and stats.plain_pages == 2
    assert job.receipt.pages_written == 2
