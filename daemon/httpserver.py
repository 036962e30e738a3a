"""A small HTTP/1.1 server on trio + h11, for the simulator and the daemon's status endpoint.

Modelled on h11's `examples/trio-server.py`, with hypercorn's per-connection timeouts: a
connection waits at most `idle_timeout` for the first byte of a request, then must deliver the
whole request within `read_timeout`. Keep-alive, no TLS, no chunked uploads beyond what h11
parses, one request at a time per connection.

The handler is `async def handler(request: Request) -> Response | Hijack`. A `Hijack` (Go's
`http.Hijacker`, in one value) hands the raw connection to the caller's coroutine instead of an
answer: the server writes nothing more on it and closes it when the coroutine returns. That is
the one extension point; the simulator builds its misbehaviour (bodies cut off mid-stream,
connections dropped unanswered) on it, so this module knows nothing about faults.

`max_connections` caps the connections served at once: past it, a new connection gets a short
`503` with `Retry-After: 1` and `Connection: close`, written before its request is read, and is
closed after a brief lingering drain. A cap keeps a flood of clients from starving the process
(the status endpoint shares its loop with the daemon; the simulator its cores with the demo).

Error handling: a bad client never kills the server. Malformed HTTP gets 400 and a close, an
oversized head 431, an oversized body 413, a slow request 408; a handler that raises gets 500
(logged) and the connection stays usable; a Hijack coroutine that raises costs its own
connection (logged); a peer that vanishes is dropped silently. Only cancellation ends
`serve_http`.
"""

from __future__ import annotations

import email.utils
import http
from collections.abc import Awaitable, Callable
from functools import partial
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
import h11
import msgspec
import trio
from loguru import logger

__all__ = ["Handler", "Hijack", "Request", "Response", "serve_http"]

# h11 refuses a request head (request line + headers) larger than this: 431.
MAX_HEADER_BYTES = 16 * 1024
# Bodies are small here (admin POSTs); a larger one is refused with 413.
MAX_BODY_BYTES = 1024 * 1024
# Seconds a kept-alive connection may sit without starting a request before we close it.
IDLE_TIMEOUT = 30.0
# Seconds a started request has to arrive in full (slowloris guard).
READ_TIMEOUT = 10.0
# After an error response, read and discard for this long so the client sees our answer
# instead of a reset caused by its unread bytes (a "lingering close").
LINGER_SECONDS = 1.0
RECEIVE_SIZE = 64 * 1024
SERVER_NAME = b"backfilld"
# What a connection over `max_connections` reads: short, JSON (every client here parses JSON),
# and it says when to come back.
BUSY_BODY = b'{"status":"ERROR","error":"Too many open connections, retry shortly"}'
BUSY_RETRY_AFTER = 1


@attrs.frozen
class Request:
    """One parsed request. Header names are lowercased; repeated headers are comma-joined."""

    method: str
    target: str  # as sent: path and query, percent-encoded
    path: str  # percent-decoded path, without the query
    query: dict[str, str]  # the last value wins for repeated keys
    headers: dict[str, str]
    body: bytes = b""


@attrs.define
class Response:
    """What the handler answers. Content-Length is added unless the handler set it.

    `close`: close the connection after answering (sends `Connection: close`).
    """

    status: int = 200
    headers: dict[str, str] = attrs.field(factory=dict)
    body: bytes = b""
    close: bool = False

    @classmethod
    def json(cls, obj: object, status: int = 200, headers: dict[str, str] | None = None
             ) -> Response:
        """A JSON response (encoded with msgspec: fast for 50,000-bar pages)."""
        return cls(status, {"content-type": "application/json", **(headers or {})},
                   msgspec.json.encode(obj))

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8"
             ) -> Response:
        return cls(status, {"content-type": content_type}, text.encode())


@attrs.frozen
class Hijack:
    """Instead of an answer: `run(stream)` gets the raw connection and does what it likes.

    The server has read the request and sent nothing for it; after `run` returns (or raises)
    the connection is closed, never reused. Bytes written are the caller's business: this is
    how a test server sends what no correct server would (a head promising more body than
    follows, nothing at all).

    Error handling: the peer vanishing inside `run` is silent; any other exception is logged
    and costs this connection only.
    """

    run: Callable[[trio.SocketStream], Awaitable[None]]


Handler = Callable[[Request], Awaitable[Response | Hijack]]


class _ClientError(Exception):
    """The request cannot be served; answer `status` and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@attrs.define
class _Limits:
    idle_timeout: float
    read_timeout: float
    max_header_bytes: int
    max_body_bytes: int
    max_connections: int | None
    open_connections: int = 0  # mutable: shared by the connections of one serve_http


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_connections: int | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on `host:port` until cancelled; report the bound port via task_status.

    `port=0` picks a free port (give a single-address host then, e.g. `127.0.0.1`, or each
    address family would get its own port). `max_connections`: at most this many connections
    are served at once; one more is answered `503` at once and closed (None: no cap).

    Error handling: binding errors (port in use) raise OSError before `started`; after that,
    nothing a client does escapes its connection's task.
    """
    if max_connections is not None and max_connections < 1:
        raise ValueError(f"max_connections must be at least 1 or None: {max_connections}")
    limits = _Limits(idle_timeout, read_timeout, max_header_bytes, max_body_bytes,
                     max_connections)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(_serve_connection, handler, limits), port, host=host)
        )
        task_status.started(int(listeners[0].socket.getsockname()[1]))


