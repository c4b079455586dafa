"""Bring a database's schema up to date with Alembic; safe when several replicas start at once."""

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from apikeys_server.storage.database import Database

# Any constant shared by every replica: PostgreSQL serialises migrations on it.
_MIGRATION_LOCK_ID = 0x61706B6579


def _config() -> Config:
    config = Config()
    location = resources.files("apikeys_server.storage").joinpath("migrations")
    config.set_main_option("script_location", str(location))
    return config


def upgrade(database: Database) -> None:
    """Runs pending migrations in one transaction, holding a lock other replicas wait on."""
    config = _config()
    with database.write_engine.connect() as connection:
        if database.is_sqlite:
            # The write engine's BEGIN IMMEDIATE already holds SQLite's write lock.
            connection.exec_driver_sql("SELECT 1")
        else:
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
            )
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        connection.commit()


def is_up_to_date(database: Database) -> bool:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    with database.read_engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    return current == head
