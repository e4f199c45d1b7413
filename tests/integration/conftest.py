"""Fixtures of the integration tests; the lab itself is in :mod:`labkit`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from labkit import Daemon, Lab


@pytest.fixture
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lab]:
    """An empty lab in ``tmp_path``; each test calls :meth:`Lab.configure` with the VMs and jobs
    it needs. Sessions a failing test leaves running are stopped at teardown.

    Its state DB is SQLite, or a fresh PostgreSQL database for a test marked
    :data:`labkit.on_every_state_db` (the fixture's parameter: "sqlite" or "postgresql")."""
    backend = getattr(request, "param", "sqlite")
    the_lab = Lab(tmp_path) if backend == "sqlite" else Lab(tmp_path, request.getfixturevalue("postgresql_url"))
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture
def daemons(lab: Lab) -> Iterator[Callable[[], Daemon]]:
    """Starts ``backupd daemon`` processes of the lab; those still running at teardown are
    killed."""
    started: list[Daemon] = []

    def start() -> Daemon:
        started.append(Daemon(lab))
        return started[-1]

    yield start
    for daemon in started:
        if daemon.bg.proc.poll() is None:
            daemon.kill()
