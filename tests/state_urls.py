"""State DBs for tests: a SQLite file, or a fresh database on the PostgreSQL server at
127.0.0.1:5432 (user ``postgres``, trust authentication), as CI provides; and the RabbitMQ
broker at 127.0.0.1:5672 (guest/guest) the backup proxy tests need.

PostgreSQL and RabbitMQ are real services: when one is not reachable, a test needing it is
skipped on a developer's machine but fails when ``CI`` is set, so CI never passes without
running it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

#: the state DB backends the StateStore tests run on
BACKENDS = ["sqlite", "postgresql"]
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
#: a server time zone far from UTC: a stored time that depended on it would be 14 hours off
PG_TIME_ZONE = "Pacific/Kiritimati"

_reachable: bool | None = None


def _admin_connection():  # -> psycopg.Connection
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True, connect_timeout=5)


def require_postgresql() -> None:
    """Skip the test when the server is not reachable; fail instead when ``CI`` is set."""
    global _reachable
    if _reachable is None:
        try:
            _admin_connection().close()
            _reachable = True
        except Exception:  # noqa: BLE001 - any failure to connect means "not reachable"
            _reachable = False
    if not _reachable:
        message = f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the PostgreSQL tests (.ci/run starts the server)")
        pytest.skip(message)


@contextmanager
def fresh_postgresql_database() -> Iterator[str]:
    """A new empty database ``backupd_test_<hex>`` whose server time zone is
    :data:`PG_TIME_ZONE`; yields its URL and drops it afterwards, closing any connection a
    test left open."""
    require_postgresql()
    name = f"backupd_test_{secrets.token_hex(6)}"
    with _admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        admin.execute(f"ALTER DATABASE \"{name}\" SET timezone TO '{PG_TIME_ZONE}'")
    try:
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with _admin_connection() as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


#: the broker of the backup proxy tests
BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
_broker_reachable: bool | None = None


def require_rabbitmq() -> None:
    """Skip the test when RabbitMQ is not reachable; fail instead when ``CI`` is set."""
    global _broker_reachable
    if _broker_reachable is None:
        from kombu import Connection

        try:
            with Connection(BROKER_URL, connect_timeout=5) as connection:
                connection.ensure_connection(max_retries=1)
            _broker_reachable = True
        except Exception:  # noqa: BLE001 - any failure to connect means "not reachable"
            _broker_reachable = False
    if not _broker_reachable:
        message = "RabbitMQ not reachable at 127.0.0.1:5672"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the backup proxy tests (.ci/run starts the broker)")
        pytest.skip(message)
