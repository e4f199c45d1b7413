"""Fixtures of the integration tests; the lab itself is in :mod:`labkit`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from labkit import Lab


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """An empty lab in ``tmp_path``; each test calls :meth:`Lab.configure` with the VMs and jobs
    it needs. Sessions a failing test leaves running are stopped at teardown."""
    the_lab = Lab(tmp_path)
    try:
        yield the_lab
    finally:
        the_lab.close()
