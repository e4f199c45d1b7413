"""One VM, two sessions at once: the second session waits for the VM and never snapshots it
while the first holds it; if the VM is not released in time, that VM fails naming the first
session, and the second session goes on with its other VMs."""

from __future__ import annotations

import time

import pytest

from labkit import EXIT_FAILED, Lab, on_every_state_db, vms_by_name

pytestmark = [pytest.mark.slow, on_every_state_db]


def _two_jobs_sharing_vm_a(lab: Lab, lock_timeout: float) -> None:
    lab.configure(
        vms={"vm-a": "32 MiB", "vm-b": "1 MiB"},
        jobs={
            "first": {"vms": ["vm-a"]},
            "second": {"vms": ["vm-a", "vm-b"], "max_parallel_vms": 2, "vm_lock_timeout_seconds": lock_timeout},
        },
        read_mib_per_s=1,  # the first session holds vm-a for 32 s
    )
    lab.fill("vm-a", seed=1)
    lab.write_disk("vm-b", b"vm-b boot sector", offset=0)


def test_a_vm_held_by_another_session_fails_after_the_lock_timeout_naming_that_session(lab: Lab) -> None:
    """Given session 1 processing vm-a, when session 2 (vm_lock_timeout_seconds = 2) reaches
    vm-a, then it waits about 2 s, ends vm-a ``failed`` with an error naming session 1, still
    backs up vm-b, and ends ``failed`` (exit 2); session 1 was not disturbed."""
    _two_jobs_sharing_vm_a(lab, lock_timeout=2)
    first_run = lab.popen("job", "start", "first", "--wait")
    first = lab.wait_for_new_session("first")
    lab.wait_for_vms_in_flight(first, ["vm-a"])

    began = time.monotonic()
    second = lab.start_wait("second", rc=EXIT_FAILED)
    assert time.monotonic() - began >= 2, "the second session waited for vm-a"
    vms = vms_by_name(second)
    assert [vm["name"] for vm in second["vms"]] == ["vm-a", "vm-b"]
    assert vms["vm-a"]["status"] == "failed"
    assert str(first) in vms["vm-a"]["error"], f"the error names session {first}: {vms['vm-a']['error']!r}"
    assert vms["vm-a"]["snapshot"] is None, "the second session never snapshotted vm-a"
    assert vms["vm-b"]["status"] == "success"
    assert second["result"] == "failed"

    holding = vms_by_name(lab.session(first))["vm-a"]
    assert holding["status"] == "running", "session 1 still processes vm-a"
    assert lab.backupd_snapshots() == {"vm-a": [f"backupd-first-{first}"]}
    lab.run_json("job", "stop", "first", "--immediate")
    assert first_run.finish().returncode == EXIT_FAILED


def test_a_vm_held_by_another_session_is_processed_once_released(lab: Lab) -> None:
    """Given session 1 processing vm-a, when session 2 reaches vm-a, then it waits without
    taking a snapshot of it; when session 1 ends (here: stopped immediately), session 2 goes
    on to back up vm-a and succeeds."""
    _two_jobs_sharing_vm_a(lab, lock_timeout=120)
    first_run = lab.popen("job", "start", "first", "--wait")
    first = lab.wait_for_new_session("first")
    lab.wait_for_vms_in_flight(first, ["vm-a"])

    lab.configure(read_mib_per_s=0)  # the second session reads unthrottled
    second_run = lab.popen("job", "start", "second", "--wait", "--json")
    second = lab.wait_for_new_session("second")
    lab.wait_for_session(
        second,
        lambda d: vms_by_name(d)["vm-b"]["status"] == "success",
        what="vm-b done while vm-a waits",
    )
    waiting = vms_by_name(lab.session(second))["vm-a"]
    assert waiting["status"] == "running" and waiting["snapshot"] is None
    assert lab.backupd_snapshots() == {"vm-a": [f"backupd-first-{first}"]}, "one session at a time on vm-a"

    lab.run_json("job", "stop", "first", "--immediate")
    assert first_run.finish().returncode == EXIT_FAILED
    doc = second_run.finish_json(rc=0, timeout=60)
    assert [(vm["name"], vm["status"]) for vm in doc["vms"]] == [("vm-a", "success"), ("vm-b", "success")]
    assert lab.restore("vm-a")[1] == bytes(lab.disks["vm-a"])


def test_an_immediate_stop_leaves_a_vm_still_waiting_for_its_lock_not_processed(lab: Lab) -> None:
    """Given session 2 waiting for vm-a, which session 1 is processing, when session 2 is
    stopped immediately, then vm-a, whose snapshot creation never began, ends
    ``not_processed`` (not ``cancelled``: nothing of it was in flight), session 2 ends
    ``failed``, and session 1 goes on undisturbed."""
    _two_jobs_sharing_vm_a(lab, lock_timeout=120)
    lab.configure(jobs={"first": {"vms": ["vm-a"]}, "second": {"vms": ["vm-a"], "vm_lock_timeout_seconds": 120}})
    first_run = lab.popen("job", "start", "first", "--wait")
    first = lab.wait_for_new_session("first")
    lab.wait_for_vms_in_flight(first, ["vm-a"])
    second_run = lab.popen("job", "start", "second", "--wait", "--json")
    second = lab.wait_for_new_session("second")
    lab.wait_for_session(second, lambda d: d["vms"][0]["status"] == "running", what="vm-a waiting for its lock")

    lab.run_json("job", "stop", "second", "--immediate")
    doc = second_run.finish_json(rc=EXIT_FAILED, timeout=30)
    assert [(vm["name"], vm["status"], vm["snapshot"]) for vm in doc["vms"]] == [("vm-a", "not_processed", None)]
    assert doc["result"] == "failed"
    assert vms_by_name(lab.session(first))["vm-a"]["status"] == "running", "session 1 is undisturbed"
    lab.run_json("job", "stop", "first", "--immediate")
    assert first_run.finish().returncode == EXIT_FAILED
