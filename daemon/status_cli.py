"""`backfilld status`: the status endpoint's answers as tables for a person at a terminal.

Reads /status, /api/v1/admin/scheduler-health, /api/v1/admin/features/staleness and
/api/v1/admin/scheduler/execution-history from a running daemon and prints what it is doing,
how fresh its series are (only those that are not fresh, unless --all) and what failed lately.

Exit codes: 0 healthy or degraded, 1 unhealthy, 4 the daemon could not be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import httpx

from .config import Config, load_config
from .errors import ConfigError
from .report import format_table
from .timefmt import human_age

__all__ = ["EXIT_UNHEALTHY", "EXIT_UNREACHABLE", "add_status_arguments", "run_status"]

EXIT_UNHEALTHY = 1
EXIT_UNREACHABLE = 4
DEFAULT_URL = "http://127.0.0.1:8080"
# A daemon listening on every address is reached on loopback.
_ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
HISTORY_SHOWN = 5
SYMBOLS_LISTED = 40
ERROR_CHARS = 100


def add_status_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--url", help="the daemon's status address (default: from the config "
                        f"file's [status] listen, else {DEFAULT_URL})")
    parser.add_argument("--config", default=None,
                        help=f"config file to read [status] listen from (default {default_config})")
    parser.add_argument("--all", action="store_true", help="list every series, fresh ones too")
    parser.add_argument("--json", action="store_true", help="print the raw JSON answers")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    parser.set_defaults(default_config=default_config)


def _url_from_config(config: Config) -> str:
    host = _ANY_ADDRESS.get(config.status.host, config.status.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.status.port}"


def resolve_url(args: argparse.Namespace) -> str:
    """--url, else the config's [status] listen, else the default address."""
    if args.url:
        return str(args.url).rstrip("/")
    path = args.config or args.default_config
    if args.config is None and not Path(path).is_file():
        return DEFAULT_URL
    return _url_from_config(load_config(path))  # ConfigError: exit 2 in __main__


def _get(http: httpx.Client, path: str) -> dict[str, Any]:
    """The JSON answer; a 503 with a reason is an answer too."""
    response = http.get(path)
    try:
        body = response.json()
    except ValueError:
        body = {"error": f"HTTP {response.status_code}", "reason": response.text[:200]}
    if not isinstance(body, dict):
        body = {"error": "unexpected answer"}
    body["_http_status"] = response.status_code
    return body


