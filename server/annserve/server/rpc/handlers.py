"""gRPC handler plumbing: handlers rebuilt for interceptors, status set, calls ended.

Rebuild a method handler around a new behaviour (for server interceptors), read the
status a handler has set, end a call from another thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from collections.abc import Callable

#: Handler attribute holding the behaviour, and grpc's public factory, by
#: ``(request_streaming, response_streaming)``.
_KINDS: dict[tuple[bool, bool], tuple[str, Callable[..., grpc.RpcMethodHandler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def behavior_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """Return the behaviour of ``handler`` (its one non-None ``unary_unary``... attribute)."""
    kind, _ = _KINDS[(handler.request_streaming, handler.response_streaming)]
    return getattr(handler, kind)


def is_non_blocking(handler: grpc.RpcMethodHandler) -> bool:
    """Whether grpc calls the behaviour with a ``send_response_callback`` third argument.

    grpc's sync server reads ``experimental_non_blocking`` off a response-streaming
    behaviour (grpc_health's ``Watch`` sets it): such a behaviour returns at once and
    sends later through the callback (None ends the call with the status set), so a
    call held open holds no worker thread.
    """
    return handler.response_streaming and bool(
        getattr(behavior_of(handler), "experimental_non_blocking", False)
    )


def rebuild_handler(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> grpc.RpcMethodHandler:
    """Return a handler of the same arity whose behaviour is ``wrap(behaviour)``.

    Built with grpc's public ``*_rpc_method_handler`` factories; the request
    deserializer and response serializer are kept, and so are the non-blocking
    flags (``experimental_non_blocking``, ``experimental_thread_pool``): without
    them a health ``Watch`` would hold a worker thread for as long as it is open.

    Parameters
    ----------
    handler
        The method's handler, as returned by an interceptor's ``continuation``.
    wrap
        Takes the handler's behaviour, returns a new function with the same call
        signature: ``(request, context, send_response_callback)`` where
        :func:`is_non_blocking`, else ``(request, context)``.
    """
    kind, factory = _KINDS[(handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, kind)
    wrapped = wrap(behavior)
    if is_non_blocking(handler):
        wrapped.experimental_non_blocking = True  # type: ignore[attr-defined]
        pool = getattr(behavior, "experimental_thread_pool", None)
        wrapped.experimental_thread_pool = pool  # type: ignore[attr-defined]
    return factory(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def status_set(context: grpc.ServicerContext) -> tuple[grpc.StatusCode | None, str]:
    """Return the status code and details a handler has set so far (e.g. by ``abort``).

    ``(None, "")`` while none is set. Details sent as bytes are decoded.
    """
    # grpcio >= 1.38 has ServicerContext.code()/details(); grpc-stubs 1.53 does not list them
    code = context.code()  # type: ignore[attr-defined]
    details = context.details() or ""  # type: ignore[attr-defined]
    if isinstance(details, bytes):
        details = details.decode(errors="replace")
    return (code if isinstance(code, grpc.StatusCode) else None), details


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call with ``code`` and ``details`` from any thread.

    ``context.abort`` works only in the handler's own thread and ``context.cancel``
    always sends ``CANCELLED``; grpc's call object ends it with a status of ours
    (the one private API of grpcio's sync server annserve uses, checked with grpcio
    1.85; pyproject bounds grpcio's minor version for it). The handler's
    generator is then closed at its ``yield``; ``context.code()`` tells why.
    """
    context.set_code(code)
    context.set_details(details)
    context._rpc_event.call.cancel(code.value[0], details)  # type: ignore[attr-defined]
