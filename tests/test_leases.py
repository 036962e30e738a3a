"""Leases, fencing and the shared budget against a real PostgreSQL: several coordinators on one
database behave as several daemons would."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator

import psycopg
import pytest
import trio

from daemon import db
from daemon.bars import Bar
from daemon.budget import SharedBudget, key_hash
from daemon.config import Secret
from daemon.jobs import JobOutcome, Lease, SeriesKey
from daemon.leases import Coordinator, Identity, reap_local
from daemon.writer import JobFinished, PageWrite, Writer, open_writer_channel

from .writing import Job, write_all, write_queued

DAY = 86_400_000
T0 = 1_700_000_000_000
Make = Callable[..., Coordinator]
FAR_PAST = 0.0  # due_before: anything done at any time counts as done


@pytest.fixture
def coordinators() -> Iterator[list[Coordinator]]:
    made: list[Coordinator] = []
    yield made
    for c in made:
        c.close()


@pytest.fixture
def coordinator(database: str, coordinators: list[Coordinator]) -> Make:
    """Coordinators on the test's database, as several daemons (closed after the test)."""
    def make(name: str, *, lease_seconds: float = 30.0, host: str = "host",
             pid: int = 1) -> Coordinator:
        c = Coordinator(database, Identity(f"{host}:{name}", name, host, pid),
                        lease_seconds=lease_seconds)
        coordinators.append(c)
        return c
    return make


def expire(url: str, holder: str) -> None:
    """What time does to a holder that stopped renewing: its leases lapse."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE series_leases SET expires_at = now() - interval '1 second' "
                     "WHERE holder = %s", (holder,))


def lease_rows(url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT symbol, timeframe, holder, fence FROM series_leases "
                            "ORDER BY symbol, timeframe").fetchall()


async def test_a_series_is_held_by_one_instance_at_a_time(database: str, coordinator: Make) -> None:
    a, b = coordinator("a"), coordinator("b")
    got_a = await a.claim("AAPL", ["1d", "5m"], due_before=FAR_PAST)
    got_b = await b.claim("AAPL", ["1d", "5m"], due_before=FAR_PAST)
    assert set(got_a.granted) == {"1d", "5m"} and got_a.held_elsewhere == frozenset()
    assert got_b.granted == {} and got_b.held_elsewhere == {"1d", "5m"}
    assert a.statistics().leases_held == 2 and b.statistics().leases_held == 0
    assert [r[2] for r in lease_rows(database)] == ["host:a", "host:a"]


async def test_concurrent_claims_never_grant_a_series_twice(
        database: str, coordinator: Make) -> None:
    coords = [coordinator(f"c{i}") for i in range(4)]
    symbols = [f"S{i}" for i in range(12)]
    granted: dict[str, list[str]] = {s: [] for s in symbols}

    async def claimer(c: Coordinator) -> None:
        for s in symbols:
            claim = await c.claim(s, ["1d"], due_before=FAR_PAST)
            if claim.granted:
                granted[s].append(c.identity.id)

    async with trio.open_nursery() as nursery:
        for c in coords:
            nursery.start_soon(claimer, c)
    assert all(len(holders) == 1 for holders in granted.values()), granted


async def test_a_lapsed_lease_is_taken_over_with_a_new_fence(
        database: str, coordinator: Make) -> None:
    a, b = coordinator("a"), coordinator("b")
    first = (await a.claim("MSFT", ["1d"], due_before=FAR_PAST)).granted["1d"]
    expire(database, "host:a")
    second = (await b.claim("MSFT", ["1d"], due_before=FAR_PAST)).granted["1d"]
    assert second.holder == "host:b" and second.fence == first.fence + 1
    assert b.statistics().takeovers == 1 and a.statistics().takeovers == 0
    # a's lease is gone: a claim by a now waits for b
    assert (await a.claim("MSFT", ["1d"], due_before=FAR_PAST)).held_elsewhere == {"1d"}


async def test_the_fenced_writer_refuses_a_page_after_a_takeover(
        database: str, coordinator: Make) -> None:
    """A holder paused past its lease (a zombie) commits nothing once another took over: its
    page is refused inside the transaction, the job ends cancelled, and the takeover's release
    is untouched by the zombie's."""
    a, b = coordinator("a"), coordinator("b")
    old = (await a.claim("IBM", ["1d"], due_before=FAR_PAST)).granted["1d"]
    expire(database, "host:a")
    new = (await b.claim("IBM", ["1d"], due_before=FAR_PAST)).granted["1d"]

    bars = [Bar(t=T0 + i * DAY, o=1.0, h=2.0, l=0.5, c=1.5, v=10.0, vw=1.2, n=3)
            for i in range(3)]
    zombie = Job("IBM", "1d", T0, T0 + 3 * DAY)
    page = zombie.page(bars)
    writer = await write_all(database, [
        PageWrite(page.series, page.rows, page.span, page.receipt, lease=old),
        JobFinished(zombie.series, zombie.fetch, zombie.receipt, lease=old)])
    assert zombie.receipt.lease_lost and zombie.receipt.outcome is JobOutcome.CANCELLED
    assert writer.statistics().lease_refusals == 1
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM bars").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM coverage WHERE symbol = 'IBM'"
                            ).fetchone() == (0,)
    assert lease_rows(database) == [("IBM", "1d", "host:b", new.fence)]

    # the new holder's pages commit, and its release marks the series done by it
    fresh = Job("IBM", "1d", T0, T0 + 3 * DAY)
    page = fresh.page(bars)
    await write_all(database, [
        PageWrite(page.series, page.rows, page.span, page.receipt, lease=new),
        JobFinished(fresh.series, fresh.fetch, fresh.receipt, lease=new)])
    assert fresh.receipt.outcome is JobOutcome.OK and fresh.receipt.bars_written == 3
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT holder, done_by FROM series_leases").fetchone() == (
            None, "host:b")


