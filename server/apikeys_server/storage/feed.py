"""The change feed in SQL: written with each change, read by position, pruned by age.

Positions come from the table's identity (PostgreSQL) or AUTOINCREMENT rowid (SQLite), and a
consumer reads everything after the last position it saw. That is only safe if positions
become visible in order: a transaction holding position 10 that commits after one holding 11
would be skipped by a consumer that already moved past 11. So writers take a transaction-level
advisory lock before taking a position and hold it until they commit (PostgreSQL); on SQLite
``BEGIN IMMEDIATE`` already serialises every writer. Changes are recorded last in their
transaction, after every row lock, so the lock is held only for the insert and the commit.

On PostgreSQL each appending transaction also sends a NOTIFY on ``FEED_CHANNEL`` (delivered at
commit) to wake consumers at once; a consumer never relies on it for correctness.
"""

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection, bindparam, delete, func, insert, select, text, update

from apikeys_server.domain.ports import FeedBatch
from apikeys_server.domain.records import EventAction, KeyChange
from apikeys_server.storage.database import Database
from apikeys_server.storage.errors import database_errors
from apikeys_server.storage.models import feed_horizon, key_changes

FEED_CHANNEL: Final = "apikeys_key_changes"
# Any constant of its own (the migration lock uses another): serialises feed appends.
_FEED_LOCK_ID: Final = 0x61706B6566


def append_changes(
    connection: Connection, rows: Sequence[dict[str, Any]], serialize: bool = True
) -> list[int]:
    """Appends ``rows`` to the feed inside the caller's (uncommitted) transaction; returns
    their positions.

    ``serialize=False`` exists only for the test that shows why the lock is needed.
    """
    if not rows:
        return []
    postgres = connection.dialect.name == "postgresql"
    if postgres and serialize:
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _FEED_LOCK_ID})
    positions = connection.execute(
        insert(key_changes).returning(key_changes.c.position), list(rows)
    ).scalars()
    if postgres:
        connection.execute(text("SELECT pg_notify(:channel, '')"), {"channel": FEED_CHANNEL})
    return list(positions)


def change_row(
    key_id: str, tenant_id: str, digest: bytes, kind: EventAction, time: datetime
) -> dict[str, Any]:
    return {
        "time": time,
        "tenant_id": tenant_id,
        "key_id": key_id,
        "kind": kind.value,
        "digest": digest,
    }


_READ = (
    select(
        key_changes.c.position,
        key_changes.c.time,
        key_changes.c.tenant_id,
        key_changes.c.key_id,
        key_changes.c.kind,
        key_changes.c.digest,
    )
    .where(key_changes.c.position > bindparam("after"))
    .order_by(key_changes.c.position)
)
_HORIZON = select(feed_horizon.c.pruned_through).where(feed_horizon.c.id == 1)


class SqlChangeFeed:
    """The consumers' side of the feed, on the read engine (autocommit)."""

    def __init__(self, database: Database) -> None:
        self._read = database.read_engine
        self._write = database.write_engine

    def head(self) -> int:
        with database_errors(), self._read.connect() as connection:
            newest = connection.execute(select(func.max(key_changes.c.position))).scalar()
            pruned = connection.execute(_HORIZON).scalar_one()
        return max(int(newest or 0), int(pruned))

    def read_changes(self, after: int, limit: int) -> FeedBatch:
        # Rows first, then the horizon: a prune that removed rows we needed has moved the
        # horizon past ``after`` by the time we read it, so it can never go unnoticed.
        with database_errors(), self._read.connect() as connection:
            rows = connection.execute(_READ.limit(limit), {"after": after}).all()
            pruned = connection.execute(_HORIZON).scalar_one()
        changes = [
            KeyChange(
                position=row.position,
                time=row.time,
                tenant_id=row.tenant_id,
                key_id=row.key_id,
                kind=EventAction(row.kind),
                digest=bytes(row.digest),
            )
            for row in rows
        ]
        return FeedBatch(changes, pruned)

    def prune(self, before: datetime) -> int:
        with database_errors(), self._write.begin() as connection:
            cutoff = connection.execute(
                select(func.max(key_changes.c.position)).where(key_changes.c.time < before)
            ).scalar()
            if cutoff is None:
                return 0
            deleted = connection.execute(
                delete(key_changes).where(key_changes.c.position <= cutoff)
            ).rowcount
            connection.execute(
                update(feed_horizon)
                .where(feed_horizon.c.id == 1, feed_horizon.c.pruned_through < cutoff)
                .values(pruned_through=cutoff)
            )
        return int(deleted)
