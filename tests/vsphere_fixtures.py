"""pytest fixtures for the vSphere simulator (registered from tests/conftest.py).

Tests needing the simulator skip, with the reason, where Go or the govmomi source is
missing, and fail instead when ``CI`` is set (``.ci/run`` installs both), as the PostgreSQL
tests do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vsphere_sim import Vcsim, VcsimUnavailable, build_launcher, unavailable_reason


def require_vcsim() -> None:
    """Skip when the simulator cannot run here; fail instead when ``CI`` is set. A build
    failure always fails (it is a bug of the launcher, not a missing package)."""
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the vSphere simulator tests (.ci/run installs the packages)")
        pytest.skip(reason)
    try:
        build_launcher()
    except VcsimUnavailable as exc:
        pytest.fail(str(exc))


@pytest.fixture
def vcsim_factory(tmp_path: Path) -> Iterator[Callable[..., Vcsim]]:
    """``start(spec, tls=False, extra_args=())`` -> a started :class:`Vcsim` in its own
    folder under ``tmp_path``; every one started is stopped after the test."""
    require_vcsim()
    started: list[Vcsim] = []

    def start(spec: dict[str, Any], tls: bool = False, extra_args: tuple[str, ...] = ()) -> Vcsim:
        sim = Vcsim(spec, tmp_path / f"vcsim-{len(started)}", tls=tls, extra_args=extra_args)
        started.append(sim)
        return sim.start()

    yield start
    for sim in started:
        sim.stop()
