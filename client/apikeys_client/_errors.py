"""Typed errors raised by the client; each carries the gRPC status code and details.

ApiKeysError                 any failed call (``.code``, ``.details``, ``.reason``, ``.domain``,
│                            ``.field_violations``, ``.retry_after``)
├── InvalidArgument          the request is malformed (bad name, unknown scope, bad token)
├── Unauthenticated          the client's own key is missing or does not verify
├── PermissionDenied         the client's key lacks the scope or the tenant
├── NotFound                 no such key in that tenant
├── AlreadyExists            a retry (same request_id) of a create or rotate that already worked
├── FailedPrecondition       the key's state forbids the change (revoked, already rotated)
├── Aborted                  a concurrent change conflicted; retry the whole call
├── ResourceExhausted        a limit of the server is reached (reason ``OVERLOADED``: too many
│                            calls at once); retry after ``.retry_after`` seconds, or elsewhere
├── Unavailable              the service or its database is unreachable; retry
└── AlreadyGone              the deadline passed or the call was cancelled

``reason`` is the server's machine-readable cause (``KEY_NOT_FOUND``, ``SCOPE_NOT_IN_CATALOG``…,
from the ``google.rpc.ErrorInfo`` detail; ``domain`` is ``"apikeys"``): branch on it, not on
the message. ``field_violations`` lists ``(field, description)`` for the request fields at fault
(``google.rpc.BadRequest``), e.g. ``[("scopes[1]", "scope 'passes:wirte' is not in…")]``.
``retry_after`` is the server's ``google.rpc.RetryInfo`` delay in seconds, None when it gave none.
Errors that did not come from the service (a deadline, a dead connection) have ``reason`` "".
"""

from typing import cast

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


class ApiKeysError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        reason: str = "",
        domain: str = "",
        field_violations: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.reason = reason
        self.domain = domain
        self.field_violations = field_violations or []
        self.retry_after = retry_after


class InvalidArgument(ApiKeysError):
    pass


class Unauthenticated(ApiKeysError):
    pass


class PermissionDenied(ApiKeysError):
    pass


class NotFound(ApiKeysError):
    pass


class AlreadyExists(ApiKeysError):
    pass


class FailedPrecondition(ApiKeysError):
    pass


class Aborted(ApiKeysError):
    pass


class ResourceExhausted(ApiKeysError):
    pass


class Unavailable(ApiKeysError):
    pass


class AlreadyGone(ApiKeysError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[ApiKeysError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: AlreadyGone,
    grpc.StatusCode.CANCELLED: AlreadyGone,
}


def from_rpc_error(error: grpc.RpcError) -> ApiKeysError:
    """The typed error for a failed call, unary or streaming, sync (a ``grpc.RpcError`` that is
    a ``grpc.Call``) or asyncio (``grpc.aio.AioRpcError``, whose ``code()``, ``details()`` and
    ``trailing_metadata()`` are plain methods too), with its rich details if any."""
    if not isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        return ApiKeysError(grpc.StatusCode.UNKNOWN, str(error))
    code = error.code()
    details = error.details() or str(error)
    status = _rich_status(error)
    reason = domain = ""
    violations: list[tuple[str, str]] = []
    retry_after = None
    for detail in status.details if status is not None else ():
        if detail.TypeName() == error_details_pb2.ErrorInfo.DESCRIPTOR.full_name:
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain = info.reason, info.domain
        elif detail.TypeName() == error_details_pb2.BadRequest.DESCRIPTOR.full_name:
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
        elif detail.TypeName() == error_details_pb2.RetryInfo.DESCRIPTOR.full_name:
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    return _BY_CODE.get(code, ApiKeysError)(
        code,
        details,
        reason=reason,
        domain=domain,
        field_violations=violations,
        retry_after=retry_after,
    )


def _rich_status(call: grpc.Call | grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The google.rpc.Status trailer; None when absent or inconsistent with the call's status
    (a proxy rewrote it): the code and message still stand."""
    try:
        # from_call reads only code(), details() and trailing_metadata(): both kinds have them.
        status: status_pb2.Status | None = rpc_status.from_call(cast(grpc.Call, call))
    except ValueError:
        return None
    return status
