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


class MalformedRequest:
    """What a request that cannot be parsed deserialises to, so that the call can end with INVALID_ARGUMENT
    and a plain message instead of gRPC's UNKNOWN with an exception's class name."""

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    kind = owner.full_name if owner is not None else "request"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # protobuf's DecodeError for bad wire data and for invalid UTF-8 in string fields
            return MalformedRequest(
                f"malformed {kind} ({len(data)} bytes): not a valid message, or a string is not UTF-8"
            )

    return deserialize


async def _abort_malformed(request: MalformedRequest, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def rejecting_malformed(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` whose requests that do not parse end the call with INVALID_ARGUMENT (for a stream, when the
    method reaches the bad message: the ones before it have been served)."""

    async def checked(requests: AsyncIterator[object], context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        async for request in requests:
            if isinstance(request, MalformedRequest):
                await _abort_malformed(request, context)
            yield request

    async def prelude(request: object, context: grpc.aio.ServicerContext) -> object:
        if handler.request_streaming:
            return checked(request, context)
        if isinstance(request, MalformedRequest):
            await _abort_malformed(request, context)
        return request

    return with_prelude(handler, prelude, _tolerant(handler.request_deserializer))


def with_prelude(
    handler: grpc.RpcMethodHandler,
    prelude: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` whose method gets `await prelude(request, context)` in place of its request (or request stream):
    a check that may abort the call, or the stream read through a wrapper. Same shape and serialisers (or
    `request_deserializer`)."""
    inner = behaviour_of(handler)
    if handler.response_streaming and inspect.isasyncgenfunction(inner):

        async def streaming(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            async for response in inner(await prelude(request, context), context):
                yield response

        behaviour: Behaviour = streaming
    else:

        async def call(request: object, context: grpc.aio.ServicerContext) -> object:
            result = inner(await prelude(request, context), context)
            return await result if inspect.isawaitable(result) else result

        behaviour = call
    factory, _ = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Every method's requests parsed tolerantly (rejecting_malformed)."""

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        return None if handler is None else rejecting_malformed(handler)
