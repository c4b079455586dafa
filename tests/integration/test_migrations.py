"""Schema migrations: idempotent, detectable, safe when several replicas start together."""

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from apikeys_server import cli
from apikeys_server.app import create_server
from apikeys_server.storage import migrate
from apikeys_server.storage.database import Database, open_database
from apikeys_server.storage.models import Base
from tests.support import running_server, server_settings

TABLES = {"api_keys", "key_events", "key_changes", "key_requests", "alembic_version"}
REPLICAS = 4


def _tables(database: Database) -> set[str]:
    return set(inspect(database.read_engine).get_table_names())


def _versions(database: Database) -> list[str]:
    with database.read_engine.connect() as connection:
        return list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema at all: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    server_url = make_url(request.getfixturevalue("postgres_url"))
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"apikeys_migrate_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def empty_database(empty_url: str) -> Iterator[Database]:
    database = open_database(empty_url, pool_size=2)
    yield database
    database.dispose()


class TestUpgrade:
    def test_empty_database_is_not_up_to_date(self, empty_database: Database) -> None:
        """A database without the schema reports not up to date."""
        assert not migrate.is_up_to_date(empty_database)
        assert _tables(empty_database) == set()

    def test_upgrade_creates_the_schema(self, empty_database: Database) -> None:
        """upgrade() creates every table and records the head revision."""
        migrate.upgrade(empty_database)
        assert migrate.is_up_to_date(empty_database)
        assert _tables(empty_database) >= TABLES
        assert len(_versions(empty_database)) == 1

    def test_models_agree_with_the_migrations(self, empty_database: Database) -> None:
        """The schema the migrations make is the one storage/models.py describes."""
        migrate.upgrade(empty_database)
        with empty_database.read_engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": False}
            )
            differences = compare_metadata(context, Base.metadata)
        assert differences == []

    def test_upgrade_is_idempotent(self, empty_database: Database) -> None:
        """Running upgrade() again changes nothing and keeps data."""
        migrate.upgrade(empty_database)
        with empty_database.write_engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO key_events (id, time, tenant_id, key_id, action, actor_key_id,"
                    " changes) VALUES ('evt_x', CURRENT_TIMESTAMP, 'acme', 'key_x', 'created',"
                    " '', '[]')"
                )
            )
        versions = _versions(empty_database)
        migrate.upgrade(empty_database)
        migrate.upgrade(empty_database)
        assert migrate.is_up_to_date(empty_database)
        assert _versions(empty_database) == versions
        with empty_database.read_engine.connect() as connection:
            count = connection.execute(text("SELECT count(*) FROM key_events")).scalar_one()
        assert count == 1

    def test_the_shared_test_database_is_up_to_date(self, database_url: str) -> None:
        """The databases the other suites use are at head once upgraded (as serve does)."""
        database = open_database(database_url, pool_size=1)
        try:
            migrate.upgrade(database)
            assert migrate.is_up_to_date(database)
        finally:
            database.dispose()


class TestConcurrentStart:
    def test_replicas_migrating_at_once_all_succeed(self, empty_url: str) -> None:
        """Several upgrade() calls racing on a fresh database all succeed, one schema results."""
        barrier = threading.Barrier(REPLICAS)
        errors: list[BaseException] = []

        def replica() -> None:
            database = open_database(empty_url, pool_size=1)
            try:
                barrier.wait(timeout=30)
                migrate.upgrade(database)
            except BaseException as error:
                errors.append(error)
            finally:
                database.dispose()

        threads = [threading.Thread(target=replica) for _ in range(REPLICAS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        database = open_database(empty_url, pool_size=1)
        try:
            assert migrate.is_up_to_date(database)
            assert len(_versions(database)) == 1
            assert _tables(database) >= TABLES
        finally:
            database.dispose()


class TestServeMigrates:
    def test_serving_an_empty_sqlite_file_creates_the_schema(self, tmp_path: Path) -> None:
        """Starting the server on a file that does not exist yet brings it up to date and serves."""
        path = tmp_path / "fresh.db"
        assert not path.exists()
        url = f"sqlite:///{path}"
        with running_server(server_settings(url)) as server, server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id="acme")
            assert client.verify(created.secret, tenant_id="acme").valid
        database = open_database(url, pool_size=1)
        try:
            assert migrate.is_up_to_date(database)
        finally:
            database.dispose()

    def test_servers_starting_together_on_one_empty_database(self, empty_url: str) -> None:
        """Several servers built at once on an empty database all start (serve migrates safely)."""
        barrier = threading.Barrier(REPLICAS)
        errors: list[BaseException] = []

        def start() -> None:
            try:
                barrier.wait(timeout=30)
                app = create_server(server_settings(empty_url, workers=2))
                app.stop(grace=0)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=start) for _ in range(REPLICAS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []

    def test_without_migrate_on_start_the_schema_is_left_alone(self, tmp_path: Path) -> None:
        """With migrate_on_start off, building the server does not touch the schema."""
        url = f"sqlite:///{tmp_path / 'untouched.db'}"
        app = create_server(server_settings(url, migrate_on_start=False))
        try:
            assert not migrate.is_up_to_date(app.services.database)
        finally:
            app.stop(grace=0)

    def test_migrate_command_brings_the_schema_up_to_date(self, empty_url: str) -> None:
        """`apikeys-server migrate --database-url URL` exits 0 and leaves the schema at head."""
        assert cli.main(["migrate", "--database-url", empty_url]) == 0
        assert cli.main(["migrate", "--database-url", empty_url]) == 0
        database = open_database(empty_url, pool_size=1)
        try:
            assert migrate.is_up_to_date(database)
        finally:
            database.dispose()
