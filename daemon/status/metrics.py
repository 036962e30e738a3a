"""Prometheus metrics for `GET /metrics`, in a registry of the daemon's own (not the global one).

Counters and gauges are read from the parts' `statistics()` at scrape time by a custom
collector, so there is no second set of numbers to keep in step: what /metrics says is what
/status says. Two things need recording as they happen: the write latency histogram (the
writer's `on_commit`) and cycle outcomes (the scheduler's `on_cycle_done`). Freshness per
timeframe comes from the staleness snapshot the status server hands over before each scrape.

    backfilld_api_requests_total            HTTP attempts sent to the API
    backfilld_api_rate_limited_total        429 responses
    backfilld_api_retries_total             attempts that followed a failed one
    backfilld_api_failures_total            pages that failed for good
    backfilld_api_bytes_total               response bytes read
    backfilld_api_in_flight / _waiting      requests holding / waiting for a slot or token
    backfilld_rate_limit_per_minute{kind}   configured and effective (after 429s) rate
    backfilld_bars_written_total            bars committed
    backfilld_pages_written_total           pages committed
    backfilld_write_errors_total            writes the database rejected
    backfilld_writer_reconnects_total       writer reconnections
    backfilld_writer_queue_depth / _capacity pages waiting for the writer
    backfilld_write_seconds                 histogram: one page's transaction
    backfilld_cycles_total{status}          finished cycles by outcome (ok / failed)
    backfilld_cycle_running                 1 while a cycle runs
    backfilld_cycle_jobs{state}             the running (else last) cycle's jobs: done/failed/total
    backfilld_last_cycle_end_timestamp_seconds
    backfilld_last_cycle_duration_seconds
    backfilld_series{timeframe,class}       configured series per staleness class
    backfilld_series_max_age_seconds{timeframe}  worst age among series holding bars
    backfilld_database_ready                1 when the last readiness check passed
    backfilld_config_generation             bumps on each successful reload
    backfilld_start_time_seconds            process start (Unix seconds)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .staleness import CLASSES

if TYPE_CHECKING:
    from .app import Daemon
    from .scheduler import CycleProgress

__all__ = ["CONTENT_TYPE", "Metrics", "SeriesSnapshot"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# One page's transaction: ~5 ms for a small top-up page, ~300 ms for 50,000 bars (DESIGN.md).
WRITE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# (timeframe, class) -> series count, and timeframe -> worst age in seconds.
SeriesSnapshot = tuple[dict[tuple[str, str], int], dict[str, float]]


class Metrics:
    """The daemon's registry. Create once per Daemon; `render()` for each scrape."""

    def __init__(self, daemon: Daemon) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.write_seconds = Histogram(
            "backfilld_write_seconds", "Duration of one page's write transaction",
            buckets=WRITE_BUCKETS, registry=self.registry,
        )
        self.cycles: dict[str, int] = {"ok": 0, "failed": 0}
        self.series: SeriesSnapshot | None = None
        self.database_ready: bool | None = None
        self.registry.register(_DaemonCollector(daemon, self))
        previous = daemon.writer.on_commit

        def on_commit(bars: int, seconds: float) -> None:
            self.write_seconds.observe(seconds)
            if previous is not None:
                previous(bars, seconds)

        daemon.writer.on_commit = on_commit
        daemon.scheduler.on_cycle_done.append(self._cycle_done)

    def _cycle_done(self, cycle: CycleProgress) -> None:
        self.cycles["ok" if cycle.ok else "failed"] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DaemonCollector(Collector):
    def __init__(self, daemon: Daemon, metrics: Metrics) -> None:
        self._daemon = daemon
        self._metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked collector: names are fixed, values read at collect time

    def collect(self) -> Iterator[Metric]:
        d, m = self._daemon, self._metrics
        api = d.client.statistics()
        limiter = d.limiter.statistics()
        writer = d.writer.statistics()

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield counter("backfilld_api_requests", "HTTP attempts sent to the API",
                      api.total_requests)
        yield counter("backfilld_api_rate_limited", "429 responses", api.rate_limited_count)
        yield counter("backfilld_api_retries", "Attempts that followed a failed one", api.retries)
        yield counter("backfilld_api_failures", "Pages that failed for good", api.failures)
        yield counter("backfilld_api_bytes", "Response bytes read", api.bytes_received)
        yield gauge("backfilld_api_in_flight", "Requests in flight", limiter.in_flight)
        yield gauge("backfilld_api_waiting", "Requests waiting for a slot or token",
                    limiter.waiting)
        rate = GaugeMetricFamily("backfilld_rate_limit_per_minute",
                                 "Request budget per minute (0: unlimited)", labels=["kind"])
        rate.add_metric(["configured"], limiter.configured_per_minute)
        rate.add_metric(["effective"], limiter.effective_per_minute)
        yield rate
        yield counter("backfilld_bars_written", "Bars committed", writer.bars_written)
        yield counter("backfilld_pages_written", "Pages committed", writer.pages_written)
        yield counter("backfilld_write_errors", "Writes the database rejected",
                      writer.write_errors)
        yield counter("backfilld_writer_reconnects", "Writer reconnections", writer.reconnects)
        yield gauge("backfilld_writer_queue_depth", "Messages waiting for the writer",
                    writer.queue_depth)
        yield gauge("backfilld_writer_queue_capacity", "Size of the writer's queue",
                    writer.queue_capacity)

        cycles = CounterMetricFamily("backfilld_cycles", "Finished cycles by outcome",
                                     labels=["status"])
        for status, count in m.cycles.items():
            cycles.add_metric([status], count)
        yield cycles
        running = d.scheduler.cycle
        yield gauge("backfilld_cycle_running", "1 while a cycle runs", int(running is not None))
        shown = running or d.scheduler.last_cycle
        if shown is not None:
            jobs = GaugeMetricFamily("backfilld_cycle_jobs", "Jobs of the running (else last) "
                                     "cycle", labels=["state"])
            jobs.add_metric(["total"], len(shown.jobs))
            jobs.add_metric(["done"], shown.jobs_done)
            jobs.add_metric(["failed"], len(shown.failed))
            yield jobs
        last = d.scheduler.last_cycle
        if last is not None and last.finished is not None:
            duration = last.finished - last.started
            yield gauge("backfilld_last_cycle_end_timestamp_seconds",
                        "When the last cycle finished", last.started_wall + duration)
            yield gauge("backfilld_last_cycle_duration_seconds", "The last cycle's duration",
                        duration)

        if m.series is not None:
            counts, ages = m.series
            series = GaugeMetricFamily("backfilld_series", "Configured series per staleness "
                                       "class", labels=["timeframe", "class"])
            for timeframe in sorted({tf for tf, _ in counts}):
                for cls in CLASSES:
                    series.add_metric([timeframe, cls], counts.get((timeframe, cls), 0))
            yield series
            age = GaugeMetricFamily("backfilld_series_max_age_seconds",
                                    "Worst staleness age among series holding bars",
                                    labels=["timeframe"])
            for timeframe, seconds in sorted(ages.items()):
                age.add_metric([timeframe], seconds)
            yield age
        if m.database_ready is not None:
            yield gauge("backfilld_database_ready", "1 when the last readiness check passed",
                        int(m.database_ready))
        yield gauge("backfilld_config_generation", "Config generation (bumps on reload)",
                    d.reload.generation)
        yield gauge("backfilld_start_time_seconds", "Process start, Unix seconds", d.started_at)
