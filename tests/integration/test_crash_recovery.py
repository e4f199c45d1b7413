"""Crash safety of sessions: a runner killed with SIGKILL at any stage, a zombie runner, a stop
that comes too late, and a state DB whose file system fills up (issue: "Integrity under
damage, crashes and bad input", sections 3 and 4). Every outcome is read through the CLI, as
a scheduler or an administrator would see it."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from labkit import EXIT_FAILED, EXIT_NO_SESSION, Lab, describe, vms_by_name, wait_until

pytestmark = pytest.mark.slow


def _job(lab: Lab, vms: list[str], size: str = "4 MiB", **settings: object) -> None:
    lab.configure(vms={name: size for name in vms}, jobs={"nightly": {"vms": vms, "vm_lock_timeout_seconds": 10}},
                  **settings)
    for seed, name in enumerate(vms):
        lab.fill(name, seed=seed)


def _simulated(lab: Lab):  # noqa: ANN202 - the provider object of the lab's config
    from backupd.config import load_config
    from providers import open_provider

    config = load_config(lab.config)
    return open_provider("lab", config.providers["lab"])


def test_a_snapshot_whose_id_was_never_recorded_is_removed_by_the_next_session(lab: Lab) -> None:
    """Given a snapshot named by backupd for a session that has ended, which no VM task row
    names (its runner was killed between the snapshot's creation on the hypervisor and the
    recording of its id), when the next session of the job runs (no daemon), then it finds
    the snapshot by its name and removes it; a snapshot backupd did not make is left alone."""
    _job(lab, ["web"])
    first = lab.start_wait("nightly")
    provider = _simulated(lab)
    vm = provider.find_vm("web")
    leaked = provider.create_snapshot(vm, name=f"backupd-nightly-{first['id']}", description="leaked", quiesce=False)
    mine = provider.create_snapshot(vm, name="before-upgrade", description="an administrator's", quiesce=False)

    second = lab.start_wait("nightly")

    assert [s["name"] for s in lab.snapshots()["web"]] == [mine.name]
    assert any(f"removed orphaned snapshot {leaked.id}" in line["text"] for line in second["log"]), second["log"]


def test_a_zombie_runner_counts_as_dead_and_frees_its_vms(lab: Lab) -> None:
    """Given a foreground runner killed with SIGKILL whose parent has not reaped it (a
    zombie, as under a container's PID 1), when anyone looks, then its session is ended
    ``failed`` with reasons on every VM, and the next session processes the VMs at once
    instead of waiting for their locks and failing them."""
    _job(lab, ["vm-a", "vm-b"], size="16 MiB", read_mib_per_s=1)
    runner = lab.popen("job", "start", "nightly", "--wait", "--json")
    session = lab.wait_for_new_session("nightly")
    lab.wait_for_vms_in_flight(session, ["vm-a"])
    runner.proc.send_signal(signal.SIGKILL)
    wait_until(lambda: _state(runner.proc.pid) == "Z", what="the runner to be a zombie")

    doc = lab.wait_stopped(session)
    assert doc["result"] == "failed"
    vms = vms_by_name(doc)
    assert vms["vm-a"]["status"] == "failed" and "ended unexpectedly" in vms["vm-a"]["error"]
    assert vms["vm-b"]["status"] == "not_processed" and vms["vm-b"]["error"].startswith("not started")

    lab.configure(read_mib_per_s=0)
    after = lab.start_wait("nightly")
    assert [vm["status"] for vm in after["vms"]] == ["success", "success"]
    assert lab.backupd_snapshots() == {}, "the killed session's snapshot was removed too"
    runner.proc.wait()


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


def test_a_runner_killed_during_snapshot_removal_keeps_its_committed_restore_point(lab: Lab) -> None:
    """Given a VM whose restore point was committed and whose snapshot removal is under way
    when the runner is killed, then the state DB and the repository agree: the VM task
    names the restore point (listed, restorable) and ends ``warning``, not ``failed``; the
    next session removes the snapshot."""
    _job(lab, ["web"], snapshot_remove_seconds=600)
    runner = lab.popen("job", "start", "nightly", "--wait", "--json")
    session = lab.wait_for_new_session("nightly")
    lab.wait_for_session(session, lambda d: d["vms"][0]["stage"] == "remove_snapshot", what="snapshot removal")
    runner.proc.send_signal(signal.SIGKILL)
    runner.proc.wait()

    doc = lab.wait_stopped(session)
    (vm,) = doc["vms"]
    assert (doc["result"], vm["status"]) == ("failed", "warning")
    assert vm["restore_point"] and "before the snapshot was removed" in vm["warning"]
    assert vm["restore_point"] in {p["id"] for p in lab.points()}
    assert lab.restore("web", vm["restore_point"])[1] == bytes(lab.disks["web"])

    lab.configure(snapshot_remove_seconds=0)
    lab.start_wait("nightly")
    assert lab.backupd_snapshots() == {}


def test_a_stop_that_comes_after_every_vm_finished_says_it_was_too_late(lab: Lab) -> None:
    """Given a session whose VMs have all finished but which has not ended yet, when
    ``job stop --immediate`` comes, then it changes nothing and says so: outcome
    ``too_late``, exit 3 (nothing was stopped), and the session keeps no stop request."""
    _job(lab, ["web"])
    from backupd.enums import SessionState, TaskStatus
    from backupd.state import StateStore

    store = StateStore(f"sqlite:///{lab.state_db}")
    session = store.create_session("nightly", ["web"], full=False)
    store.update_session(session.id, state=SessionState.WORKING, owner_pid=os.getpid())
    store.update_task(store.tasks(session.id)[0].id, status=TaskStatus.SUCCESS)

    answer = lab.run_json("job", "stop", "nightly", "--immediate", rc=EXIT_NO_SESSION)
    assert answer == {"stops": [{"job": "nightly", "session": session.id, "outcome": "too_late", "mode": None}]}
    assert lab.session(session.id)["stop"] is None
    store.close()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system to fill (needs root): {done.stderr.strip()}")


def test_a_state_db_whose_file_system_fills_stops_the_session_cleanly(lab: Lab, tmp_path: Path) -> None:
    """Given a session running with its state DB on a small file system, when that file
    system fills up, then the runner prints one clear message (no traceback), cancels its
    VMs and removes their snapshots, and exits 2; once space is free again, the next command
    records the session ``failed``."""
    statefs = tmp_path / "statefs"
    _mount_tmpfs(statefs, "4m")
    try:
        _job(lab, ["vm-a", "vm-b"], size="32 MiB", read_mib_per_s=2)
        config = lab.config.read_text().replace("sqlite:///state.db", f"sqlite:///{statefs}/state.db")
        lab.write_raw_config(config)
        lab.state_db = statefs / "state.db"
        runner = lab.popen("job", "start", "nightly", "--wait", "--json")
        session = lab.wait_for_new_session("nightly")
        lab.wait_for_vms_in_flight(session, ["vm-a"])
        filler = statefs / "filler"
        with open(filler, "wb", buffering=0) as out:  # unbuffered: close() has nothing left to write
            try:
                while True:
                    out.write(b"\0" * 65536)
            except OSError:
                pass

        done = runner.finish(timeout=120)
        assert done.returncode == EXIT_FAILED, describe(done, "the runner exits 2")
        assert "Traceback" not in done.stderr, done.stderr
        assert "database or disk is full" in done.stderr and "snapshots were removed" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) <= 3, done.stderr
        assert lab.backupd_snapshots() == {}

        filler.unlink()
        doc = lab.session(session)
        assert (doc["state"], doc["result"]) == ("stopped", "failed")
        assert all(vm["status"] in ("failed", "not_processed") and vm["error"] for vm in doc["vms"]), doc["vms"]
    finally:
        subprocess.run(["umount", "-l", str(statefs)], check=False)
