"""Every failure a user of backfilld can see, in one tree.

Lower-library errors (httpx, psycopg, tomllib, pgserver) are translated into these at the edge
of the module that talks to them, so callers handle *our* failures and messages never carry
secrets (API keys and database passwords are redacted before an exception is built).

    BackfilldError                          transient?
    ├── ConfigError             bad or unreadable config file; names file, key, line
    ├── ApiError                anything the market-data API did wrong
    │   ├── ApiAuthError        401/403                                        no
    │   │   ├── ApiKeyRefused   the key is missing, unknown or invalid: all API work stops
    │   │   └── NotEntitled     the plan lacks this ticker/timespan: that series only
    │   ├── ApiRequestError     other 4xx: our request is wrong                no
    │   ├── ApiUnavailable      the API stayed down past `run --once --max-wait`  no
    │   ├── RateLimited         429; after Retry-After or backoff              yes
    │   ├── ApiServerError      5xx (often an HTML page)                       yes
    │   ├── ApiTransportError   connect/read failures, timeouts                yes
    │   └── BadResponse         truncated or unparseable body, `"results": null` yes
    ├── DatabaseError           PostgreSQL rejected a statement                no
    │   └── DatabaseUnavailable PostgreSQL cannot be reached (yet)             yes
    └── EmbeddedPostgresError   the embedded server (pgserver) could not start

`transient` says whether the same call, made again later, can succeed. It is the only input of
the one retry mechanism (daemon.retrying): the client retries transient API errors, the writer
and every database reader wait out transient database errors, and nothing else is retried.
"""

from __future__ import annotations

import re

__all__ = [
    "ApiAuthError",
    "ApiError",
    "ApiKeyRefused",
    "ApiRequestError",
    "ApiServerError",
    "ApiTransportError",
    "ApiUnavailable",
    "BackfilldError",
    "BadResponse",
    "ConfigError",
    "DatabaseError",
    "DatabaseUnavailable",
    "EmbeddedPostgresError",
    "NotEntitled",
    "RateLimited",
    "redact",
]

# Query-string keys and URL userinfo that carry credentials. Redaction happens on every message
# that may quote a URL, so a key can never travel from a request into a log line.
_SECRET_QUERY = re.compile(r"(?i)((?:apikey|api_key|password|token)=)[^&\s\"']+")
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@/\s]+@")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """Return `text` with API keys, bearer tokens and URL passwords replaced by `***`."""
    text = _SECRET_QUERY.sub(r"\1***", text)
    text = _URL_PASSWORD.sub(r"\1***@", text)
    return _BEARER.sub(r"\1***", text)


class BackfilldError(Exception):
    """Base of every error backfilld raises on purpose."""

    transient = False  # see the module docstring: whether a later retry can succeed

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(BackfilldError):
    """The config file is missing, unparseable or has a bad key or value.

    The message names the file, the key (dotted, e.g. `backfill.timeframes`), the line when
    known, and what was expected, so one log line is enough to fix it.
    """

    def __init__(
        self, path: object, key: str | None, expected: str, *, line: int | None = None
    ) -> None:
        self.path = str(path)
        self.key = key
        self.line = line
        self.expected = expected
        where = self.path + (f":{line}" if line else "")
        what = f"key {key!r}: " if key else ""
        super().__init__(f"{where}: {what}{expected}")


class ApiError(BackfilldError):
    """The market-data API failed a request. `status` is the HTTP status when there was one;
    `retry_after` the seconds the server asked us to wait (429, 503), if it said."""

    def __init__(self, message: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


class ApiAuthError(ApiError):
    """401/403: the API key is missing, wrong, or its plan does not cover the request."""


class ApiKeyRefused(ApiAuthError):
    """The key itself is refused (401, or 403 saying the key is unknown or invalid): every
    request would be refused the same way, so the instance stops its API work."""


class NotEntitled(ApiAuthError):
    """403 NOT_AUTHORIZED for one ticker or timespan the plan does not cover, while the key
    works for everything else: that series fails, and is asked again at most once a day."""


class ApiUnavailable(ApiError):
    """The API was unreachable (circuit open) for longer than the caller would wait."""


class ApiRequestError(ApiError):
    """A 4xx other than 401/403/429: the request itself is wrong (bad ticker syntax, range)."""


class RateLimited(ApiError):
    """429. `retry_after` is the server's Retry-After in seconds when it sent one."""

    transient = True

    def __init__(self, message: str, *, status: int | None = 429,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status=status, retry_after=retry_after)


class ApiServerError(ApiError):
    """5xx from the API or a proxy in front of it."""

    transient = True


class ApiTransportError(ApiError):
    """The connection failed, was reset, or timed out."""

    transient = True


class BadResponse(ApiError):
    """HTTP 200 whose body is cut off, not JSON, not the documented shape, or `results: null`."""

    transient = True


class DatabaseError(BackfilldError):
    """PostgreSQL is unreachable or rejected a statement."""


class DatabaseUnavailable(DatabaseError):
    """No connection could be made, or it broke: the server is down, restarting, failing over,
    or not up yet at boot."""

    transient = True


class EmbeddedPostgresError(BackfilldError):
    """The embedded PostgreSQL server could not be started or stopped."""