async def test_a_lost_lease_in_a_batch_of_pages_refuses_that_series_only(
        database: str, coordinator: Make) -> None:
    """A zombie's page queued between live pages of another series: the batch's transaction
    is refused whole, then each page is written alone; the live series' pages all commit."""
    a, b = coordinator("a"), coordinator("b")
    old = (await a.claim("IBM", ["1d"], due_before=FAR_PAST)).granted["1d"]
    live = (await a.claim("SAP", ["1d"], due_before=FAR_PAST)).granted["1d"]
    expire(database, "host:a")
    await b.claim("IBM", ["1d"], due_before=FAR_PAST)
    with psycopg.connect(database, autocommit=True) as conn:  # SAP's lease is still a's
        conn.execute("UPDATE series_leases SET expires_at = now() + interval '1 hour' "
                     "WHERE symbol = 'SAP'")

    def page(job: Job, day: int, lease: Lease) -> PageWrite:
        bars = [Bar(t=T0 + day * DAY, o=1.0, h=2.0, l=0.5, c=1.5, v=10.0, vw=1.2, n=3)]
        p = job.page(bars, (T0 + day * DAY, T0 + (day + 1) * DAY))
        return PageWrite(p.series, p.rows, p.span, p.receipt, lease=lease)

    zombie, sap = Job("IBM", "1d", T0, T0 + 3 * DAY), Job("SAP", "1d", T0, T0 + 3 * DAY)
    writer = await write_queued(database, [
        page(sap, 0, live), page(zombie, 0, old), page(sap, 1, live), page(zombie, 1, old),
        page(sap, 2, live), JobFinished(zombie.series, zombie.fetch, zombie.receipt, lease=old),
        JobFinished(sap.series, sap.fetch, sap.receipt, lease=live)])
    assert zombie.receipt.lease_lost and zombie.receipt.outcome is JobOutcome.CANCELLED
    assert sap.receipt.outcome is JobOutcome.OK and sap.receipt.bars_written == 3
    assert writer.statistics().lease_refusals == 1
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT symbol, count(*) FROM bars GROUP BY symbol").fetchall() == [
            ("SAP", 3)]


