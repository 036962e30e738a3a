"""Prometheus metrics for `GET /metrics`, in a registry of the daemon's own (not the global one).

Every value is read from one Snapshot (daemon.snapshot) at scrape time, so there is no second
set of numbers to keep in step: what /metrics says is what /status says. The parts count what
happens as it happens (the writer its latency histogram, the scheduler its finished cycles);
this module only renders. Freshness per timeframe and readiness come from the status app's
cached database answers, passed in with the snapshot.

    backfilld_api_requests_total            HTTP attempts sent to the API
    backfilld_api_rate_limited_total        429 responses
    backfilld_api_retries_total             attempts that followed a failed one
    backfilld_api_failures_total            pages that failed for good
    backfilld_api_bytes_total               response bytes read
    backfilld_api_in_flight / _waiting      requests holding / waiting for a slot or token
    backfilld_bars_quarantined_total        bars that did not decode or validate
    backfilld_circuit_open                  1 while the API circuit breaker is open
    backfilld_circuit_opened_total          times it opened
    backfilld_circuit_open_seconds_total    seconds it has been open
    backfilld_circuit_probes                probes of the current (or last) outage
    backfilld_rate_limit_per_minute{kind}   configured and effective (after 429s) rate
    backfilld_bars_written_total            bars committed
    backfilld_pages_written_total           pages committed
    backfilld_write_errors_total            writes the database rejected
    backfilld_writer_reconnects_total       writer reconnections
    backfilld_splits_applied_total          splits that re-adjusted stored history
    backfilld_writer_queue_depth / _capacity pages waiting for the writer
    backfilld_write_seconds                 histogram: one page's transaction
    backfilld_cycles_total{status}          finished cycles by outcome (ok/failed/interrupted)
    backfilld_cycle_running                 1 while a cycle runs
    backfilld_cycle_jobs{state}             the running (else last) cycle's jobs: done/failed/
                                            not_entitled/total
    backfilld_last_cycle_end_timestamp_seconds
    backfilld_last_cycle_duration_seconds
    backfilld_series{timeframe,class}       configured series per staleness class
    backfilld_series_max_age_seconds{timeframe}  worst age among series holding bars
    backfilld_features_lag_seconds{timeframe}  worst span of bars without features
    backfilld_features_rows_written_total   feature rows written
    backfilld_features_passes_total / _errors_total / _pending / _latency_seconds
    backfilld_instance{instance_id,label,host}  instances sharing the database (1 alive)
    backfilld_instance_heartbeat_age_seconds{instance_id} / backfilld_instance_leases{...}
    backfilld_lease_takeovers_total / backfilld_lease_refused_pages_total
    backfilld_event_loop_lag_seconds / _max_seconds  how late the loop woke (last; worst of 60 s)
    backfilld_health{status}                1 for the current verdict: healthy/degraded/unhealthy
    backfilld_database_ready                1 when the last readiness check passed
    backfilld_config_generation             bumps on each successful reload
    backfilld_start_time_seconds            process start (Unix seconds)
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from ..cycles import ExecutionStatus
from ..snapshot import Snapshot
from ..staleness import CLASSES
from ..writer import WRITE_BUCKETS
from .reports import SeriesCounts

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE = CONTENT_TYPE_LATEST


HEALTH_STATES = ("healthy", "degraded", "unhealthy")


def render(snap: Snapshot, *, database_ready: bool | None, series: SeriesCounts | None,
           health: str | None = None) -> bytes:
    """The Prometheus text exposition of `snap` (plus readiness, the health verdict and
    per-timeframe freshness)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snap, database_ready, series, health))
    return generate_latest(registry)


