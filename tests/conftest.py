"""Fixtures: databases (SQLite file, PostgreSQL) and an in-process server over each.

PostgreSQL tests run against a fresh database created for the session; they are skipped
when the server is unreachable, unless APIKEYS_REQUIRE_POSTGRES is set (CI sets it), in
which case they fail.
"""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from apikeys_server.storage import migrate
from apikeys_server.storage.database import open_database
from tests.support import FakeClock, RunningServer, running_server, server_settings

POSTGRES_ADMIN_URL = os.environ.get(
    "APIKEYS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _postgres_unreachable(reason: str) -> None:
    if os.environ.get("APIKEYS_REQUIRE_POSTGRES"):
        pytest.fail(f"PostgreSQL is required (APIKEYS_REQUIRE_POSTGRES) but {reason}")
    pytest.skip(f"PostgreSQL unreachable: {reason}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session, dropped afterwards."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"apikeys_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:  # any failure to connect means "unreachable"
        admin.dispose()
        _postgres_unreachable(str(error).splitlines()[0])
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    database = open_database(url)
    migrate.upgrade(database)
    database.dispose()
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _truncate(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE api_keys, key_events, key_requests"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using this runs on a new SQLite file and on an emptied PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'apikeys.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    _truncate(url)
    yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'apikeys.db'}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(database_url: str, clock: FakeClock) -> Iterator[RunningServer]:
    """A real gRPC server on a free port over each database, with a controllable clock."""
    with running_server(server_settings(database_url), clock) as running:
        yield running
