"""Python client for the apikeys service: key management and Verify over gRPC."""

from apikeys_client._client import ApiKeysClient
from apikeys_client._errors import (
    Aborted,
    AlreadyExists,
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
from apikeys_client._tls import tls_credentials

__all__ = [
    "Aborted",
    "AlreadyExists",
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
    "tls_credentials",
]