async def _serve_connection(handler: Handler, limits: _Limits, stream: trio.SocketStream
                            ) -> None:
    if limits.max_connections is not None and limits.open_connections >= limits.max_connections:
        await _refuse_busy(stream)
        return
    limits.open_connections += 1
    try:
        await _Connection(stream, limits).run(handler)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the peer went away
    except Exception:  # a bug here must cost one connection, not the server
        logger.exception("http connection failed")
    finally:
        limits.open_connections -= 1  # before closing: a client seeing EOF may reconnect at once
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _refuse_busy(stream: trio.SocketStream) -> None:
    """Answer 503 before reading anything, then close: the cheapest polite refusal.

    Written raw (no h11 state: the request has not arrived). Lingering afterwards reads and
    discards the request the client is sending, so it sees the 503 rather than a reset.
    """
    head = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(BUSY_BODY)).encode()
            + b"\r\nretry-after: " + str(BUSY_RETRY_AFTER).encode()
            + b"\r\nconnection: close\r\ndate: " + email.utils.formatdate(usegmt=True).encode()
            + b"\r\nserver: " + SERVER_NAME + b"\r\n\r\n")
    logger.debug("http connection refused: max_connections reached")
    try:
        await stream.send_all(head + BUSY_BODY)
        await _linger(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


class _Connection:
    """One client connection: read a request, answer it, repeat while keep-alive holds."""

    def __init__(self, stream: trio.SocketStream, limits: _Limits) -> None:
        self.stream = stream
        self.limits = limits
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)

    async def run(self, handler: Handler) -> None:
        while True:
            try:
                request = await self._read_request()
            except _ClientError as exc:
                await self._fail(exc.status, str(exc))
                return
            except trio.TooSlowError:
                await self._fail(408, "request not received in time")
                return
            if request is None:
                return
            try:
                response = await handler(request)
            except Exception:
                logger.exception("http handler failed for {} {}", request.method, request.path)
                response = Response.text("internal server error\n", 500)
            if isinstance(response, Hijack):
                await response.run(self.stream)
                return
            await self._send(response, head=request.method == "HEAD")
            if response.close:
                return
            if self.conn.our_state is h11.MUST_CLOSE:
                return
            self.conn.start_next_cycle()

    async def _receive(self) -> None:
        self.conn.receive_data(await self.stream.receive_some(RECEIVE_SIZE))

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA]:
        try:
            return self.conn.next_event()  # type: ignore[return-value]
        except h11.RemoteProtocolError as exc:
            raise _ClientError(exc.error_status_hint, str(exc)) from None

    async def _read_request(self) -> Request | None:
        """The next complete request, or None when the client closed or stayed idle."""
        event = self._next_event()
        if event is h11.NEED_DATA:
            with trio.move_on_after(self.limits.idle_timeout) as idle:
                await self._receive()
            if idle.cancelled_caught:
                return None
            event = self._next_event()
        head: h11.Request | None = None
        body = bytearray()
        with trio.fail_after(self.limits.read_timeout):
            while True:
                if event is h11.NEED_DATA:
                    await self._receive()
                elif isinstance(event, h11.ConnectionClosed):
                    return None
                elif isinstance(event, h11.Request):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.limits.max_body_bytes:
                        raise _ClientError(413, "request body too large")
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    return _build_request(head, bytes(body))
                event = self._next_event()

    async def _send(self, response: Response, *, head: bool = False) -> None:
        headers = [(k.lower().encode(), v.encode("latin-1")) for k, v in response.headers.items()]
        names = {k for k, _ in headers}
        if b"content-length" not in names:
            headers.append((b"content-length", str(len(response.body)).encode()))
        if b"date" not in names:
            headers.append((b"date", email.utils.formatdate(usegmt=True).encode()))
        headers.append((b"server", SERVER_NAME))
        if response.close:
            headers.append((b"connection", b"close"))
        reason = _reason(response.status)
        # One write per response, not one per part: each send() releases the GIL and must
        # take it back from whichever thread computes (py-spy, 50 clients during a backfill:
        # 27 % of the loop thread's samples sat in send(), most of it waiting for the GIL).
        parts = [self.conn.send(h11.Response(status_code=response.status, headers=headers,
                                             reason=reason)) or b""]
        if response.body and not head:
            parts.append(self.conn.send(h11.Data(data=response.body)) or b"")
        parts.append(self.conn.send(h11.EndOfMessage()) or b"")
        await self.stream.send_all(b"".join(parts))

    async def _fail(self, status: int, reason: str) -> None:
        """Answer a broken request with `status` when h11 still allows it, then close politely."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            logger.debug("http client error {}: {}", status, reason)
            try:
                await self._send(Response.text(f"{reason}\n", status))
            except h11.LocalProtocolError:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        await _linger(self.stream)


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then discard what the client still sends, briefly (see LINGER_SECONDS)."""
    with trio.move_on_after(LINGER_SECONDS):
        try:
            await stream.send_eof()
            drained = 0
            while drained < 16 * RECEIVE_SIZE:
                chunk = await stream.receive_some(RECEIVE_SIZE)
                if not chunk:
                    return
                drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _build_request(head: h11.Request, body: bytes) -> Request:
    target = head.target.decode("latin-1")
    parts = urlsplit(target)
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(
        method=head.method.decode("latin-1"),
        target=target,
        path=unquote(parts.path),
        query=dict(parse_qsl(parts.query, keep_blank_values=True)),
        headers=headers,
        body=body,
    )
