"""One table maps domain errors to gRPC status codes; anything else is INTERNAL, logged here."""

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Final, TypeVar

import grpc

from apikeys_server.domain import errors

log = logging.getLogger(__name__)

STATUS_OF: Final[dict[type[errors.DomainError], grpc.StatusCode]] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}

Servicer = TypeVar("Servicer")
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Servicer, Request, grpc.ServicerContext], Response]


def status_errors(
    handler: Handler[Servicer, Request, Response],
) -> Handler[Servicer, Request, Response]:
    """Ends the call with the mapped status; never lets an exception reach grpc as UNKNOWN."""

    @functools.wraps(handler)
    def wrapper(self: Servicer, request: Request, context: grpc.ServicerContext) -> Response:
        try:
            return handler(self, request, context)
        except errors.DomainError as error:
            context.abort(STATUS_OF[type(error)], str(error))
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

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
            yield from handler(self, request, context)
        except errors.DomainError as error:
            context.abort(STATUS_OF[type(error)], str(error))
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    return wrapper
