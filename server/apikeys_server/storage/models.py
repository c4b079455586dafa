"""Typed declarative models. The schema itself changes only through migrations/."""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite (naive text) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use aware UTC datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    # Space-separated, sorted: scope names hold no spaces, and a split is the cheapest parse.
    scopes: Mapped[str] = mapped_column(Text)
    hint: Mapped[str] = mapped_column(String(64))
    # SHA-256 of the key. The key itself is never stored.
    digest: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    expire_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoke_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoke_reason: Mapped[str] = mapped_column(String(256), default="")
    last_used_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    replaced_by: Mapped[str | None] = mapped_column(String(40))
    rotated_from: Mapped[str | None] = mapped_column(String(40))
    # Reported leaked (RevokeLeakedKeys): when, by whom, where (migration 0004).
    leak_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    leak_source: Mapped[str] = mapped_column(String(64), default="", server_default="")
    leak_url: Mapped[str] = mapped_column(String(2048), default="", server_default="")
    # The tripwire (migration 0004): presented after it stopped working; written in batches.
    presented_after_revocation_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    presented_after_revocation_count: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0"
    )
    # When the last PRESENTED_AFTER_REVOCATION event was written (migration 0005): claimed by a
    # conditional UPDATE, so processes and replicas agree on one event a key a minute.
    presented_event_time: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_api_keys_tenant_created", "tenant_id", "create_time", "id"),)


class KeyEventRow(Base):
    __tablename__ = "key_events"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    tenant_id: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(40))
    action: Mapped[str] = mapped_column(String(16))
    actor_key_id: Mapped[str] = mapped_column(String(40))
    # JSON list of {field, old, new}; never a secret.
    changes: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        Index("ix_key_events_tenant_time", "tenant_id", "time", "id"),
        Index("ix_key_events_tenant_key_time", "tenant_id", "key_id", "time", "id"),
    )


# SQLite: an INTEGER PRIMARY KEY with AUTOINCREMENT, so a position is never reused once the
# newest rows are pruned; PostgreSQL: a BIGINT identity.
FeedPosition = BigInteger().with_variant(Integer(), "sqlite")


class KeyChangeRow(Base):
    """The change feed (a transactional outbox): one row per committed change to a key."""

    __tablename__ = "key_changes"

    position: Mapped[int] = mapped_column(FeedPosition, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    tenant_id: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(16))
    # SHA-256 of the key, for evicting caches; never sent outside the service.
    digest: Mapped[bytes] = mapped_column(LargeBinary(32))

    __table_args__ = (Index("ix_key_changes_time", "time"), {"sqlite_autoincrement": True})


class FeedHorizonRow(Base):
    """One row: every position at or below ``pruned_through`` may have been pruned."""

    __tablename__ = "key_changes_horizon"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    pruned_through: Mapped[int] = mapped_column(BigInteger)


class KeyRequestRow(Base):
    """Ids of requests that created a key (AIP-155), kept 24 hours: a retry (the same id from
    the same caller tenant) never creates a second key. Written in the key's transaction; the
    primary key makes concurrent duplicates safe (the second waits, then finds the first)."""

    __tablename__ = "key_requests"

    # The caller's tenant ("_platform" for platform keys): request ids are scoped to it.
    caller_tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # SHA-256 (hex) of what the request asked for: the same id with another request is refused.
    fingerprint: Mapped[str] = mapped_column(String(64))
    # The key the request created (for a rotation, the successor).
    key_id: Mapped[str] = mapped_column(String(40))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_key_requests_create_time", "create_time"),)


api_keys: Table = ApiKeyRow.__table__  # type: ignore[assignment]
key_events: Table = KeyEventRow.__table__  # type: ignore[assignment]
key_changes: Table = KeyChangeRow.__table__  # type: ignore[assignment]
feed_horizon: Table = FeedHorizonRow.__table__  # type: ignore[assignment]
key_requests: Table = KeyRequestRow.__table__  # type: ignore[assignment]
