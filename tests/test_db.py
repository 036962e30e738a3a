from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from daemon import db
from daemon.errors import DatabaseError


def test_migrations_apply_in_order_once(empty_database: str) -> None:
    applied = db.apply_migrations(empty_database)
    assert applied == [f"{m.version:03d}_{m.name}" for m in db.load_migrations()]
    assert applied[0] == "001_bars"
    assert db.apply_migrations(empty_database) == []  # idempotent
    with psycopg.connect(empty_database) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY 1")]
        assert versions == [m.version for m in db.load_migrations()]
        cols = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'bars' ORDER BY ordinal_position"
        ).fetchall()
    assert cols == [
        ("symbol", "text"), ("timeframe", "text"), ("ts", "timestamp with time zone"),
        ("open", "double precision"), ("high", "double precision"), ("low", "double precision"),
        ("close", "double precision"), ("volume", "double precision"),
        ("vwap", "double precision"), ("trades", "bigint"),
    ]


def test_edited_migration_is_refused(empty_database: str, tmp_path: Path) -> None:
    (tmp_path / "001_one.sql").write_text("CREATE TABLE one (x int);")
    db.apply_migrations(empty_database, db.load_migrations(tmp_path))
    (tmp_path / "001_one.sql").write_text("CREATE TABLE one (x bigint);")
    with pytest.raises(DatabaseError, match="changed after it was applied"):
        db.apply_migrations(empty_database, db.load_migrations(tmp_path))


def test_failed_migration_rolls_back_whole(empty_database: str, tmp_path: Path) -> None:
    (tmp_path / "001_ok.sql").write_text("CREATE TABLE ok (x int);")
    (tmp_path / "002_bad.sql").write_text("CREATE TABLE half (x int); SELECT nonsense();")
    with pytest.raises(DatabaseError, match="migration failed"):
        db.apply_migrations(empty_database, db.load_migrations(tmp_path))
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("SELECT to_regclass('ok') IS NOT NULL").fetchone() == (True,)
        assert conn.execute("SELECT to_regclass('half') IS NULL").fetchone() == (True,)
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone() == (1,)


def test_badly_named_migration(tmp_path: Path) -> None:
    (tmp_path / "1_x.sql").write_text("")
    with pytest.raises(DatabaseError, match="NNN_name.sql"):
        db.load_migrations(tmp_path)


def test_unreachable_database_error_hides_password() -> None:
    with pytest.raises(DatabaseError) as info:
        db.connect("postgresql://user:hunter2@127.0.0.1:1/x")
    assert "hunter2" not in str(info.value)


def test_ms_conversion_is_exact() -> None:
    for ms in (0, 1, 1_700_000_000_123, -86_400_000, 4_102_444_800_999):
        assert db.to_ms(db.from_ms(ms)) == ms


def test_a_local_server_process_is_reniced_never_raised(database: str) -> None:
    with psycopg.connect(database) as conn:
        pid = conn.info.backend_pid
        assert os.getpriority(os.PRIO_PROCESS, pid) == 0
        assert db.lower_server_priority(conn, 7) is True
        assert os.getpriority(os.PRIO_PROCESS, pid) == 7
        group = Path(f"/proc/{pid}/autogroup")
        if group.exists():  # the backend leads a session: its scheduling group is niced too
            assert group.read_text().split()[-1] == "7"
        assert db.lower_server_priority(conn, 3) is True
        assert os.getpriority(os.PRIO_PROCESS, pid) == 7  # only ever lowered
        assert conn.execute("SELECT 1").fetchone() == (1,)  # and it serves as before
