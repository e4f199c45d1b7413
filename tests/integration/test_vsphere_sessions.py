"""Whole job sessions through the CLI against the vSphere simulator (the project's launcher),
with real ext4 filesystem images as the VMs' disks: full, a guest change inside a file,
incremental through CBT reading only the changed areas, restores byte-identical and
``e2fsck``-clean, full-VM restore to the simulator, immediate and graceful stops, a quiesce
fault, a transient HTTP 503, an expired session and a permanent snapshot fault.

The config has a ``[providers.vc]`` section of type ``vsphere`` pointing at the launcher over
http, the password in an environment variable (``password_env``). A guest write is a write
into the image file (the launcher's disk is a symbolic link to it), inside the data extent of
a file (found with ``debugfs``) so the filesystem stays consistent. Skipped where Go or the
govmomi source is missing, failed under ``CI``.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from backupd.disk_images import (
    FS_BLOCK_SIZE,
    DiskImageError,
    GeneratedFile,
    ImageSpec,
    build_ext4_image,
    dump_file,
    e2fsck_clean,
    file_extents,
)
from labkit import EXIT_FAILED, EXIT_SUCCESS, EXIT_WARNING, MiB, Lab, describe, toml_table, vms_by_name, wait_until
from vsphere_sim import Vcsim

pytestmark = pytest.mark.vsphere

PASSWORD_ENV = "BACKUPD_IT_VC_PASSWORD"
DISK_SIZE = 64 * MiB
DATA_FILE = "srv/data.bin"
DATA_FILE_SIZE = 12 * MiB
PATCH_SIZE = 2 * MiB
VMS = ("db-01", "web-01")


@pytest.fixture(scope="module")
def template_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One ext4 image per VM, built once for the module (``mkfs.ext4 -d``): a copy of
    ``/usr/share/doc`` (capped) and a file of random data the guest later rewrites."""
    folder = tmp_path_factory.mktemp("images")
    images = {}
    for seed, vm in enumerate(VMS, start=1):
        spec = ImageSpec(DISK_SIZE, vm, (("/usr/share/doc", "usr/share/doc"),), cap_bytes=6 * MiB,
                         generated=(GeneratedFile(DATA_FILE, DATA_FILE_SIZE, seed=seed),))
        try:
            build_ext4_image(folder / f"{vm}.img", spec)
        except DiskImageError as exc:  # no e2fsprogs: a missing tool, not a failure of backupd
            pytest.skip(str(exc))
        images[vm] = folder / f"{vm}.img"
    return images


