"""Scale-out end to end: several daemon processes from one config file, one PostgreSQL, one
simulator enforcing the key's budget. The whole table is compared with the ground truth.

- three instances, one SIGKILLed early: no series is fetched twice over (requests within 10% of
  one instance doing the same work), the budget holds across them (at most 5% 429s), the
  survivors take the dead one's leases over and exit 0;
- a zombie: an instance frozen (SIGSTOP) past its lease while another takes its series over,
  then thawed (SIGCONT), commits nothing.
"""

from __future__ import annotations

import datetime as dt
import signal
from pathlib import Path

import psycopg

from daemon.market_calendar import et_midnight_ms

from .procs import (
    bar_count,
    duplicates,
    run_once,
    simulator,
    simulator_stats,
    start_daemon,
    table,
    truth,
    wait_until,
    write_config,
)

SEED = 23
SYMBOLS = ["AAPL", "MSFT", "NVDA", "AMD", "BRK.A", "X:BTCUSD", "I:SPX", "TSLA", "IBM"]
TIMEFRAMES = ["1h", "5m"]
START, END = dt.date(2024, 1, 2), dt.date(2024, 2, 29)
FROM_MS = et_midnight_ms(START)
TO_MS = et_midnight_ms(END + dt.timedelta(days=1)) - 1
RATE = 1200  # the key's budget, per minute: the simulator enforces it, the daemons share it


def config_body(symbols: list[str], *, lease_seconds: float = 3, page_limit: int = 5000) -> str:
    settings = {"symbols": symbols, "timeframes": TIMEFRAMES, "start": START.isoformat(),
                "end": END.isoformat(), "stagger_seconds": 0.01, "max_concurrent_symbols": 3}
    lines = [f"{k} = {v!r}".replace("'", '"') for k, v in settings.items()]
    return (f"requests_per_minute = {RATE}\npage_limit = {page_limit}\n"
            f"[daemon]\nlease_seconds = {lease_seconds}\n"
            "[backfill]\n" + "\n".join(lines) + "\n"
            "[retry]\nattempts = 8\nmin_seconds = 0.05\nmax_seconds = 1\n")


def query(url: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args or None).fetchall()


def instance_of(url: str, pid: int) -> str | None:
    rows = query(url, "SELECT id FROM instances WHERE pid = %s", pid)
    return str(rows[0][0]) if rows else None


def assert_equals_truth(url: str, symbols: list[str]) -> None:
    expected = truth(SEED, symbols, TIMEFRAMES, FROM_MS, TO_MS)
    got = table(url)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], key
    assert duplicates(url) == 0


