"""Building blocks for grpc.aio server interceptors: rebuild a method handler around new behaviour.

A handler's behaviour comes in one of four shapes (unary or stream, each way), and a response stream is
either an async generator or a coroutine that calls context.write (the health service's Watch). These
helpers keep the shape and the (de)serialisers, so an interceptor only says what happens around a call.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]

_FACTORIES = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def behaviour_of(handler: grpc.RpcMethodHandler) -> Behaviour:
    _, attribute = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return getattr(handler, attribute)


def with_behaviour(handler: grpc.RpcMethodHandler, behaviour: Behaviour) -> grpc.RpcMethodHandler:
    """A handler of the same shape and (de)serialisers as `handler` that runs `behaviour` instead."""
    factory, _ = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call with `code` without reading its requests or running the method."""

    async def refuse(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return with_behaviour(handler, refuse)


def around(
    handler: grpc.RpcMethodHandler,
    enter: Callable[[grpc.aio.ServicerContext], object],
    leave: Callable[[object, grpc.aio.ServicerContext, BaseException | None], Awaitable[None] | None],
) -> grpc.RpcMethodHandler:
    """`handler` with `enter(context)` before the call and `leave(state, context, error)` after it,
    whichever way it ends (returned, aborted, failed, cancelled); `error` is None when it returned."""
    inner = behaviour_of(handler)

    async def finish(state: object, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        result = leave(state, context, error)
        if inspect.isawaitable(result):
            await result

    if handler.response_streaming and inspect.isasyncgenfunction(inner):

        async def streaming(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            state = enter(context)
            try:
                async for response in inner(request, context):
                    yield response
            except BaseException as exc:
                await finish(state, context, exc)
                raise
            await finish(state, context, None)

        return with_behaviour(handler, streaming)

    async def call(request: object, context: grpc.aio.ServicerContext) -> object:
        state = enter(context)
        try:
            result = inner(request, context)
            if inspect.isawaitable(result):
                result = await result
        except BaseException as exc:
            await finish(state, context, exc)
            raise
        await finish(state, context, None)
        return result

    return with_behaviour(handler, call)
