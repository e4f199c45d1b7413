"""The stop contract through the CLI: ``job start --wait`` runs in one process, ``job stop`` comes
from another, as an administrator in a second terminal or a scheduler would send it.

VMs are kept in flight with the simulated hypervisor's read throttle: each disk is filled with
incompressible data, so a full transfer takes (disk size / ``read_mib_per_s``) seconds.
"""

from __future__ import annotations

import os
import signal

import pytest

from labkit import EXIT_FAILED, EXIT_NO_SESSION, EXIT_USAGE, EXIT_WARNING, Lab, on_every_state_db, vms_by_name, wait_until

pytestmark = pytest.mark.slow

THREE_VMS = ["vm-a", "vm-b", "vm-c"]


def _three_full_vms(lab: Lab, size: str, **settings: object) -> None:
    lab.configure(
        vms={name: size for name in THREE_VMS},
        jobs={"nightly": {"vms": THREE_VMS, "max_parallel_vms": 2}},
        **settings,
    )
    for seed, name in enumerate(THREE_VMS):
        lab.fill(name, seed=seed)


@on_every_state_db
def test_immediate_stop_removes_snapshots_and_fails_session(lab: Lab) -> None:
    """Given a session with two VMs in flight and one waiting, and restore points of an earlier
    session, when ``job stop --immediate`` comes from another process, then within moments the
    session ends ``failed`` (exit 2): the VMs in flight ``cancelled`` with no restore point and
    their snapshots removed, the waiting VM ``not_processed``; the earlier restore points are
    untouched and still verify and restore."""
    _three_full_vms(lab, "16 MiB")
    earlier = lab.start_wait("nightly")
    earlier_points = {vm["name"]: vm["restore_point"] for vm in earlier["vms"]}
    disks_then = {name: bytes(lab.disks[name]) for name in THREE_VMS}

    lab.configure(read_mib_per_s=1)  # 16 s per VM from now on
    runner = lab.popen("job", "start", "nightly", "--wait", "--full", "--json")
    session = lab.wait_for_new_session("nightly", known={earlier["id"]})
    lab.wait_for_vms_in_flight(session, ["vm-a", "vm-b"])
    snapshot_name = f"backupd-nightly-{session}"
    assert lab.backupd_snapshots() == {"vm-a": [snapshot_name], "vm-b": [snapshot_name]}

    answer = lab.run_json("job", "stop", "nightly", "--immediate")
    assert answer == {"stops": [{"job": "nightly", "session": session, "outcome": "stop_requested", "mode": "immediate"}]}

    doc = runner.finish_json(rc=EXIT_FAILED, timeout=30)
    assert all(vm["bytes_read"] < 16 * 2**20 for vm in doc["vms"][:2]), \
        "an immediate stop acts between blocks: no VM in flight read its whole disk"
    assert doc["id"] == session
    assert (doc["state"], doc["result"]) == ("stopped", "failed")
    assert doc["stop"]["mode"] == "immediate"
    assert [(vm["name"], vm["status"]) for vm in doc["vms"]] == [
        ("vm-a", "cancelled"),
        ("vm-b", "cancelled"),
        ("vm-c", "not_processed"),
    ]
    vms = vms_by_name(doc)
    for name in ("vm-a", "vm-b"):
        assert vms[name]["restore_point"] is None
        assert vms[name]["snapshot"]["removed"] is True
    assert vms["vm-c"]["snapshot"] is None and vms["vm-c"]["restore_point"] is None
    assert lab.backupd_snapshots() == {}, "every snapshot the session created is gone"

    points = lab.points()
    assert all(p["session"] != session for p in points), "partial data never becomes a restore point"
    assert {p["vm"]: p["id"] for p in points} == earlier_points
    assert lab.run_json("restore-point", "verify", "--all")["ok"] is True
    for name in THREE_VMS:
        assert lab.restore(name)[1] == disks_then[name]