async def test_a_series_done_elsewhere_since_the_cycle_began_is_not_claimed(
        database: str, coordinator: Make) -> None:
    a, b = coordinator("a"), coordinator("b")
    lease = (await a.claim("NVDA", ["1d"], due_before=FAR_PAST)).granted["1d"]
    job = Job("NVDA", "1d", T0, T0 + DAY)
    await write_all(database, [JobFinished(job.series, job.fetch, job.receipt, lease=lease)])
    a.released(SeriesKey("NVDA", "1d"))
    assert a.statistics().leases_held == 0

    with psycopg.connect(database) as conn:
        done_at = conn.execute("SELECT extract(epoch FROM done_at) FROM series_leases"
                               ).fetchone()
    assert done_at is not None
    before = float(done_at[0]) - 60
    claim = await b.claim("NVDA", ["1d"], due_before=before)
    assert claim.granted == {} and claim.done_elsewhere == {"1d"}
    # a later cycle (due after the last completion) claims it again
    assert set((await b.claim("NVDA", ["1d"], due_before=float(done_at[0]) + 1)).granted) == {
        "1d"}


async def test_the_keeper_registers_renews_and_releases_at_stop(
        database: str, coordinator: Make) -> None:
    a = coordinator("a", lease_seconds=0.6)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await a.claim("AMD", ["1d"], due_before=FAR_PAST)
        with psycopg.connect(database) as conn:
            first = conn.execute("SELECT expires_at FROM series_leases").fetchone()
        while a.statistics().renewals < 2:  # noqa: ASYNC110 - renewals come from a thread
            await trio.sleep(0.05)
        with psycopg.connect(database) as conn:
            renewed = conn.execute("SELECT expires_at FROM series_leases").fetchone()
            alive = conn.execute("SELECT stopped_at FROM instances").fetchone()
        assert first is not None and renewed is not None and renewed[0] > first[0]
        assert alive == (None,)
        assert [i.id for i in a.statistics().instances] == ["host:a"]
        nursery.cancel_scope.cancel()
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT holder FROM series_leases").fetchone() == (None,)
        stopped = conn.execute("SELECT stopped_at FROM instances").fetchone()
    assert stopped is not None and stopped[0] is not None


async def test_a_dead_process_of_this_host_is_reaped_and_its_leases_freed(
        database: str, coordinator: Make) -> None:
    # a pid certainly dead: a process that has exited (run once, before any task starts)
    gone = subprocess.run(  # noqa: ASYNC221
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True, text=True, check=True)
    pid = int(gone.stdout)
    dead = coordinator("dead", host="box", pid=pid)
    live = coordinator("live", host="box", pid=1)
    async with trio.open_nursery() as nursery:
        for c in (dead, live):
            await nursery.start(c.run)
        await dead.claim("TSLA", ["1d"], due_before=FAR_PAST)
        await live.claim("AMZN", ["1d"], due_before=FAR_PAST)
        assert reap_local(database, "box") == 1  # pid 1 is alive; the dead pid is not
        assert (await live.claim("TSLA", ["1d"], due_before=FAR_PAST)).granted
        nursery.cancel_scope.cancel()


def test_the_budget_row_is_keyed_by_the_keys_hash_never_the_key(database: str) -> None:
    key = Secret("sk-live-0123456789")
    assert key_hash(key) != key.reveal() and len(key_hash(key)) == 64

    async def main() -> None:
        budget = SharedBudget(database, key, slowdown=0.5, floor=0.1, recovery=0.05)
        await budget.reserve(1, configured_per_minute=60, slowdowns=0, successes=0,
                             retry_after=0)
        budget.close()

    trio.run(main)
    with psycopg.connect(database) as conn:
        dump = repr(conn.execute("SELECT * FROM api_budget").fetchall())
    assert key.reveal() not in dump and key_hash(key) in dump


