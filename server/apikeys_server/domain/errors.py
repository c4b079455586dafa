"""Domain errors. The transport maps each to one status code, in one place (rpc/errors.py).

DomainError              the domain refused on purpose (mapped as FailedPrecondition)
├── InvalidArgument      the request is malformed or names something that does not exist
├── Unauthenticated      no caller key, several, or one that does not verify
├── PermissionDenied     the caller's key lacks the scope or the tenant
├── NotFound             no such key for this tenant (also another tenant's key)
├── AlreadyExists        a retried request (same request_id) already created its key
├── FailedPrecondition   the key's state forbids the change (revoked, already rotated)
├── Aborted              a concurrent change conflicted; retrying the whole call may succeed
├── ResourceExhausted    a limit of this server is reached; retry later or elsewhere
└── Unavailable          the database cannot be reached; retry later

Each error carries a machine-readable ``reason`` (UPPER_SNAKE_CASE, e.g. ``KEY_NOT_FOUND``;
each class has a default) and, where one request field is at fault, ``field``: its path as
in the proto (``scopes[1]``, ``update_mask.paths[0]``). Plain strings: no grpc here.
"""

from typing import ClassVar


class DomainError(Exception):
    """Base of every error the domain raises on purpose; its message is safe to show callers."""

    default_reason: ClassVar[str] = "REFUSED"

    def __init__(self, message: str, *, reason: str | None = None, field: str | None = None):
        super().__init__(message)
        self.reason = reason or self.default_reason
        self.field = field


class InvalidArgument(DomainError):
    default_reason = "INVALID_ARGUMENT"


class Unauthenticated(DomainError):
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    default_reason = "PERMISSION_DENIED"


class NotFound(DomainError):
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    default_reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    default_reason = "CONFLICT"


class ResourceExhausted(DomainError):
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(DomainError):
    default_reason = "UNAVAILABLE"
