"""A Polygon-compatible aggregates API on loopback: deterministic, rate-limited, faulty on purpose.

`data` generates the bars (pure functions of seed, ticker, timeframe and time); `server` serves
them over HTTP with the real API's paths, bodies, pagination, auth, 429s and failure modes. The
demo, the integration tests and the benchmark run against it, and the official `massive` client
reads from it, which is how we know it speaks the real protocol.
"""

from __future__ import annotations
