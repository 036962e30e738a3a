from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from daemon.config import Secret, load_config, parse_config
from daemon.errors import ConfigError
from daemon.timeframes import Timeframe, parse_timeframe

ROOT = Path(__file__).resolve().parent.parent


def test_repo_example_config_is_valid() -> None:
    config = load_config(ROOT / "config.toml", env={})
    assert config.backfill.symbols
    assert [t.label for t in config.backfill.timeframes] == ["1d", "4h", "1h", "15m", "5m"]
    assert config.backfill.max_concurrent_symbols == 3


def test_defaults() -> None:
    config = parse_config("", env={})
    assert config.polygon.base_url == "https://api.massive.com"
    assert config.polygon.requests_per_minute == 150
    assert config.polygon.adjusted is True
    assert config.database.url is None
    assert config.retry.attempts == 5 and config.retry.min_seconds == 1
    assert config.retry.max_seconds == 300
    assert (config.status.host, config.status.port) == ("127.0.0.1", 8080)


def test_full_config() -> None:
    text = """
[polygon]
base_url = "http://127.0.0.1:9999/"
api_key = "from-file"
requests_per_minute = 0
[database]
url = "postgresql://u:pw@db/x"
[backfill]
symbols = ["AAPL", "BRK.A", "X:BTCUSD", "I:SPX"]
timeframes = ["1mo", "1w", "2h", "30m"]
start = 2020-01-01
end = "2021-06-30"
[status]
listen = "0.0.0.0:0"
"""
    config = parse_config(text, env={})
    assert config.polygon.base_url == "http://127.0.0.1:9999"
    assert config.polygon.api_key.reveal() == "from-file"
    assert config.database.url is not None
    assert config.backfill.timeframes == (
        Timeframe(1, "mo"), Timeframe(1, "w"), Timeframe(2, "h"), Timeframe(30, "m"))
    assert config.backfill.start == dt.date(2020, 1, 1)
    assert config.backfill.end == dt.date(2021, 6, 30)
    assert (config.status.host, config.status.port) == ("0.0.0.0", 0)


def test_env_overrides_key_and_url() -> None:
    text = '[polygon]\napi_key = "file"\n[database]\nurl = "postgresql:///a"\n'
    env = {"MASSIVE_API_KEY": "massive", "BACKFILLD_DATABASE_URL": "postgresql:///b"}
    config = parse_config(text, env=env)
    assert config.polygon.api_key.reveal() == "massive"
    assert config.database.url is not None and config.database.url.reveal() == "postgresql:///b"
    config = parse_config(text, env={**env, "POLYGON_API_KEY": "polygon"})
    assert config.polygon.api_key.reveal() == "polygon"


def test_api_key_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("abc123\n")
    config = parse_config(f'[polygon]\napi_key_file = "{key}"\n', env={})
    assert config.polygon.api_key.reveal() == "abc123"
    with pytest.raises(ConfigError, match="polygon.api_key_file.*cannot read"):
        parse_config(f'[polygon]\napi_key_file = "{tmp_path / "nope"}"\n', env={})


def test_secrets_never_print() -> None:
    config = parse_config(
        '[polygon]\napi_key = "SUPERSECRET"\n[database]\nurl = "postgresql://u:PW@h/d"\n', env={}
    )
    shown = repr(config) + str(config)
    assert "SUPERSECRET" not in shown and "PW" not in shown
    assert repr(Secret("x")) == "Secret('***')"


@pytest.mark.parametrize(
    ("text", "key", "line", "expected"),
    [
        ("[backfill]\nsymbols = [\"A\"]\ntimeframes = [\"5x\"]\n", "backfill.timeframes", 3,
         "not a timeframe"),
        ("[polygon]\nrequests_per_minute = -1\n", "polygon.requests_per_minute", 2, "number"),
        ("[polygon]\nbase_url = \"ftp://x\"\n", "polygon.base_url", 2, "http"),
        ("[backfill]\nsymbls = []\n", "backfill.symbls", 2, "unknown key"),
        ("[nope]\n", "nope", 1, "unknown section"),
        ("[backfill]\nstart = 2021-01-01\nhistory_days = 3\n", "backfill.history_days", 3,
         "either"),
        ("[backfill]\nstart = 2021-01-02\nend = 2021-01-01\n", "backfill.end", 3, "on or after"),
        ("[backfill]\nsymbols = [\"A B\"]\n", "backfill.symbols", 2, "tickers"),
        ("[retry]\nmin_seconds = 10\nmax_seconds = 5\n", "retry.max_seconds", 3, ">="),
        ("[status]\nlisten = \"nonsense\"\n", "status.listen", 2, "HOST:PORT"),
        ("[polygon]\nadjusted = \"yes\"\n", "polygon.adjusted", 2, "true or false"),
    ],
)
def test_bad_values_name_key_line_and_expectation(
    text: str, key: str, line: int, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="/etc/backfilld/config.toml", env={})
    err = info.value
    assert err.key == key
    assert err.line == line
    assert expected in str(err)
    assert str(err).startswith(f"/etc/backfilld/config.toml:{line}: key {key!r}")


def test_toml_syntax_error_names_line() -> None:
    with pytest.raises(ConfigError, match=r"cfg.toml:2: not valid TOML"):
        parse_config("[polygon]\nbase_url = \n", source="cfg.toml", env={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize("text", ["5", "m", "0m", "5 m", "5s", "1y", "10000m", ""])
def test_timeframe_grammar_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a timeframe"):
        parse_timeframe(text)


def test_timeframe_grammar() -> None:
    assert parse_timeframe("15m") == Timeframe(15, "m")
    assert parse_timeframe("1mo").timespan == "month"
    assert parse_timeframe("4h").timespan == "hour"
    assert parse_timeframe("4h").intraday and not parse_timeframe("1d").intraday


def test_systemd_credentials_below_env_above_file(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "polygon-api-key").write_text("from-credential\n")
    (creds / "database-url").write_text("postgresql://u:pw@db/x\n")
    text = '[polygon]\napi_key = "from-file"\n'
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    config = parse_config(text, env=env)
    assert config.polygon.api_key == Secret("from-credential")
    assert config.database.url == Secret("postgresql://u:pw@db/x")
    config = parse_config(text, env={**env, "POLYGON_API_KEY": "from-env"})
    assert config.polygon.api_key == Secret("from-env")
    # no credential of that name: the file's key stands
    assert parse_config(text, env={"CREDENTIALS_DIRECTORY": str(tmp_path)}).polygon.api_key == (
        Secret("from-file"))
