"""The JSON of `/status`: pure functions of a Snapshot (no I/O, no clock of their own).

Everything here is read from memory, so `/status` stays fast during a backfill; what needs the
database (staleness, history) is in daemon.status.reports.
"""

from __future__ import annotations

from typing import Any

from ..cycles import CycleSnapshot, SchedulerState, SymbolState
from ..snapshot import Snapshot
from ..timefmt import iso

__all__ = ["breaker_report", "cycle_report", "limiter_report", "rounded", "status_report"]

# Failed jobs listed per cycle; the rest are counted.
FAILED_JOBS_LISTED = 50


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def status_report(snap: Snapshot) -> dict[str, Any]:
    config = snap.config
    sched = snap.scheduler
    api, writer = snap.api, snap.writer
    cycle, last = sched.cycle, sched.last_cycle
    next_at = None
    if cycle is None and last is not None and sched.state is not SchedulerState.STOPPING:
        next_at = snap.wall_of(last.started + config.backfill.refresh_minutes * 60)
    return {
        "service": "backfilld",
        "version": snap.version,
        "instance": config.instance,
        "state": sched.state.value,
        "started_at": iso(snap.started_at),
        "uptime_seconds": rounded(snap.wall - snap.started_at),
        "config": {
            "generation": snap.reload.generation,
            "loaded_at": iso(snap.reload.loaded_at),
            "source": config.source,
            "symbols": len(config.backfill.symbols),
            "timeframes": [tf.label for tf in config.backfill.timeframes],
            "refresh_minutes": config.backfill.refresh_minutes,
            "last_reload_error": snap.reload.last_error,
            "last_reload_error_at": iso(snap.reload.last_error_at),
        },
        "cycle": None if cycle is None else cycle_report(snap, cycle, running=True),
        "last_cycle": None if last is None else cycle_report(snap, last, running=False),
        "next_cycle_at": iso(next_at),
        "rate_limiter": limiter_report(snap),
        "circuit": breaker_report(snap),
        "total_requests": api.total_requests,
        "rate_limited_count": api.rate_limited_count,
        "retries": api.retries,
        "api": {
            "failures": api.failures,
            "pages": api.pages,
            "bars": api.bars,
            "bytes_received": api.bytes_received,
            "bars_quarantined": api.bars_quarantined,
        },
        "writer": {
            "connected": writer.connected,
            "queue_depth": writer.queue_depth,
            "queue_capacity": writer.queue_capacity,
            "pages_written": writer.pages_written,
            "bars_written": writer.bars_written,
            "transactions": writer.transactions,
            "write_errors": writer.write_errors,
            "reconnects": writer.reconnects,
            "last_write_seconds": rounded(writer.last_write_seconds, 4),
            "busy_seconds": None if writer.busy_since is None else rounded(
                snap.now - writer.busy_since),
        },
        "instance_id": snap.instances.instance_id,
        "instances": [
            {"id": i.id, "label": i.label, "host": i.host, "pid": i.pid, "version": i.version,
             "started_at": iso(i.started_at), "heartbeat_at": iso(i.heartbeat_at),
             "heartbeat_age_seconds": rounded(snap.wall - i.heartbeat_at), "alive": i.alive,
             "leases": i.leases, "this": i.id == snap.instances.instance_id}
            for i in snap.instances.instances],
        "leases": {
            "held": snap.instances.leases_held,
            "claimed": snap.instances.claims,
            "taken_over": snap.instances.takeovers,
            "renewals": snap.instances.renewals,
            "refused_pages": snap.writer.lease_refusals,
        },
        "event_loop": {
            "lag_seconds": rounded(snap.loop.last_seconds, 4),
            "max_lag_seconds": rounded(snap.loop.max_seconds, 4),
        },
        "features": {
            "connected": snap.features.connected,
            "passes": snap.features.runs,
            "series_computed": snap.features.series_computed,
            "rows_written": snap.features.rows_written,
            "pending": snap.features.pending,
            "last_pass_seconds": rounded(snap.features.last_run_seconds),
            "last_latency_seconds": rounded(snap.features.last_latency_seconds),
            "errors": snap.features.errors,
            "last_error": snap.features.last_error,
        },
        "last_error": last_error(snap),
    }


