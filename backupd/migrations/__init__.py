"""Schema migrations of the state DB (Alembic), shipped with the package.

``create_all`` only creates missing tables: it never adds a column to an existing one, so a
release with new columns would break every state DB made before it. Each change of the schema
is therefore a revision in ``versions/`` (``0001_initial.py``, ``0002_daemon.py``, ...), and
:class:`~backupd.state.StateStore` brings every DB it opens to :data:`HEAD`:

- a new DB gets every revision;
- a DB made before migrations existed (backupd 0.1: the tables of revision 0001 and no
  ``alembic_version`` table) is stamped 0001, then upgraded;
- a DB at :data:`HEAD` costs one ``SELECT version_num FROM alembic_version``: this module
  imports Alembic only inside :func:`upgrade`, so ordinary commands never load it;
- a DB at a revision this code does not know was upgraded by a newer backupd and is refused.

Alembic runs configured in code (no ``alembic.ini``): ``env.py`` migrates the connection it
is handed, inside the caller's transaction.

A new revision: copy the newest file of ``versions/``, give it the next number as
``revision`` and the previous one as ``down_revision``, change the SQLModel tables of
:mod:`backupd.state` to match, and append the number to :data:`REVISIONS`. New columns are
nullable or have a server default, so rows written before stay valid.
``tests/unit/test_state_migrations.py`` checks that :data:`REVISIONS` lists the files and that
the migrated schema equals the SQLModel tables.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from backupd.errors import StateError

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import Connection

#: every revision of ``versions/``, oldest first
REVISIONS = ("0001", "0002", "0003", "0004")
#: the newest revision, the one this code reads and writes
HEAD = REVISIONS[-1]
#: the revision of the tables backupd made before it had migrations
_BEFORE_MIGRATIONS = "0001"
#: the key of the PostgreSQL advisory lock held while a state DB is upgraded (any constant
#: of backupd's own; the lock is per database)
_ADVISORY_LOCK_KEY = 0x6261636B757064  # "backupd"


def refuse_unknown(revision: str | None) -> None:
    """Check that this code knows a state DB's revision (None: a DB without migrations).

    :raises StateError: the revision is newer than this code: a newer backupd upgraded it.
    """
    if revision is not None and revision not in REVISIONS:
        raise StateError(f"the state DB was upgraded by a newer backupd (revision {revision}); upgrade backupd")


def alembic_config(connection: Connection) -> Config:
    """The Alembic config that migrates ``connection`` with the revisions of this package,
    for :func:`upgrade` and for ``alembic.command`` calls of tools and tests."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", os.path.dirname(os.path.abspath(__file__)))
    config.attributes["connection"] = connection
    return config


def upgrade(connection: Connection) -> None:
    """Bring the state DB on ``connection`` to :data:`HEAD`, inside the connection's
    transaction, which the caller commits: a failed upgrade leaves the DB as it was.

    Upgrades are serialised between processes (cron starting two jobs on a new DB): on
    PostgreSQL by a transaction-level advisory lock taken here, released at commit; on SQLite
    the caller holds the setup lock file, and the transaction begins ``IMMEDIATE`` so that the
    DDL is part of it (Python's sqlite3 would otherwise commit each DDL statement at once).
    The revision is read again once the lock is held: another process may have upgraded the
    DB meanwhile.

    :param connection: a connection to the state DB, not yet in a transaction of SQLite's.
    :raises StateError: the DB is at a revision newer than this code knows.
    """
    from alembic import command
    from sqlalchemy import inspect

    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK_KEY})")
    elif connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    inspector = inspect(connection)
    config = alembic_config(connection)
    if inspector.has_table("alembic_version"):
        refuse_unknown(connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar())
    elif inspector.has_table("job_session"):
        command.stamp(config, _BEFORE_MIGRATIONS)
    command.upgrade(config, "head")
