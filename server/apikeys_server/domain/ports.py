"""What the domain needs from storage and infrastructure, as protocols (implemented in storage/)."""

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from apikeys_server.domain.pagination import Cursor
from apikeys_server.domain.records import KeyEvent, KeyRecord


class KeyLookup(Protocol):
    def find_by_digest(self, digest: bytes) -> KeyRecord | None: ...


class CacheInvalidation(Protocol):
    """Tells every cache to forget a key. The one mechanism a second process could drive too."""

    def evict(self, digest: bytes) -> None: ...


class UsageRecorder(Protocol):
    def record(self, key_id: str, when: datetime) -> None: ...


@dataclass(frozen=True, slots=True)
class KeyQuery:
    tenant_id: str
    include_revoked: bool = False
    name_prefix: str = ""


class KeyWriter(Protocol):
    """Writes inside one transaction; committed when the block exits without error."""

    def get_key_for_update(self, tenant_id: str, key_id: str) -> KeyRecord | None: ...

    def insert_key(self, key: KeyRecord) -> None: ...

    def update_key(self, key: KeyRecord) -> None: ...

    def insert_event(self, event: KeyEvent) -> None: ...


class KeyStore(KeyLookup, Protocol):
    def get_key(self, tenant_id: str, key_id: str) -> KeyRecord | None: ...

    def list_keys(self, query: KeyQuery, after: Cursor | None, limit: int) -> list[KeyRecord]: ...

    def list_events(
        self, tenant_id: str, key_id: str | None, after: Cursor | None, limit: int
    ) -> list[KeyEvent]: ...

    def transaction(self) -> AbstractContextManager[KeyWriter]: ...

    def touch_last_used(self, used: Mapping[str, datetime]) -> None: ...
