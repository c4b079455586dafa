"""Immutable records of keys and audit events: what the storage returns and the cache holds."""

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

T = TypeVar("T")


class KeyState(enum.Enum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


class EventAction(enum.Enum):
    CREATED = "created"
    UPDATED = "updated"
    ROTATED = "rotated"
    REVOKED = "revoked"
    LEAKED = "leaked"
    # Stored in a 16-character column: the short name.
    PRESENTED_AFTER_REVOCATION = "presented"


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
    leak_time: datetime | None = None
    leak_source: str = ""
    leak_url: str = ""
    presented_after_revocation_time: datetime | None = None
    presented_after_revocation_count: int = 0

    def state(self, now: datetime) -> KeyState:
        return key_state(self.revoke_time is not None, self.expire_time, now)


@dataclass(frozen=True, slots=True)
class VerifyRecord:
    """What Verify reads of a key, and all the Verify cache holds of it.

    One is cached per recently verified key (100 000 of them by default), so it keeps only
    what the rules and the answer need: no hint, creation or last-used time, revoke reason or
    rotation links, each of which costs memory per cached key. ``digest`` is the cache's own
    key object (shared, not copied).

    ``cached_until`` is the Verify cache's: it stores a copy stamped with the time (on its own
    monotonic timer) past which the copy is stale, instead of a (record, expiry) pair, 56
    bytes less a cached key. It says nothing about the key: equality ignores it.
    """

    id: str
    tenant_id: str
    name: str
    scopes: frozenset[str]
    digest: bytes
    expire_time: datetime | None = None
    revoked: bool = False
    cached_until: float = field(default=math.inf, compare=False, repr=False)

    @classmethod
    def of(cls, key: KeyRecord) -> "VerifyRecord":
        return cls(
            key.id,
            key.tenant_id,
            key.name,
            key.scopes,
            key.digest,
            key.expire_time,
            key.revoke_time is not None,
        )

    def cached(self, until: float) -> "VerifyRecord":
        """This record as the cache stores it: a copy that is stale past ``until``.

        Spelled out rather than dataclasses.replace(), which costs twice as much on each cache
        miss; every field is copied (tests compare a stored copy with all fields set).
        """
        return VerifyRecord(
            id=self.id,
            tenant_id=self.tenant_id,
            name=self.name,
            scopes=self.scopes,
            digest=self.digest,
            expire_time=self.expire_time,
            revoked=self.revoked,
            cached_until=until,
        )


def key_state(revoked: bool, expire_time: datetime | None, now: datetime) -> KeyState:
    """The one rule for a key's state, whichever record holds the key."""
    if revoked:
        return KeyState.REVOKED
    if expire_time is not None and expire_time <= now:
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


class PerRecord(Generic[T]):
    """One value per VerifyRecord, made once and shared while the record is: kept by digest
    and checked by identity (a changed key is a new record, whose value is made again), so a
    cache hit allocates none. Bounded: starts over when ``limit`` records are held."""

    __slots__ = ("_limit", "_made", "_make")

    def __init__(self, make: Callable[[VerifyRecord], T], limit: int) -> None:
        self._make = make
        self._limit = limit
        self._made: dict[bytes, tuple[VerifyRecord, T]] = {}

    def of(self, record: VerifyRecord) -> T:
        known = self._made.get(record.digest)
        if known is not None and known[0] is record:
            return known[1]
        value = self._make(record)
        if len(self._made) >= self._limit:
            self._made.clear()
        self._made[record.digest] = (record, value)
        return value
