"""Engines: one for writes (real transactions), one for reads (autocommit, no BEGIN per read).

SQLAlchemy's default begin/rollback around every read triples the cost of a PostgreSQL lookup,
so the Verify path reads in autocommit. On SQLite, writes take the lock up front
(BEGIN IMMEDIATE), so concurrent writers queue instead of failing on a lock upgrade.
"""

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

SQLITE_BUSY_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class Database:
    url: URL
    write_engine: Engine
    read_engine: Engine

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    def dispose(self) -> None:
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
    database_url: str, pool_size: int = 16, max_overflow: int | None = None
) -> Database:
    """PostgreSQL: each of the two engines opens up to pool_size + max_overflow connections
    (max_overflow defaults to pool_size)."""
    url = normalise_url(database_url)
    if url.get_backend_name() == "sqlite":
        return Database(url, _sqlite_engine(url, write=True), _sqlite_engine(url, write=False))
    options: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": pool_size if max_overflow is None else max_overflow,
        "pool_recycle": 1800,
    }
    write = create_engine(url, **options)
    read = create_engine(url, isolation_level="AUTOCOMMIT", **options)
    return Database(url, write, read)


def _use_wal(cursor: Any) -> None:
    """Switch a new file to WAL (readers never block on the writer); the mode persists.

    Changing the journal mode answers "database is locked" at once, without waiting on the
    busy timeout, while another connection (a replica starting too) holds a lock: retry.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
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


def _sqlite_engine(url: URL, write: bool) -> Engine:
    pool: dict[str, Any] = {} if write else {"pool_size": SQLITE_READ_POOL_SIZE, "max_overflow": 0}
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **pool)

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Leave transaction control to the events below rather than to the sqlite3 module.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        _use_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    if write:

        @event.listens_for(engine, "begin")
        def on_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
