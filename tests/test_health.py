"""The scheduler-health policy as a pure function of a snapshot: no database, no daemon."""

from __future__ import annotations

from daemon.cycles import CycleSnapshot, SchedulerState, SymbolState
from daemon.jobs import JobOutcome
from daemon.status.health import scheduler_health

from .snapshots import cycle, job, snapshot

HOUR = 3600.0


def finished(*outcomes: JobOutcome, auth_error: str | None = None,
             started: float = 0.0) -> CycleSnapshot:
    jobs = tuple(job(f"S{i}", o, None if o is JobOutcome.OK else "boom")
                 for i, o in enumerate(outcomes))
    return cycle(1, started=started, finished=started + 10, jobs=jobs, auth_error=auth_error,
                 symbols={j.symbol: SymbolState.DONE for j in jobs})


def test_healthy_after_a_good_cycle_and_before_the_next_is_due() -> None:
    report = scheduler_health(snapshot(now=HOUR - 1, last_cycle=finished(JobOutcome.OK)), None)
    assert report["status"] == "healthy" and report["reasons"] == []
    assert report["last_execution"]["state"] == "ok"
    assert report["failure_rate"] == 0.0 and report["circuit"]["state"] == "closed"


def test_no_execution_yet_degrades() -> None:
    report = scheduler_health(snapshot(), None)
    assert report["status"] == "degraded"
    assert report["reasons"] == ["no execution has started yet"]


def test_late_degrades_and_very_late_is_unhealthy() -> None:
    last = finished(JobOutcome.OK)
    late = scheduler_health(snapshot(now=HOUR + 61, last_cycle=last), None)
    assert late["status"] == "degraded" and late["reasons"] == ["the next execution is 1m late"]
    very = scheduler_health(snapshot(now=2 * HOUR + 1, last_cycle=last), None)
    assert very["status"] == "unhealthy"
    assert very["reasons"] == ["no execution for 2h 0m; the schedule is every 1h 0m"]
    # stopping is not lateness
    stopping = scheduler_health(snapshot(now=3 * HOUR, last_cycle=last,
                                         state=SchedulerState.STOPPING), None)
    assert stopping["reasons"] == ["stopping"]


def test_failure_share_decides_between_degraded_and_unhealthy() -> None:
    one_of_four = finished(JobOutcome.OK, JobOutcome.OK, JobOutcome.OK, JobOutcome.FAILED)
    report = scheduler_health(snapshot(now=60, last_cycle=one_of_four), None)
    assert report["status"] == "degraded" and report["failure_rate"] == 0.25
    assert report["reasons"] == ["1 of 4 jobs failed in execution 1"]
    half = finished(JobOutcome.OK, JobOutcome.FAILED)
    assert scheduler_health(snapshot(now=60, last_cycle=half), None)["status"] == "unhealthy"
    # cancelled jobs are not counted either way
    cancelled = finished(JobOutcome.OK, JobOutcome.CANCELLED)
    assert scheduler_health(snapshot(now=60, last_cycle=cancelled), None)["status"] == "healthy"


def test_a_refused_key_the_database_and_the_writer_are_unhealthy() -> None:
    refused = finished(JobOutcome.FAILED, auth_error="HTTP 401: Unknown API Key")
    report = scheduler_health(snapshot(now=60, last_cycle=refused), None)
    assert report["status"] == "unhealthy"
    assert "the API refused the key in execution 1: HTTP 401: Unknown API Key" in report["reasons"]
    ok = finished(JobOutcome.OK)
    down = scheduler_health(snapshot(now=60, last_cycle=ok, connected=False),
                            "cannot connect to PostgreSQL")
    assert down["reasons"] == ["database: cannot connect to PostgreSQL",
                               "the writer is not connected to the database"]
    stuck = scheduler_health(snapshot(now=200, last_cycle=ok, busy_since=100.0), None)
    assert stuck["status"] == "degraded"
    assert stuck["reasons"] == ["one write has been running for 100 s"]


def test_a_running_cycle_is_judged_on_its_finished_jobs() -> None:
    running = cycle(2, started=50, jobs=(job("A", JobOutcome.FAILED, "x"), job("B", None)),
                    symbols={"A": SymbolState.FAILED, "B": SymbolState.RUNNING})
    report = scheduler_health(snapshot(now=60, cycle=running,
                                       last_cycle=finished(JobOutcome.OK)), None)
    assert report["last_execution"] == {"number": 2, "state": "running",
                                        "started_at": "2023-11-14T22:13:20.000Z",
                                        "age_seconds": 10.0}
    assert report["failure_rate"] == 1.0 and report["status"] == "unhealthy"
