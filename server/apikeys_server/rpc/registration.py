"""Servicers registered from their service descriptors, with request decoding that cannot fail.

grpc's generated ``add_*Servicer_to_server`` decodes requests with ``FromString``; bytes that
do not decode (invalid UTF-8 in a string field, a field of the wrong wire type, garbage) end
the call with INTERNAL "Exception deserializing request!" before any handler runs. Here the
same handlers are built with a deserializer that answers an ``Undecodable`` marker instead,
which ``status_errors`` turns into INVALID_ARGUMENT saying what was wrong. On success the cost
is one try block around ``FromString`` (free in CPython 3.11) and one type check in the
handler wrapper.
"""

from collections.abc import Callable
from typing import Any, Final

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


def _method_handler(
    servicer: object, method: MethodDescriptor
) -> "grpc.RpcMethodHandler[Any, Any]":
    behavior = getattr(servicer, method.name)
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


def add_servicer(server: grpc.Server, service: ServiceDescriptor, servicer: object) -> None:
    """What the generated ``add_<Service>Servicer_to_server`` does, with safe decoding."""
    handlers = {method.name: _method_handler(servicer, method) for method in service.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    # Registered methods skip the generic lookup per call (grpc >= 1.62), as generated code does.
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]
