"""Call slots: how many calls the server serves at once, by class, and how long a stream may keep it waiting.

Health checks take no slot: a load balancer must always get an answer. Every other call takes one of
LimitsConfig.max_concurrent_rpcs; calls that stream requests (IndexImages, SearchStream, IndexVideo, and
reflection) may take at most max_concurrent_streams of them, so that idle or slow streams can never hold
every slot and Search, Delete and GetStats are still served. A stream that keeps the server waiting for its
next message longer than stream_idle_timeout_s ends with DEADLINE_EXCEEDED, releasing what it held (a video
slot, its place in the batcher); a stream the server is not reading from (back-pressure) is not idle.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator

import grpc

from inserve.server.config import LimitsConfig
from inserve.server.grpc.interceptors import behaviour_of, with_behaviour, with_prelude
from inserve.server.grpc.security import OPEN_SERVICES


class CallSlotsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, limits: LimitsConfig, open_services: tuple[str, ...] = OPEN_SERVICES) -> None:
        self.calls, self.streams = limits.max_concurrent_rpcs, limits.stream_slots
        self.idle_s = limits.stream_idle_timeout_s
        self.open_services = open_services
        self.serving = {False: 0, True: 0}  # calls in their slots, by whether they stream requests

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self.open_services):
            return handler
        if handler.request_streaming and self.idle_s is not None:
            handler = with_idle_timeout(handler, self.idle_s)
        return self._slotted(handler)

    def _refusal(self, streaming: bool) -> str | None:
        """Why a call cannot have a slot now (None: it can)."""
        total = sum(self.serving.values())
        if self.calls is not None and total >= self.calls:
            return f"{total} calls in progress, the most this server serves at once; retry later"
        if streaming and self.streams is not None and self.serving[True] >= self.streams:
            return f"{self.serving[True]} streams are open, the most this server takes at once; retry later"
        return None

    def _slotted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` taking a slot when it starts (checked and taken with no await in between: one event loop)
        and giving it back however it ends."""
        inner, streaming = behaviour_of(handler), handler.request_streaming

        async def take(context: grpc.aio.ServicerContext) -> None:
            refusal = self._refusal(streaming)
            if refusal is not None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            self.serving[streaming] += 1

        if handler.response_streaming and inspect.isasyncgenfunction(inner):

            async def responses(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
                await take(context)
                try:
                    async for response in inner(request, context):
                        yield response
                finally:
                    self.serving[streaming] -= 1

            return with_behaviour(handler, responses)

        async def call(request: object, context: grpc.aio.ServicerContext) -> object:
            await take(context)
            try:
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                self.serving[streaming] -= 1

        return with_behaviour(handler, call)


def with_idle_timeout(handler: grpc.RpcMethodHandler, idle_s: float) -> grpc.RpcMethodHandler:
    """A request-streaming handler whose stream ends with DEADLINE_EXCEEDED when the server has waited
    `idle_s` for the next message."""

    async def timed(requests: AsyncIterator[object], context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        iterator = aiter(requests)
        while True:
            # the read runs as a task of its own (asyncio.timeout would need Python 3.11: JetPack has 3.10); when
            # the call ends first (aborted, cancelled), its outcome is marked seen, or asyncio logs it
            reading = asyncio.ensure_future(anext(iterator))
            try:
                done, _ = await asyncio.wait({reading}, timeout=idle_s)
            finally:
                if not reading.done():
                    reading.cancel()
                reading.add_done_callback(outcome_seen)
            if not done:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no message for {idle_s:g} s: the stream was idle too long (send more, or close it)",
                )
            try:
                request = reading.result()
            except StopAsyncIteration:
                return
            yield request

    async def prelude(requests: AsyncIterator[object], context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        return timed(requests, context)

    return with_prelude(handler, prelude)


def outcome_seen(future: asyncio.Future) -> None:
    """Marks the outcome of work whose call has gone as seen, so that asyncio does not log its exception as
    'Future exception was never retrieved'."""
    if not future.cancelled():
        future.exception()