@on_every_state_db
def test_graceful_stop_lets_vms_in_flight_finish_and_skips_the_rest(lab: Lab) -> None:
    """Given a session with two VMs in flight and one waiting, when ``job stop`` (graceful, the
    default) comes from another process, then the VMs in flight complete their restore points
    and snapshot removal, the waiting VM ends ``not_processed``, and the session ends
    ``warning`` (exit 1).

    The VMs in flight are held mid-transfer by a pause of their reads until the stop has been
    seen, so no CLI call's latency on a loaded machine can let them finish before the stop
    lands (a read throttle did, and the session then ended ``success``)."""
    _three_full_vms(lab, "10 MiB")
    in_flight = ["vm-a", "vm-b"]
    for name in in_flight:
        lab.pause(name, "read")
    runner = lab.popen("job", "start", "nightly", "--wait", "--json")
    session = lab.wait_for_new_session("nightly")
    wait_until(lambda: all(lab.pause(name, "read") >= 1 for name in in_flight), what="both VMs held mid-transfer")

    answer = lab.run_json("job", "stop", "nightly")
    assert answer["stops"] == [{"job": "nightly", "session": session, "outcome": "stop_requested", "mode": "graceful"}]
    stopping = lab.wait_for_session(session, lambda d: d["state"] == "stopping", what="state stopping")
    assert stopping["stop"]["mode"] == "graceful"
    statuses = {vm["name"]: vm["status"] for vm in stopping["vms"]}
    assert (statuses["vm-a"], statuses["vm-b"]) == ("running", "running"), "VMs in flight go on"
    assert statuses["vm-c"] in ("pending", "not_processed"), "the VM waiting for a slot never starts"

    again = lab.run_json("job", "stop", "nightly")
    assert again["stops"][0]["outcome"] == "stop_requested", "repeating a stop under way is harmless"
    for name in in_flight:
        lab.resume(name)

    doc = runner.finish_json(rc=EXIT_WARNING, timeout=60)
    assert (doc["state"], doc["result"]) == ("stopped", "warning")
    assert [(vm["name"], vm["status"]) for vm in doc["vms"]] == [
        ("vm-a", "success"),
        ("vm-b", "success"),
        ("vm-c", "not_processed"),
    ]
    vms = vms_by_name(doc)
    assert vms["vm-c"]["snapshot"] is None and vms["vm-c"]["restore_point"] is None
    assert lab.backupd_snapshots() == {}
    assert {p["vm"]: p["session"] for p in lab.points()} == {"vm-a": session, "vm-b": session}
    for name in ("vm-a", "vm-b"):
        assert vms[name]["snapshot"]["removed"] is True
        assert lab.restore(name)[1] == bytes(lab.disks[name]), "a finished VM's point is complete"


def test_graceful_stop_before_the_first_vm_starts_fails_the_session_as_canceled_by_user(lab: Lab) -> None:
    """Given a session whose first VM waits for another session to release it (so its snapshot
    creation cannot have begun), when that session is stopped gracefully, then it ends promptly
    ``failed`` (exit 2) with the message ``Operation was canceled by user``, no VM processed and
    no snapshot taken; the other session is not disturbed."""
    lab.configure(
        vms={"vm-a": "32 MiB", "vm-b": "1 MiB"},
        jobs={
            "holder": {"vms": ["vm-a"]},
            "nightly": {"vms": ["vm-a", "vm-b"], "vm_lock_timeout_seconds": 120},
        },
        read_mib_per_s=1,
    )
    lab.fill("vm-a", seed=1)
    holder_run = lab.popen("job", "start", "holder", "--wait")
    holder = lab.wait_for_new_session("holder")
    lab.wait_for_vms_in_flight(holder, ["vm-a"])

    nightly_run = lab.popen("job", "start", "nightly", "--wait", "--json")
    nightly = lab.wait_for_new_session("nightly")
    lab.wait_for_session(
        nightly,
        lambda d: d["state"] == "working" and d["vms"][0]["status"] == "running",
        what="nightly's vm-a waiting for its turn",
    )
    assert lab.backupd_snapshots() == {"vm-a": [f"backupd-holder-{holder}"]}, "nightly waits, it took no snapshot"

    lab.run_json("job", "stop", "nightly")
    doc = nightly_run.finish_json(rc=EXIT_FAILED, timeout=20)
    assert lab.session(holder)["state"] != "stopped", "the stop did not wait for the other session to release vm-a"
    assert (doc["state"], doc["result"]) == ("stopped", "failed")
    assert doc["message"] == "Operation was canceled by user"
    assert [(vm["name"], vm["status"], vm["snapshot"]) for vm in doc["vms"]] == [
        ("vm-a", "not_processed", None),
        ("vm-b", "not_processed", None),
    ]

    still = lab.session(holder)
    assert still["state"] == "working" and still["stop"] is None, "the other session runs on"
    lab.run_json("job", "stop", "holder", "--immediate")
    assert holder_run.finish().returncode == EXIT_FAILED
    assert lab.backupd_snapshots() == {}


