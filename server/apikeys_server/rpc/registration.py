"""Servicers registered from their service descriptors, with request decoding that cannot fail.

grpc's generated ``add_*Servicer_to_server`` decodes requests with ``FromString``; bytes that
do not decode (invalid UTF-8 in a string field, a field of the wrong wire type, garbage) end
the call with INTERNAL "Exception deserializing request!" before any handler runs. Here the
same handlers are built with a deserializer that answers an ``Undecodable`` marker instead,
which ``status_errors`` turns into INVALID_ARGUMENT saying what was wrong. On success the cost
is one try block around ``FromString`` (free in CPython 3.11) and one type check in the
handler wrapper.
"""

import time
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

PARSE_ERROR_PREFIX: Final = "Error parsing message with type "


class Undecodable:
    """What the deserializer answers for bytes that are not the request message."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def request_deserializer(message_class: type[Message]) -> Callable[[bytes], object]:
    """``message_class.FromString`` answering ``Undecodable`` instead of raising DecodeError."""
    from_string = message_class.FromString
    name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> object:
        try:
            return from_string(data)
        except DecodeError as error:
            return Undecodable(f"the request could not be decoded as {name}: {_cause(error)}")

    return deserialize


def _cause(error: DecodeError) -> str:
    """upb says "Error parsing message with type 'x.Y': String field had bad UTF-8"; keep
    what follows the type, which the message already names."""
    text = str(error)
    if text.startswith(PARSE_ERROR_PREFIX):
        _, separator, cause = text.partition("': ")
        if separator:
            return cause
    return text or type(error).__name__


Observe = Callable[[float, "grpc.StatusCode | None"], None]


class CallObserver(Protocol):
    """What records each call (metrics.py): asked once per method for its observe function,
    which gets the ``time.perf_counter()`` the call started at and its code (None: OK)."""

    def observer(self, service: str, method: str, grpc_type: str) -> Observe: ...


def observed(behavior: Callable[..., Any], observe: Observe, streaming: bool) -> Callable[..., Any]:
    """The handler, reporting each call's duration and status code once it ends. The code is
    the one the handler's context ended with (rpc/errors.py aborts with it); None is OK."""
    clock = time.perf_counter
    if not streaming:

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            started = clock()
            try:
                return behavior(request, context)
            finally:
                observe(started, context.code())  # type: ignore[attr-defined]

        return unary

    def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        started = clock()
        try:
            yield from behavior(request, context)
        finally:
            observe(started, context.code())  # type: ignore[attr-defined]

    return stream


def _method_handler(
    servicer: object, method: MethodDescriptor, observer: CallObserver | None
) -> "grpc.RpcMethodHandler[Any, Any]":
    behavior = getattr(servicer, method.name)
    if observer is not None:
        grpc_type = "server_stream" if method.server_streaming else "unary"
        observe = observer.observer(method.containing_service.full_name, method.name, grpc_type)
        behavior = observed(behavior, observe, method.server_streaming)
    deserializer = request_deserializer(GetMessageClass(method.input_type))
    serializer = GetMessageClass(method.output_type).SerializeToString
    if method.client_streaming:
        raise NotImplementedError(f"{method.full_name}: client streaming is not supported here")
    build: Any = (
        grpc.unary_stream_rpc_method_handler
        if method.server_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    handler: grpc.RpcMethodHandler[Any, Any] = build(
        behavior, request_deserializer=deserializer, response_serializer=serializer
    )
    return handler


def add_servicer(
    server: grpc.Server,
    service: ServiceDescriptor,
    servicer: object,
    observer: CallObserver | None = None,
) -> None:
    """What the generated ``add_<Service>Servicer_to_server`` does, with safe decoding; with an
    ``observer``, every call of every method is timed and counted by its status code."""
    handlers = {
        method.name: _method_handler(servicer, method, observer) for method in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    # Registered methods skip the generic lookup per call (grpc >= 1.62), as generated code does.
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]
