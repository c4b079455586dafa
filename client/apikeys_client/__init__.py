"""Python client for the apikeys service: key management and Verify over gRPC."""

from apikeys_client._client import ApiKeysClient
from apikeys_client._errors import (
    Aborted,
    AlreadyGone,
    ApiKeysError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "Aborted",
    "AlreadyGone",
    "ApiKeysClient",
    "ApiKeysError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]
