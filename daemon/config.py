"""The config file: TOML read with tomllib into frozen attrs classes, checked key by key.

Why strict: a daemon that runs for months must refuse a typo at start (or at SIGHUP, keeping
the old config) rather than silently run with a default. Every error is a ConfigError naming
the file, the dotted key, its line, and what was expected.

Secrets (the API key, a database URL with a password, the status token) are held in `Secret`,
whose repr is `***`, so a Config can be logged or shown on /status without leaking them.

`status_exposure_problem` is the one rule for when the status endpoint may not start (reachable
from other hosts, yet open to anyone); `backfilld run` and `check-config` both apply it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigError
from .timeframes import Timeframe, parse_timeframe

__all__ = [
    "BackfillConfig",
    "Config",
    "DatabaseConfig",
    "LoggingConfig",
    "MonitoringConfig",
    "PolygonConfig",
    "RetryConfig",
    "Secret",
    "StalenessConfig",
    "StatusConfig",
    "is_loopback",
    "load_config",
    "parse_config",
    "status_exposure_problem",
]

DEFAULT_TIMEFRAMES = ("1d", "4h", "1h", "15m", "5m")
# Environment variables that override the file, in priority order (first set wins).
API_KEY_ENV = ("POLYGON_API_KEY", "MASSIVE_API_KEY")
DATABASE_URL_ENV = "BACKFILLD_DATABASE_URL"
# systemd credentials (LoadCredential=NAME:PATH in the unit), read from $CREDENTIALS_DIRECTORY:
# below the environment variables, above the file.
API_KEY_CREDENTIAL = "polygon-api-key"
DATABASE_URL_CREDENTIAL = "database-url"
# The status endpoint's bearer token: env > credential > [status] token_file (first set wins).
STATUS_TOKEN_ENV = "BACKFILLD_STATUS_TOKEN"
STATUS_TOKEN_CREDENTIAL = "status-token"
# A token travels in an Authorization header: printable ASCII, no spaces (RFC 6750's token68
# is a subset). Anything else could never be sent as configured.
_TOKEN = re.compile(r"^[\x21-\x7e]+$")
# Tickers: letters, digits and the `:` `.` `-` `/` the API uses (X:BTCUSD, BRK.A, I:SPX).
_TICKER = re.compile(r"^[A-Za-z0-9:._/-]{1,40}$")


@attrs.frozen(repr=False)
class Secret:
    """A string that never prints. Call `reveal()` only where the value is sent on the wire."""

    _value: str

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


@attrs.frozen
class PolygonConfig:
    base_url: str = "https://api.massive.com"
    api_key: Secret = Secret("")
    requests_per_minute: float = 150.0  # 0 means unlimited
    adjusted: bool = True
    timeout_seconds: float = 30.0
    max_in_flight: int = 16  # requests in flight across all jobs; must reach rate x latency
    page_limit: int = 50_000  # the API's `limit` (base aggregates per page), max 50000


@attrs.frozen
class DatabaseConfig:
    url: Secret | None = None  # None: embedded PostgreSQL under state_dir
    queue_pages: int = 8  # bounded writer channel: producers wait when the writer is behind
    features_connections: int = 2  # series whose features are computed at once (a core each)


@attrs.frozen
class BackfillConfig:
    symbols: tuple[str, ...] = ()
    timeframes: tuple[Timeframe, ...] = tuple(parse_timeframe(t) for t in DEFAULT_TIMEFRAMES)
    start: dt.date | None = None
    history_days: int | None = None
    end: dt.date | None = None  # inclusive; None means today (UTC)
    max_concurrent_symbols: int = 3
    stagger_seconds: float = 0.5
    refresh_minutes: float = 60.0
    overlap_bars: int = 3
    # Sub-ranges of one series fetched at once (0: as many as the request budget can use).
    parallel_ranges: int = 0

    def first_day(self, today: dt.date) -> dt.date:
        """The first day of history to hold: `start`, else today minus `history_days`."""
        if self.start is not None:
            return self.start
        return today - dt.timedelta(days=self.history_days or 730)

    def last_day(self, today: dt.date) -> dt.date:
        return self.end if self.end is not None else today


@attrs.frozen
class RetryConfig:
    attempts: int = 5
    min_seconds: float = 1.0
    max_seconds: float = 300.0
    jitter: float = 0.0  # extra random wait, as a fraction of the backoff (0.1 = up to +10 %)
    # The circuit breaker (daemon.breaker): consecutive transient failures that open it, and
    # the probe interval while open (doubling from the first to the max).
    breaker_failures: int = 5
    breaker_probe_seconds: float = 5.0
    breaker_max_probe_seconds: float = 60.0


@attrs.frozen
class MonitoringConfig:
    retention_days: float = 90.0  # executions and job results older than this are pruned


@attrs.frozen
class StatusConfig:
    host: str = "127.0.0.1"
    port: int = 8080  # 0: pick a free port and log it
    # None: no token, every path open (refused on a non-loopback listen, see
    # status_exposure_problem). Set: every path but /healthz and /readyz wants it.
    token: Secret | None = None
    token_source: str = ""  # where the token came from, for check-config (never the value)
    allow_unauthenticated: bool = False  # serve a non-loopback listen without a token anyway
    max_connections: int = 64  # connections served at once; one more is answered 503


@attrs.frozen
class LoggingConfig:
    level: str = "INFO"
    format: str = "text"  # or "json"


@attrs.frozen
class StalenessConfig:
    fresh_hours: float = 1.0
    aging_hours: float = 6.0
    stale_hours: float = 24.0


@attrs.frozen
class Config:
    polygon: PolygonConfig = PolygonConfig()
    database: DatabaseConfig = DatabaseConfig()
    backfill: BackfillConfig = BackfillConfig()
    retry: RetryConfig = RetryConfig()
    status: StatusConfig = StatusConfig()
    logging: LoggingConfig = LoggingConfig()
    staleness: StalenessConfig = StalenessConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    state_dir: Path = Path("~/.local/state/backfilld").expanduser()
    instance: str = "backfilld"
    # Scale-out (daemon.leases): a series' lease lapses this long after its holder's last
    # renewal; another instance then takes the series over.
    lease_seconds: float = 30.0
    source: str = "<defaults>"


# --- value checkers: each returns the converted value or raises ValueError(expected) ---------


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _number(lo: float, hi: float = float("inf")) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise ValueError(f"expected a number from {lo:g} to {hi:g}")
        return float(v)

    return check


def _integer(lo: int, hi: int = 2**31) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"expected a whole number from {lo} to {hi}")
        return v

    return check


def _string(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    return v


def _choice(*options: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or v.lower() not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return v.lower()

    return check


def _url(v: Any) -> str:
    if not isinstance(v, str) or not re.match(r"^https?://[^/\s]+", v):
        raise ValueError("expected an http:// or https:// URL")
    return v.rstrip("/")


def _date(v: Any) -> dt.date:
    if isinstance(v, dt.date) and not isinstance(v, dt.datetime):
        return v
    if isinstance(v, str):
        try:
            return dt.date.fromisoformat(v)
        except ValueError:
            pass
    raise ValueError("expected a date YYYY-MM-DD")


def _symbols(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(s, str) and _TICKER.match(s) for s in v):
        raise ValueError(
            "expected a list of tickers such as [\"AAPL\", \"BRK.A\", \"X:BTCUSD\"] "
            "(letters, digits, ':', '.', '-', '/')"
        )
    if len(set(v)) != len(v):
        raise ValueError("expected each ticker once (duplicates found)")
    return tuple(v)


def _timeframes(v: Any) -> tuple[Timeframe, ...]:
    if not isinstance(v, list) or not v:
        raise ValueError('expected a non-empty list such as ["1d", "1h", "5m"]')
    parsed = tuple(parse_timeframe(t) for t in v)
    if len(set(parsed)) != len(parsed):
        raise ValueError("expected each timeframe once (duplicates found)")
    return parsed


def _listen(v: Any) -> tuple[str, int]:
    match = re.match(r"^\[?([^\]]*?)\]?:(\d{1,5})$", v) if isinstance(v, str) else None
    if match is None or int(match.group(2)) > 65535:
        raise ValueError('expected "HOST:PORT", e.g. "127.0.0.1:8080" (port 0 picks a free one)')
    return match.group(1) or "127.0.0.1", int(match.group(2))


# section -> key -> checker. The attrs field of the same name receives the value.
_SCHEMA: dict[str, dict[str, Callable[[Any], Any]]] = {
    "daemon": {"state_dir": _string, "instance": _string,
               "lease_seconds": _number(1, 3600)},
    "polygon": {
        "base_url": _url,
        "api_key": _string,
        "api_key_file": _string,
        "requests_per_minute": _number(0, 1_000_000),
        "adjusted": _bool,
        "timeout_seconds": _number(0.1, 3600),
        "max_in_flight": _integer(1, 1000),
        "page_limit": _integer(1, 50_000),
    },
    "database": {"url": _string, "queue_pages": _integer(1, 1000),
                 "features_connections": _integer(1, 64)},
    "backfill": {
        "symbols": _symbols,
        "timeframes": _timeframes,
        "start": _date,
        "history_days": _integer(1, 36_500),
        "end": _date,
        "max_concurrent_symbols": _integer(1, 1000),
        "stagger_seconds": _number(0, 3600),
        "refresh_minutes": _number(0.01, 100_000),
        "overlap_bars": _integer(0, 100_000),
        "parallel_ranges": _integer(0, 1000),
    },
    "retry": {
        "attempts": _integer(1, 100),
        "min_seconds": _number(0, 3600),
        "max_seconds": _number(0, 86_400),
        "jitter": _number(0, 10),
        "breaker_failures": _integer(1, 1000),
        "breaker_probe_seconds": _number(0.01, 3600),
        "breaker_max_probe_seconds": _number(0.01, 86_400),
    },
    "monitoring": {"retention_days": _number(1, 36_500)},
    "status": {
        "listen": _listen,
        "token_file": _string,
        "allow_unauthenticated": _bool,
        "max_connections": _integer(1, 10_000),
    },
    "logging": {"level": _choice("trace", "debug", "info", "warning", "error"),
                "format": _choice("text", "json")},
    "staleness": {
        "fresh_hours": _number(0.01, 10_000),
        "aging_hours": _number(0.01, 10_000),
        "stale_hours": _number(0.01, 10_000),
    },
}


def _line_of(text: str, section: str | None, key: str | None) -> int | None:
    """Best-effort line number of `key` in `[section]` (tomllib reports none for values)."""
    current: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = re.match(r"^\[\s*([^\]]+?)\s*\]", line)
        if header:
            current = header.group(1)
            if key is None and current == section:
                return number
            continue
        if key and current == section and re.match(rf"^{re.escape(key)}\s*=", line):
            return number
    return None


def parse_config(
    text: str,
    *,
    source: str = "<string>",
    env: Mapping[str, str] | None = None,
) -> Config:
    """Parse and validate TOML text. Raises ConfigError naming source, key, line, expectation."""
    env = os.environ if env is None else env
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _lineno_from_message(str(exc))
        raise ConfigError(source, None, f"not valid TOML: {exc}", line=line) from None

    def fail(section: str, key: str | None, expected: str) -> ConfigError:
        dotted = f"{section}.{key}" if key else section
        return ConfigError(source, dotted, expected, line=_line_of(text, section, key))

    values: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        if section not in _SCHEMA:
            raise fail(section, None, f"unknown section; known: {', '.join(_SCHEMA)}")
        if not isinstance(table, dict):
            raise fail(section, None, "expected a [section] table")
        values[section] = {}
        for key, raw in table.items():
            checker = _SCHEMA[section].get(key)
            if checker is None:
                known = ", ".join(_SCHEMA[section])
                raise fail(section, key, f"unknown key; [{section}] takes: {known}")
            try:
                values[section][key] = checker(raw)
            except ValueError as exc:
                raise fail(section, key, str(exc)) from None

    try:
        return _build(values, env, source)
    except _KeyProblem as problem:
        raise fail(problem.section, problem.key, problem.expected) from None


class _KeyProblem(Exception):
    def __init__(self, section: str, key: str | None, expected: str) -> None:
        self.section, self.key, self.expected = section, key, expected


def _lineno_from_message(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None


def _build(values: dict[str, dict[str, Any]], env: Mapping[str, str], source: str) -> Config:
    """Assemble Config from checked values, applying env overrides and cross-key rules."""
    pol = dict(values.get("polygon", {}))
    key_file = pol.pop("api_key_file", None)
    api_key = pol.pop("api_key", "")
    if key_file:
        try:
            api_key = Path(key_file).expanduser().read_text().strip()
        except OSError as exc:
            raise _KeyProblem("polygon", "api_key_file", f"cannot read: {exc.strerror}") from None
    api_key = _credential(env, API_KEY_CREDENTIAL) or api_key
    for name in API_KEY_ENV:
        if env.get(name):
            api_key = env[name].strip()
            break
    polygon = PolygonConfig(api_key=Secret(api_key), **pol)

    db = dict(values.get("database", {}))
    url = (env.get(DATABASE_URL_ENV) or _credential(env, DATABASE_URL_CREDENTIAL)
           or db.pop("url", ""))
    db.pop("url", None)
    database = DatabaseConfig(url=Secret(url) if url else None, **db)

    bf = dict(values.get("backfill", {}))
    if "start" in bf and "history_days" in bf:
        raise _KeyProblem("backfill", "history_days", "give either start or history_days, not both")
    backfill = BackfillConfig(**bf)
    if backfill.start and backfill.end and backfill.start > backfill.end:
        raise _KeyProblem("backfill", "end", "expected a date on or after backfill.start")

    retry = RetryConfig(**values.get("retry", {}))
    if retry.max_seconds < retry.min_seconds:
        raise _KeyProblem("retry", "max_seconds", "expected a value >= retry.min_seconds")
    if retry.breaker_max_probe_seconds < retry.breaker_probe_seconds:
        raise _KeyProblem("retry", "breaker_max_probe_seconds",
                          "expected a value >= retry.breaker_probe_seconds")

    status = _status(dict(values.get("status", {})), env)

    staleness = StalenessConfig(**values.get("staleness", {}))
    if not staleness.fresh_hours < staleness.aging_hours < staleness.stale_hours:
        raise _KeyProblem("staleness", None, "expected fresh_hours < aging_hours < stale_hours")

    daemon = values.get("daemon", {})
    state_dir = daemon.get("state_dir") or env.get("STATE_DIRECTORY", "").split(":")[0]
    return Config(
        polygon=polygon,
        database=database,
        backfill=backfill,
        retry=retry,
        status=status,
        logging=LoggingConfig(**values.get("logging", {})),
        staleness=staleness,
        monitoring=MonitoringConfig(**values.get("monitoring", {})),
        state_dir=Path(state_dir or "~/.local/state/backfilld").expanduser(),
        instance=daemon.get("instance") or _default_instance(),
        lease_seconds=daemon.get("lease_seconds", 30.0),
        source=source,
    )


def _status(st: dict[str, Any], env: Mapping[str, str]) -> StatusConfig:
    """[status], with its token from env > credential > token_file (only the first set is read).

    A token_file that is set but cannot be read, or is empty, is an error: the daemon must not
    quietly serve open what the operator meant to protect.
    """
    if "listen" in st:
        st["host"], st["port"] = st.pop("listen")
    token_file = st.pop("token_file", None)
    key: str | None = None  # the key to blame for a bad token (None: it came from outside)
    token, source = env.get(STATUS_TOKEN_ENV, "").strip(), f"${STATUS_TOKEN_ENV}"
    if not token:
        token = _credential(env, STATUS_TOKEN_CREDENTIAL)
        source = f"the systemd credential {STATUS_TOKEN_CREDENTIAL}"
    if not token and token_file:
        path = Path(token_file).expanduser()
        key, source = "token_file", str(path)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise _KeyProblem("status", key, f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise _KeyProblem("status", key, f"{path} is not UTF-8 text") from None
        if not token:
            raise _KeyProblem("status", key, f"{path} is empty; expected the status token")
    if not token:
        return StatusConfig(**st)
    if not _TOKEN.match(token):  # the message names the source, never the value
        raise _KeyProblem("status", key, f"the status token from {source} must be printable "
                          "ASCII without spaces (e.g. the output of `openssl rand -hex 32`)")
    return StatusConfig(token=Secret(token), token_source=source, **st)


def status_exposure_problem(status: StatusConfig) -> str | None:
    """Why the status endpoint must not start as configured, or None when it may.

    The rule: a listen address other hosts can reach (anything but 127.0.0.0/8, ::1 and
    localhost) needs a token, unless `allow_unauthenticated = true` says open is meant. Pure:
    `backfilld run` refuses to start on it (before anything else starts) and `check-config`
    reports it, with the same words.
    """
    if status.token is not None or status.allow_unauthenticated or is_loopback(status.host):
        return None
    shown = f"[{status.host}]" if ":" in status.host else status.host
    return (f"[status] listen = \"{shown}:{status.port}\" is reachable from other hosts, but no "
            "status token is set, so anyone who can connect could read /status and /metrics. "
            f"Set a token ({STATUS_TOKEN_ENV}, the systemd credential {STATUS_TOKEN_CREDENTIAL}, "
            "or [status] token_file), listen on 127.0.0.1, or set [status] "
            "allow_unauthenticated = true to serve it open on purpose")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also IPv4-mapped) and the name localhost; False for anything
    else, names included (a name may resolve anywhere)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _credential(env: Mapping[str, str], name: str) -> str:
    """The systemd credential `name` (stripped), or "" when there is none."""
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return ""
    try:
        return (Path(directory) / name).read_text().strip()
    except OSError:
        return ""


def _default_instance() -> str:
    """The host name: a label for people (each process also gets a unique id, so several
    daemons on one host need nothing set apart; see daemon.leases)."""
    return os.uname().nodename


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file at `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read the config file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, "not UTF-8 text") from None
    return parse_config(text, source=str(path), env=env)
