"""The simulator as a child process, for the demo, the scripts and the end-to-end tests.

A child rather than a task in the caller's trio loop: generating and encoding bars is CPU work
that would otherwise share one core (and one GIL) with the daemon being measured.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["free_port", "simulator_process", "wait_for_port"]

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


@contextlib.contextmanager
def simulator_process(
    *,
    requests_per_minute: float = 0,
    latency_ms: str = "0-0",
    fault_rate: float = 0.0,
    seed: int = 1,
    extra: Sequence[str] = (),
    log: Path | None = None,
) -> Iterator[str]:
    """Run `backfilld simulate` on a free loopback port; yield its base URL; stop it after."""
    port = free_port()
    with open(log or os.devnull, "wb") as out:  # the child keeps its own copy of the fd
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "simulate", "--port", str(port),
             "--requests-per-minute", str(requests_per_minute), "--latency-ms", latency_ms,
             "--fault-rate", str(fault_rate), "--seed", str(seed), *extra],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
