"""Immutable records of keys and audit events: what the storage returns and the cache holds."""

import enum
from dataclasses import dataclass
from datetime import datetime


class KeyState(enum.Enum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


class EventAction(enum.Enum):
    CREATED = "created"
    UPDATED = "updated"
    ROTATED = "rotated"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    tenant_id: str
    name: str
    scopes: frozenset[str]
    hint: str
    digest: bytes
    create_time: datetime
    expire_time: datetime | None = None
    revoke_time: datetime | None = None
    revoke_reason: str = ""
    last_used_time: datetime | None = None
    replaced_by: str | None = None
    rotated_from: str | None = None

    def state(self, now: datetime) -> KeyState:
        if self.revoke_time is not None:
            return KeyState.REVOKED
        if self.expire_time is not None and self.expire_time <= now:
            return KeyState.EXPIRED
        return KeyState.ACTIVE


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One committed change to a key, as the change feed records it.

    ``position`` only grows, in commit order. ``digest`` is for evicting caches inside the
    service; it never leaves the process (the watch stream sends everything else).
    """

    position: int
    time: datetime
    tenant_id: str
    key_id: str
    kind: EventAction
    digest: bytes


@dataclass(frozen=True, slots=True)
class FieldChange:
    field: str
    old_value: str
    new_value: str


@dataclass(frozen=True, slots=True)
class KeyEvent:
    id: str
    time: datetime
    tenant_id: str
    key_id: str
    action: EventAction
    actor_key_id: str
    changes: tuple[FieldChange, ...]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """The id of a request that created a key (AIP-155), kept for a day so that a retry of it
    never creates a second key.

    ``caller_tenant_id`` scopes the id: the caller's own tenant (every platform key shares
    ``_platform``). ``fingerprint`` is a digest of what the request asked for, so the same id
    sent with another request is refused. ``key_id``: the key it created (a rotation's successor).
    """

    caller_tenant_id: str
    request_id: str
    fingerprint: str
    key_id: str
    create_time: datetime
