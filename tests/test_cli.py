"""The command line's refusals: what a user sees before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.__main__ import EXIT_CONFIG, main


@pytest.fixture
def no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("POLYGON_API_KEY", "MASSIVE_API_KEY", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)


def test_run_without_a_key_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_key_env: None
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[backfill]\nsymbols = ["AAPL"]\n')
    assert main(["run", "--config", str(config), "--once"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{config}: no API key" in err and "POLYGON_API_KEY" in err


def test_run_with_a_bad_config_names_file_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[backfill]\nsymbols = ["AAPL"]\nmax_concurrent_symbols = 0\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(config)])
    assert exit_info.value.code == EXIT_CONFIG
    assert f"{config}:3: key 'backfill.max_concurrent_symbols'" in capsys.readouterr().err


def test_check_config_summarises_without_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_key_env: None
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[polygon]\napi_key = "SEKRIT"\nrequests_per_minute = 5\n'
                      '[backfill]\nsymbols = ["AAPL", "X:BTCUSD"]\ntimeframes = ["1d"]\n')
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "key set, 5 req/min" in out and "2 symbols x 1d" in out
    assert "SEKRIT" not in out
