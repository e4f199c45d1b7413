"""Recovery of sessions whose runner is gone: the state DB is brought in line with the
repository, the source of truth for restore points, and every unfinished VM gets a reason."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from backupd.config import Config, load_config
from backupd.enums import SessionResult, SessionState, TaskStatus
from backupd.recovery import recover_dead_sessions
from backupd.state import StateStore

CONFIG = """\
[state]
url = "{state_url}"

[providers.lab]
type = "simulated"
state_dir = "lab"

[[providers.lab.vms]]
name = "{vm}"
disks = ["1 MiB"]

[repositories.local]
path = "repo"

[jobs.nightly]
provider = "lab"
repository = "local"
vms = ["a", "b", "c", "d"]
"""


@pytest.fixture
def config(tmp_path: Path, state_url: str) -> Config:
    """A job of four VMs whose state DB is SQLite and PostgreSQL in turn."""
    path = tmp_path / "backupd.toml"
    path.write_text(CONFIG.format(vm="a", state_url=state_url))
    return load_config(path)


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _commit_point(config: Config, vm: str, session: int) -> str:
    repository = config.repositories["local"].open(create=True)
    with repository.new_point(vm=vm, vm_id=vm, job="nightly", session=str(session), mode="full") as writer:
        disk = writer.add_disk(key=2000, label="Hard disk 1", capacity_bytes=1 << 20, change_id=None)
        disk.put_block(0, b"\x07" * (1 << 20))
        return writer.commit().id


def test_a_dead_session_is_reconciled_with_the_points_its_repository_holds(config: Config) -> None:
    """Given a runner killed after committing restore points of two VMs (one of them before
    the point was recorded on its task, one while its snapshot was being removed), one VM
    in flight and one never started, when recovery runs, then each VM ends as the repository
    and the task's progress say: committed points recorded (``warning`` when the snapshot is
    still there, ``success`` when it was removed), the VM in flight ``failed`` with the
    reason and stage, the VM never started ``not_processed``; the session ``failed``."""
    store = StateStore(config.state.url)
    session = store.create_session("nightly", ["a", "b", "c", "d"], full=False).id
    store.update_session(session, state=SessionState.WORKING, owner_host=socket.gethostname(), owner_pid=_dead_pid())
    a, b, c, d = store.tasks(session)
    store.update_task(a.id, status=TaskStatus.RUNNING, stage="remove_snapshot", snapshot_id="snap-1")
    store.update_task(b.id, status=TaskStatus.RUNNING, stage="retention", snapshot_id="snap-2", snapshot_removed=True)
    store.update_task(c.id, status=TaskStatus.RUNNING, stage="transfer", snapshot_id="snap-3")
    point_a = _commit_point(config, "a", session)  # committed; the crash came before it was recorded
    point_b = _commit_point(config, "b", session)
    _commit_point(config, "c", session + 1)  # another session's point of c changes nothing

    assert recover_dead_sessions(config, store) == [session]

    row = store.session(session)
    assert (row.state, row.result) == (SessionState.STOPPED, SessionResult.FAILED)
    assert row.message == "runner process died"
    a, b, c, d = store.tasks(session)
    assert (a.status, a.restore_point) == (TaskStatus.WARNING, point_a)
    assert "before the snapshot was removed" in a.warning
    assert (b.status, b.restore_point, b.warning) == (TaskStatus.SUCCESS, point_b, None)
    assert (c.status, c.restore_point) == (TaskStatus.FAILED, None)
    assert "ended unexpectedly" in c.error and "stage transfer" in c.error
    assert d.status is TaskStatus.NOT_PROCESSED and d.error.startswith("not started")
    assert recover_dead_sessions(config, store) == [], "recovery happens once"


def test_a_live_session_is_not_recovered(config: Config) -> None:
    import os

    store = StateStore(config.state.url)
    session = store.create_session("nightly", ["a"], full=False).id
    store.update_session(session, owner_host=socket.gethostname(), owner_pid=os.getpid())
    assert recover_dead_sessions(config, store) == []
    assert store.session(session).state is SessionState.STARTING
