"""The vSphere simulator rig itself (contrib/vcsim through tests/vsphere_sim.py), driven with
pyVmomi directly: what the vSphere provider relies on works as on vCenter."""

from __future__ import annotations

import http.client
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pyVim.connect import Connect, Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

MiB = 1024 * 1024
CHUNK = 64 * 1024  # the launcher's change tracking granularity


def make_image(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    """A sparse image of ``size`` bytes with ``writes`` (offset -> data) in it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path


def connect(sim):
    kwargs = {"host": sim.host, "port": sim.port, "user": sim.user, "pwd": sim.password, "protocol": sim.protocol}
    if sim.tls:
        kwargs["sslContext"] = sim.ssl_context()
    return SmartConnect(**kwargs)


def find_vm(si, name: str, folder: str | None = None) -> vim.VirtualMachine:
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        matches = [vm for vm in view.view if vm.name == name and (folder is None or vm.parent.name == folder)]
    finally:
        view.Destroy()
    assert len(matches) == 1, f"{len(matches)} VMs named {name}"
    return matches[0]


def snapshot(vm, name: str, quiesce: bool = False) -> vim.vm.Snapshot:
    task = vm.CreateSnapshot_Task(name=name, description=f"test {name}", memory=False, quiesce=quiesce)
    WaitForTask(task)
    return task.info.result


def disks_of(config) -> list[vim.vm.device.VirtualDisk]:
    return [d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def changed_areas(vm, snap, key: int, change_id: str, capacity: int) -> tuple[list[tuple[int, int]], int]:
    """Every area QueryChangedDiskAreas reports from 0 to capacity, and how many calls it took."""
    areas, offset, calls = [], 0, 0
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset, changeId=change_id)
        assert info.startOffset == offset and info.length > 0
        areas += [(a.start, a.length) for a in info.changedArea]
        offset += info.length
        calls += 1
    return areas, calls


@pytest.fixture
def image(tmp_path: Path) -> Path:
    # data in chunks 1 and 40 (of 64 KiB), the rest never written (sparse, zero)
    return make_image(tmp_path / "web-01.img", 8 * MiB, {CHUNK: b"a" * 100, 40 * CHUNK + 10: b"b" * CHUNK})


@pytest.fixture
def sim(vcsim_factory, image: Path):
    spec = {"vms": [
        {"name": "web-01", "folder": "prod", "guest_id": "ubuntu64Guest", "cpus": 2, "memory_mib": 2048,
         "firmware": "efi", "cbt": True, "nics": [{"network": "VM Network", "adapter": "vmxnet3"}],
         "disks": [{"image": str(image), "thin": True, "controller": "pvscsi"},
                   {"capacity_bytes": 2 * MiB, "thin": False, "controller": "lsilogic"}]},
        {"name": "web-01", "folder": "test"},
        {"name": "db-01", "disks": [{"capacity_bytes": MiB}]},
    ]}
    # 1 MiB windows: an 8 MiB disk takes 8 answers, as vCenter answers in pieces
    return vcsim_factory(spec, extra_args=("-cbt-window", str(MiB)))


@pytest.fixture
def si(sim):
    si = connect(sim)
    yield si
    try:
        Disconnect(si)
    except Exception:  # noqa: BLE001 - a test may have expired the session
        pass


def test_inventory_is_the_spec(sim, si):
    web = find_vm(si, "web-01", "prod")
    assert web.config.guestId == "ubuntu64Guest"
    assert (web.config.hardware.numCPU, web.config.hardware.memoryMB, web.config.firmware) == (2, 2048, "efi")
    assert web.config.changeTrackingEnabled is True
    disks = disks_of(web.config)
    assert [d.backing.fileName for d in disks] == ["[LocalDS_0] prod/web-01/web-01.vmdk", "[LocalDS_0] prod/web-01/web-01_1.vmdk"]
    assert [d.capacityInBytes for d in disks] == [8 * MiB, 2 * MiB]
    assert [d.backing.thinProvisioned for d in disks] == [True, False]
    controllers = {d.key: type(d) for d in web.config.hardware.device if isinstance(d, vim.vm.device.VirtualController)}
    assert controllers[disks[0].controllerKey] is vim.vm.device.ParaVirtualSCSIController
    assert controllers[disks[1].controllerKey] is vim.vm.device.VirtualLsiLogicController
    nics = [d for d in web.config.hardware.device if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    assert [(type(n), n.backing.deviceName) for n in nics] == [(vim.vm.device.VirtualVmxnet3, "VM Network")]
    # the same name in two folders; each VM a stable instanceUuid of its own
    paths = sorted(vm["path"] for vm in sim.state()["vms"])
    assert paths == ["DC0/vm/db-01", "DC0/vm/prod/web-01", "DC0/vm/test/web-01"]
    assert web.config.instanceUuid == sim.vm_state("DC0/vm/prod/web-01")["instance_uuid"]
    assert len({vm["instance_uuid"] for vm in sim.state()["vms"]}) == 3
    found = si.RetrieveContent().searchIndex.FindByInventoryPath("DC0/vm/prod/web-01")
    assert found == web


def test_snapshots_with_wait_for_task_and_no_snapshot_reads_none(sim, si, image: Path):
    vm = find_vm(si, "db-01")
    assert vm.snapshot is None  # the simulator alone drops the connection here
    first = snapshot(vm, "backupd-job-1", quiesce=True)
    second = snapshot(vm, "backupd-job-2")
    assert vm.snapshot.currentSnapshot == second
    assert [s["name"] for s in sim.vm_state("db-01")["snapshots"]] == ["backupd-job-1", "backupd-job-2"]
    assert first.config.hardware.memoryMB == vm.config.hardware.memoryMB
    WaitForTask(first.RemoveSnapshot_Task(removeChildren=False))  # TypeError with the simulator alone
    WaitForTask(second.RemoveSnapshot_Task(removeChildren=False))
    assert vm.snapshot is None
    files = {f["path"] for f in sim.state()["files"]}
    assert {"db-01/db-01.vmdk", "db-01/db-01-flat.vmdk"} <= files  # removal never deletes disks
    assert not any(p.endswith(".vmsn") for p in files)
    with pytest.raises(vmodl.fault.ManagedObjectNotFound):
        WaitForTask(first.RemoveSnapshot_Task(removeChildren=False))


def test_removing_many_snapshots_keeps_the_disks(sim, si, image: Path):
    vm = find_vm(si, "web-01", "prod")
    snaps = [snapshot(vm, f"s{i}") for i in range(4)]
    for snap in [snaps[1], snaps[0], snaps[3], snaps[2]]:
        WaitForTask(snap.RemoveSnapshot_Task(removeChildren=False))
    files = {f["path"]: f["size"] for f in sim.state()["files"]}
    assert files["prod/web-01/web-01-flat.vmdk"] == 8 * MiB
    assert files["prod/web-01/web-01_1-flat.vmdk"] == 2 * MiB
    assert image.stat().st_size == 8 * MiB


def test_cbt_change_ids_and_changed_areas_in_pieces(sim, si, image: Path):
    vm = find_vm(si, "web-01", "prod")
    first = snapshot(vm, "full")
    disk = disks_of(first.config)[0]
    change_id = disk.backing.changeId
    assert change_id and change_id.endswith("/1") and len(change_id.split("/")[0].split()) == 15
    assert disk.backing.fileName == "[LocalDS_0] prod/web-01/web-01.vmdk"  # the base disk: no delta disks

    allocated, calls = changed_areas(vm, first, disk.key, "*", disk.capacityInBytes)
    assert calls == 8
    assert allocated == [(CHUNK, CHUNK), (40 * CHUNK, 2 * CHUNK)]

    # a guest write: two whole chunks in two windows, and one byte
    with open(image, "r+b") as f:
        for offset, data in {3 * CHUNK: b"x" * 2 * CHUNK, 100 * CHUNK: b"y"}.items():
            f.seek(offset)
            f.write(data)
    second = snapshot(vm, "incremental")
    disk2 = disks_of(second.config)[0]
    assert disk2.backing.changeId.endswith("/2") and disk2.backing.changeId.split("/")[0] == change_id.split("/")[0]
    changed, _ = changed_areas(vm, second, disk.key, change_id, disk.capacityInBytes)
    assert changed == [(3 * CHUNK, 2 * CHUNK), (100 * CHUNK, CHUNK)]
    # nothing changed since the second snapshot's own changeId
    assert changed_areas(vm, second, disk.key, disk2.backing.changeId, disk.capacityInBytes)[0] == []


def test_changed_areas_cap_extents_per_answer(vcsim_factory, tmp_path: Path):
    image = make_image(tmp_path / "striped.img", 4 * MiB, {i * 2 * CHUNK: b"z" for i in range(32)})
    sim = vcsim_factory({"vms": [{"name": "striped", "cbt": True, "disks": [{"image": str(image)}]}]},
                        extra_args=("-cbt-max-extents", "5"))
    si = connect(sim)
    vm = find_vm(si, "striped")
    snap = snapshot(vm, "full")
    key = disks_of(snap.config)[0].key
    first = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=0, changeId="*")
    assert len(first.changedArea) == 5 and first.length == 10 * CHUNK
    areas, calls = changed_areas(vm, snap, key, "*", 4 * MiB)
    assert areas == [(i * 2 * CHUNK, CHUNK) for i in range(32)] and calls == 7


def test_cbt_reset_and_cbt_off_invalidate_change_ids(sim, si):
    vm = find_vm(si, "web-01", "prod")
    first = snapshot(vm, "one")
    disk = disks_of(first.config)[0]
    sim.cbt_reset("DC0/vm/prod/web-01")
    second = snapshot(vm, "two")
    new_id = disks_of(second.config)[0].backing.changeId
    assert new_id.endswith("/1") and new_id.split("/")[0] != disk.backing.changeId.split("/")[0]
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=second, deviceKey=disk.key, startOffset=0, changeId=disk.backing.changeId)
    # "*" still answers for the new tracking
    assert vm.QueryChangedDiskAreas(snapshot=second, deviceKey=disk.key, startOffset=0, changeId="*").length > 0

    # CBT off: no changeId at the next snapshot; on again: takes effect at the next snapshot
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=False)))
    third = snapshot(vm, "three")
    assert not disks_of(third.config)[0].backing.changeId
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=third, deviceKey=disk.key, startOffset=0, changeId="*")
    WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    fourth = snapshot(vm, "four")
    assert disks_of(fourth.config)[0].backing.changeId.endswith("/1")
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=fourth, deviceKey=disk.key, startOffset=0, changeId=new_id)


@pytest.mark.parametrize("fault", ["ApplicationQuiesceFault", "ToolsUnavailable", "TaskInProgress",
                                   "HostCommunication", "FileFault", "InvalidState", "SnapshotFault"])
def test_task_faults_fail_the_task_n_times(sim, si, fault: str):
    vm = find_vm(si, "db-01")
    sim.fault("CreateSnapshot_Task", "db-01", fault, times=2)
    expected = getattr(vim.fault, fault, None) or getattr(vmodl.fault, fault)  # HostCommunication is vmodl's
    for _ in range(2):
        with pytest.raises(expected):
            snapshot(vm, "backupd-quiesced", quiesce=True)
    assert vm.snapshot is None  # a failed creation leaves no snapshot
    snapshot(vm, "backupd-quiesced", quiesce=True)  # the third call works
    assert [s["name"] for s in sim.vm_state("db-01")["snapshots"]] == ["backupd-quiesced"]


def test_faults_on_remove_snapshot_and_on_a_non_task_method(sim, si):
    vm = find_vm(si, "web-01", "prod")
    snap = snapshot(vm, "s")
    key = disks_of(snap.config)[0].key
    sim.fault("RemoveSnapshot_Task", "DC0/vm/prod/web-01", "TaskInProgress")
    with pytest.raises(vim.fault.TaskInProgress):
        WaitForTask(snap.RemoveSnapshot_Task(removeChildren=False))
    sim.fault("QueryChangedDiskAreas", "DC0/vm/prod/web-01", "FileFault")
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=0, changeId="*")
    vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=0, changeId="*")
    WaitForTask(snap.RemoveSnapshot_Task(removeChildren=False))
    # a fault on one VM leaves the other of the same name alone
    sim.fault("CreateSnapshot_Task", "DC0/vm/test/web-01", "SnapshotFault")
    snapshot(vm, "other VM unaffected")


def test_slow_snapshot_can_be_cancelled_or_waited(sim, si):
    vm = find_vm(si, "db-01")
    sim.slow_snapshots(30)
    task = vm.CreateSnapshot_Task(name="slow", description="", memory=False, quiesce=False)
    assert task.info.state == "running" and vm.snapshot is None
    task.CancelTask()
    with pytest.raises(vmodl.fault.RequestCanceled):
        WaitForTask(task)
    assert vm.snapshot is None
    sim.slow_snapshots(0.5)
    task = vm.CreateSnapshot_Task(name="slow", description="", memory=False, quiesce=False)
    WaitForTask(task)
    assert vm.snapshot.currentSnapshot == task.info.result


def test_session_expiry_gives_not_authenticated_and_relogin_works(sim, si):
    vm = find_vm(si, "db-01")
    assert sim.expire_sessions() >= 1
    with pytest.raises(vim.fault.NotAuthenticated):
        vm.name  # noqa: B018 - a property read is a call
    with pytest.raises(vim.fault.NotAuthenticated):
        vm.CreateSnapshot_Task(name="x", description="", memory=False, quiesce=False)
    again = connect(sim)
    assert find_vm(again, "db-01").name == "db-01"
    Disconnect(again)


def test_rename_keeps_the_instance_uuid(sim, si):
    vm = find_vm(si, "db-01")
    before = vm.config.instanceUuid
    sim.rename("db-01", "db-01-renamed")
    assert vm.name == "db-01-renamed" and vm.config.instanceUuid == before


def read_folder(sim, path: str, headers: dict[str, str] | None = None):
    request = urllib.request.Request(sim.folder_url(path), headers=headers or {})
    with urllib.request.urlopen(request, timeout=30, context=sim.ssl_context()) as response:
        return response.status, response.read()


def test_range_get_of_the_flat_file_and_503(sim, image: Path):
    status, data = read_folder(sim, "prod/web-01/web-01-flat.vmdk", {"Range": f"bytes={40 * CHUNK}-{41 * CHUNK + 99}"})
    assert status == 206 and data == image.read_bytes()[40 * CHUNK:41 * CHUNK + 100]
    sim.http_503(times=2)
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as raised:
            read_folder(sim, "prod/web-01/web-01.vmdk")
        assert raised.value.code == 503
    status, descriptor = read_folder(sim, "prod/web-01/web-01.vmdk")
    assert status == 200 and b'RW 16384 VMFS "web-01-flat.vmdk"' in descriptor


def put_file(sim, path: str, data: bytes) -> int:
    connection = http.client.HTTPConnection(sim.host, sim.port, timeout=30)
    connection.request("PUT", sim.folder_url(path).split(f":{sim.port}", 1)[1], body=data)
    status = connection.getresponse().status
    connection.close()
    return status


def test_upload_then_create_vm_reads_back_the_bytes_and_destroy(sim, si):
    data = bytes(range(256)) * 4096  # 1 MiB
    descriptor = (f'# Disk DescriptorFile\nversion=1\ncreateType="vmfs"\nRW {len(data) // 512} VMFS '
                  f'"restored-flat.vmdk"\n').encode()
    assert put_file(sim, "restored/restored.vmdk", descriptor) in (200, 201)
    assert put_file(sim, "restored/restored-flat.vmdk", data) in (200, 201)

    content = si.RetrieveContent()
    datacenter = content.rootFolder.childEntity[0]
    pool = datacenter.hostFolder.childEntity[0].resourcePool
    controller = vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.ParaVirtualSCSIController(
        key=-100, busNumber=0, sharedBus="noSharing"))
    disk = vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.VirtualDisk(
        key=-101, controllerKey=-100, unitNumber=0, capacityInKB=len(data) // 1024,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName="[LocalDS_0] restored/restored.vmdk", diskMode="persistent", thinProvisioned=True)))
    spec = vim.vm.ConfigSpec(name="restored", guestId="otherGuest64", numCPUs=1, memoryMB=256,
                             files=vim.vm.FileInfo(vmPathName="[LocalDS_0] restored/restored.vmx"),
                             deviceChange=[controller, disk])
    task = datacenter.vmFolder.CreateVM_Task(config=spec, pool=pool)
    WaitForTask(task)
    vm = task.info.result
    [attached] = disks_of(vm.config)
    assert attached.backing.fileName == "[LocalDS_0] restored/restored.vmdk"
    assert read_folder(sim, "restored/restored-flat.vmdk")[1] == data
    # the restored VM takes snapshots like the others
    snap = snapshot(vm, "after restore")
    WaitForTask(snap.RemoveSnapshot_Task(removeChildren=False))

    WaitForTask(vm.Destroy_Task())
    assert all(v["name"] != "restored" for v in sim.state()["vms"])
    # and files go by DeleteDatastoreFile_Task or HTTP DELETE
    assert put_file(sim, "leftover/a.bin", b"1") in (200, 201)
    WaitForTask(content.fileManager.DeleteDatastoreFile_Task(name="[LocalDS_0] leftover/a.bin", datacenter=datacenter))
    assert put_file(sim, "leftover/b.bin", b"2") in (200, 201)
    connection = http.client.HTTPConnection(sim.host, sim.port, timeout=30)
    connection.request("DELETE", sim.folder_url("leftover/b.bin").split(f":{sim.port}", 1)[1])
    assert connection.getresponse().status == 204
    connection.close()
    assert not [f for f in sim.state()["files"] if f["path"].startswith(("leftover/a", "leftover/b", "restored/"))]


def test_https_with_the_thumbprint(vcsim_factory, image: Path):
    sim = vcsim_factory({"vms": [{"name": "web-01", "disks": [{"image": str(image)}]}]}, tls=True)
    assert sim.url.startswith("https://") and len(sim.thumbprint.split(":")) == 32
    # pyVmomi checks a pinned thumbprint (lower-case hex) when the certificate does not verify;
    # SmartConnect's version discovery ignores the pin, Connect has none
    pin = sim.thumbprint.replace(":", "").lower()
    si = Connect(host=sim.host, port=sim.port, user=sim.user, pwd=sim.password,
                 sslContext=ssl.create_default_context(), thumbprint=pin)
    assert find_vm(si, "web-01").name == "web-01"
    Disconnect(si)
    with pytest.raises(vim.fault.HostConnectFault, match="thumbprint mismatch"):
        Connect(host=sim.host, port=sim.port, user=sim.user, pwd=sim.password,
                sslContext=ssl.create_default_context(), thumbprint="ab" * 32)
    # the certificate file verifies as a CA (names 127.0.0.1 and localhost)
    si = SmartConnect(host=sim.host, port=sim.port, user=sim.user, pwd=sim.password, sslContext=sim.ssl_context())
    assert find_vm(si, "web-01").name == "web-01"
    Disconnect(si)
    status, data = read_folder(sim, "web-01/web-01-flat.vmdk", {"Range": "bytes=65536-65635"})
    assert status == 206 and data == b"a" * 100


def test_missing_packages_skip_locally_and_fail_in_ci(monkeypatch):
    import vsphere_fixtures

    reason = "vSphere simulator unavailable: missing go (Debian package golang-go)"
    monkeypatch.setattr(vsphere_fixtures, "unavailable_reason", lambda: reason)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="golang-go"):
        vsphere_fixtures.require_vcsim()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run"):
        vsphere_fixtures.require_vcsim()