def cycle_report(snap: Snapshot, cycle: CycleSnapshot, *, running: bool) -> dict[str, Any]:
    per_symbol: dict[str, list[int]] = {}  # symbol -> [done, jobs, failed, bars]
    failed_jobs = []
    refused = [{"symbol": j.symbol, "timeframe": j.timeframe, "message": j.error}
               for j in cycle.jobs if j.not_entitled]
    for job in cycle.jobs:
        counts = per_symbol.setdefault(job.symbol, [0, 0, 0, 0])
        counts[1] += 1
        counts[3] += job.bars_written
        if job.done:
            counts[0] += 1
            if job.failed:
                counts[2] += 1
                failed_jobs.append({"symbol": job.symbol, "timeframe": job.timeframe,
                                    "error": job.error})
    queued = sum(1 for s in cycle.symbols.values() if s is SymbolState.QUEUED)
    symbols = {}
    for symbol, state in cycle.symbols.items():
        done, jobs, failed, bars = per_symbol.get(symbol, [0, 0, 0, 0])
        symbols[symbol] = {"state": state.value, "jobs_done": done, "jobs": jobs,
                           "jobs_failed": failed, "bars": bars}
    states: dict[str, int] = {}
    for state in cycle.symbols.values():
        states[state.value] = states.get(state.value, 0) + 1
    end = snap.now if running else (cycle.finished or cycle.started)
    elapsed = end - cycle.started
    report: dict[str, Any] = {
        "number": cycle.number,
        "execution_id": str(cycle.execution_id),
        "trigger": cycle.trigger,
        "started_at": iso(cycle.started_wall),
        "finished_at": None if running else iso(cycle.started_wall + elapsed),
        "duration_seconds": rounded(elapsed),
        "jobs_done": cycle.jobs_done,
        # planned so far, plus one per timeframe for each symbol still to plan
        "jobs_total": len(cycle.jobs) + queued * snap.scheduler.timeframes,
        "jobs_failed": len(failed_jobs),
        "jobs_not_entitled": len(refused),
        "bars_written": cycle.bars_written,
        "bars_quarantined": cycle.quarantined,
        "requests": cycle.requests,
        "rate_limited": cycle.rate_limited,
        "retries": cycle.retries,
        "ok": None if running else cycle.ok,
        "symbol_states": states,
        "symbols": symbols,
        "failed_jobs": failed_jobs[-FAILED_JOBS_LISTED:],
        "not_entitled": refused[-FAILED_JOBS_LISTED:],
    }
    if cycle.auth_error:
        report["auth_error"] = cycle.auth_error
    return report


def limiter_report(snap: Snapshot) -> dict[str, Any]:
    stats = snap.limiter
    paused = None if stats.paused_until is None else stats.paused_until - snap.now
    return {
        "configured_per_minute": stats.configured_per_minute,
        "effective_per_minute": rounded(stats.effective_per_minute, 2),
        "in_flight": stats.in_flight,
        "waiting": stats.waiting,
        "paused_for_seconds": rounded(paused),
        "total_granted": stats.total_granted,
        "max_in_flight": stats.max_in_flight,
    }


def breaker_report(snap: Snapshot) -> dict[str, Any]:
    """The circuit breaker (daemon.breaker): closed, or open since when, probing how often."""
    b = snap.breaker
    return {
        "state": b.state.value,
        "open_since": None if b.opened_at is None or b.open_since is None else iso(b.opened_at),
        "open_seconds": None if b.open_since is None else rounded(snap.now - b.open_since),
        "probes": b.probes,
        "next_probe_in_seconds": None if b.next_probe_at is None else rounded(
            max(0.0, b.next_probe_at - snap.now)),
        "waiting": b.waiting,
        "consecutive_failures": b.consecutive_failures,
        "failure_threshold": b.threshold,
        "opened_total": b.opened_total,
    }


def last_error(snap: Snapshot) -> dict[str, Any] | None:
    """The most recent of: the writer's last failed job or write, the last failed reload."""
    candidates = []
    writer = snap.writer
    if writer.last_error is not None and writer.last_error_at is not None:
        candidates.append((writer.last_error_at, writer.last_error))
    reload = snap.reload
    if reload.last_error is not None and reload.last_error_at is not None:
        candidates.append((reload.last_error_at, f"config reload: {reload.last_error}"))
    if not candidates:
        return None
    at, message = max(candidates)
    return {"at": iso(at), "message": message}