def test_stop_without_a_running_session_exits_3_naming_the_job(lab: Lab) -> None:
    """Given a job whose last session has ended, when it is stopped, then the answer is exit
    code 3 and a message naming the job (text), or outcome ``no_running_session`` (JSON)."""
    lab.configure(vms={"vm-a": "1 MiB"}, jobs={"nightly": {"vms": ["vm-a"]}})
    lab.start_wait("nightly")

    text = lab.run("job", "stop", "nightly")
    assert text.returncode == EXIT_NO_SESSION, text
    assert "nightly" in text.stderr + text.stdout

    answer = lab.run_json("job", "stop", "nightly", rc=EXIT_NO_SESSION)
    assert [(s["job"], s["session"], s["outcome"]) for s in answer["stops"]] == [("nightly", None, "no_running_session")]


def test_one_stop_call_stops_several_jobs_with_one_message(lab: Lab) -> None:
    """Given two jobs running (detached) and a third idle, when one ``job stop`` names all three
    with ``--message`` and ``--wait``, then when it returns both running sessions have ended,
    each showing the message in ``session show``; the idle job is reported
    ``no_running_session`` with exit code 3, and that does not undo the two stops."""
    lab.configure(
        vms={"vm-a": "32 MiB", "vm-b": "32 MiB", "vm-c": "1 MiB"},
        jobs={"alpha": {"vms": ["vm-a"]}, "beta": {"vms": ["vm-b"]}, "gamma": {"vms": ["vm-c"]}},
        read_mib_per_s=1,
    )
    lab.fill("vm-a", seed=1)
    lab.fill("vm-b", seed=2)
    alpha = lab.start("alpha")
    beta = lab.start("beta")
    lab.wait_for_vms_in_flight(alpha, ["vm-a"])
    lab.wait_for_vms_in_flight(beta, ["vm-b"])

    message = "repo01 maintenance (OPS-4711)"
    answer = lab.run_json(
        "job", "stop", "alpha", "beta", "gamma", "--immediate", "--message", message, "--wait", rc=EXIT_NO_SESSION
    )
    assert [(s["job"], s["session"], s["outcome"]) for s in answer["stops"]] == [
        ("alpha", alpha, "stop_requested"),
        ("beta", beta, "stop_requested"),
        ("gamma", None, "no_running_session"),
    ]
    assert [s["mode"] for s in answer["stops"][:2]] == ["immediate", "immediate"]

    for session, vm in ((alpha, "vm-a"), (beta, "vm-b")):
        doc = lab.session(session)
        assert (doc["state"], doc["result"]) == ("stopped", "failed"), "--wait returned after the sessions ended"
        assert doc["stop"]["mode"] == "immediate" and doc["stop"]["message"] == message
        assert doc["stop"]["requested_at"]
        assert [(v["name"], v["status"]) for v in doc["vms"]] == [(vm, "cancelled")]
        shown = lab.run("session", "show", session)
        assert shown.returncode == 0 and message in shown.stdout, "text output shows the message"
    assert lab.backupd_snapshots() == {}
    assert lab.points() == []


def test_stop_message_longer_than_320_characters_is_a_usage_error(lab: Lab) -> None:
    """Given a running session, when ``job stop`` gets a 321-character message, then it exits 64
    and the session is not stopped; a message of exactly 320 characters is accepted and kept
    whole."""
    lab.configure(vms={"vm-a": "32 MiB"}, jobs={"nightly": {"vms": ["vm-a"]}}, read_mib_per_s=1)
    lab.fill("vm-a", seed=1)
    session = lab.start("nightly")
    lab.wait_for_vms_in_flight(session, ["vm-a"])

    refused = lab.run("job", "stop", "nightly", "--immediate", "--message", "x" * 321)
    assert refused.returncode == EXIT_USAGE, refused
    assert "320" in refused.stderr, "the usage error states the limit"
    doc = lab.session(session)
    assert doc["state"] == "working" and doc["stop"] is None

    lab.run_json("job", "stop", "nightly", "--immediate", "--message", "y" * 320)
    assert lab.wait_stopped(session, timeout=20)["stop"]["message"] == "y" * 320


