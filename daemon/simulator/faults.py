"""Injected faults: which request fails and how, and the misbehaving answers themselves.

A request that reaches the fault stage gets a sequence number; `choose_fault` hashes (seed,
sequence) into "no fault" (with probability 1 - rate) or one of the configured kinds, so a seed
replays the same faults in the same order. The default rotation is `FAULT_KINDS`; the kinds in
`OPT_IN_FAULT_KINDS` (a `200` whose body is an error) join only when asked for, so existing
seeds keep failing exactly as they did.

    http_500/502/503       an nginx-style HTML error page
    truncated              the real answer's head (full Content-Length), part of its body, close
    null_results           `200` with `"results": null` (the API under load)
    dropped                the connection closed without an answer
    spurious_429           a 429 with the real body but no Retry-After, whatever the window says
    status_error           `200` with `{"status":"ERROR","error":...}`            (opt-in)
    status_not_authorized  `200` with `{"status":"NOT_AUTHORIZED","message":...}` (opt-in)

Cut-off bodies and dropped connections are written on the raw stream through
daemon.httpserver's `Hijack`: the server itself knows nothing about faults.

Error handling: none raised; a peer vanishing while a fault is written is the server's business.
"""

from __future__ import annotations

import email.utils
import hashlib
import http
from collections.abc import Callable
from functools import partial

import trio

from ..httpserver import Hijack, Response

__all__ = ["ALL_FAULT_KINDS", "FAULT_KINDS", "NOT_ENTITLED_MESSAGE", "OPT_IN_FAULT_KINDS",
           "RATE_LIMIT_ERROR", "choose_fault", "dropped", "fault_response", "html_error",
           "truncated"]

FAULT_KINDS = ("http_500", "http_502", "http_503", "truncated", "null_results", "dropped",
               "spurious_429")
OPT_IN_FAULT_KINDS = ("status_error", "status_not_authorized")
ALL_FAULT_KINDS = FAULT_KINDS + OPT_IN_FAULT_KINDS
RATE_LIMIT_ERROR = (
    "You've exceeded the maximum requests per minute, please wait or upgrade your subscription "
    "to continue. https://polygon.io/pricing"
)
NOT_ENTITLED_MESSAGE = (
    "You are not entitled to this data. Please upgrade your plan at https://polygon.io/pricing"
)
STATUS_ERROR_MESSAGE = "Internal error while fetching the data, please try again"
_HTML_PAGE = (
    "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)
_REASONS = {
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Temporarily Unavailable",
}


def _digest(seed: int, label: str, sequence: int, size: int) -> bytes:
    return hashlib.blake2b(f"{seed}|{label}|{sequence}".encode(), digest_size=size).digest()


def choose_fault(seed: int, sequence: int, rate: float, kinds: tuple[str, ...]) -> str | None:
    """The fault for request number `sequence`, or None (a pure function of its arguments)."""
    if rate <= 0 or not kinds:
        return None
    digest = _digest(seed, "fault", sequence, 8)
    if int.from_bytes(digest[:4], "little") / 2**32 >= rate:
        return None
    return kinds[int.from_bytes(digest[4:], "little") % len(kinds)]


def html_error(code: int, headers: dict[str, str] | None = None) -> Response:
    """What nginx answers when the service behind it fails: an HTML page, not JSON."""
    response = Response.text(_HTML_PAGE.format(code=code, reason=_REASONS[code]), code,
                             "text/html")
    response.headers.update(headers or {})
    return response


def fault_response(kind: str, request_id: Callable[[], str], null_body: dict[str, object]
                   ) -> Response | Hijack:
    """The answer for any kind but `truncated` (which needs the real answer: `truncated`).

    `null_body`: the endpoint's success body, whose `results` the null_results kind nulls.
    """
    if kind.startswith("http_"):
        return html_error(int(kind[5:]))
    if kind == "dropped":
        return dropped()
    if kind == "spurious_429":
        return Response.json({"status": "ERROR", "request_id": request_id(),
                              "error": RATE_LIMIT_ERROR}, 429)
    if kind == "status_error":
        return Response.json({"status": "ERROR", "request_id": request_id(),
                              "error": STATUS_ERROR_MESSAGE})
    if kind == "status_not_authorized":
        return Response.json({"status": "NOT_AUTHORIZED", "request_id": request_id(),
                              "message": NOT_ENTITLED_MESSAGE})
    if kind == "null_results":
        return Response.json({**null_body, "results": None, "request_id": request_id()})
    raise ValueError(f"unknown fault kind {kind!r}")


def dropped() -> Hijack:
    """Close the connection without a byte of answer."""
    return Hijack(_send_nothing)


def truncated(response: Response, seed: int, sequence: int) -> Hijack:
    """`response`'s head, promising its whole body, then a seed-chosen prefix of it, then close.

    The prefix holds at least one byte and never the whole body.
    """
    cut = 1 + int.from_bytes(_digest(seed, "cut", sequence, 4), "little") % max(
        1, len(response.body) - 1)
    return Hijack(partial(_send_raw, _head(response) + response.body[:cut]))


def _head(response: Response) -> bytes:
    """The HTTP/1.1 head h11 would write for `response`, with `Connection: close`."""
    headers = {k.lower(): v for k, v in response.headers.items()}
    headers.setdefault("content-length", str(len(response.body)))
    headers.setdefault("date", email.utils.formatdate(usegmt=True))
    headers["connection"] = "close"
    lines = [f"HTTP/1.1 {response.status} {http.HTTPStatus(response.status).phrase}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send_raw(data: bytes, stream: trio.SocketStream) -> None:
    await stream.send_all(data)


async def _send_nothing(stream: trio.SocketStream) -> None:
    return None
