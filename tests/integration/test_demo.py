"""`backfilld demo` from the command line, small: it finishes, prints its table, and stops."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", "demo", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_small_demo_prints_its_table_and_leaves_data_to_look_at(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    try:
        done = demo("--symbols", "3", "--days", "20", "--speed", "40", "--state-dir", str(state))
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        assert re.search(r"jobs\s+15 ok, 0 failed", out), out
        found = re.search(r"bars written\s+([\d,]+)", out)
        assert found is not None
        bars = int(found.group(1).replace(",", ""))
        assert bars > 1000
        assert re.search(r"wall time\s+[\d.]+ s", out)
        # the printed psql line works: the database is still up, holding the bars
        psql = re.search(r"^\s+(\S+/psql) '([^']+)'", out, re.M)
        assert psql is not None, out
        query = "SELECT count(*) FROM bars"
        count = subprocess.run([psql.group(1), psql.group(2), "-tAc", query],
                               capture_output=True, text=True, timeout=30)
        assert int(count.stdout.strip()) == bars
        assert f"--stop --state-dir {state}" in out
    finally:
        stopped = demo("--stop", "--state-dir", str(state), timeout=60)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not (state / "pgdata" / "postmaster.pid").exists()
