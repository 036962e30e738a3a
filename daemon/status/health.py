"""Scheduler health: healthy / degraded / unhealthy with every reason, as a pure function.

`scheduler_health(snapshot, database_error)` reads nothing but its arguments (the snapshot
carries its own `now`), so the policy is tested on MockClock without a database or a daemon.
"""

from __future__ import annotations

from typing import Any

from ..cycles import SchedulerState
from ..snapshot import Snapshot
from ..timefmt import human_age, iso
from .views import breaker_report, limiter_report, rounded

__all__ = ["FAILURE_UNHEALTHY", "LATE_GRACE_SECONDS", "WRITE_STUCK_SECONDS", "scheduler_health"]

# A cycle this late (beyond its due time) degrades, twice the interval late is unhealthy; a
# failed-job share at or above FAILURE_UNHEALTHY is unhealthy, any failure degrades.
LATE_GRACE_SECONDS = 60.0
FAILURE_UNHEALTHY = 0.5
# A single write running this long means the database is stuck (pages take < 1 s).
WRITE_STUCK_SECONDS = 60.0


def circuit(snap: Snapshot) -> dict[str, Any]:
    """The API gate: the circuit breaker's state and, beside it, the rate limiter's (paused by a
    Retry-After, throttled after 429s, or at its configured rate)."""
    stats = snap.limiter
    if stats.paused_until is not None:
        rate = "paused"
    elif stats.effective_per_minute < stats.configured_per_minute:
        rate = "throttled"
    else:
        rate = "full"
    return {**breaker_report(snap), "rate": rate, **limiter_report(snap)}


def scheduler_health(snap: Snapshot, database_error: str | None) -> dict[str, Any]:
    """healthy / degraded / unhealthy, with every reason that is not 'healthy'."""
    sched = snap.scheduler
    stopping = sched.state is SchedulerState.STOPPING
    interval = snap.config.backfill.refresh_minutes * 60
    now = snap.now
    unhealthy: list[str] = []
    degraded: list[str] = []
    if database_error is not None:
        unhealthy.append(f"database: {database_error}")
    writer = snap.writer
    if not writer.connected:
        unhealthy.append("the writer is not connected to the database")
    elif writer.busy_since is not None and now - writer.busy_since > WRITE_STUCK_SECONDS:
        degraded.append(f"one write has been running for {now - writer.busy_since:.0f} s")
    if stopping:
        degraded.append("stopping")

    cycle, last = sched.cycle, sched.last_cycle
    last_execution: dict[str, Any] | None = None
    if cycle is not None:
        last_execution = {"number": cycle.number, "state": "running",
                          "started_at": iso(cycle.started_wall),
                          "age_seconds": rounded(now - cycle.started)}
    elif last is not None and last.finished is not None:
        # the scheduler's own due time (a retry cycle between regular ones does not move it)
        due = sched.next_cycle_at if sched.next_cycle_at is not None else last.started + interval
        late = now - due
        last_execution = {"number": last.number, "state": "ok" if last.ok else "failed",
                          "started_at": iso(last.started_wall),
                          "finished_at": iso(snap.wall_of(last.finished)),
                          "age_seconds": rounded(now - last.finished),
                          "next_due_at": iso(snap.wall_of(due))}
        if not stopping and late > interval:
            unhealthy.append(f"no execution for {human_age(now - last.started)}; the schedule "
                             f"is every {human_age(interval)}")
        elif not stopping and late > LATE_GRACE_SECONDS:
            degraded.append(f"the next execution is {human_age(late)} late")
    else:
        degraded.append("no execution has started yet")

    # Failure rate: the running cycle's finished jobs, else the last cycle's.
    judged = cycle if cycle is not None and cycle.jobs_done else last
    failure_rate = None
    if judged is not None:
        done = [j for j in judged.jobs if j.done and not j.cancelled and not j.not_entitled]
        failed = len(judged.failed)
        failure_rate = failed / len(done) if done else 0.0
        label = f"execution {judged.number}"
        if judged.auth_error:
            unhealthy.append(f"the API refused the key in {label}: {judged.auth_error}")
        elif failed and failure_rate >= FAILURE_UNHEALTHY:
            unhealthy.append(f"{failed} of {len(done)} jobs failed in {label}")
        elif failed:
            degraded.append(f"{failed} of {len(done)} jobs failed in {label}")
        refused = judged.not_entitled
        if refused:
            names = ", ".join(f"{j.symbol} {j.timeframe}" for j in refused[:5])
            more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
            degraded.append(f"{len(refused)} series not entitled (the API plan does not cover "
                            f"them) in {label}: {names}{more}")
        if judged.quarantined:
            degraded.append(f"{judged.quarantined} bars quarantined in {label} (impossible or "
                            "undecodable; asked again each top-up)")

    gate = circuit(snap)
    if gate["state"] != "closed":
        degraded.append(f"the API is unavailable: circuit {gate['state']} for "
                        f"{gate['open_seconds'] or 0:.0f} s, {gate['probes']} probe(s); work "
                        "waits and resumes by itself")
    if gate["rate"] == "paused":
        degraded.append(f"the API asked us to wait (Retry-After): no requests for "
                        f"{gate['paused_for_seconds']:.1f} s")
    elif gate["rate"] == "throttled":
        degraded.append(f"request rate cut to {gate['effective_per_minute']:g}/min of "
                        f"{gate['configured_per_minute']:g} after 429s")

    status = "unhealthy" if unhealthy else "degraded" if degraded else "healthy"
    return {
        "status": status,
        "reasons": unhealthy + degraded,
        "checked_at": iso(snap.wall),
        "schedule_seconds": interval,
        "last_execution": last_execution,
        "failure_rate": rounded(failure_rate),
        "circuit": gate,
    }
