"""Control endpoints: tests and the demo change the scenario while the simulator serves.

No API key, no latency, no rate limit, no outage: they are the test's hand, not the API.
Parameters are query parameters; every answer is JSON.

    GET  /__control                       the scenario: outages, defect rates, every split
    POST /__control/outage?seconds=S      an outage over [now, now + S); S=0 ends outages now
    POST /__control/defects?ticker=T&rate=R
                                          serve share R of T's bars defective from now on;
                                          R=0 corrects the vendor (clean answers again)
    GET  /__control/splits                every registered split, hidden ones included
    POST /__control/splits?ticker=T&execution_date=YYYY-MM-DD&split_from=F&split_to=T[&hidden=1]
                                          register a split (hidden=1: not yet announced)
    POST /__control/splits/announce?ticker=T[&all=1]
                                          announce T's earliest hidden split (all=1: every
                                          hidden one); 404 when T has none hidden

Error handling: a malformed or clashing request gets 400 with `{"status":"ERROR","error":..}`,
an unknown path 404, a wrong method 405; the scenario is unchanged by a refused request.
"""

from __future__ import annotations

from ..httpserver import Request, Response
from .scenario import Scenario
from .splits import Split

__all__ = ["PREFIX", "handle_control"]

PREFIX = "/__control"


def _error(status: int, message: str) -> Response:
    return Response.json({"status": "ERROR", "error": message}, status)


def _split_json(split: Split) -> dict[str, object]:
    return {**split.as_json(), "hidden": split.hidden}


def _state(scenario: Scenario) -> dict[str, object]:
    return {"outages": [{"start": s, "end": e} for s, e in scenario.outages()],
            "defects": scenario.defect_rates(),
            "splits": [_split_json(s) for s in scenario.splits()]}


def _number(query: dict[str, str], name: str) -> float:
    if name not in query:
        raise ValueError(f"{name} is required")
    try:
        return float(query[name])
    except ValueError:
        raise ValueError(f"{name} must be a number: {query[name]!r}") from None


def _flag(query: dict[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("1", "true", "yes")


def handle_control(scenario: Scenario, request: Request, now: float) -> Response:
    """Answer one control request (its path starts with PREFIX) at trio time `now`."""
    path, query, method = request.path.rstrip("/"), request.query, request.method
    routes = {
        PREFIX: ("GET",),
        f"{PREFIX}/outage": ("POST",),
        f"{PREFIX}/defects": ("POST",),
        f"{PREFIX}/splits": ("GET", "POST"),
        f"{PREFIX}/splits/announce": ("POST",),
    }
    if path not in routes:
        return _error(404, f"no control endpoint {path}")
    if method not in routes[path]:
        return _error(405, f"{path} takes {' or '.join(routes[path])}")
    try:
        if path == PREFIX or (path == f"{PREFIX}/splits" and method == "GET"):
            state = _state(scenario)
            return Response.json(state if path == PREFIX else {"splits": state["splits"]})
        if path == f"{PREFIX}/outage":
            seconds = _number(query, "seconds")
            scenario.start_outage(now, seconds)
            return Response.json({"status": "OK", "outages": _state(scenario)["outages"]})
        if "ticker" not in query or not query["ticker"]:
            raise ValueError("ticker is required")
        ticker = query["ticker"]
        if path == f"{PREFIX}/defects":
            scenario.set_defect_rate(ticker, _number(query, "rate"))
            return Response.json({"status": "OK", "defects": scenario.defect_rates()})
        if path == f"{PREFIX}/splits":
            split = Split(ticker, query.get("execution_date", ""), _number(query, "split_from"),
                          _number(query, "split_to"), hidden=_flag(query, "hidden"))
            scenario.register_split(split)
            return Response.json({"status": "OK", "split": _split_json(split)})
        announced = scenario.announce(ticker, every=_flag(query, "all"))
        if not announced:
            return _error(404, f"{ticker} has no hidden split")
        return Response.json({"status": "OK",
                              "announced": [_split_json(s) for s in announced]})
    except ValueError as exc:
        return _error(400, str(exc))
