"""Call slots (server/grpc/call_slots.py) on hand-made handlers: health checks take none, streams never take
every slot, slots come back however a call ends, and an idle request stream ends with DEADLINE_EXCEEDED."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from inserve.server.config import LimitsConfig
from inserve.server.grpc.call_slots import CallSlotsInterceptor


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Context:
    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)


class Details:
    def __init__(self, method: str) -> None:
        self.method = method


def held(release: asyncio.Event, streaming: bool) -> grpc.RpcMethodHandler:
    """A method that answers once `release` is set (request streams: after reading them to the end)."""

    async def unary(request: object, context: object) -> str:
        await release.wait()
        return "done"

    async def stream(requests: AsyncIterator[object], context: object) -> str:
        async for _ in requests:
            pass
        await release.wait()
        return "done"

    if streaming:
        return grpc.stream_unary_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


async def nothing() -> AsyncIterator[object]:
    return
    yield


async def never() -> AsyncIterator[object]:
    await asyncio.Event().wait()
    yield


async def start(slots: CallSlotsInterceptor, method: str, handler: grpc.RpcMethodHandler, requests=None):
    async def continuation(details: Details) -> grpc.RpcMethodHandler:
        return handler

    wrapped = await slots.intercept_service(continuation, Details(method))
    behaviour = wrapped.stream_unary if wrapped.request_streaming else wrapped.unary_unary
    task = asyncio.ensure_future(behaviour(requests if requests is not None else "request", Context()))
    await asyncio.sleep(0.01)
    return task


SEARCH, INDEX = "/inserve.v1.InstanceSearch/Search", "/inserve.v1.InstanceSearch/IndexImages"
HEALTH = "/grpc.health.v1.Health/Check"


def test_health_checks_take_no_slot_and_a_full_server_refuses_the_rest() -> None:
    async def run() -> None:
        release = asyncio.Event()
        slots = CallSlotsInterceptor(LimitsConfig(max_concurrent_rpcs=1))
        first = await start(slots, SEARCH, held(release, False))
        health = await start(slots, HEALTH, held(release, False))
        refused = await start(slots, SEARCH, held(release, False))
        with pytest.raises(Aborted) as caught:
            await refused
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 calls in progress" in caught.value.message
        release.set()
        assert await first == "done" and await health == "done"
        assert slots.serving == {False: 0, True: 0}

    asyncio.run(run())


def test_streams_never_take_every_slot() -> None:
    async def run() -> None:
        release = asyncio.Event()
        slots = CallSlotsInterceptor(LimitsConfig(max_concurrent_rpcs=4, stream_idle_timeout_s=None))
        streams = [await start(slots, INDEX, held(release, True), never()) for _ in range(3)]  # 3/4 of 4
        refused = await start(slots, INDEX, held(release, True), never())
        with pytest.raises(Aborted, match="3 streams are open"):
            await refused
        search = await start(slots, SEARCH, held(release, False))
        assert slots.serving == {False: 1, True: 3}
        release.set()
        assert await search == "done"
        for stream in streams:
            stream.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        assert slots.serving == {False: 0, True: 0}  # cancelled calls give their slots back too

    asyncio.run(run())


def test_a_stream_that_keeps_the_server_waiting_ends_with_deadline_exceeded() -> None:
    async def run() -> None:
        release = asyncio.Event()
        release.set()
        slots = CallSlotsInterceptor(LimitsConfig(stream_idle_timeout_s=0.05))
        idle = await start(slots, INDEX, held(release, True), never())
        with pytest.raises(Aborted) as caught:
            await idle
        assert (
            caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "no message for 0.05 s" in caught.value.message
        )
        assert await (await start(slots, INDEX, held(release, True), nothing())) == "done"
        assert slots.serving == {False: 0, True: 0}

    asyncio.run(run())


def test_stream_slots_default_to_three_quarters() -> None:
    assert LimitsConfig(max_concurrent_rpcs=64).stream_slots == 48
    assert LimitsConfig(max_concurrent_rpcs=1).stream_slots == 1
    assert LimitsConfig(max_concurrent_rpcs=64, max_concurrent_streams=10).stream_slots == 10
    assert LimitsConfig(max_concurrent_rpcs=None).stream_slots is None
