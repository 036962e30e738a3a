"""Session-wide real PostgreSQL (embedded, started once) and a fresh migrated database per test.

The server is the same embedded pgserver the daemon uses when no URL is configured, so the suite
needs nothing installed but the project's own dependencies. Each test gets its own database,
cloned from a migrated template (CREATE DATABASE ... TEMPLATE is ~20 ms), so tests never see
each other's rows.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import conninfo

from daemon import db
from daemon.embedded import embedded_postgres

TEMPLATE = "backfilld_template"
_names = itertools.count()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's PostgreSQL server (maintenance database `postgres`)."""
    state = tmp_path_factory.mktemp("pg")
    with embedded_postgres(state, delete_on_exit=True) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        db.apply_migrations(conninfo.make_conninfo(url, dbname=TEMPLATE))
        yield url


def make_database(server_url: str, *, migrated: bool = True) -> str:
    name = f"t{os.getpid()}_{next(_names)}"
    template = TEMPLATE if migrated else "template0"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    return conninfo.make_conninfo(server_url, dbname=name)


def drop_database(server_url: str, url: str) -> None:
    name = conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def database(pg_server: str) -> Iterator[str]:
    """URL of a fresh, migrated database for this test alone."""
    url = make_database(pg_server)
    yield url
    drop_database(pg_server, url)


@pytest.fixture
def second_database(pg_server: str) -> Iterator[str]:
    """Another fresh, migrated database, for a test comparing two runs."""
    url = make_database(pg_server)
    yield url
    drop_database(pg_server, url)


@pytest.fixture
def empty_database(pg_server: str) -> Iterator[str]:
    """URL of a fresh database with no schema (for migration tests)."""
    url = make_database(pg_server, migrated=False)
    yield url
    drop_database(pg_server, url)
