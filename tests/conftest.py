"""Fixtures shared by every test folder: the state DB URLs (see :mod:`state_urls`); the
vSphere simulator's come from the :mod:`vsphere_fixtures` plugin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from state_urls import BACKENDS, fresh_postgresql_database

pytest_plugins = ["vsphere_fixtures"]


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    with fresh_postgresql_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty state DB: a SQLite file in ``tmp_path``, or a PostgreSQL
    database (skipped when the server is not reachable, failed in CI)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    return request.getfixturevalue("postgresql_url")