class VsphereLab:
    """A :class:`Lab` whose provider ``vc`` is the launcher ``sim`` serving ``images``."""

    def __init__(self, lab: Lab, sim: Vcsim, images: dict[str, Path]) -> None:
        self.lab = lab
        self.sim = sim
        self.images = images

    def configure(self, vms: tuple[str, ...] = VMS, **job: Any) -> None:
        values = {"provider": "vc", "repository": "local", "vms": list(vms),
                  "retry": {"attempts": 3, "wait_seconds": 0}, **job}
        self.lab.write_raw_config("\n".join([
            toml_table("state", {"url": self.lab.state_url}),
            toml_table("repositories.local", {"path": "repo"}),
            toml_table("providers.vc", self.sim.provider_values(PASSWORD_ENV)),
            toml_table("jobs.nightly", values),
        ]))

    def patch_file(self, vm: str, seed: int) -> int:
        """Rewrite ``PATCH_SIZE`` bytes of the VM's data file in place, 1 MiB-aligned on the disk
        inside one of its extents; returns the disk offset."""
        image = self.images[vm]
        for extent in sorted(file_extents(image, DATA_FILE), key=lambda e: -e.length):
            start = extent.physical * FS_BLOCK_SIZE
            offset = -(-start // MiB) * MiB
            if offset + PATCH_SIZE <= start + extent.length * FS_BLOCK_SIZE:
                with open(image, "r+b") as f:
                    f.seek(offset)
                    f.write(random.Random(seed).randbytes(PATCH_SIZE))
                return offset
        raise AssertionError(f"/{DATA_FILE} of {image} has no extent of {PATCH_SIZE} bytes")

    def restore_image(self, vm: str, point: Any = None) -> Path:
        target = self.lab.scratch / f"restore-{len(list(self.lab.scratch.glob('restore-*')))}"
        doc = self.lab.run_json("restore", vm, "--to", target, *(["--point", point] if point is not None else []))
        assert len(doc["images"]) == 1, doc
        return Path(doc["images"][0])

    def backupd_snapshots(self) -> dict[str, list[str]]:
        """The launcher's snapshots named ``backupd-...``, per VM that has any."""
        found = {vm["name"]: [s["name"] for s in vm["snapshots"] if s["name"].startswith("backupd-")]
                 for vm in self.sim.state()["vms"]}
        return {name: names for name, names in found.items() if names}


@pytest.fixture
def vlab(request: pytest.FixtureRequest, lab: Lab, vcsim_factory, template_images: dict[str, Path],  # noqa: ANN001
         monkeypatch: pytest.MonkeyPatch) -> VsphereLab:
    """The lab on a launcher serving ``VMS`` on copies of the template images; CBT on unless
    parametrized indirectly with ``{"cbt": False}``."""
    cbt = getattr(request, "param", {}).get("cbt", True)
    images = {}
    for vm, template in template_images.items():
        images[vm] = lab.scratch / template.name
        subprocess.run(["cp", "--sparse=always", str(template), str(images[vm])], check=True)
    sim = vcsim_factory({"vms": [
        {"name": vm, "folder": "prod", "cbt": cbt, "guest_id": "debian11_64Guest", "cpus": 2, "memory_mib": 1024,
         "disks": [{"image": str(images[vm])}], "nics": [{"network": "VM Network"}]} for vm in VMS
    ]})
    monkeypatch.setenv(PASSWORD_ENV, sim.password)
    made = VsphereLab(lab, sim, images)
    made.configure()
    return made


def test_full_then_incremental_through_cbt_restores_byte_identical_clean_filesystems(vlab: VsphereLab) -> None:
    lab = vlab.lab
    first = lab.start_wait("nightly")
    assert (first["state"], first["result"]) == ("stopped", "success"), first
    for vm in first["vms"]:
        assert (vm["status"], vm["mode"]) == ("success", "full"), vm
        assert 0 < vm["bytes_read"] < DISK_SIZE // 2, "a full read skips the unallocated areas ('*')"
        assert vm["snapshot"]["removed"] is True
    assert vlab.backupd_snapshots() == {}
    before = vlab.images["db-01"].read_bytes()

    vlab.patch_file("db-01", seed=7)

    second = lab.start_wait("nightly")
    vms = vms_by_name(second)
    assert second["result"] == "success"
    assert (vms["db-01"]["mode"], vms["web-01"]["mode"]) == ("incremental", "incremental")
    assert 0 < vms["db-01"]["bytes_read"] <= PATCH_SIZE, "only the rewritten areas are read"
    assert vms["web-01"]["bytes_read"] == 0, "nothing changed on web-01"

    for vm in VMS:
        restored = vlab.restore_image(vm)
        assert restored.read_bytes() == vlab.images[vm].read_bytes(), vm
        clean, summary = e2fsck_clean(restored)
        assert clean, summary
    dumped = lab.scratch / "data.bin"
    dump_file(vlab.restore_image("db-01"), DATA_FILE, dumped)
    assert random.Random(7).randbytes(PATCH_SIZE) in dumped.read_bytes()
    first_point = vms_by_name(first)["db-01"]["restore_point"]
    assert vlab.restore_image("db-01", first_point).read_bytes() == before, "the full point restores the disk as it was"


def test_full_vm_restore_to_the_simulator_reads_back_the_disk(vlab: VsphereLab) -> None:
    lab = vlab.lab
    vlab.configure(vms=("db-01",))
    lab.start_wait("nightly")

    doc = lab.run_json("restore", "db-01", "--to-provider", "vc", "--as", "db-01-restored")

    state = vlab.sim.vm_state("db-01-restored")
    assert state["instance_uuid"] in json.dumps(doc), "the new VM's id is printed"
    assert state["power_state"] == "poweredOff"
    restored = vlab.sim.flat_file("db-01-restored")
    assert restored.read_bytes() == vlab.images["db-01"].read_bytes()
    assert e2fsck_clean(restored)[0]
    original = vlab.sim.vm_state("db-01")
    assert [d["capacity_bytes"] for d in state["disks"]] == [d["capacity_bytes"] for d in original["disks"]]
    taken = lab.run("restore", "db-01", "--to-provider", "vc", "--as", "db-01-restored", "--json")
    assert taken.returncode == 73, describe(taken, "a taken name is refused with exit 73")


@pytest.mark.parametrize("vlab", [{"cbt": False}], indirect=True)
def test_enable_cbt_switches_tracking_on_so_the_second_session_is_incremental(vlab: VsphereLab) -> None:
    lab = vlab.lab
    assert vlab.sim.vm_state("db-01")["cbt_enabled"] is False
    vlab.configure(vms=("db-01",))  # enable_cbt defaults to true

    first = vms_by_name(lab.start_wait("nightly"))["db-01"]
    assert first["mode"] == "full"
    assert vlab.sim.vm_state("db-01")["cbt_enabled"] is True
    vlab.patch_file("db-01", seed=9)
    second = vms_by_name(lab.start_wait("nightly"))["db-01"]

    assert second["mode"] == "incremental" and 0 < second["bytes_read"] <= PATCH_SIZE
    assert vlab.restore_image("db-01").read_bytes() == vlab.images["db-01"].read_bytes()


def _wait_creating(vlab: VsphereLab, vm: str) -> None:
    """Until the launcher runs a (slow) snapshot creation of ``vm``: the session has that VM
    in flight and has not started the next one (``max_parallel_vms`` is 1)."""
    wait_until(lambda: vlab.sim.state()["creating_snapshots"].get(vm), timeout=60, interval=0.05,
               what=f"a snapshot creation of {vm} in the simulator")


def test_an_immediate_stop_cancels_and_leaves_no_snapshot(vlab: VsphereLab) -> None:
    """Given a snapshot creation that would run for an hour, when an immediate stop comes, then
    the task is cancelled (``CancelTask``) rather than waited for, and nothing is left."""
    lab = vlab.lab
    vlab.sim.slow_snapshots(3600)
    session = lab.start("nightly")
    _wait_creating(vlab, "db-01")

    lab.run_json("job", "stop", "nightly", "--immediate")

    doc = lab.wait_stopped(session, timeout=90)
    vms = vms_by_name(doc)
    assert doc["result"] == "failed"
    assert (vms["db-01"]["status"], vms["web-01"]["status"]) == ("cancelled", "not_processed"), json.dumps(doc, indent=1)
    assert vms["db-01"]["restore_point"] is None and vms["db-01"]["snapshot"] is None
    assert vlab.backupd_snapshots() == {}
    assert not vlab.sim.state()["creating_snapshots"].get("db-01"), "the creation task was cancelled"
    assert lab.points() == []


def test_a_graceful_stop_finishes_the_vm_in_flight_and_leaves_no_snapshot(vlab: VsphereLab) -> None:
    lab = vlab.lab
    vlab.sim.slow_snapshots(3)
    session = lab.start("nightly")
    _wait_creating(vlab, "db-01")

    lab.run_json("job", "stop", "nightly")

    doc = lab.wait_stopped(session, timeout=90)
    vms = vms_by_name(doc)
    assert (vms["db-01"]["status"], vms["web-01"]["status"]) == ("success", "not_processed"), json.dumps(doc, indent=1)
    assert vms["db-01"]["snapshot"]["removed"] is True
    assert vlab.backupd_snapshots() == {}
    assert [p["vm"] for p in lab.points()] == ["db-01"]


def test_a_quiesce_fault_falls_back_to_a_crash_consistent_snapshot_with_a_warning(vlab: VsphereLab) -> None:
    vlab.configure(quiesce=True)
    vlab.sim.fault("CreateSnapshot_Task", "db-01", "ApplicationQuiesceFault", times=1)

    doc = vlab.lab.start_wait("nightly", rc=EXIT_WARNING)

    vms = vms_by_name(doc)
    assert doc["result"] == "warning"
    assert (vms["db-01"]["status"], vms["web-01"]["status"]) == ("warning", "success")
    assert vms["db-01"]["restore_point"] is not None
    assert vlab.restore_image("db-01").read_bytes() == vlab.images["db-01"].read_bytes()
    assert vlab.backupd_snapshots() == {}


def test_a_transient_503_on_a_disk_read_is_retried_and_the_session_succeeds(vlab: VsphereLab) -> None:
    vlab.sim.http_503(times=2)

    doc = vlab.lab.start_wait("nightly", rc=EXIT_SUCCESS)

    assert doc["result"] == "success"
    assert vlab.sim.state()["http_503"] == 0, "the 503s were met"
    assert "503" in str(doc), "the retry is in the session log"
    for vm in VMS:
        assert vlab.restore_image(vm).read_bytes() == vlab.images[vm].read_bytes()


def test_an_expired_session_logs_in_again_and_the_session_succeeds(vlab: VsphereLab) -> None:
    lab = vlab.lab
    vlab.sim.slow_snapshots(2)
    session = lab.start("nightly")
    _wait_creating(vlab, "db-01")
    assert vlab.sim.expire_sessions() >= 1  # while backupd waits for the snapshot task

    doc = lab.wait_stopped(session, timeout=90)

    assert doc["result"] == "success", json.dumps(doc, indent=1)
    assert all(vm["status"] == "success" for vm in doc["vms"])
    wait_until(lambda: vlab.backupd_snapshots() == {}, timeout=30, what="no backupd snapshot left")


def test_a_permanent_snapshot_fault_fails_only_its_vm(vlab: VsphereLab) -> None:
    vlab.sim.fault("CreateSnapshot_Task", "db-01", "SnapshotFault", times=100)

    doc = vlab.lab.start_wait("nightly", rc=EXIT_FAILED)

    vms = vms_by_name(doc)
    assert doc["result"] == "failed"
    assert vms["db-01"]["status"] == "failed" and "SnapshotFault" in (vms["db-01"]["error"] or "") + str(doc)
    assert vms["web-01"]["status"] == "success" and vms["web-01"]["restore_point"] is not None
    assert vlab.backupd_snapshots() == {}
    assert e2fsck_clean(vlab.restore_image("web-01"))[0]
