"""Python client for the apikeys service: key management and Verify over gRPC."""

from apikeys_client._aio import AsyncApiKeysClient
from apikeys_client._caching import AsyncCachingVerifier, CachingVerifier
from apikeys_client._client import ApiKeysClient, WatchStream
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
    "AsyncApiKeysClient",
    "AsyncCachingVerifier",
    "CachingVerifier",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "WatchStream",
    "tls_credentials",
]
