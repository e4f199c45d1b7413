"""Alembic's entry point for the state DB, configured in code by :func:`backupd.migrations.upgrade`.

The connection to migrate comes in ``config.attributes["connection"]``, already in a
transaction that the caller commits; Alembic adds none of its own. SQLite alters a table by
copying it (batch mode), which is what ``render_as_batch`` makes Alembic write there.
"""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
