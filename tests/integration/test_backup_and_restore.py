"""Whole sessions through the CLI: full then incremental transfers, CBT and quiesce fallbacks,
transient faults retried, a permanent fault isolated to its VM.

Every guest write goes through ``backupd sim write``, and the lab mirrors it, so "the live disk"
below is known byte for byte.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from labkit import EXIT_FAILED, EXIT_SUCCESS, EXIT_WARNING, MiB, Lab, describe, payload, vms_by_name, wait_until


def test_second_run_is_incremental_reads_only_changed_blocks_and_restores_bit_for_bit(lab: Lab) -> None:
    """Given a VM backed up once (full), when one 1 MiB block of its disk changes and the job runs
    again, then the second transfer is incremental and reads only that block, and restoring the
    newest restore point gives the live disk byte for byte while the first point still restores
    the disk as it was then."""
    lab.configure(vms={"vm-a": "32 MiB"}, jobs={"nightly": {"vms": ["vm-a"]}})
    lab.write_disk("vm-a", payload(8 * MiB, seed=1), offset=0)
    disk_at_first_run = bytes(lab.disks["vm-a"])

    first = lab.start_wait("nightly")
    vm = vms_by_name(first)["vm-a"]
    assert (first["state"], first["result"]) == ("stopped", "success")
    assert vm["status"] == "success" and vm["mode"] == "full"
    assert vm["bytes_read"] >= 8 * MiB, "a full transfer reads at least every block the guest wrote"
    assert vm["snapshot"] is not None and vm["snapshot"]["removed"] is True

    lab.write_disk("vm-a", payload(MiB, seed=2), offset=20 * MiB)

    second = lab.start_wait("nightly")
    vm2 = vms_by_name(second)["vm-a"]
    assert second["result"] == "success"
    assert vm2["status"] == "success" and vm2["mode"] == "incremental"
    assert 0 < vm2["bytes_read"] <= MiB, "only the one changed 1 MiB block is read"
    assert vm2["restore_point"] not in (None, vm["restore_point"])

    point, image = lab.restore("vm-a")
    assert point == vm2["restore_point"], "restore takes the newest restore point by default"
    assert len(image) == 32 * MiB
    assert image == bytes(lab.disks["vm-a"]), "the incremental point restores the live disk exactly"

    _, old_image = lab.restore("vm-a", point=vm["restore_point"])
    assert old_image == disk_at_first_run, "the full point still restores the disk as it was"

    points = lab.points(vm="vm-a")
    assert [(p["id"], p["mode"]) for p in points] == [
        (vm2["restore_point"], "incremental"),
        (vm["restore_point"], "full"),
    ], "restore-point list is newest first and records each transfer mode"


def test_incremental_after_random_guest_writes_restores_what_a_full_read_restores(lab: Lab) -> None:
    """Given a VM backed up once, when the guest writes 3 random 1 MiB blocks (``sim write
    --blocks``) and the job runs again, then the transfer is incremental and reads at most those
    blocks, and its restore point restores exactly what a ``--full`` run of the same disk
    restores (and not the disk before the writes)."""
    lab.configure(vms={"vm-a": "32 MiB"}, jobs={"nightly": {"vms": ["vm-a"]}})
    lab.sim("write", "vm-a", "--blocks", "8", "--seed", "1")
    before = vms_by_name(lab.start_wait("nightly"))["vm-a"]

    lab.sim("write", "vm-a", "--blocks", "3", "--seed", "2")
    incremental = vms_by_name(lab.start_wait("nightly"))["vm-a"]
    assert incremental["mode"] == "incremental"
    assert incremental["bytes_read"] == 3 * MiB, "3 aligned 1 MiB blocks changed; exactly those are read"
    full = vms_by_name(lab.start_wait("nightly", "--full"))["vm-a"]
    assert full["mode"] == "full"

    images = {name: lab.restore("vm-a", point=vm["restore_point"])[1] for name, vm in
              (("before", before), ("incremental", incremental), ("full", full))}
    assert images["incremental"] == images["full"]
    assert images["incremental"] != images["before"]


def test_after_cbt_reset_the_next_run_is_full_and_succeeds(lab: Lab) -> None:
    """Given a VM backed up once, when its changed block tracking is reset (old changeIds become
    invalid) and the job runs again, then that transfer falls back to full, succeeds and restores
    the live disk; the run after it is incremental again."""
    lab.configure(vms={"vm-a": "16 MiB"}, jobs={"nightly": {"vms": ["vm-a"]}})
    lab.write_disk("vm-a", payload(6 * MiB, seed=1), offset=0)
    assert vms_by_name(lab.start_wait("nightly"))["vm-a"]["mode"] == "full"

    lab.sim("cbt-reset", "vm-a")
    lab.write_disk("vm-a", payload(MiB, seed=2), offset=10 * MiB)

    after_reset = lab.start_wait("nightly", rc=EXIT_SUCCESS)
    vm = vms_by_name(after_reset)["vm-a"]
    assert after_reset["result"] == "success"
    assert vm["status"] == "success" and vm["mode"] == "full"
    assert vm["bytes_read"] >= 7 * MiB, "a full transfer reads every written area, not just the change"
    assert lab.restore("vm-a")[1] == bytes(lab.disks["vm-a"])

    lab.write_disk("vm-a", payload(MiB, seed=3), offset=12 * MiB)
    next_run = vms_by_name(lab.start_wait("nightly"))["vm-a"]
    assert next_run["mode"] == "incremental" and next_run["bytes_read"] <= MiB
    assert lab.restore("vm-a")[1] == bytes(lab.disks["vm-a"])


def test_quiesce_failure_falls_back_to_crash_consistent_snapshot_with_warning(lab: Lab) -> None:
    """Given a job with quiesce = true, when the guest of one VM cannot be quiesced, then that VM
    is still backed up from a crash-consistent snapshot and ends ``warning``, the other VM
    ``success``, the session ``warning`` with exit code 1, and the restore point restores."""
    lab.configure(
        vms={"vm-a": "8 MiB", "vm-b": "8 MiB"},
        jobs={"nightly": {"vms": ["vm-a", "vm-b"], "quiesce": True}},
    )
    lab.fill("vm-a", seed=1, size=4 * MiB)
    lab.fill("vm-b", seed=2, size=4 * MiB)
    lab.sim("fault", "vm-a", "--op", "quiesce", "--permanent")

    doc = lab.start_wait("nightly", rc=EXIT_WARNING)
    vms = vms_by_name(doc)
    assert (doc["state"], doc["result"]) == ("stopped", "warning")
    assert [vm["name"] for vm in doc["vms"]] == ["vm-a", "vm-b"]
    assert vms["vm-a"]["status"] == "warning"
    assert "quiesce" in (vms["vm-a"]["warning"] or "").lower(), "the warning says why"
    assert vms["vm-a"]["restore_point"] is not None
    assert vms["vm-a"]["snapshot"]["removed"] is True
    assert vms["vm-b"]["status"] == "success"

    assert [p["id"] for p in lab.points(vm="vm-a")] == [vms["vm-a"]["restore_point"]]
    assert lab.restore("vm-a")[1] == bytes(lab.disks["vm-a"])
    assert lab.backupd_snapshots() == {}


@pytest.mark.parametrize("op", ["read", "create_snapshot", "remove_snapshot"])
def test_transient_faults_are_retried_and_the_vm_succeeds(lab: Lab, op: str) -> None:
    """Given retry attempts = 3, when the next two ``op`` calls of a VM fail transiently, then the
    third attempt succeeds: the session log shows two retries, the VM ends ``success`` with a
    complete restore point and no snapshot is left behind."""
    lab.configure(
        vms={"vm-a": "8 MiB"},
        jobs={"nightly": {"vms": ["vm-a"], "retry": {"attempts": 3, "wait_seconds": 0}}},
    )
    lab.fill("vm-a", seed=1, size=4 * MiB)
    lab.sim("fault", "vm-a", "--op", op, "--times", "2")

    doc = lab.start_wait("nightly", rc=EXIT_SUCCESS)
    vm = vms_by_name(doc)["vm-a"]
    assert doc["result"] == "success" and vm["status"] == "success", vm
    retries = [line for line in doc["log"] if line["vm"] == "vm-a" and "retry" in line["text"].lower()]
    assert len(retries) == 2, f"the session log shows both retries: {doc['log']}"
    assert vm["snapshot"]["removed"] is True
    assert lab.backupd_snapshots() == {}
    assert lab.restore("vm-a")[1] == bytes(lab.disks["vm-a"])


@pytest.mark.parametrize("op", ["read", "create_snapshot"])
def test_a_transient_fault_is_not_retried_with_a_single_attempt(lab: Lab, op: str) -> None:
    """Given retry attempts = 1, when the next ``op`` call of a VM fails transiently, then the VM
    ends ``failed`` (so the success above is owed to the retries), the session ``failed`` with
    exit code 2, and no restore point or snapshot is left; the next run succeeds."""
    lab.configure(
        vms={"vm-a": "8 MiB"},
        jobs={"nightly": {"vms": ["vm-a"], "retry": {"attempts": 1, "wait_seconds": 0}}},
    )
    lab.fill("vm-a", seed=1, size=4 * MiB)
    lab.sim("fault", "vm-a", "--op", op, "--times", "1")

    doc = lab.start_wait("nightly", rc=EXIT_FAILED)
    vm = vms_by_name(doc)["vm-a"]
    assert doc["result"] == "failed" and vm["status"] == "failed"
    assert vm["error"], "the failed VM says what went wrong"
    assert vm["restore_point"] is None and lab.points(vm="vm-a") == []
    assert lab.backupd_snapshots() == {}

    assert vms_by_name(lab.start_wait("nightly"))["vm-a"]["status"] == "success"


@pytest.mark.parametrize("op", ["create_snapshot", "read"])
def test_permanent_fault_fails_only_its_vm_and_the_session_goes_on(lab: Lab, op: str) -> None:
    """Given a job of three VMs, when ``op`` fails permanently on the middle one, then that VM
    ends ``failed`` with an error and no restore point (and, had a snapshot been taken, it is
    removed), the VMs before and after it end ``success`` in config order, and the session ends
    ``failed`` with exit code 2."""
    lab.configure(
        vms={"vm-a": "8 MiB", "vm-b": "8 MiB", "vm-c": "8 MiB"},
        jobs={"nightly": {"vms": ["vm-a", "vm-b", "vm-c"]}},
    )
    for seed, name in enumerate(["vm-a", "vm-b", "vm-c"]):
        lab.fill(name, seed=seed, size=2 * MiB)
    lab.sim("fault", "vm-b", "--op", op, "--permanent")

    doc = lab.start_wait("nightly", rc=EXIT_FAILED)
    assert (doc["state"], doc["result"]) == ("stopped", "failed")
    assert [(vm["name"], vm["status"]) for vm in doc["vms"]] == [
        ("vm-a", "success"),
        ("vm-b", "failed"),
        ("vm-c", "success"),
    ]
    failed = vms_by_name(doc)["vm-b"]
    assert failed["error"] and failed["restore_point"] is None
    if op == "create_snapshot":
        assert failed["snapshot"] is None, "no snapshot was created, none is recorded"
    else:
        assert failed["snapshot"]["removed"] is True, "the snapshot of a failed transfer is removed"
    assert lab.backupd_snapshots() == {}
    assert {p["vm"] for p in lab.points()} == {"vm-a", "vm-c"}, "partial data never becomes a restore point"

    lab.sim("fault", "vm-b", "--clear")
    assert lab.start_wait("nightly")["result"] == "success"


def test_a_snapshot_that_cannot_be_removed_is_reported_on_the_vm_task(lab: Lab) -> None:
    """Given snapshot removal failing permanently on a VM, when the job runs, then the restore
    point is still committed, the VM ends ``warning`` with the removal error recorded on its
    snapshot (``removed: false``), the session ends ``warning`` (exit 1), and the snapshot is
    still listed by ``vm list``: nothing pretends it was removed."""
    lab.configure(vms={"vm-a": "8 MiB"}, jobs={"nightly": {"vms": ["vm-a"]}})
    lab.fill("vm-a", seed=3)
    lab.sim("fault", "vm-a", "--op", "remove_snapshot", "--permanent")

    doc = lab.start_wait("nightly", rc=EXIT_WARNING)
    vm = vms_by_name(doc)["vm-a"]
    assert (doc["result"], vm["status"]) == ("warning", "warning")
    assert vm["restore_point"] is not None
    assert vm["snapshot"]["removed"] is False and vm["snapshot"]["error"]
    assert vm["snapshot"]["id"] in vm["warning"]
    assert lab.backupd_snapshots() == {"vm-a": [f"backupd-nightly-{doc['id']}"]}


def test_listings_show_jobs_sessions_points_and_vms_as_scripts_read_them(lab: Lab) -> None:
    """Given two sessions of a job, when a script lists jobs, sessions, restore points and VMs
    with ``--json``, then each listing carries the contract's keys: the job with its VMs in
    order and its last session's result; sessions newest first; restore points with mode and
    logical and stored bytes; VMs with their disks and no snapshot left."""
    lab.configure(vms={"vm-b": "4 MiB", "vm-a": "4 MiB"}, jobs={"nightly": {"vms": ["vm-b", "vm-a"]}})
    lab.fill("vm-a", seed=1)
    first = lab.start_wait("nightly")
    second = lab.start_wait("nightly")

    (job,) = lab.run_json("job", "list", "--json")
    assert (job["name"], job["vms"]) == ("nightly", ["vm-b", "vm-a"])
    assert (job["last_session"]["id"], job["last_session"]["result"]) == (second["id"], "success")

    sessions = lab.run_json("session", "list", "--json")
    assert [s["id"] for s in sessions] == [second["id"], first["id"]]
    assert set(sessions[0]) >= {"id", "job", "state", "result", "started_at"}

    points = lab.run_json("restore-point", "list", "--vm", "vm-a", "--json")
    assert [(p["session"], p["mode"]) for p in points] == [(second["id"], "incremental"), (first["id"], "full")]
    assert all(p["logical_bytes"] == 4 * MiB for p in points)
    assert points[1]["stored_bytes"] > 0 and points[0]["stored_bytes"] == 0, "nothing changed: nothing new stored"

    vms = {vm["name"]: vm for vm in lab.run_json("vm", "list", "--json")}
    assert sorted(vms) == ["vm-a", "vm-b"]
    assert vms["vm-a"]["disks"][0]["capacity_bytes"] == 4 * MiB and vms["vm-a"]["snapshots"] == []


def test_a_restore_killed_while_writing_leaves_a_partial_image_the_next_restore_removes(lab: Lab) -> None:
    """Given a restore point of a 256 MiB disk, when ``backupd restore`` is killed with SIGKILL
    while it writes the image, then its hidden ``.partial`` image stays in the target folder (no
    cleanup code runs), and the next restore into the same folder removes it, says so on stderr,
    and writes the image of the live disk."""
    lab.configure(vms={"vm-a": "256 MiB"}, jobs={"nightly": {"vms": ["vm-a"]}})
    for half in range(2):  # payload() makes at most 2**28 - 1 bytes at once
        lab.write_disk("vm-a", payload(128 * MiB, seed=7 + half), offset=half * 128 * MiB)
    lab.start_wait("nightly")
    target = lab.scratch / "restored"

    def partials() -> list[str]:
        return sorted(p.name for p in target.glob(".*.partial")) if target.is_dir() else []

    killed = lab.popen("restore", "vm-a", "--to", target, "--json")
    [leftover] = wait_until(partials, timeout=60, interval=0.005, what="a partial image")
    killed.proc.send_signal(signal.SIGKILL)
    assert killed.finish().returncode == -signal.SIGKILL, "killed while writing, before it could finish"
    assert partials() == [leftover] and not list(target.glob("*.img")), "nothing ran to clean up after SIGKILL"

    proc = lab.run("restore", "vm-a", "--to", target, "--json")

    assert proc.returncode == EXIT_SUCCESS, describe(proc, "the second restore failed")
    assert partials() == []
    [image] = json.loads(proc.stdout)["images"]
    assert sorted(p.name for p in target.iterdir()) == [Path(image).name]
    assert Path(image).read_bytes() == bytes(lab.disks["vm-a"])
    assert "removed 1 leftover partial image(s) of an interrupted restore" in proc.stderr
    assert leftover in proc.stderr
