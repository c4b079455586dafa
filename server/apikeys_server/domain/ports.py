"""What the domain needs from storage and infrastructure, as protocols (implemented in storage/)."""

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from apikeys_server.domain.pagination import Cursor
from apikeys_server.domain.records import (
    EventAction,
    KeyChange,
    KeyEvent,
    KeyRecord,
    RequestRecord,
    VerifyRecord,
)


class KeyLookup(Protocol):
    def find_by_digest(self, digest: bytes) -> VerifyRecord | None: ...


class Uncached(enum.Enum):
    """What a cache answers for a digest it does not hold, or no longer trusts. A KeyLookup
    with a cache in front may also offer ``cached(digest) -> VerifyRecord | Uncached | None``,
    the cache alone, and ``load(digest)``, the store alone (storage/cache.py): the Verifier
    asks the cache before a key's shape check and loads only well-formed keys it missed."""

    MISS = "miss"


MISS = Uncached.MISS


class UsageRecorder(Protocol):
    def record(self, key_id: str, when: datetime) -> None: ...


class TripwireRecorder(Protocol):
    """Notes a key presented after it stopped working (revoked, leaked, expired)."""

    def record_presented(
        self, key_id: str, tenant_id: str, when: datetime, presenter: str
    ) -> None: ...


# At most one PRESENTED_AFTER_REVOCATION event a key this often, across every process and
# replica on one database (KeyStore.record_presented decides, in the database).
EVENT_INTERVAL = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class Presented:
    """A key's presentations after it stopped working, gathered since the last flush.

    ``presenter``: the key id of the caller that presented it last; ``event``: whether this
    process asks for a PRESENTED_AFTER_REVOCATION event (it wrote none for the key within
    EVENT_INTERVAL); the store writes it only if no process did."""

    key_id: str
    tenant_id: str
    time: datetime
    count: int
    presenter: str
    event: bool


@dataclass(frozen=True, slots=True)
class KeyQuery:
    tenant_id: str
    include_revoked: bool = False
    name_prefix: str = ""


class KeyWriter(Protocol):
    """Writes inside one transaction; committed when the block exits without error."""

    def get_key_for_update(self, tenant_id: str, key_id: str) -> KeyRecord | None: ...

    def get_key_by_digest_for_update(self, digest: bytes) -> KeyRecord | None:
        """The key with this digest, in any tenant (the caller checks the tenant)."""
        ...

    def insert_key(self, key: KeyRecord) -> None: ...

    def update_key(self, key: KeyRecord) -> None: ...

    def insert_event(self, event: KeyEvent) -> None: ...

    def record_change(self, key: KeyRecord, kind: EventAction, time: datetime) -> None:
        """Adds the change to the feed, committed with the transaction (and only then)."""
        ...

    def claim_request(self, request: RequestRecord, stale_before: datetime) -> RequestRecord | None:
        """Records ``request``, committed with the transaction, and returns None; unless a
        request with the same caller tenant and id, recorded at or after ``stale_before``, is
        already committed (or commits concurrently: this waits for it): then nothing is written
        and that request is returned. An older one is replaced."""
        ...

    def prune_requests(self, before: datetime, limit: int) -> None:
        """Deletes at most ``limit`` requests recorded before ``before``, skipping any another
        transaction holds (so concurrent creates never wait on each other here)."""
        ...


class KeyStore(KeyLookup, Protocol):
    def get_key(self, tenant_id: str, key_id: str) -> KeyRecord | None: ...

    def list_keys(self, query: KeyQuery, after: Cursor | None, limit: int) -> list[KeyRecord]: ...

    def list_events(
        self, tenant_id: str, key_id: str | None, after: Cursor | None, limit: int
    ) -> list[KeyEvent]: ...

    def transaction(self) -> AbstractContextManager[KeyWriter]: ...

    def touch_last_used(self, used: Mapping[str, datetime]) -> None: ...

    def record_presented(self, presented: Sequence[Presented]) -> set[str]:
        """Adds each key's count and latest time (increments, so every process's presentations
        count); for those asking for an event, writes one only if the key's last event, by any
        process, is at least EVENT_INTERVAL older than ``time``. Returns the keys given one."""
        ...


@dataclass(frozen=True, slots=True)
class FeedBatch:
    """Changes after a position, in position order, and how far the feed has been pruned."""

    changes: list[KeyChange]
    pruned_through: int


class ChangeFeed(Protocol):
    """The change feed as its consumers read it."""

    def head(self) -> int:
        """The highest committed position (or the pruned horizon of an empty feed)."""
        ...

    def read_changes(self, after: int, limit: int) -> FeedBatch: ...

    def prune(self, before: datetime) -> int:
        """Deletes changes recorded before ``before``; returns how many."""
        ...


@dataclass(frozen=True, slots=True)
class FeedUpdate:
    """Changes after a watcher's position and the position they bring it to; a heartbeat
    has no changes. ``confirm_time``: when the server last confirmed it had the whole feed."""

    changes: list[KeyChange]
    position: int
    confirm_time: datetime


class ChangeSource(Protocol):
    """The change feed as this process has applied it (the follower)."""

    @property
    def position(self) -> int: ...

    def head(self) -> int:
        """The feed's head in the database."""
        ...

    def updates(
        self, after: int, heartbeat: float, active: Callable[[], bool]
    ) -> Iterator[FeedUpdate]: ...
