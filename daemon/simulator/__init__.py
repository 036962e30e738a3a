"""A Polygon-compatible API on loopback: deterministic, rate-limited, faulty on purpose.

`data` generates the bars (pure functions of seed, ticker, timeframe and time); `server` serves
them over HTTP with the real API's paths, bodies, pagination, auth, 429s and failure modes. The
demo, the integration tests and the benchmark run against it, and the official `massive` client
reads from it, which is how we know it speaks the real protocol.

The other modules, one concern each:

    options    SimulatorOptions and the `backfilld simulate` command line
    faults     injected faults: which request fails, and the misbehaving answers
    defects    defective bars, a pure function of (seed, ticker, timeframe, t, rate)
    splits     the split model and the price arithmetic it implies
    reference  GET /v3/reference/splits: filtering, sorting, v3 paging
    scenario   the run's mutable conditions: outages, defect rates, splits
    control    the /__control endpoints that change the scenario at run time
    process    the simulator as a child process
"""

from __future__ import annotations