def test_three_instances_share_the_universe_and_the_budget(
        database: str, second_database: str, tmp_path: Path) -> None:
    # One instance alone: the requests the work needs.
    with simulator(tmp_path, requests_per_minute=RATE, latency_ms="5-15", seed=SEED,
                   extra=("--window-seconds", "2")) as url:
        config = write_config(tmp_path / "one.toml", url, config_body(SYMBOLS))
        assert run_once(config, second_database, log=tmp_path / "one.log") == 0
        alone = simulator_stats(url)
    assert_equals_truth(second_database, SYMBOLS)

    # Three from one config file; the one that has committed first is SIGKILLed at once.
    with simulator(tmp_path, requests_per_minute=RATE, latency_ms="5-15", seed=SEED,
                   extra=("--window-seconds", "2")) as url:
        config = write_config(tmp_path / "config.toml", url, config_body(SYMBOLS))
        logs = [tmp_path / f"daemon-{i}.log" for i in range(3)]
        procs = [start_daemon(config, database, "--once", log=log) for log in logs]
        try:
            # all three started (none reaps the victim at its start), one has committed
            wait_until(lambda: query(database, "SELECT count(*) FROM instances")[0][0] == 3,
                       "three registrations")
            wait_until(lambda: bar_count(database) > 0, "the first commit")
            # the victim: the instance holding the most leases right now
            [(victim_id, victim_pid)] = query(
                database, "SELECT i.id, i.pid FROM series_leases l JOIN instances i "
                "ON i.id = l.holder WHERE l.expires_at > now() GROUP BY i.id, i.pid "
                "ORDER BY count(*) DESC, i.id LIMIT 1")
            victim = next(p for p in procs if p.pid == victim_pid)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            held = query(database, "SELECT symbol, timeframe FROM series_leases "
                         "WHERE holder = %s AND expires_at > now()", victim_id)
            codes = {i: p.wait(timeout=180) for i, p in enumerate(procs) if p is not victim}
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        shared = simulator_stats(url)
    for i, code in codes.items():
        assert code == 0, logs[i].read_text()[-3000:]
    assert_equals_truth(database, SYMBOLS)

    # Each survivor did part of the work; the dead one's leases went to them.
    survivors = {instance_of(database, p.pid) for p in procs if p is not victim}
    workers = dict(query(database, "SELECT instance_id, count(*) FROM job_results "
                         "WHERE status = 'ok' GROUP BY instance_id"))
    assert survivors <= set(workers), workers
    assert held, "the victim held no lease when it died: kill it earlier"
    for symbol, timeframe in held:
        [(holder, done_by)] = query(database, "SELECT holder, done_by FROM series_leases "
                                    "WHERE symbol = %s AND timeframe = %s", symbol, timeframe)
        assert holder is None and done_by in survivors, (symbol, timeframe, done_by)
    taken = sum(logs[i].read_text().count("taken over") for i in codes)
    assert taken >= 1

    # One budget, one universe: hardly more requests than one instance, hardly any 429.
    extra = shared["requests"] / alone["requests"] - 1
    assert extra <= 0.10, (shared["requests"], alone["requests"])
    assert shared["rate_limited"] <= 0.05 * shared["requests"], shared
    print(f"\nrequests: one instance {alone['requests']}, three {shared['requests']} "
          f"({extra:+.1%}); 429s {shared['rate_limited']}")


def test_a_zombie_that_lost_its_leases_commits_nothing(database: str, tmp_path: Path) -> None:
    symbols = SYMBOLS[:4]
    with simulator(tmp_path, requests_per_minute=600, latency_ms="20-40", seed=SEED,
                   extra=("--window-seconds", "2")) as url:
        body = config_body(symbols, lease_seconds=2, page_limit=5000)
        config = write_config(tmp_path / "config.toml", url, body.replace(
            f"requests_per_minute = {RATE}", "requests_per_minute = 600"))
        zombie_log = tmp_path / "zombie.log"
        zombie = start_daemon(config, database, "--once", log=zombie_log)
        try:
            wait_until(lambda: bar_count(database) > 0, "the zombie's first commit")
            zombie.send_signal(signal.SIGSTOP)
            zombie_id = instance_of(database, zombie.pid)
            held = query(database, "SELECT symbol, timeframe, fence FROM series_leases "
                         "WHERE holder = %s", zombie_id)
            assert held
            # Frozen past its lease (2 s), while another instance takes everything over...
            assert run_once(config, database, log=tmp_path / "other.log", timeout=180) == 0
            assert_equals_truth(database, symbols)
            frozen = table(database)
            thawed_at = query(database, "SELECT now()")[0][0]
            zombie.send_signal(signal.SIGCONT)
            # ...then thawed: it finds its leases gone and writes none of what it still held.
            wait_until(lambda: "another instance took the series over" in zombie_log.read_text()
                       or zombie.poll() is not None, "the zombie's reaction", timeout=60)
            zombie.wait(timeout=60)
        finally:
            if zombie.poll() is None:
                zombie.send_signal(signal.SIGCONT)
                zombie.kill()
                zombie.wait()
    text = zombie_log.read_text()
    assert "another instance took the series over" in text, text[-3000:]
    assert table(database) == frozen
    # not one page of the zombie's landed after the thaw: no coverage moved
    moved = query(database, "SELECT count(*) FROM coverage WHERE updated_at >= %s", thawed_at)
    assert moved == [(0,)]
    for symbol, timeframe, fence in held:
        [(holder, now_fence)] = query(database, "SELECT holder, fence FROM series_leases "
                                      "WHERE symbol = %s AND timeframe = %s", symbol, timeframe)
        assert holder is None and int(str(now_fence)) > int(str(fence))
