"""The vSphere provider against the vCenter simulator (the project's launcher, fixture ``vcsim``
of ``tests/vsphere_fixtures.py``): inventory, snapshots, configuration, full-VM restore, a
renamed VM, an expired session.

Skipped where the simulator rig is missing (no ``tests/vsphere_sim.py`` yet, or no Go /
govmomi source), failed under ``CI``.
"""

from __future__ import annotations

import io
import os
from urllib.parse import urlparse

import pytest

try:
    import vsphere_fixtures  # noqa: F401 - provides the ``vcsim`` fixture
except ImportError:  # the launcher is not merged here yet
    if os.environ.get("CI"):
        raise
    pytest.skip("the vCenter simulator rig (tests/vsphere_fixtures.py) is not here", allow_module_level=True)

from providers.base import QuiesceError, SnapshotError, VmExists, VmInfo, VmNotFound  # noqa: E402
from providers.vsphere import VsphereProvider  # noqa: E402
from providers.vsphere.config import VsphereProviderConfig  # noqa: E402

pytestmark = pytest.mark.vsphere


@pytest.fixture
def provider(vcsim, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201 - the rig's object
    monkeypatch.setenv("BACKUPD_TEST_VC_PASSWORD", vcsim.password)
    url = urlparse(vcsim.url)
    values = {
        "type": "vsphere", "host": url.hostname, "port": url.port or (443 if url.scheme == "https" else 80),
        "user": vcsim.user, "password_env": "BACKUPD_TEST_VC_PASSWORD", "protocol": url.scheme,
    }
    if url.scheme == "https":
        values["thumbprint"] = vcsim.thumbprint
    made = VsphereProvider("vc", VsphereProviderConfig.model_validate(values))
    yield made
    made.close()


@pytest.fixture
def vm(provider: VsphereProvider) -> VmInfo:
    return provider.list_vms()[0]


def test_every_listed_vm_is_found_by_name_and_by_inventory_path(provider: VsphereProvider, vcsim) -> None:  # noqa: ANN001
    from providers.vsphere import _inventory
    from providers.vsphere._errors import Operation

    records = provider.connection.call(Operation("test"), lambda content: _inventory.scan(content, None))
    assert records
    for record in records:
        assert record.path.startswith(f"{record.datacenter}/vm/")
        assert provider.find_vm(record.path).id == record.info.id
    with pytest.raises(VmNotFound):
        provider.find_vm(f"{vcsim.datacenter}/vm/no-such-vm")


def test_a_snapshot_is_listed_described_found_by_id_and_removed_idempotently(provider: VsphereProvider, vm: VmInfo) -> None:
    snapshot = provider.create_snapshot(vm, name="backupd-live-1", description="session 1", quiesce=False)

    assert snapshot in provider.list_snapshots(vm)
    assert provider.find_snapshot(snapshot.id) == snapshot
    assert [disk.key for disk in provider.disks(snapshot)] == [disk.key for disk in vm.disks]
    config = provider.vm_config(snapshot)
    assert config.name == vm.name and [d.key for d in config.disks] == [d.key for d in vm.disks]
    provider.remove_snapshot(snapshot)
    provider.remove_snapshot(snapshot)
    assert snapshot not in provider.list_snapshots(vm)
    with pytest.raises(SnapshotError):
        provider.disks(snapshot)


def test_a_renamed_vm_keeps_its_id_and_its_snapshots(provider: VsphereProvider, vm: VmInfo, vcsim) -> None:  # noqa: ANN001
    vcsim.rename(vm.name, f"{vm.name}-renamed")

    renamed = provider.find_vm(f"{vm.name}-renamed")

    assert renamed.id == vm.id
    snapshot = provider.create_snapshot(vm, name="backupd-live-2", description="after rename", quiesce=False)
    assert snapshot.vm_name == renamed.name
    provider.remove_snapshot(snapshot)


def test_an_expired_session_logs_in_again(provider: VsphereProvider, vm: VmInfo, vcsim) -> None:  # noqa: ANN001
    provider.list_vms()
    vcsim.expire_sessions()

    assert provider.find_vm(vm.name).id == vm.id


def test_a_quiesce_fault_is_a_quiesce_error_and_leaves_no_snapshot(provider: VsphereProvider, vm: VmInfo, vcsim) -> None:  # noqa: ANN001
    vcsim.fault(vm.name, "CreateSnapshot_Task", "ApplicationQuiesceFault", times=1)

    with pytest.raises(QuiesceError):
        provider.create_snapshot(vm, name="backupd-live-3", description="quiesce", quiesce=True)

    assert [s for s in provider.list_snapshots(vm) if s.name == "backupd-live-3"] == []


def test_a_restored_vm_has_the_captured_configuration_and_a_taken_name_is_refused(provider: VsphereProvider, vm: VmInfo, vcsim) -> None:  # noqa: ANN001
    snapshot = provider.create_snapshot(vm, name="backupd-live-4", description="restore", quiesce=False)
    config = provider.vm_config(snapshot)
    provider.remove_snapshot(snapshot)
    data = {disk.key: bytes([disk.key % 251]) * disk.capacity_bytes for disk in config.disks}

    restored = provider.create_vm(
        config, name=f"{vm.name}-restored", datastore=vcsim.datastore,
        disks={key: io.BytesIO(payload) for key, payload in data.items()},
    )

    assert restored.name == f"{vm.name}-restored" and restored.id != vm.id
    assert restored.power_state == "poweredOff"
    assert [d.capacity_bytes for d in restored.disks] == [d.capacity_bytes for d in config.disks]
    again = provider.create_snapshot(restored, name="backupd-live-5", description="read back", quiesce=False)
    for disk, captured in zip(provider.disks(again), config.disks, strict=True):
        with provider.open_disk(again, disk) as reader:
            assert reader.read(0, disk.capacity_bytes) == data[captured.key]
    provider.remove_snapshot(again)
    with pytest.raises(VmExists):
        provider.create_vm(config, name=vm.name, datastore=vcsim.datastore, disks={k: io.BytesIO(v) for k, v in data.items()})
