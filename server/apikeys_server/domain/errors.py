"""Domain errors. The transport maps each to one status code, in one place (rpc/errors.py).

DomainError
├── InvalidArgument      the request is malformed or names something that does not exist
├── Unauthenticated      no caller key, or one that does not verify
├── PermissionDenied     the caller's key lacks the scope or the tenant
├── NotFound             no such key for this tenant (also another tenant's key)
├── AlreadyExists        a retried request (same request_id) already created its key
├── FailedPrecondition   the key's state forbids the change (revoked, already rotated)
├── ResourceExhausted    a limit of this server is reached; retry later or elsewhere
└── Unavailable          the database cannot be reached; retry later
"""


class DomainError(Exception):
    """Base of every error the domain raises on purpose; its message is safe to show callers."""


class InvalidArgument(DomainError):
    pass


class Unauthenticated(DomainError):
    pass


class PermissionDenied(DomainError):
    pass


class NotFound(DomainError):
    pass


class AlreadyExists(DomainError):
    pass


class FailedPrecondition(DomainError):
    pass


class ResourceExhausted(DomainError):
    pass


class Unavailable(DomainError):
    pass
