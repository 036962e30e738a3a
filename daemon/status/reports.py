"""The database-backed answers: per-series staleness (`/api/v1/admin/features/staleness`).

Runs in a worker thread on a short-lived reader connection (daemon.monitoring), never the
writer's; the status app caches the result (daemon.status.cache).
"""

from __future__ import annotations

from typing import Any

from .. import monitoring
from ..config import Config
from ..staleness import CLASSES, series_age
from ..timefmt import human_age, iso_ms
from .views import rounded

__all__ = ["SeriesCounts", "series_metrics", "staleness_report"]

# (timeframe, class) -> series count, and timeframe -> worst age in seconds.
SeriesCounts = tuple[dict[tuple[str, str], int], dict[str, float]]


def staleness_report(url: str, config: Config, now_ms: int) -> dict[str, Any]:
    """Read freshness rows and classify every configured series (runs in a worker thread)."""
    rows = monitoring.read_freshness(url)
    thresholds = config.staleness
    series = []
    counts = dict.fromkeys(CLASSES, 0)
    for symbol in config.backfill.symbols:
        for tf in config.backfill.timeframes:
            row = rows.get((symbol, tf.label))
            age = series_age(
                symbol, tf, row.last_bar_ms if row else None, now_ms, thresholds,
                checked_through_ms=row.checked_through_ms if row else None,
            )
            counts[age.cls] += 1
            series.append({
                "symbol": symbol,
                "timeframe": tf.label,
                "class": age.cls,
                "age_seconds": rounded(age.age_seconds, 1),
                "age": human_age(age.age_seconds),
                "last_bar": iso_ms(row.last_bar_ms if row else None),
                "expected_bar": iso_ms(age.expected_bar_ms),
                "overdue_since": iso_ms(age.overdue_since_ms),
                "last_success": iso_ms(row.last_success_ms if row else None),
                "last_attempt": iso_ms(row.last_attempt_ms if row else None),
                "last_error": row.last_error if row else None,
                "last_error_at": iso_ms(row.last_error_ms if row else None),
                "not_entitled": row.refused_reason if row and row.refused_ms else None,
                "not_entitled_since": iso_ms(row.refused_ms if row else None),
                "quarantined": row.quarantined if row else 0,
            })
    refused = sum(1 for s in series if s["not_entitled"])
    return {
        "now": iso_ms(now_ms),
        "not_entitled": refused,
        "quarantined": sum(s["quarantined"] for s in series),
        "thresholds_hours": {"fresh": thresholds.fresh_hours, "aging": thresholds.aging_hours,
                             "stale": thresholds.stale_hours},
        "counts": counts,
        "series": series,
    }


def series_metrics(report: dict[str, Any]) -> SeriesCounts:
    """The staleness report folded into what /metrics exports per timeframe."""
    counts: dict[tuple[str, str], int] = {}
    ages: dict[str, float] = {}
    for s in report["series"]:
        key = (s["timeframe"], s["class"])
        counts[key] = counts.get(key, 0) + 1
        if s["age_seconds"] is not None:
            ages[s["timeframe"]] = max(ages.get(s["timeframe"], 0.0), s["age_seconds"])
    return counts, ages
