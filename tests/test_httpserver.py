"""daemon.httpserver over real loopback sockets: bad clients cost a connection, never the server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio.testing

from daemon.httpserver import Hijack, Request, Response, serve_http

# Short timeouts so the slow-client tests finish in well under a second of real time.
IDLE = 0.5
READ = 0.3


async def send_cut_body(stream: trio.SocketStream) -> None:
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 100)


async def send_nothing(stream: trio.SocketStream) -> None:
    pass


async def handler(request: Request) -> Response | Hijack:
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    if request.path == "/cut":
        return Hijack(send_cut_body)
    if request.path == "/drop":
        return Hijack(send_nothing)
    if request.path == "/hijack-boom":
        return Hijack(hijack_bug)
    text = f"{request.method} {request.path} {sorted(request.query.items())} " \
           f"{request.headers.get('x-test', '')} {len(request.body)}"
    return Response.text(text)


@pytest.fixture
async def port(nursery: trio.Nursery) -> AsyncIterator[int]:
    bound = await nursery.start(
        lambda task_status: serve_http(handler, "127.0.0.1", 0, idle_timeout=IDLE,
                                       read_timeout=READ, task_status=task_status)
    )
    yield bound


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def read_all(stream: trio.SocketStream) -> bytes:
    """Everything until the server closes (fails the test if it never does within 3 s)."""
    data = bytearray()
    with trio.fail_after(3):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return bytes(data)


async def read_response(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """One Content-Length-framed response: (head, body)."""
    data = bytearray()
    with trio.fail_after(3):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = bytearray(body)
        while len(body) < length:
            body += await stream.receive_some(65536)
    return head, bytes(body)


async def get(port: int, path: str) -> tuple[bytes, bytes]:
    stream = await connect(port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return await read_response(stream)


async def test_keep_alive_serves_two_requests_on_one_connection(port: int) -> None:
    stream = await connect(port)
    async with stream:
        await stream.send_all(b"GET /a?x=1&y=%3A HTTP/1.1\r\nHost: h\r\nX-Test: v\r\n\r\n")
        head, body = await read_response(stream)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert body == b"GET /a [('x', '1'), ('y', ':')] v 0"
        await stream.send_all(b"POST /b%3Ac HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
        head, body = await read_response(stream)
        assert body == b"POST /b:c []  3"


async def test_garbage_gets_400_and_close(port: int) -> None:
    stream = await connect(port)
    async with stream:
        await stream.send_all(b"\x00\xff\xfe this is not http\r\n\r\n")
        reply = await read_all(stream)
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert (await get(port, "/ok"))[1].startswith(b"GET /ok")


async def test_huge_header_gets_431_and_close(port: int) -> None:
    stream = await connect(port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 100_000
                              + b"\r\n\r\n")
        reply = await read_all(stream)
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert (await get(port, "/ok"))[0].startswith(b"HTTP/1.1 200 ")


async def test_half_a_request_then_silence_is_closed_by_the_read_timeout(port: int) -> None:
    stream = await connect(port)
    async with stream:
        await stream.send_all(b"GET /slow HTTP/1.1\r\nHost: h\r\n")
        started = trio.current_time()
        reply = await read_all(stream)
        assert READ <= trio.current_time() - started < READ + 1.5
    assert reply.startswith(b"HTTP/1.1 408 ")


async def test_idle_keep_alive_connection_is_closed_quietly(port: int) -> None:
    stream = await connect(port)
    async with stream:
        await stream.send_all(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
        await read_response(stream)
        assert await read_all(stream) == b""  # closed after IDLE with nothing sent


async def test_handler_exception_is_500_and_the_server_goes_on(port: int) -> None:
    stream = await connect(port)
    async with stream:
        await stream.send_all(b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\n")
        head, _ = await read_response(stream)
        assert head.startswith(b"HTTP/1.1 500 ")
        await stream.send_all(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")  # same connection
        assert (await read_response(stream))[1].startswith(b"GET /after")


async def hijack_bug(stream: trio.SocketStream) -> None:
    await stream.send_all(b"partial")
    raise RuntimeError("bug after taking the connection over")


async def test_hijack_gets_the_raw_stream_then_the_connection_closes(port: int) -> None:
    stream = await connect(port)
    async with stream:
        await stream.send_all(b"GET /cut HTTP/1.1\r\nHost: h\r\n\r\n")
        reply = await read_all(stream)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-length: 1000" in head.lower() and len(body) == 100
    stream = await connect(port)
    async with stream:
        await stream.send_all(b"GET /drop HTTP/1.1\r\nHost: h\r\n\r\n")
        assert await read_all(stream) == b""
    stream = await connect(port)
    async with stream:  # a bug in the hijacker costs its connection, logged, not the server
        await stream.send_all(b"GET /hijack-boom HTTP/1.1\r\nHost: h\r\n\r\n")
        assert await read_all(stream) == b"partial"
    assert (await get(port, "/ok"))[0].startswith(b"HTTP/1.1 200 ")


async def test_client_vanishing_mid_request_does_not_hurt(port: int) -> None:
    for _ in range(5):
        stream = await connect(port)
        await stream.send_all(b"GET /x HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
        await stream.aclose()
    assert (await get(port, "/ok"))[0].startswith(b"HTTP/1.1 200 ")


async def test_max_connections_answers_503_past_the_cap(nursery: trio.Nursery) -> None:
    capped = await nursery.start(
        lambda task_status: serve_http(handler, "127.0.0.1", 0, idle_timeout=IDLE,
                                       read_timeout=READ, max_connections=2,
                                       task_status=task_status)
    )
    held = [await connect(capped) for _ in range(2)]
    for stream in held:  # answered, so the server counts both as open (kept alive)
        await stream.send_all(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await read_response(stream))[0].startswith(b"HTTP/1.1 200 ")
    for _ in range(3):  # every further one is refused at once, and the held ones still work
        stream = await connect(capped)
        async with stream:
            await stream.send_all(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n")
            reply = await read_all(stream)
        head, _, body = reply.partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        assert lines[0].startswith(b"http/1.1 503 ")
        assert b"retry-after: 1" in lines and b"connection: close" in lines
        assert b"content-type: application/json" in lines
        assert b'"status":"ERROR"' in body
    await held[0].send_all(b"GET /still HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await read_response(held[0]))[1].startswith(b"GET /still")
    await held[0].aclose()  # one slot frees: the next connection is served
    for _ in range(100):  # the server notices the close on its next read; no timer involved
        head, body = await get(capped, "/again")
        if head.startswith(b"HTTP/1.1 200 "):
            break
        await trio.testing.wait_all_tasks_blocked()
    assert body.startswith(b"GET /again")
    await held[1].aclose()


async def test_max_connections_refusal_reaches_an_httpx_client(nursery: trio.Nursery) -> None:
    capped = await nursery.start(
        lambda task_status: serve_http(handler, "127.0.0.1", 0, max_connections=1,
                                       task_status=task_status)
    )
    held = await connect(capped)
    async with held:
        await held.send_all(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
        await read_response(held)
        async with httpx.AsyncClient() as client:
            reply = await client.get(f"http://127.0.0.1:{capped}/b")
    assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
    assert reply.json()["status"] == "ERROR"


def test_max_connections_must_be_positive() -> None:
    async def main() -> None:
        await serve_http(handler, "127.0.0.1", 0, max_connections=0)

    with pytest.raises(ValueError, match="max_connections"):
        trio.run(main)
