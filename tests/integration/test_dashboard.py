"""The dashboard in a real browser: headless Chromium renders `/` of a running daemon (a
subprocess, with a status token, after a real backfill against the simulator) and the test
reads the rendered DOM, then takes a screenshot.

`BACKFILLD_WRITE_SCREENSHOT=1 uv run pytest tests/integration/test_dashboard.py` writes the
screenshot to docs/dashboard.png (the README's picture); otherwise it goes to the test's tmp.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from daemon.simulator.process import free_port

from .procs import simulator, start_daemon, write_config

TOKEN = "dash-token-4f1c9a"
SYMBOLS = ["AAPL", "MSFT", "BRK.A", "X:BTCUSD"]
TIMEFRAMES = ["1d", "1h", "5m"]
ROOT = Path(__file__).resolve().parents[2]
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(b)), None)

pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine "
                                "(.ci/run installs Debian's chromium package)")


def chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert BROWSER is not None
    return subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--run-all-compositor-stages-before-draw",
         "--virtual-time-budget=4000", *args],
        capture_output=True, text=True, timeout=timeout, check=False)


def wait_for_cycle(base: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            st = httpx.get(base + "/status", headers={"authorization": f"Bearer {TOKEN}"},
                           timeout=2).json()
            if st.get("last_cycle"):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("the daemon finished no cycle within 60 s")


def test_the_dashboard_renders_the_daemon_in_a_real_browser(database: str,
                                                             tmp_path: Path) -> None:
    port = free_port()
    token_file = tmp_path / "status-token"
    token_file.write_text(TOKEN + "\n")
    base = f"http://127.0.0.1:{port}"
    with simulator(tmp_path, seed=3, latency_ms="1-3") as api:
        symbols = ", ".join(f'"{s}"' for s in SYMBOLS)
        timeframes = ", ".join(f'"{t}"' for t in TIMEFRAMES)
        config = write_config(
            tmp_path / "config.toml", api,
            f"requests_per_minute = 0\n[backfill]\nsymbols = [{symbols}]\n"
            f"timeframes = [{timeframes}]\nhistory_days = 30\nstagger_seconds = 0\n"
            f'[daemon]\ninstance = "dash-box"\n'
            f'[status]\nlisten = "127.0.0.1:{port}"\ntoken_file = "{token_file}"\n')
        proc = start_daemon(config, database, log=tmp_path / "daemon.log")
        try:
            wait_for_cycle(base)
            # the page itself needs no token; the data behind it does
            assert httpx.get(base + "/", timeout=5).status_code == 200
            assert httpx.get(base + "/status", timeout=5).status_code == 401

            page = f"{base}/#token={TOKEN}"
            dom = chromium("--dump-dom", page)
            assert dom.returncode == 0, dom.stderr[-2000:]
            html = dom.stdout

            # a wrong token: the page says so instead of showing data (no prompt in headless)
            wrong = chromium("--dump-dom", f"{base}/#token=not-the-token").stdout

            shot = (ROOT / "docs" / "dashboard.png"
                    if os.environ.get("BACKFILLD_WRITE_SCREENSHOT") == "1"
                    else tmp_path / "dashboard.png")
            taken = chromium(f"--screenshot={shot}", "--window-size=1280,1100", page)
            assert taken.returncode == 0, taken.stderr[-2000:]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0

    # health, the cycle, the API panel
    assert re.search(r'id="health" class="pill healthy">healthy<', html), html[:3000]
    assert re.search(r'id="instance">dash-box<', html)
    assert re.search(r'cycle 1 \(start\) ok: 12/12 jobs', html)
    assert "circuit</dt><dd>closed" in html
    # one cell per series, coloured by its freshness class, with its details on hover
    cells = re.findall(r'<button class="cell (\w+)"[^>]*title="([^"]*)"[^>]*'
                       r'data-symbol="([^"]+)" data-timeframe="([^"]+)"', html)
    assert {(sym, tf) for _, _, sym, tf in cells} == {(s, t) for s in SYMBOLS
                                                      for t in TIMEFRAMES}
    assert {cls for cls, *_ in cells} == {"fresh"}
    assert all("coverage " in title and "0 hole(s)" in title for _, title, *_ in cells)
    # the instance row and the executions table
    assert re.search(r"<tbody><tr><td>● [^<]+</td><td>dash-box</td><td class=\"status-ok\">"
                     r"alive</td>", html)
    executions = re.search(r'<table id="executions">.*?<tbody>(.*?)</tbody>', html, re.S)
    assert executions and '<td class="status-ok">ok</td>' in executions.group(1)
    # nothing but text went in: no token echoed into the page
    assert TOKEN not in html
    assert "needs its status token" in wrong and 'class="cell' not in wrong

    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
