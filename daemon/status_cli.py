"""`backfilld status`: the status endpoint's answers as tables for a person at a terminal.

Reads /status, /api/v1/admin/scheduler-health, /api/v1/admin/features/staleness and
/api/v1/admin/scheduler/execution-history from a running daemon and prints what it is doing,
how fresh its series are (only those that are not fresh, unless --all) and what failed lately.

The status token (a daemon with one answers 401 without it) is, first found wins:
`--token-file PATH`, `$BACKFILLD_STATUS_TOKEN`, then the token of the config file read for the
address (its systemd credential or `[status] token_file`). A config's token is sent only to the
address that config names, or with an explicit `--config`: never to a `--url` alone, so a
token cannot leak to a host it was not meant for.

Exit codes: 0 healthy or degraded, 1 unhealthy, 2 bad config or unreadable --token-file,
4 the daemon could not be reached, 5 the daemon refused us (401: no token, or the wrong one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import attrs
import httpx

from .config import STATUS_TOKEN_ENV, Config, Secret, load_config
from .errors import ConfigError
from .report import format_table
from .timefmt import human_age

__all__ = ["EXIT_UNAUTHORIZED", "EXIT_UNHEALTHY", "EXIT_UNREACHABLE", "Target",
           "add_status_arguments", "resolve_target", "run_status"]

EXIT_UNHEALTHY = 1
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 4
EXIT_UNAUTHORIZED = 5
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
    parser.add_argument("--token-file", default=None, metavar="PATH",
                        help=f"send the status token in PATH (default: ${STATUS_TOKEN_ENV}, "
                        "else the config file's token)")
    parser.set_defaults(default_config=default_config)


@attrs.frozen
class Target:
    """Where to ask, and with which token (None: none found) and where it came from."""

    url: str
    token: Secret | None = None
    token_source: str = ""


def _url_from_config(config: Config) -> str:
    host = _ANY_ADDRESS.get(config.status.host, config.status.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.status.port}"


def resolve_target(args: argparse.Namespace, env: dict[str, str] | None = None) -> Target:
    """The address (--url, else the config's [status] listen, else the default) and the token
    (--token-file, else $BACKFILLD_STATUS_TOKEN, else the config's).

    The config file is read when --config is given, or when there is no --url and the default
    file exists; only then is its token used (see the module docstring).

    Error handling: a bad config or an unreadable --token-file raises ConfigError.
    """
    env = dict(os.environ if env is None else env)
    token_file = getattr(args, "token_file", None)
    if token_file:
        path = Path(token_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(path, None, f"--token-file: cannot read: {reason}") from None
        _check_token(text, path, "--token-file")
        # As the environment variable: it outranks the config's own sources, which then are
        # not even read (a config whose token_file only root can read still gives the address).
        env[STATUS_TOKEN_ENV] = text
    elif env.get(STATUS_TOKEN_ENV, "").strip():
        _check_token(env[STATUS_TOKEN_ENV].strip(), f"${STATUS_TOKEN_ENV}", "the variable")
    path = args.config or args.default_config
    read_config = args.config is not None or (not args.url and Path(path).is_file())
    config = load_config(path, env=env) if read_config else None
    url = (str(args.url).rstrip("/") if args.url
           else _url_from_config(config) if config is not None else DEFAULT_URL)
    if config is not None and config.status.token is not None:
        source = "--token-file" if token_file else config.status.token_source
        return Target(url, config.status.token, source)
    explicit = env.get(STATUS_TOKEN_ENV, "").strip()
    if explicit:
        return Target(url, Secret(explicit), "--token-file" if token_file
                      else f"${STATUS_TOKEN_ENV}")
    return Target(url)


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
        target = resolve_target(args)
    except ConfigError as exc:
        print(f"backfilld: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    url = target.url
    headers = ({} if target.token is None
               else {"authorization": f"Bearer {target.token.reveal()}"})
    try:
        with httpx.Client(base_url=url, timeout=args.timeout, headers=headers) as http:
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
    if any(body["_http_status"] == 401 for body in answers.values()):
        print(f"backfilld: {url}: the daemon requires a status token: {_token_hint(target)}",
              file=sys.stderr)
        return EXIT_UNAUTHORIZED
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


def _check_token(text: str, where: object, what: str) -> None:
    """A token that can travel in a header (printable ASCII, no spaces), or ConfigError; the
    message never quotes it."""
    if not text:
        raise ConfigError(where, None, f"{what} is empty; expected the status token")
    if not (text.isascii() and text.isprintable() and " " not in text):
        raise ConfigError(where, None, f"{what} must hold printable ASCII without spaces")


def _token_hint(target: Target) -> str:
    if target.token is not None:
        return f"it refused the token from {target.token_source}; is it the daemon's token?"
    return (f"none was sent; give --token-file PATH, set {STATUS_TOKEN_ENV}, or --config the "
            "daemon's config file (its token_file or systemd credential)")


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
    gate = st.get("circuit") or health.get("circuit") or {}
    circuit = str(gate.get("state", "?"))
    if circuit != "closed" and gate.get("open_seconds") is not None:
        circuit = (f"{circuit.upper()} for {human_age(gate['open_seconds'])}, "
                   f"{gate.get('probes', 0)} probe(s)")
    lines.append(f"  api: {_n(st['total_requests'])} requests, {_n(st['rate_limited_count'])} "
                 f"429s, {_n(st['retries'])} retries · rate {rate} · {rl['in_flight']} in "
                 f"flight, {rl['waiting']} waiting · circuit {circuit} · "
                 f"{_n(st['api'].get('bars_quarantined', 0))} bars quarantined")
    w = st["writer"]
    last_write = ("-" if w["last_write_seconds"] is None
                  else f"{w['last_write_seconds'] * 1000:.0f} ms")
    lines.append(f"  writer: {'connected' if w['connected'] else 'NOT CONNECTED'} · queue "
                 f"{w['queue_depth']}/{w['queue_capacity']} · {_n(w['pages_written'])} pages, "
                 f"{_n(w['bars_written'])} bars · last write {last_write} · "
                 f"{w['write_errors']} rejected")
    feats = st.get("features")
    if feats:
        lines.append(f"  features: {'connected' if feats['connected'] else 'NOT CONNECTED'} · "
                     f"{_n(feats['rows_written'])} rows in {_n(feats['passes'])} passes · "
                     f"{feats['pending']} commits pending · {feats['errors']} errors")
    shown = cycle or last
    if shown and shown.get("not_entitled"):
        names = ", ".join(f"{j['symbol']} {j['timeframe']}" for j in shown["not_entitled"][:8])
        lines.append(f"  not entitled (the plan does not cover them; asked again daily): {names}")
    if st.get("last_error"):
        err = st["last_error"]
        lines.append(f"  last error ({_when(err['at'])}): {_clip(err['message'])}")

    if cycle:
        lines += ["", *_symbols_section(cycle)]
    lines += _instances_section(st)
    lines += ["", *_staleness_section(answers["staleness"], show_all)]
    lines += ["", *_history_section(answers["history"])]
    return "\n".join(lines)


def _instances_section(st: dict[str, Any]) -> list[str]:
    """The daemons sharing the database (shown when there is more than this one)."""
    instances = st.get("instances") or []
    if len(instances) < 2:
        return []
    leases = st.get("leases") or {}
    rows = [(("* " if i["this"] else "  ") + i["id"], i["label"],
             "alive" if i["alive"] else "SILENT", human_age(i["heartbeat_age_seconds"]),
             str(i["leases"]), _when(i["started_at"])) for i in instances]
    return ["", f"Instances sharing the database ({sum(i['alive'] for i in instances)} alive; "
                f"this one took {leases.get('taken_over', 0)} lease(s) over, "
                f"{leases.get('refused_pages', 0)} page(s) refused by fencing):",
            format_table(["instance", "label", "state", "heartbeat", "leases", "started"],
                          rows)]


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
    if report.get("quarantined"):
        summary += f"; {report['quarantined']} bars quarantined"
    if report.get("not_entitled"):
        summary += f"; {report['not_entitled']} series not entitled"
    if report.get("readjusting"):
        summary += f"; {report['readjusting']} series re-adjusting after a split"
    lines = [f"freshness: {summary} (fresh < {th['fresh']:g} h, aging < {th['aging']:g} h, "
             f"stale < {th['stale']:g} h)"]
    shown = [s for s in report["series"] if show_all or s["class"] != "fresh"]
    if not shown:
        lines.append("every series holds every bar the market could have produced")
        return lines
    rows = [(s["symbol"], s["timeframe"], s["class"].replace("_", " "), s["age"],
             (s.get("features") or {}).get("class", "-").replace("_", " "),
             _when(s["last_bar"]), _when(s["last_success"]), s.get("quarantined", 0),
             _clip("not entitled: " + s["not_entitled"] if s.get("not_entitled")
                   else "re-adjusting: " + s["readjusting_for"] if s.get("readjusting")
                   else s["last_error"], 60))
            for s in shown]
    lines.append(format_table(["symbol", "timeframe", "class", "age", "features", "last bar",
                               "last success", "quarantined", "last error"], rows))
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