def run_status(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        url = resolve_url(args)
    except ConfigError as exc:
        print(f"backfilld: {exc}", file=sys.stderr)
        return 2
    try:
        with httpx.Client(base_url=url, timeout=args.timeout) as http:
            answers = {
                "status": _get(http, "/status"),
                "health": _get(http, "/api/v1/admin/scheduler-health"),
                "staleness": _get(http, "/api/v1/admin/features/staleness"),
                "history": _get(http, "/api/v1/admin/scheduler/execution-history"
                                f"?limit={HISTORY_SHOWN}"),
            }
    except httpx.HTTPError as exc:
        print(f"backfilld: cannot reach the daemon at {url}: {exc or type(exc).__name__}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    if answers["status"]["_http_status"] != 200:
        print(f"backfilld: {url}/status answered HTTP {answers['status']['_http_status']}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        for body in answers.values():
            body.pop("_http_status", None)
        print(json.dumps(answers, indent=2), file=out)
    else:
        print(render(url, answers, show_all=args.all), file=out)
    return EXIT_UNHEALTHY if answers["health"].get("status") == "unhealthy" else 0


# --- rendering (pure: tested with recorded answers) ------------------------------------------


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _clip(text: str | None, limit: int = ERROR_CHARS) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(iso: str | None) -> str:
    """`2024-03-01 12:00:05Z` from an ISO time, `-` for None."""
    return "-" if not iso else iso.replace("T", " ")[:19] + "Z"


def render(url: str, answers: dict[str, dict[str, Any]], *, show_all: bool = False) -> str:
    st, health = answers["status"], answers["health"]
    lines = [f"backfilld {st.get('instance', '?')} at {url}: "
             f"{str(health.get('status', 'unknown')).upper()}"]
    for reason in health.get("reasons", []):
        lines.append(f"  ! {reason}")
    cfg = st["config"]
    lines.append(f"  version {st['version']} · up {human_age(st['uptime_seconds'])} · config "
                 f"generation {cfg['generation']} loaded {_when(cfg['loaded_at'])} from "
                 f"{cfg['source']}")
    if cfg.get("last_reload_error"):
        lines.append(f"  last reload failed ({_when(cfg['last_reload_error_at'])}): "
                     f"{_clip(cfg['last_reload_error'])}")
    lines.append(f"  {cfg['symbols']} symbols x {', '.join(cfg['timeframes'])}, every "
                 f"{cfg['refresh_minutes']:g} min")
    cycle, last = st.get("cycle"), st.get("last_cycle")
    if cycle:
        lines.append(f"  state: {st['state']}, cycle {cycle['number']} ({cycle['trigger']}) "
                     f"{cycle['jobs_done']}/{cycle['jobs_total']} jobs, {cycle['jobs_failed']} "
                     f"failed, {_n(cycle['bars_written'])} bars, "
                     f"{human_age(cycle['duration_seconds'])} so far")
    else:
        lines.append(f"  state: {st['state']}, next cycle {_when(st.get('next_cycle_at'))}")
    if last:
        verdict = "ok" if last["ok"] else "FAILED"
        lines.append(f"  last cycle {last['number']} ({last['trigger']}) {verdict}: "
                     f"{last['jobs_done']} jobs, {last['jobs_failed']} failed, "
                     f"{_n(last['bars_written'])} bars in {human_age(last['duration_seconds'])}, "
                     f"finished {_when(last['finished_at'])}")
    rl = st["rate_limiter"]
    rate = ("unlimited" if not rl["configured_per_minute"] else
            f"{rl['effective_per_minute']:g}/{rl['configured_per_minute']:g} per min")
    circuit = health.get("circuit", {}).get("state", "?")
    lines.append(f"  api: {_n(st['total_requests'])} requests, {_n(st['rate_limited_count'])} "
                 f"429s, {_n(st['retries'])} retries · rate {rate} · {rl['in_flight']} in "
                 f"flight, {rl['waiting']} waiting · circuit {circuit}")
    w = st["writer"]
    last_write = ("-" if w["last_write_seconds"] is None
                  else f"{w['last_write_seconds'] * 1000:.0f} ms")
    lines.append(f"  writer: {'connected' if w['connected'] else 'NOT CONNECTED'} · queue "
                 f"{w['queue_depth']}/{w['queue_capacity']} · {_n(w['pages_written'])} pages, "
                 f"{_n(w['bars_written'])} bars · last write {last_write} · "
                 f"{w['write_errors']} rejected")
    if st.get("last_error"):
        err = st["last_error"]
        lines.append(f"  last error ({_when(err['at'])}): {_clip(err['message'])}")

    if cycle:
        lines += ["", *_symbols_section(cycle)]
    lines += ["", *_staleness_section(answers["staleness"], show_all)]
    lines += ["", *_history_section(answers["history"])]
    return "\n".join(lines)


def _symbols_section(cycle: dict[str, Any]) -> list[str]:
    states = ", ".join(f"{n} {s}" for s, n in sorted(cycle["symbol_states"].items()))
    lines = [f"symbols in cycle {cycle['number']}: {states}"]
    symbols = cycle["symbols"]
    # The interesting ones first: running and failed, then queued, then done.
    order = {"running": 0, "failed": 1, "queued": 2, "done": 3}
    ranked = sorted(symbols.items(), key=lambda kv: (order.get(kv[1]["state"], 4), kv[0]))
    rows = [(s, v["state"], f"{v['jobs_done']}/{v['jobs']}", v["jobs_failed"], v["bars"])
            for s, v in ranked[:SYMBOLS_LISTED]]
    lines.append(format_table(["symbol", "state", "jobs", "failed", "bars"], rows))
    if len(ranked) > SYMBOLS_LISTED:
        lines.append(f"... and {len(ranked) - SYMBOLS_LISTED} more")
    return lines


def _staleness_section(report: dict[str, Any], show_all: bool) -> list[str]:
    if "series" not in report:
        return [f"freshness: unavailable ({_clip(report.get('reason') or report.get('error'))})"]
    counts = report["counts"]
    th = report["thresholds_hours"]
    summary = ", ".join(f"{counts[c]} {c.replace('_', ' ')}" for c in counts)
    lines = [f"freshness: {summary} (fresh < {th['fresh']:g} h, aging < {th['aging']:g} h, "
             f"stale < {th['stale']:g} h)"]
    shown = [s for s in report["series"] if show_all or s["class"] != "fresh"]
    if not shown:
        lines.append("every series holds every bar the market could have produced")
        return lines
    rows = [(s["symbol"], s["timeframe"], s["class"].replace("_", " "), s["age"],
             _when(s["last_bar"]), _when(s["last_success"]), _clip(s["last_error"], 60))
            for s in shown]
    lines.append(format_table(["symbol", "timeframe", "class", "age", "last bar",
                               "last success", "last error"], rows))
    return lines


def _history_section(report: dict[str, Any]) -> list[str]:
    if "executions" not in report:
        return [f"executions: unavailable ({_clip(report.get('reason') or report.get('error'))})"]
    executions = report["executions"]
    if not executions:
        return ["executions: none yet"]
    rows = [(e["number"], e["instance"], _when(e["started_at"]), e["trigger"], e["status"],
             human_age(e["duration_seconds"]), e["jobs_ok"], e["jobs_failed"], e["bars_written"],
             e["requests"], e["rate_limited"]) for e in executions]
    lines = ["recent executions",
             format_table(["#", "instance", "started", "trigger", "status", "took", "ok",
                           "failed", "bars", "requests", "429s"], rows)]
    for e in executions:
        if e.get("error"):
            lines.append(f"  execution {e['number']} ({e['instance']}): {_clip(e['error'])}")
        for job in e["failed_jobs"][:10]:
            lines.append(f"  execution {e['number']}: {job['symbol']} {job['timeframe']} "
                         f"failed: {_clip(job['error'])}")
        if len(e["failed_jobs"]) > 10:
            lines.append(f"  execution {e['number']}: ... {e['jobs_failed'] - 10} more failed")
    return lines
