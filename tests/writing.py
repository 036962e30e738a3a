"""Shared by the tests that drive the real writer: send messages, let it drain, return it."""

from __future__ import annotations

import trio

from daemon.writer import Writer, open_writer_channel


async def write_all(url: str, messages: list[object]) -> Writer:
    """Run a Writer on `url` until it has committed (or rejected) every message."""
    send, receive = open_writer_channel(4)
    writer = Writer(url, receive)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with send:
            for m in messages:
                await send.send(m)  # type: ignore[arg-type]
    return writer