class _SnapshotCollector(Collector):
    def __init__(self, snap: Snapshot, database_ready: bool | None,
                 series: SeriesCounts | None, health: str | None) -> None:
        self._snap = snap
        self._ready = database_ready
        self._series = series
        self._health = health

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unchecked collector: names are fixed, values read at collect time

    def collect(self) -> Iterator[Metric]:
        snap = self._snap
        api, limiter, writer, sched = snap.api, snap.limiter, snap.writer, snap.scheduler

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
        yield counter("backfilld_bars_quarantined", "Bars that did not decode or validate",
                      api.bars_quarantined)
        breaker = snap.breaker
        yield gauge("backfilld_circuit_open", "1 while the API circuit breaker is open",
                    int(breaker.open_since is not None))
        yield counter("backfilld_circuit_opened", "Times the circuit opened",
                      breaker.opened_total)
        yield counter("backfilld_circuit_open_seconds", "Seconds the circuit has been open",
                      breaker.open_seconds_total)
        yield gauge("backfilld_circuit_probes", "Probes sent in the current (or last) outage",
                    breaker.probes)
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
        yield counter("backfilld_splits_applied", "Splits that re-adjusted stored history",
                      writer.splits_applied)
        yield gauge("backfilld_event_loop_lag_seconds", "How late the event loop woke from its "
                    "last short sleep", snap.loop.last_seconds)
        yield gauge("backfilld_event_loop_lag_max_seconds", "The event loop's worst lateness "
                    "over the last minute", snap.loop.max_seconds)
        yield gauge("backfilld_writer_queue_depth", "Messages waiting for the writer",
                    writer.queue_depth)
        yield gauge("backfilld_writer_queue_capacity", "Size of the writer's queue",
                    writer.queue_capacity)
        if writer.write_buckets:
            buckets = [(f"{bound:g}", count)
                       for bound, count in zip(WRITE_BUCKETS, writer.write_buckets, strict=True)]
            buckets.append(("+Inf", writer.pages_written))
            yield HistogramMetricFamily("backfilld_write_seconds",
                                        "Duration of one page's write (its share by bars when "
                                        "queued pages share a transaction)",
                                        buckets=buckets, sum_value=writer.write_seconds_sum)

        cycles = CounterMetricFamily("backfilld_cycles", "Finished cycles by outcome",
                                     labels=["status"])
        for status in ExecutionStatus:
            cycles.add_metric([status.value], sched.cycles_finished.get(status.value, 0))
        yield cycles
        running = sched.cycle
        yield gauge("backfilld_cycle_running", "1 while a cycle runs", int(running is not None))
        shown = running or sched.last_cycle
        if shown is not None:
            jobs = GaugeMetricFamily("backfilld_cycle_jobs", "Jobs of the running (else last) "
                                     "cycle", labels=["state"])
            jobs.add_metric(["total"], len(shown.jobs))
            jobs.add_metric(["done"], shown.jobs_done)
            jobs.add_metric(["failed"], len(shown.failed))
            jobs.add_metric(["not_entitled"], len(shown.not_entitled))
            yield jobs
        last = sched.last_cycle
        if last is not None and last.finished is not None:
            duration = last.finished - last.started
            yield gauge("backfilld_last_cycle_end_timestamp_seconds",
                        "When the last cycle finished", last.started_wall + duration)
            yield gauge("backfilld_last_cycle_duration_seconds", "The last cycle's duration",
                        duration)

        if self._series is not None:
            counts, ages, lags = self._series
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
            lag = GaugeMetricFamily("backfilld_features_lag_seconds",
                                    "Worst span of bars without features (bar time)",
                                    labels=["timeframe"])
            for timeframe, seconds in sorted(lags.items()):
                lag.add_metric([timeframe], seconds)
            yield lag
        if self._health is not None:
            health = GaugeMetricFamily("backfilld_health", "1 for the scheduler's health now "
                                       "(healthy, degraded or unhealthy; the reasons are on "
                                       "/api/v1/admin/scheduler-health)", labels=["status"])
            for verdict in HEALTH_STATES:
                health.add_metric([verdict], int(verdict == self._health))
            yield health
        if self._ready is not None:
            yield gauge("backfilld_database_ready", "1 when the last readiness check passed",
                        int(self._ready))
        coord = snap.instances
        info = GaugeMetricFamily("backfilld_instance", "Instances sharing the database (1: "
                                 "alive, 0: stopped or silent)", labels=["instance_id", "label",
                                                                        "host"])
        beat = GaugeMetricFamily("backfilld_instance_heartbeat_age_seconds",
                                 "Seconds since each running (not cleanly stopped) instance's "
                                 "last heartbeat", labels=["instance_id"])
        held = GaugeMetricFamily("backfilld_instance_leases", "Series leases each instance "
                                 "holds", labels=["instance_id"])
        for inst in coord.instances:
            info.add_metric([inst.id, inst.label, inst.host], int(inst.alive))
            if not inst.stopped:
                beat.add_metric([inst.id], max(0.0, snap.wall - inst.heartbeat_at))
            held.add_metric([inst.id], inst.leases)
        yield info
        yield beat
        yield held
        yield counter("backfilld_lease_takeovers", "Leases this instance took over from a "
                      "lapsed holder", coord.takeovers)
        yield counter("backfilld_lease_refused_pages", "Pages not written: their lease had "
                      "gone to another instance", snap.writer.lease_refusals)
        feats = snap.features
        yield counter("backfilld_features_rows_written", "Feature rows written",
                      feats.rows_written)
        yield counter("backfilld_features_passes", "Features passes run", feats.runs)
        yield counter("backfilld_features_errors", "Features passes or series that failed",
                      feats.errors)
        yield gauge("backfilld_features_pending", "Commits whose features are not computed yet",
                    feats.pending)
        if feats.last_latency_seconds is not None:
            yield gauge("backfilld_features_latency_seconds",
                        "From a commit to its features, last pass", feats.last_latency_seconds)
        yield gauge("backfilld_config_generation", "Config generation (bumps on reload)",
                    snap.reload.generation)
        yield gauge("backfilld_start_time_seconds", "Process start, Unix seconds",
                    snap.started_at)
