"""The simulator as a child process, for the demo, the scripts and the end-to-end tests.

A child rather than a task in the caller's trio loop: generating and encoding bars is CPU work
that would otherwise share one core (and one GIL) with the daemon being measured.

`simulator_process` takes every SimulatorOptions knob as a keyword argument and turns it into
the `backfilld simulate` command line (`simulate_arguments`, testable without a process);
`extra` still appends raw arguments. What can change while it runs goes through the control
endpoints (`control_url` builds their URLs; see daemon.simulator.control).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypedDict, Unpack
from urllib.parse import urlencode

from .splits import Split

__all__ = ["SimulateOptions", "control_url", "free_port", "simulate_arguments",
           "simulator_process", "wait_for_port"]

START_SECONDS = 20.0
_POLL_SECONDS = 0.02


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], *, timeout: float = START_SECONDS
) -> None:
    """Return once `port` accepts connections on loopback.

    Error handling: RuntimeError when `proc` exits first, TimeoutError after `timeout`.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before "
                               f"listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(_POLL_SECONDS)
    raise TimeoutError(f"nothing listened on port {port} within {timeout:g} s")


class SimulateOptions(TypedDict, total=False):
    """The keywords `simulate_arguments` and `simulator_process` take (see the former)."""

    requests_per_minute: float
    latency_ms: str
    fault_rate: float
    seed: int
    api_key: str | None
    now: int | str | None
    window_seconds: float | None
    retry_after: bool
    fault_kinds: Iterable[str] | None
    not_entitled: Iterable[str]
    not_entitled_timespans: Iterable[str]
    outages: Iterable[tuple[float, float]]
    outage_retry_after: int | None
    defects: Mapping[str, float] | None
    splits: Iterable[Split | str]
    cache_mb: float | None
    max_connections: int | None


def _split_argument(split: Split | str) -> str:
    if isinstance(split, str):
        return split
    return (f"{split.ticker}:{split.execution_date.isoformat()}:{split.split_from:g}:"
            f"{split.split_to:g}" + (":hidden" if split.hidden else ""))


def simulate_arguments(
    *,
    requests_per_minute: float = 0,
    latency_ms: str = "0-0",
    fault_rate: float = 0.0,
    seed: int = 1,
    api_key: str | None = None,
    now: int | str | None = None,
    window_seconds: float | None = None,
    retry_after: bool = True,
    fault_kinds: Iterable[str] | None = None,
    not_entitled: Iterable[str] = (),
    not_entitled_timespans: Iterable[str] = (),
    outages: Iterable[tuple[float, float]] = (),
    outage_retry_after: int | None = None,
    defects: Mapping[str, float] | None = None,
    splits: Iterable[Split | str] = (),
    cache_mb: float | None = None,
    max_connections: int | None = None,
) -> list[str]:
    """The `backfilld simulate` arguments (after the port) for these options.

    Each keyword is the SimulatorOptions field of the same name (`now`: Unix ms or ISO time;
    `splits`: Split objects or `TICKER:YYYY-MM-DD:FROM:TO[:hidden]` strings; `cache_mb`: the
    page cache in MiB); None or empty leaves the simulator's default.
    """
    args = ["--requests-per-minute", str(requests_per_minute), "--latency-ms", latency_ms,
            "--fault-rate", str(fault_rate), "--seed", str(seed)]
    if api_key is not None:
        args += ["--api-key", api_key]
    if now is not None:
        args += ["--now", str(now)]
    if window_seconds is not None:
        args += ["--window-seconds", str(window_seconds)]
    if not retry_after:
        args.append("--no-retry-after")
    if fault_kinds is not None:
        args += ["--fault-kinds", ",".join(fault_kinds)]
    if tickers := ",".join(not_entitled):
        args += ["--not-entitled", tickers]
    if timespans := ",".join(not_entitled_timespans):
        args += ["--not-entitled-timespans", timespans]
    for start, duration in outages:
        args += ["--outage", f"{start:g}:{duration:g}"]
    if outage_retry_after is not None:
        args += ["--outage-retry-after", str(outage_retry_after)]
    for ticker, rate in (defects or {}).items():
        args += ["--defects", f"{ticker}:{rate:g}"]
    for split in splits:
        args += ["--split", _split_argument(split)]
    if cache_mb is not None:
        args += ["--cache-mb", f"{cache_mb:g}"]
    if max_connections is not None:
        args += ["--max-connections", str(max_connections)]
    return args


def control_url(base_url: str, what: str, **params: object) -> str:
    """The URL of control endpoint `what` (e.g. "outage", "splits/announce") with `params`."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{base_url.rstrip('/')}/__control/{what}" + (f"?{query}" if query else "")


@contextlib.contextmanager
def simulator_process(
    *,
    extra: Sequence[str] = (),
    log: Path | None = None,
    **options: Unpack[SimulateOptions],
) -> Iterator[str]:
    """Run `backfilld simulate` on a free loopback port; yield its base URL; stop it after.

    `options`: the keywords of `simulate_arguments` (every SimulatorOptions knob), e.g.
    `simulator_process(not_entitled=["AAPL"], outages=[(5, 10)], defects={"MSFT": 0.01},
    splits=["NVDA:2024-06-10:1:10:hidden"])`; `extra` appends raw arguments.

    Error handling: TypeError for an unknown keyword (before anything starts); RuntimeError
    or TimeoutError (see `wait_for_port`) when the simulator does not come up.
    """
    arguments = simulate_arguments(**options)
    port = free_port()
    with open(log or os.devnull, "wb") as out:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "simulate", "--port", str(port), *arguments,
             *extra],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
