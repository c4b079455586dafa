"""Alembic environment: always given a connection by apikeys_server.storage.migrate."""

from alembic import context

from apikeys_server.storage.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
