"""Benchmark databases: a caller key, working sets of real keys, and filler rows in bulk."""

import hashlib
import random
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

from apikeys_server.app import build_services
from apikeys_server.config import Settings
from apikeys_server.domain import scopes
from apikeys_server.domain.key_format import (
    BASE62,
    CHECKSUM_LENGTH,
    RANDOM_LENGTH,
    KeyFormat,
    digest,
)
from apikeys_server.domain.manager import new_id
from apikeys_server.domain.records import KeyRecord
from apikeys_server.storage.feed import SqlChangeFeed
from apikeys_server.storage.models import api_keys
from apikeys_server.storage.repository import key_row

TENANT = "bench"
GRANTED = ("passes:read", "passes:write")
REQUIRED = ("passes:read",)
KEY_FORMAT = KeyFormat(Settings().key_prefix)
BATCH = 20_000
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class BenchKey:
    secret: str
    record: KeyRecord


@dataclass(frozen=True)
class BenchDatabase:
    url: str
    caller: str  # the secret the load generator authenticates with (scope apikeys:verify)
    keys: list[BenchKey]  # the working set of valid keys of TENANT
    rows: int  # api_keys rows in all
    feed_position: int  # the change feed's head: what a server's answers reflect


def prepare(url: str, working_set: int, filler: int = 0) -> BenchDatabase:
    """Migrates, creates the caller key the way the service does, bulk-inserts the rest."""
    services = build_services(Settings(database_url=url, last_used_flush_seconds=3600.0))
    try:
        caller = services.manager.create_unchecked(
            TENANT, "bench-caller", [scopes.VERIFY], expire_time=None
        )
        now = datetime.now(UTC)
        keys = [new_key(f"bench-{index:07d}", now) for index in range(working_set)]
        with services.database.write_engine.begin() as connection:
            for start in range(0, len(keys), BATCH):
                batch = keys[start : start + BATCH]
                connection.execute(insert(api_keys), [key_row(key.record) for key in batch])
        with services.database.write_engine.begin() as connection:
            if services.database.is_sqlite:
                # Random digests land all over the unique index: keep it in memory while loading.
                connection.exec_driver_sql("PRAGMA cache_size=-262144")
            for start in range(0, filler, BATCH):
                rows = [_filler_row(n, now) for n in range(start, min(filler, start + BATCH))]
                connection.execute(insert(api_keys), rows)
        with services.database.read_engine.connect() as connection:
            if services.database.is_sqlite:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            else:
                connection.exec_driver_sql("ANALYZE api_keys")
        head = SqlChangeFeed(services.database).head()
    finally:
        services.close()
    return BenchDatabase(url, caller.secret, keys, 1 + working_set + filler, head)


def new_key(name: str, now: datetime, tenant: str = TENANT) -> BenchKey:
    secret = KEY_FORMAT.generate()
    record = KeyRecord(
        id=new_id("key"),
        tenant_id=tenant,
        name=name,
        scopes=frozenset(GRANTED),
        hint=KEY_FORMAT.hint(secret),
        digest=digest(secret),
        create_time=now,
    )
    return BenchKey(secret, record)


def _filler_row(number: int, now: datetime) -> dict[str, Any]:
    """Another tenant's key: only the size of the table and of its digest index matter."""
    return {
        "id": f"key_filler{number:010d}",
        "tenant_id": f"filler-{number % 1000:03d}",
        "name": f"filler-{number}",
        "scopes": " ".join(GRANTED),
        "hint": "ak_fill…",
        "digest": filler_digest(number),
        "create_time": now,
        "revoke_reason": "",
    }


def filler_digest(number: int) -> bytes:
    return hashlib.sha256(b"bench filler %d" % number).digest()


def unknown_keys(count: int) -> list[str]:
    """Well-formed keys of this deployment that no database holds (not secret: fast random)."""
    keys = []
    prefix = KEY_FORMAT.prefix + "_"
    for _ in range(count):
        body = prefix + "".join(random.choices(BASE62, k=RANDOM_LENGTH))
        number = zlib.crc32(body.encode("ascii"))
        checksum = []
        for _ in range(CHECKSUM_LENGTH):
            number, digit = divmod(number, 62)
            checksum.append(BASE62[digit])
        keys.append(body + "".join(reversed(checksum)))
    if keys and not KEY_FORMAT.is_well_formed(keys[0]):
        raise AssertionError("unknown_keys no longer follows the key format")
    return keys


def sqlite_url(directory: Path, name: str) -> str:
    return f"sqlite:///{directory / name}"


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this run, dropped afterwards."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"apikeys_bench_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
