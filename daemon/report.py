"""Plain-text tables for people at a terminal: `run --once` failures and the demo's summary."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from .cycles import CycleSnapshot

__all__ = ["format_table", "print_failures"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned text columns, numbers right-aligned, a rule under the header."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(r, widths, numeric, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_failures(cycle: CycleSnapshot | None, stream: TextIO = sys.stderr) -> None:
    """What went wrong in a `run --once` cycle, and why: one row per failed, refused or
    quarantining job."""
    if cycle is None:
        print("backfilld: the cycle did not complete (stopped before it finished)", file=stream)
        return
    failed, refused = cycle.failed, cycle.not_entitled
    print(f"backfilld: {len(failed)} of {len(cycle.jobs)} jobs failed, {len(refused)} not "
          f"entitled, {cycle.quarantined} bars quarantined", file=stream)
    if cycle.auth_error:
        print(f"  the API refused the key: {cycle.auth_error}", file=stream)
    rows = [(j.symbol, j.timeframe, "failed", j.bars_written, (j.error or "")[:120])
            for j in failed]
    rows += [(j.symbol, j.timeframe, "not entitled", j.bars_written, (j.error or "")[:120])
             for j in refused]
    rows += [(j.symbol, j.timeframe, "quarantined", j.quarantined,
              "bars kept out (see quarantined_bars); asked again next top-up")
             for j in cycle.jobs if j.quarantined]
    if rows:
        print(format_table(["symbol", "timeframe", "what", "bars", "why"], rows), file=stream)
