"""`backfilld features rebuild`: the config's database, a summary line, exit 0."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import psycopg
import pytest

from daemon.features_cli import add_features_arguments, run_features

from .test_features import assert_matches, load, reference, stored, truth_bars


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="backfilld features")
    add_features_arguments(parser)
    return parser.parse_args(list(argv))


def test_rebuild_from_the_configs_database(database: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BACKFILLD_DATABASE_URL", raising=False)
    daily, hourly = truth_bars("AAPL", "1d", 120), truth_bars("MSFT", "1h", 10)
    with psycopg.connect(database) as conn:
        load(conn, "AAPL", "1d", daily)
        load(conn, "MSFT", "1h", hourly)
    config = tmp_path / "config.toml"
    config.write_text(f'[backfill]\nsymbols = ["AAPL"]\n[database]\nurl = "{database}"\n'
                      '[logging]\nlevel = "WARNING"\n')
    out = io.StringIO()
    assert run_features(_args("rebuild", "--config", str(config), "--symbol", "AAPL"), out) == 0
    assert out.getvalue().startswith(f"features rebuilt: 1 series, {len(daily):,} rows in ")
    assert_matches(stored(database, "AAPL", "1d"), reference(daily))
    assert stored(database, "MSFT", "1h") == []
    out = io.StringIO()
    monkeypatch.setenv("BACKFILLD_CONFIG", str(config))
    assert run_features(_args("rebuild", "--jobs", "2"), out) == 0
    assert f"2 series, {len(hourly):,} rows" in out.getvalue()  # AAPL 1d was right already


def test_rebuild_needs_a_subcommand() -> None:
    with pytest.raises(SystemExit):
        _args()
    assert _args("rebuild", "--timeframe", "5m").timeframe == "5m"
