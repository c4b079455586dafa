"""Python client for the apikeys service: key management and Verify over gRPC."""

from apikeys_client._client import ApiKeysClient
from apikeys_client._errors import (
    AlreadyExists,
    AlreadyGone,
    ApiKeysError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from apikeys_client._tls import tls_credentials

__all__ = [
    "AlreadyExists",
    "AlreadyGone",
    "ApiKeysClient",
    "ApiKeysError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
    "tls_credentials",
]
