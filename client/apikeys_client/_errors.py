"""Typed errors raised by the client; each carries the gRPC status code and details.

ApiKeysError                 any failed call (``.code``, ``.details``)
├── InvalidArgument          the request is malformed (bad name, unknown scope, bad token)
├── Unauthenticated          the client's own key is missing or does not verify
├── PermissionDenied         the client's key lacks the scope or the tenant
├── NotFound                 no such key in that tenant
├── AlreadyExists            a retry (same request_id) of a create or rotate that already worked
├── FailedPrecondition       the key's state forbids the change (revoked, already rotated)
├── Unavailable              the service or its database is unreachable; retry
└── AlreadyGone              the deadline passed or the call was cancelled
"""

import grpc


class ApiKeysError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


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
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: AlreadyGone,
    grpc.StatusCode.CANCELLED: AlreadyGone,
}


def from_rpc_error(error: grpc.RpcError) -> ApiKeysError:
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    return _BY_CODE.get(code, ApiKeysError)(code, details)