def test_ctrl_c_on_a_foreground_session_stops_gracefully_then_immediately(lab: Lab) -> None:
    """Given ``job start --wait`` running in the foreground with two VMs in flight, when the
    administrator presses Ctrl-C, then a graceful stop is requested and the VMs in flight go on;
    when Ctrl-C comes again, the stop becomes immediate: the VMs in flight end ``cancelled``
    with their snapshots removed, the third VM ``not_processed``, and the command exits 2."""
    _three_full_vms(lab, "32 MiB", read_mib_per_s=1)
    runner = lab.popen("job", "start", "nightly", "--wait", "--json")
    session = lab.wait_for_new_session("nightly")
    lab.wait_for_vms_in_flight(session, ["vm-a", "vm-b"])

    runner.proc.send_signal(signal.SIGINT)
    graceful = lab.wait_for_session(session, lambda d: d["stop"] is not None, what="a stop request")
    assert graceful["stop"]["mode"] == "graceful"
    assert [vm["status"] for vm in graceful["vms"]][:2] == ["running", "running"], "VMs in flight go on"

    runner.proc.send_signal(signal.SIGINT)
    doc = runner.finish_json(rc=EXIT_FAILED, timeout=30)
    assert doc["stop"]["mode"] == "immediate"
    assert [(vm["name"], vm["status"]) for vm in doc["vms"]] == [
        ("vm-a", "cancelled"),
        ("vm-b", "cancelled"),
        ("vm-c", "not_processed"),
    ]
    assert lab.backupd_snapshots() == {}
    assert lab.points() == []


def test_sigterm_to_a_detached_runner_stops_gracefully_then_immediately(lab: Lab) -> None:
    """Given a session running detached (``job start`` without ``--wait``) with two VMs in
    flight, when its runner process gets SIGTERM (a scheduler's timeout, a shutdown), then a
    graceful stop is recorded and the VMs in flight go on; a second SIGTERM makes it immediate:
    the VMs in flight end ``cancelled``, their snapshots are removed, the session ends
    ``failed``."""
    _three_full_vms(lab, "32 MiB", read_mib_per_s=1)
    session = lab.start("nightly")
    lab.wait_for_vms_in_flight(session, ["vm-a", "vm-b"])
    runner = lab.session(session)["runner"]
    assert runner is not None and runner["pid"] > 0

    os.kill(runner["pid"], signal.SIGTERM)
    graceful = lab.wait_for_session(session, lambda d: d["stop"] is not None, what="a stop request")
    assert graceful["stop"]["mode"] == "graceful"
    assert [vm["status"] for vm in graceful["vms"]][:2] == ["running", "running"], "VMs in flight go on"

    os.kill(runner["pid"], signal.SIGTERM)
    doc = lab.wait_stopped(session, timeout=30)
    assert (doc["result"], doc["stop"]["mode"]) == ("failed", "immediate")
    assert [(vm["name"], vm["status"]) for vm in doc["vms"]] == [
        ("vm-a", "cancelled"),
        ("vm-b", "cancelled"),
        ("vm-c", "not_processed"),
    ]
    assert lab.backupd_snapshots() == {}


def test_snapshots_left_by_a_killed_runner_are_removed_by_the_next_session(lab: Lab) -> None:
    """Given a session killed with SIGKILL while two VMs are in flight (no chance to clean
    up), when the job runs again, then the dead session is ended ``failed``, the new session
    first removes the snapshots the dead one recorded, and no snapshot of backupd's is left."""
    _three_full_vms(lab, "32 MiB", read_mib_per_s=1)
    runner = lab.popen("job", "start", "nightly", "--wait", "--json")
    dead = lab.wait_for_new_session("nightly")
    lab.wait_for_vms_in_flight(dead, ["vm-a", "vm-b"])
    runner.proc.kill()
    runner.proc.wait(timeout=10)
    assert lab.backupd_snapshots() == {"vm-a": [f"backupd-nightly-{dead}"], "vm-b": [f"backupd-nightly-{dead}"]}

    lab.configure(read_mib_per_s=0)
    doc = lab.start_wait("nightly")
    assert doc["result"] == "success"
    assert lab.backupd_snapshots() == {}
    ended = lab.session(dead)
    assert (ended["state"], ended["result"]) == ("stopped", "failed")
    assert all(vm["snapshot"]["removed"] for vm in ended["vms"][:2])
    assert sum("orphaned snapshot" in line["text"] for line in doc["log"]) == 2
