"""Shared by the tests that drive the real writer: jobs as a producer sends them, and a writer
run until it has drained every message."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence

import trio

from daemon.bars import PG_EPOCH_US, Bar, CopyRows, encode_copy_rows
from daemon.jobs import FetchResult, Receipt, SeriesKey
from daemon.writer import JobFinished, Message, PageWrite, Writer, open_writer_channel


class Job:
    """A test's job: its series, the range it asked for, how fetching went, and the receipt."""

    def __init__(self, symbol: str, timeframe: str, from_ms: int, to_ms: int, *,
                 execution_id: uuid.UUID | None = None, pages: int = 0, attempts: int = 0,
                 api_seconds: float = 0.0, error: str | None = None,
                 cancelled: bool = False) -> None:
        self.series = SeriesKey(symbol, timeframe)
        self.fetch = FetchResult(from_ms, to_ms, pages, attempts, api_seconds, error, cancelled)
        self.receipt = Receipt(execution_id=execution_id)

    def page(self, bars: Sequence[Bar], span: tuple[int, int] | None = None) -> PageWrite:
        """A page proving `span` (default: from the job's `from` through its last bar)."""
        if span is None:
            span = (self.fetch.from_ms, bars[-1].t + 1 if bars else self.fetch.from_ms)
        rows = encode_copy_rows(list(bars), self.series.symbol, self.series.timeframe)[0]
        return PageWrite(self.series, rows, span, self.receipt)

    def done(self) -> JobFinished:
        return JobFinished(self.series, self.fetch, self.receipt)


async def write_all(url: str, messages: Sequence[Message]) -> Writer:
    """Run a Writer on `url` until it has committed (or rejected) every message."""
    send, receive = open_writer_channel(4)
    writer = Writer(url, receive)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        async with send:
            for m in messages:
                await send.send(m)
    return writer


async def write_queued(url: str, messages: Sequence[Message]) -> Writer:
    """Run a Writer on `url` with every message already queued when it starts: it takes the
    queued pages in batches (one transaction each), as a writer behind its producers does."""
    send, receive = open_writer_channel(len(messages) + 1)
    for m in messages:
        send.send_nowait(m)
    send.close()
    writer = Writer(url, receive)
    await writer.run()
    return writer


async def acknowledge(receive: trio.MemoryReceiveChannel[Message]) -> None:
    """Stand in for the writer where only the producer is under test (MockClock tests): count
    each page, finish each job with the one outcome rule, write nothing."""
    async with receive:
        async for message in receive:
            if isinstance(message, PageWrite):
                message.receipt.bars_written += message.rows.count
                message.receipt.pages_written += 1
            elif isinstance(message, JobFinished):
                message.receipt.outcome = message.fetch.outcome(message.receipt.write_error)
                message.receipt.finished.set()


def row_times(rows: CopyRows) -> list[int]:
    """The `t` of every bar in encoded COPY rows (the third field of each row: `ts`, binary
    timestamptz, microseconds since 2000-01-01 UTC)."""
    out, data, i = [], rows.payload, 0
    while i < len(data):
        (fields,) = struct.unpack_from(">h", data, i)
        i += 2
        for field in range(fields):
            (length,) = struct.unpack_from(">i", data, i)
            i += 4
            if field == 2:
                out.append((struct.unpack_from(">q", data, i)[0] + PG_EPOCH_US) // 1000)
            i += max(length, 0)
    return out
