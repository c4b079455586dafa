"""Engines: one for writes (real transactions), one for reads (autocommit, no BEGIN per read).

SQLAlchemy's default begin/rollback around every read triples the cost of a PostgreSQL lookup,
so the Verify path reads in autocommit. On SQLite, writes take the lock up front
(BEGIN IMMEDIATE), so concurrent writers queue instead of failing on a lock upgrade.

Every PostgreSQL operation is bounded (``DatabaseTimeouts``): connect, pool checkout, the
server's statement_timeout, and the watchdog's client-side bound, which alone holds when the
network drops packets silently. On SQLite the busy timeout, set to the write bound, bounds
lock waits.
"""

import math
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url

from apikeys_server.config import Settings
from apikeys_server.storage.watchdog import ConnectionWatchdog


@dataclass(frozen=True)
class DatabaseTimeouts:
    """Seconds. Reads: Verify lookups, Get/List. Writes: changes, last-used flush, migrations."""

    connect: float = 2.0
    read: float = 2.0
    write: float = 5.0
    pool: float = 1.0
    # Off only to show what the watchdog is for (a test's negative control) or to diagnose.
    watchdog: bool = True

    @classmethod
    def of(cls, settings: Settings) -> "DatabaseTimeouts":
        return cls(
            connect=settings.db_connect_timeout_seconds,
            read=settings.db_read_timeout_seconds,
            write=settings.db_write_timeout_seconds,
            pool=settings.db_pool_timeout_seconds,
            watchdog=settings.db_watchdog,
        )


@dataclass(frozen=True)
class Database:
    url: URL
    write_engine: Engine
    read_engine: Engine
    # Started by open_database and stopped by dispose: no handle ever runs unbounded.
    watchdog: ConnectionWatchdog | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    def deadline_passed(self, dbapi_connection: Any) -> bool:
        """Whether a failed operation failed because its bound passed (not worth retrying)."""
        return self.watchdog is not None and self.watchdog.deadline_passed(dbapi_connection)

    def check_reachable(self) -> None:
        """One round trip under the read bound; raises SQLAlchemy's error if it fails."""
        with self.read_engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        self.write_engine.dispose()
        self.read_engine.dispose()


def normalise_url(database_url: str) -> URL:
    """``postgresql://`` means psycopg 3 here (the driver we ship), not psycopg2."""
    url = make_url(database_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ValueError("SQLite needs a file (sqlite:///apikeys.db); in-memory is not supported")
    return url


def open_database(
    database_url: str,
    pool_size: int = 16,
    timeouts: DatabaseTimeouts | None = None,
    max_overflow: int | None = None,
) -> Database:
    """PostgreSQL: each of the two engines opens up to pool_size + max_overflow connections
    (max_overflow defaults to pool_size)."""
    url = normalise_url(database_url)
    timeouts = timeouts or DatabaseTimeouts()
    if url.get_backend_name() == "sqlite":
        busy = timeouts.write
        return Database(
            url, _sqlite_engine(url, busy, write=True), _sqlite_engine(url, busy, write=False)
        )
    options: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": pool_size if max_overflow is None else max_overflow,
        "pool_recycle": 1800,
        "pool_timeout": timeouts.pool,
    }
    write = create_engine(url, connect_args=_bounds(url, timeouts, timeouts.write), **options)
    read = create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        connect_args=_bounds(url, timeouts, timeouts.read),
        **options,
    )
    if not timeouts.watchdog:
        return Database(url, write, read)
    watchdog = ConnectionWatchdog()
    watchdog.watch(write, timeouts.write)
    watchdog.watch(read, timeouts.read)
    watchdog.start()
    return Database(url, write, read, watchdog)


def _bounds(url: URL, timeouts: DatabaseTimeouts, statement: float) -> dict[str, Any]:
    """psycopg's connect_timeout (whole seconds; libpq treats less than 2 as 2) and the
    server-side statement_timeout, added to any ``options`` the URL already carries."""
    options = f"-c statement_timeout={math.ceil(statement * 1000)}"
    given = url.query.get("options")
    if isinstance(given, str) and given:
        options = f"{given} {options}"
    return {"connect_timeout": max(2, math.ceil(timeouts.connect)), "options": options}


def _use_wal(cursor: Any, busy_seconds: float) -> None:
    """Switch a new file to WAL (readers never block on the writer); the mode persists.

    Changing the journal mode answers "database is locked" at once, without waiting on the
    busy timeout, while another connection (a replica starting too) holds a lock: retry.
    """
    deadline = time.monotonic() + busy_seconds
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# Few, hot read connections: each SQLite connection has its own page cache, and the GIL lets
# little more than one lookup run at a time (measured: ~10 % less CPU per cache miss than
# SQLAlchemy's default 5 + 10 connections).
SQLITE_READ_POOL_SIZE = 2


def _sqlite_engine(url: URL, busy_seconds: float, write: bool) -> Engine:
    pool: dict[str, Any] = {} if write else {"pool_size": SQLITE_READ_POOL_SIZE, "max_overflow": 0}
    engine = create_engine(url, connect_args={"timeout": busy_seconds}, **pool)

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Leave transaction control to the events below rather than to the sqlite3 module.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        _use_wal(cursor, busy_seconds)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={math.ceil(busy_seconds * 1000)}")
        cursor.close()

    if write:

        @event.listens_for(engine, "begin")
        def on_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
