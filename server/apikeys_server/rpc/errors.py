"""One table maps domain errors to gRPC status codes, following the class hierarchy; every
error carries ``google.rpc`` details; anything else is INTERNAL, logged here.

Each error ends the call with a ``google.rpc.Status`` in the ``grpc-status-details-bin``
trailer: an ``ErrorInfo`` (domain ``apikeys``, a machine-readable ``reason``) and, where one
request field is at fault, a ``BadRequest`` naming it. The message is the domain's, unchanged.
"""

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Final, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from apikeys_server.domain import errors
from apikeys_server.logs import REFUSED_CALLERS
from apikeys_server.rpc.registration import Undecodable

log = logging.getLogger(__name__)

DOMAIN: Final = "apikeys"

# Looked up along the error's MRO: a subclass maps as its nearest mapped ancestor.
STATUS_OF: Final[dict[type[errors.DomainError], grpc.StatusCode]] = {
    # A bare DomainError is a deliberate refusal nobody classified: not the request's shape
    # (INVALID_ARGUMENT would blame the caller's input), not worth a blind retry, and its
    # message is meant for the caller. FAILED_PRECONDITION says exactly that (AIP-193).
    errors.DomainError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}

INTERNAL_MESSAGE: Final = "internal error; see the server log"
INTERNAL_REASON: Final = "INTERNAL"
UNDECODABLE_REASON: Final = "REQUEST_NOT_DECODABLE"


def status_code(error: errors.DomainError) -> grpc.StatusCode:
    """The code of the nearest class in the error's MRO that the table names."""
    for cls in type(error).__mro__:
        code = STATUS_OF.get(cls)
        if code is not None:
            return code
    raise AssertionError("unreachable: DomainError itself is in the table")


def rich_status(
    code: grpc.StatusCode, message: str, reason: str, field: str | None = None
) -> grpc.Status:
    """A status whose trailer carries ErrorInfo and, for a field at fault, BadRequest."""
    details = [_packed(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))]
    if field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        details.append(_packed(error_details_pb2.BadRequest(field_violations=[violation])))
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def domain_status(error: errors.DomainError) -> grpc.Status:
    return rich_status(status_code(error), str(error), error.reason, error.field)


def _packed(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _abort(context: grpc.ServicerContext, status: grpc.Status) -> NoReturn:
    # Exactly what grpc's ServicerContext.abort_with_status does; in two calls because
    # grpc_testing's context (tests/integration/test_servicers.py) does not implement it.
    context.set_trailing_metadata(status.trailing_metadata)
    context.abort(status.code, status.details)


def _abort_for(
    error: Exception, handler: Callable[..., object], context: grpc.ServicerContext
) -> NoReturn:
    if isinstance(error, errors.DomainError):
        if isinstance(error, errors.Unauthenticated | errors.PermissionDenied):
            # Logged here, once for every handler; rate-limited against floods (logs.py).
            REFUSED_CALLERS.refused(handler.__name__, status_code(error).name, error.reason)
        _abort(context, domain_status(error))
    log.error("unexpected error in %s", handler.__name__, exc_info=error)
    _abort(context, rich_status(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, INTERNAL_REASON))


def _undecodable(request: Undecodable) -> errors.InvalidArgument:
    return errors.InvalidArgument(request.message, reason=UNDECODABLE_REASON)


Servicer = TypeVar("Servicer")
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Servicer, Request, grpc.ServicerContext], Response]


def status_errors(
    handler: Handler[Servicer, Request, Response],
) -> Handler[Servicer, Request, Response]:
    """Ends the call with the mapped status; never lets an exception reach grpc as UNKNOWN.
    A request that could not be decoded (rpc/registration.py) ends INVALID_ARGUMENT here."""

    @functools.wraps(handler)
    def wrapper(self: Servicer, request: Request, context: grpc.ServicerContext) -> Response:
        try:
            if isinstance(request, Undecodable):
                raise _undecodable(request)
            return handler(self, request, context)
        except Exception as error:
            _abort_for(error, handler, context)

    return wrapper


StreamHandler = Callable[[Servicer, Request, grpc.ServicerContext], Iterator[Response]]


def stream_status_errors(
    handler: StreamHandler[Servicer, Request, Response],
) -> StreamHandler[Servicer, Request, Response]:
    """``status_errors`` for server-streaming handlers (errors raised while iterating too)."""

    @functools.wraps(handler)
    def wrapper(
        self: Servicer, request: Request, context: grpc.ServicerContext
    ) -> Iterator[Response]:
        try:
            if isinstance(request, Undecodable):
                raise _undecodable(request)
            yield from handler(self, request, context)
        except Exception as error:
            _abort_for(error, handler, context)

    return wrapper
