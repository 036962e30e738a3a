"""The database-backed answers: per-series staleness of bars and of their features
(`/api/v1/admin/features/staleness`).

Runs in a worker thread on a short-lived reader connection (daemon.monitoring), never the
writer's; the status app caches the result (daemon.status.cache).
"""

from __future__ import annotations

from typing import Any

from .. import monitoring
from ..config import Config
from ..features import read_features_lag
from ..market_calendar import et_date, et_midnight_ms
from ..staleness import CLASSES, series_age
from ..timefmt import human_age, iso_ms
from .views import rounded

__all__ = ["SeriesCounts", "series_metrics", "staleness_report"]

# (timeframe, class) -> series count; timeframe -> worst age in seconds; timeframe -> worst
# features lag (seconds of bars without features).
SeriesCounts = tuple[dict[tuple[str, str], int], dict[str, float], dict[str, float]]


def _coverage(summary: monitoring.CoverageSummary | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    return {"from": iso_ms(summary.first_ms), "to": iso_ms(summary.end_ms),
            "holes": summary.holes}


def staleness_report(url: str, config: Config, now_ms: int) -> dict[str, Any]:
    """Read freshness rows and classify every configured series (runs in a worker thread)."""
    rows = monitoring.read_freshness(url)
    lags = read_features_lag(url)
    first_ms = et_midnight_ms(config.backfill.first_day(et_date(now_ms)))
    readjusting = monitoring.read_readjusting(url, first_ms)
    coverage = monitoring.read_coverage_summary(url)
    thresholds = config.staleness
    series = []
    counts = dict.fromkeys(CLASSES, 0)
    feature_counts = dict.fromkeys(CLASSES, 0)
    for symbol in config.backfill.symbols:
        for tf in config.backfill.timeframes:
            row = rows.get((symbol, tf.label))
            age = series_age(
                symbol, tf, row.last_bar_ms if row else None, now_ms, thresholds,
                checked_through_ms=row.checked_through_ms if row else None,
            )
            counts[age.cls] += 1
            lag = lags.get((symbol, tf.label))
            newest_feature = lag.newest_feature_ms if lag else None
            # features are judged like bars: from their newest row, and (once they have
            # caught up with the bars) the same proof that nothing newer is missing
            caught_up = (lag is not None and lag.dirty_from_ms is None and row is not None
                         and newest_feature == row.last_bar_ms)
            feature_age = series_age(
                symbol, tf, newest_feature, now_ms, thresholds,
                checked_through_ms=row.checked_through_ms if caught_up and row else None)
            feature_counts[feature_age.cls] += 1
            bars_ahead = None
            if row is not None and row.last_bar_ms is not None:
                bars_ahead = (row.last_bar_ms - (newest_feature or row.last_bar_ms)) / 1000
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
                "coverage": _coverage(coverage.get((symbol, tf.label))),
                "readjusting": (symbol, tf.label) in readjusting,
                "readjusting_for": (readjusting[(symbol, tf.label)].split
                                    if (symbol, tf.label) in readjusting else None),
                "features": {
                    "class": feature_age.cls,
                    "newest": iso_ms(newest_feature),
                    "lag_seconds": None if newest_feature is None else rounded(bars_ahead, 1),
                    "dirty_from": iso_ms(lag.dirty_from_ms if lag else None),
                },
            })
    refused = sum(1 for s in series if s["not_entitled"])
    return {
        "now": iso_ms(now_ms),
        "not_entitled": refused,
        "quarantined": sum(s["quarantined"] for s in series),
        "readjusting": sum(1 for s in series if s["readjusting"]),
        "thresholds_hours": {"fresh": thresholds.fresh_hours, "aging": thresholds.aging_hours,
                             "stale": thresholds.stale_hours},
        "counts": counts,
        "features_counts": feature_counts,
        "series": series,
    }


def series_metrics(report: dict[str, Any]) -> SeriesCounts:
    """The staleness report folded into what /metrics exports per timeframe."""
    counts: dict[tuple[str, str], int] = {}
    ages: dict[str, float] = {}
    lags: dict[str, float] = {}
    for s in report["series"]:
        key = (s["timeframe"], s["class"])
        counts[key] = counts.get(key, 0) + 1
        if s["age_seconds"] is not None:
            ages[s["timeframe"]] = max(ages.get(s["timeframe"], 0.0), s["age_seconds"])
        lag = s["features"]["lag_seconds"]
        if lag is not None:
            lags[s["timeframe"]] = max(lags.get(s["timeframe"], 0.0), lag)
    return counts, ages, lags