async def test_two_instances_share_one_budget_without_overlap(database: str) -> None:
    key = Secret("shared-key")
    a, b = (SharedBudget(database, key, slowdown=0.5, floor=0.1, recovery=0.05)
            for _ in range(2))
    try:
        times: list[float] = []
        for budget in (a, b, a, b):
            r = await budget.reserve(3, configured_per_minute=600, slowdowns=0, successes=0,
                                     retry_after=0)
            assert r.spacing == pytest.approx(0.1)
            times.extend(r.times())
        times.sort()
        gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
        # 12 slots, one timeline: every gap is the 0.1 s interval (within scheduling noise)
        assert min(gaps) > 0.09, gaps
        assert times[-1] - times[0] == pytest.approx(1.1, abs=0.05)
    finally:
        a.close()
        b.close()


async def test_a_429_seen_by_one_instance_slows_all(database: str) -> None:
    key = Secret("shared-key")
    a, b = (SharedBudget(database, key, slowdown=0.5, floor=0.1, recovery=0.05)
            for _ in range(2))
    try:
        await a.reserve(1, configured_per_minute=600, slowdowns=0, successes=0, retry_after=0)
        hit = await a.reserve(1, configured_per_minute=600, slowdowns=1, successes=0,
                              retry_after=2.0)
        assert hit.effective_per_minute == pytest.approx(300)
        other = await b.reserve(1, configured_per_minute=600, slowdowns=0, successes=0,
                                retry_after=0)
        assert other.effective_per_minute == pytest.approx(300)
        assert other.first - trio.current_time() > 1.5  # the Retry-After pauses b too
        back = await b.reserve(1, configured_per_minute=600, slowdowns=0, successes=4,
                               retry_after=0)
        assert back.effective_per_minute == pytest.approx(300 + 4 * 0.05 * 600)
    finally:
        a.close()
        b.close()


def test_db_from_ms_round_trips_due_before() -> None:
    assert db.from_ms(T0).timestamp() * 1000 == T0


async def test_a_long_reader_of_bars_never_holds_up_lease_renewal(
        database: str, coordinator: Make) -> None:
    """A page of a year with no partition yet, while a long transaction reads `bars` (a
    features computation): creating the partition must wait for that reader, but the writer
    waits outside its page transaction, so its lease row is not locked meanwhile and renewal
    goes on; nor do other readers of `bars` queue behind its lock request for long."""
    a = coordinator("a")
    lease = (await a.claim("IBM", ["1d"], due_before=FAR_PAST)).granted["1d"]
    y1990 = 631_152_000_000  # 1990-01-01: no partition for it
    bars = [Bar(t=y1990 + i * DAY, o=1.0, h=2.0, l=0.5, c=1.5, v=10.0) for i in range(3)]
    job = Job("IBM", "1d", y1990, y1990 + 3 * DAY)
    page = job.page(bars)
    reader = psycopg.connect(database)  # holds ACCESS SHARE on bars until it commits
    reader.execute("SELECT count(*) FROM bars")

    def waiting_for_the_partition() -> bool:
        with psycopg.connect(database, autocommit=True) as conn:
            return bool(conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                "'%bars_ensure_partition%' AND pid <> pg_backend_pid()").fetchone()[0])

    def renew_and_read() -> None:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '3s'")  # far longer than the writer's own wait
            conn.execute("UPDATE series_leases SET expires_at = now() + interval '30 s' "
                         "WHERE holder = 'host:a'")
            conn.execute("SELECT count(*) FROM bars")

    send, receive = open_writer_channel(4)
    writer = Writer(database, receive)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with send:
            try:  # the reader ends here whatever happens: the writer's thread waits for it
                await send.send(PageWrite(page.series, page.rows, page.span, page.receipt,
                                          lease=lease))
                with trio.fail_after(20):
                    while not await trio.to_thread.run_sync(waiting_for_the_partition):  # noqa: ASYNC110 - polls the server
                        await trio.sleep(0.02)
                for _ in range(3):  # across the writer's waits and pauses
                    await trio.to_thread.run_sync(renew_and_read)
                    await trio.sleep(0.1)
                assert writer.statistics().pages_written == 0  # still waiting for the reader
                reader.commit()
            finally:
                reader.close()
            await send.send(JobFinished(job.series, job.fetch, job.receipt, lease=lease))
    assert job.receipt.outcome is JobOutcome.OK and job.receipt.bars_written == 3
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM bars_y1990").fetchone() == (3,)
