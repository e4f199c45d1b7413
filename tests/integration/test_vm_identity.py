"""VM identity and full-VM restore through the CLI: a renamed VM goes on with its restore point
chain; a restore point's captured configuration rebuilds the VM on a provider, all or nothing.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from backupd.disk_images import GeneratedFile, ImageSpec, MissingTool, build_ext4_image, e2fsck_clean
from labkit import EXIT_FAILED, MiB, Lab, describe, payload, vms_by_name
from providers.simulated import SimulatedProvider
from providers.simulated.config import SimulatedProviderConfig

#: the exit code of a full-VM restore onto a name that is taken (EX_CANTCREAT)
EXIT_VM_EXISTS = 73


def test_a_renamed_vm_goes_on_with_its_chain_and_restores_under_either_name(lab: Lab) -> None:
    """Given a VM backed up once, when it is renamed on the hypervisor (and in the config and the
    job) and one 1 MiB block changes, then the next session is incremental and reads only that
    block, both points share the VM's id, the list shows each point under the name it was made
    under, and restoring by the old or the new name gives the live disk."""
    lab.configure(vms={"web": "16 MiB"}, jobs={"nightly": {"vms": ["web"]}})
    lab.fill("web", seed=1, size=8 * MiB)
    first = vms_by_name(lab.start_wait("nightly"))["web"]
    assert first["mode"] == "full" and first["vm_id"]

    lab.sim("rename", "web", "www")
    lab.disks["www"] = lab.disks.pop("web")
    lab.configure(vms={"www": "16 MiB"}, jobs={"nightly": {"vms": ["www"]}})
    lab.write_disk("www", payload(MiB, seed=2), offset=4 * MiB)
    second = vms_by_name(lab.start_wait("nightly"))["www"]

    assert second["status"] == "success" and second["mode"] == "incremental"
    assert second["bytes_read"] == MiB, "CBT named only the changed block"
    assert second["vm_id"] == first["vm_id"]
    listed = lab.points(vm="www")
    assert [(p["id"], p["vm"], p["vm_id"]) for p in listed] == [
        (second["restore_point"], "www", first["vm_id"]), (first["restore_point"], "web", first["vm_id"])]
    assert [p["id"] for p in lab.points(vm="web")] == [p["id"] for p in listed]
    for name in ("web", "www", first["vm_id"]):
        point, image = lab.restore(name)
        assert point == second["restore_point"] and image == bytes(lab.disks["www"])


def test_an_orphaned_snapshot_of_a_vm_renamed_since_is_found_by_its_id(lab: Lab) -> None:
    """Given a runner killed while its VM's snapshot exists, when the VM is renamed before
    anyone recovers, then the snapshot hunter finds the VM by the id the VM task recorded (not by
    the name it had) and removes the snapshot."""
    lab.configure(vms={"web": "16 MiB"}, jobs={"nightly": {"vms": ["web"]}}, read_mib_per_s=1)
    lab.fill("web", seed=1, size=8 * MiB)
    runner = lab.popen("job", "start", "nightly", "--wait", "--json")
    session = lab.wait_for_new_session("nightly")
    lab.wait_for_vms_in_flight(session, ["web"])
    runner.proc.send_signal(signal.SIGKILL)
    runner.proc.wait()
    assert lab.backupd_snapshots() == {"web": [f"backupd-nightly-{session}"]}

    lab.sim("rename", "web", "www")
    lab.configure(vms={"www": "16 MiB"}, jobs={"nightly": {"vms": ["www"]}}, read_mib_per_s=0)
    found = lab.run_json("snapshot", "hunt")

    assert [(row["vm"], row["action"]) for row in found] == [("web", "removed")], found
    assert lab.backupd_snapshots() == {}


@pytest.fixture
def ext4_image(tmp_path: Path) -> Path:
    """A 24 MiB ext4 image with a few MiB of files in it (``mkfs.ext4 -d``)."""
    image = tmp_path / "images" / "web.ext4"
    spec = ImageSpec(size_bytes=24 * MiB, label="web", sources=(), cap_bytes=0, generated=(
        GeneratedFile("data/a.bin", 3 * MiB, seed=1), GeneratedFile("data/b.bin", 700_000, seed=2)))
    try:
        build_ext4_image(image, spec)
    except MissingTool as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{exc} (CI installs e2fsprogs)")
    return image


def _created_disk(lab: Lab, vm: str) -> bytes:
    provider = SimulatedProvider("lab", SimulatedProviderConfig.model_validate(
        {"type": "simulated", "state_dir": str(lab.site / "lab")}))
    return provider.disk_path(vm).read_bytes()


def test_full_vm_restore_rebuilds_the_vm_byte_identical_and_refuses_a_taken_name(lab: Lab, ext4_image: Path) -> None:
    """Given an ext4 VM backed up, when its restore point is restored to the simulated provider
    as a new VM, then the new VM is powered off with the captured configuration, its disk is
    byte-identical to the restore point and e2fsck-clean, and it can be backed up like any
    other; restoring onto a name that exists exits 73 and creates nothing."""
    lab.configure(vms={"web": ext4_image}, jobs={"nightly": {"vms": ["web"]}})
    point = vms_by_name(lab.start_wait("nightly"))["web"]["restore_point"]
    shown = lab.run_json("restore-point", "show", point)
    assert shown["config"]["disks"][0]["capacity_bytes"] == 24 * MiB
    assert (shown["config"]["cpus"], shown["config"]["firmware"], shown["config"]["nics"][0]["network"]) == (
        1, "bios", "VM Network")
    text = lab.run("restore-point", "show", point)
    assert text.returncode == 0 and "24.0 MiB" in text.stdout and "otherLinux64Guest" in text.stdout

    doc = lab.run_json("restore", "web", "--to-provider", "lab", "--as", "web-copy")

    assert (doc["point"], doc["vm"]["name"], doc["power_state"]) == (point, "web-copy", "poweredOff")
    assert doc["disks"] == [{"key": 2000, "label": "Hard disk 1", "capacity_bytes": 24 * MiB}]
    restored = _created_disk(lab, "web-copy")
    assert restored == ext4_image.read_bytes() == lab.restore("web")[1]
    copy = lab.scratch / "web-copy.ext4"
    copy.write_bytes(restored)
    clean, report = e2fsck_clean(copy)
    assert clean, report
    listed = {vm["name"]: vm for vm in lab.run_json("vm", "list")}
    assert listed["web-copy"]["power_state"] == "poweredOff"
    lab.configure(jobs={"nightly": {"vms": ["web"]}, "copies": {"vms": ["web-copy"]}})
    backed_up = vms_by_name(lab.start_wait("copies"))["web-copy"]
    assert backed_up["status"] == "success" and backed_up["vm_id"] == doc["vm"]["id"]

    taken = lab.run("restore", "web", "--to-provider", "lab", "--as", "web-copy")
    assert taken.returncode == EXIT_VM_EXISTS, describe(taken, "a taken name must be refused with 73")
    assert "web-copy" in taken.stderr


def test_a_full_vm_restore_that_meets_a_damaged_block_leaves_no_vm(lab: Lab) -> None:
    """Given a restore point one of whose blocks was damaged in the repository, when it is
    restored as a whole VM, then the restore fails naming the block and no VM (nor a half-built
    one) is left on the provider."""
    lab.configure(vms={"web": "8 MiB"}, jobs={"nightly": {"vms": ["web"]}})
    lab.fill("web", seed=3)
    assert lab.start_wait("nightly")["result"] == "success"
    victim = sorted(p for p in (lab.repo / "blocks").rglob("*") if p.is_file())[-1]
    victim.write_bytes(b"not a block")

    failed = lab.run("restore", "web", "--to-provider", "lab", "--as", "web-bad")

    assert failed.returncode == EXIT_FAILED, describe(failed, "a damaged block fails the restore")
    assert "block" in failed.stderr
    assert "web-bad" not in {vm["name"] for vm in lab.run_json("vm", "list")}
    assert [p.name for p in (lab.site / "lab" / "vms").iterdir() if p.name.startswith(".")] == []
    assert lab.run("restore", "web", "--to", lab.scratch / "x").returncode == EXIT_FAILED
