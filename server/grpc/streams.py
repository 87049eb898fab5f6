"""Ordered pipelining of a request stream: several requests in flight, answers in request order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

Q = TypeVar("Q")
A = TypeVar("A")


async def ordered(
    requests: AsyncIterable[Q], handle: Callable[[int, Q], Awaitable[A]], window: int
) -> AsyncIterator[A]:
    """handle(i, request) for each request, up to `window` at once, results yielded in request order.

    Requests are read while earlier ones are handled, so a client that waits for each answer before
    sending the next one is served too. The first failure propagates; closing the generator (use
    contextlib.aclosing) cancels every request still in flight.
    """
    slots = asyncio.Semaphore(window)
    started: asyncio.Queue[asyncio.Future[A] | None] = asyncio.Queue()

    async def read() -> None:
        try:
            index = 0
            async for request in requests:
                await slots.acquire()
                started.put_nowait(asyncio.ensure_future(handle(index, request)))
                index += 1
        finally:
            started.put_nowait(None)

    reader = asyncio.ensure_future(read())
    try:
        while (task := await started.get()) is not None:
            try:
                yield await task
            finally:
                slots.release()
        await reader
    finally:
        reader.cancel()
        while not started.empty():
            task = started.get_nowait()
            if task is not None:
                task.cancel()
