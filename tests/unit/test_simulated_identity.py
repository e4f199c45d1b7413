"""The simulated hypervisor's part of VM identity and full-VM restore: configurations captured
by snapshots, renames that keep the id, VMs created from streams all or nothing."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from providers.base import DiskConfig, ProviderError, VmConfig, VmExists, VmNotFound
from providers.simulated import SimulatedProvider
from test_simulated import MiB, MakeProvider, make_provider, state_dir  # noqa: F401 (fixtures)

WEB = {"name": "web", "disks": ["4 MiB", "2 MiB"], "guest_os": "ubuntu64Guest", "cpus": 4, "memory": "8 GiB",
       "firmware": "efi", "disk_controller": "lsilogic-sas", "thin_disks": False,
       "nics": [{"network": "prod"}, {"network": "backup", "adapter_type": "e1000e"}]}


def streams(config: VmConfig, seed: int = 0) -> dict[int, io.BytesIO]:
    return {d.key: io.BytesIO(bytes([seed + n]) * d.capacity_bytes) for n, d in enumerate(config.disks)}


def test_a_snapshot_captures_the_configuration_of_its_moment(make_provider: MakeProvider) -> None:
    sim = make_provider([WEB])
    snapshot = sim.create_snapshot(sim.find_vm("web"), name="s", description="", quiesce=False)
    config = sim.vm_config(snapshot)

    assert (config.name, config.guest_os, config.cpus, config.memory_bytes, config.firmware) == (
        "web", "ubuntu64Guest", 4, 8 << 30, "efi")
    assert [(d.key, d.controller, d.controller_model, d.bus_number, d.unit_number, d.capacity_bytes, d.thin)
            for d in config.disks] == [(2000, "scsi", "lsilogic-sas", 0, 0, 4 * MiB, False),
                                       (2001, "scsi", "lsilogic-sas", 0, 1, 2 * MiB, False)]
    assert [(n.label, n.network, n.adapter_type) for n in config.nics] == [
        ("Network adapter 1", "prod", "vmxnet3"), ("Network adapter 2", "backup", "e1000e")]
    changed = make_provider([{**WEB, "cpus": 8}])
    assert changed.vm_config(snapshot).cpus == 4, "the snapshot keeps what it captured"


def test_scsi_disks_skip_unit_7_and_fill_the_next_bus(make_provider: MakeProvider) -> None:
    sim = make_provider([{"name": "big", "disks": ["1 MiB"] * 17}])
    snapshot = sim.create_snapshot(sim.find_vm("big"), name="s", description="", quiesce=False)
    slots = [(d.bus_number, d.unit_number) for d in sim.vm_config(snapshot).disks]
    assert slots[6:8] == [(0, 6), (0, 8)] and slots[14:] == [(0, 15), (1, 0), (1, 1)]


def test_a_rename_keeps_id_disks_snapshots_and_cbt(make_provider: MakeProvider) -> None:
    sim = make_provider([WEB, {"name": "db", "disks": ["1 MiB"]}])
    before = sim.find_vm("web")
    snapshot = sim.create_snapshot(before, name="s", description="", quiesce=False)
    sim.write_data("web", offset=0, data=b"after the snapshot")

    after = sim.rename_vm("web", "www")

    assert (after.name, after.id, after.disks) == ("www", before.id, sim.find_vm("www").disks)
    assert sim.changed_areas(snapshot, after.disks[0], before.disks[0].change_id) == []
    assert [s.id for s in sim.list_snapshots(after)] == [snapshot.id]
    assert sim.vm_config(snapshot).name == "web"
    sim.remove_snapshot(snapshot)  # found although it records the old name
    assert sim.list_snapshots(after) == []
    sim.find_vm("db")  # made on first use: from then on its name is taken
    with pytest.raises(VmExists):
        sim.rename_vm("www", "db")
    with pytest.raises(VmNotFound):
        sim.rename_vm("nobody", "x")
    renamed_in_config = make_provider([{**WEB, "name": "www"}, {"name": "db", "disks": ["1 MiB"]}])
    assert renamed_in_config.find_vm("www").id == before.id
    assert [vm.name for vm in renamed_in_config.list_vms()] == ["db", "www"]


def test_a_created_vm_is_powered_off_listed_and_backs_up_like_any_other(make_provider: MakeProvider) -> None:
    sim = make_provider([WEB])
    config = sim.vm_config(sim.create_snapshot(sim.find_vm("web"), name="s", description="", quiesce=False))

    created = sim.create_vm(config, name="web-copy", datastore=None, disks=streams(config, seed=7))

    again = make_provider([WEB])  # another process sees it, though the config does not declare it
    assert again.find_vm("web-copy") == created and created.power_state == "poweredOff"
    assert created.id != sim.find_vm("web").id
    assert [(d.key, d.label, d.capacity_bytes) for d in created.disks] == [(2000, "Hard disk 1", 4 * MiB),
                                                                           (2001, "Hard disk 2", 2 * MiB)]
    assert again.disk_path("web-copy", 1).read_bytes() == bytes([8]) * 2 * MiB
    snapshot = again.create_snapshot(created, name="s", description="", quiesce=False)
    assert again.vm_config(snapshot) == VmConfig(**{**config.__dict__, "name": "web-copy"})
    with again.open_disk(snapshot, created.disks[0]) as reader:
        assert reader.read(0, 16) == bytes([7]) * 16


def test_create_vm_refuses_a_taken_or_declared_name_before_reading(make_provider: MakeProvider) -> None:
    sim = make_provider([WEB, {"name": "declared", "disks": ["1 MiB"]}])
    config = sim.vm_config(sim.create_snapshot(sim.find_vm("web"), name="s", description="", quiesce=False))
    for taken in ("web", "declared"):
        data = streams(config)
        with pytest.raises(VmExists, match=taken):
            sim.create_vm(config, name=taken, datastore=None, disks=data)
        assert all(stream.tell() == 0 for stream in data.values())


class _Interrupted(io.RawIOBase):
    """A stream that gives ``good`` bytes, then raises ``error`` (a Ctrl-C, a damaged block)."""

    def __init__(self, good: int, error: BaseException) -> None:
        self.good, self.error = good, error

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:  # noqa: ANN001
        if self.good <= 0:
            raise self.error
        count = min(len(target), self.good)
        target[:count] = bytes(count)
        self.good -= count
        return count


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("damaged block")], ids=["ctrl-c", "error"])
def test_a_creation_that_fails_midway_leaves_nothing(make_provider: MakeProvider, state_dir: Path,
                                                     error: BaseException) -> None:
    sim = make_provider([WEB])
    config = sim.vm_config(sim.create_snapshot(sim.find_vm("web"), name="s", description="", quiesce=False))
    disks = {2000: io.BytesIO(bytes(4 * MiB)), 2001: _Interrupted(MiB, error)}

    with pytest.raises(type(error)):
        sim.create_vm(config, name="half", datastore=None, disks=disks)

    assert [vm.name for vm in make_provider([WEB]).list_vms()] == ["web"]
    assert sorted(os.listdir(state_dir / "vms")) == ["vm-1"]


def test_a_short_stream_or_a_missing_disk_is_an_error_and_leaves_nothing(make_provider: MakeProvider) -> None:
    sim = make_provider([WEB])
    config = sim.vm_config(sim.create_snapshot(sim.find_vm("web"), name="s", description="", quiesce=False))
    with pytest.raises(ProviderError, match="ended after 1024 of"):
        sim.create_vm(config, name="short", datastore=None, disks={2000: io.BytesIO(bytes(4 * MiB)),
                                                                  2001: io.BytesIO(bytes(1024))})
    with pytest.raises(ProviderError, match=r"no data given for disk\(s\) \[2001\]"):
        sim.create_vm(config, name="short", datastore=None, disks={2000: io.BytesIO(bytes(4 * MiB))})
    assert [vm.name for vm in sim.list_vms()] == ["web"]


def test_a_creation_left_by_a_dead_process_is_swept(make_provider: MakeProvider, state_dir: Path) -> None:
    sim = make_provider([WEB])
    leftover = state_dir / "vms" / ".vm-9.creating"
    leftover.mkdir()
    (leftover / "create.lock").touch()
    (leftover / "disk-2000.img").write_bytes(b"half")
    config = VmConfig(name="x", guest_os="g", cpus=1, memory_bytes=1 << 30, firmware="bios", nics=(), disks=(
        DiskConfig(key=1, label="Hard disk 1", controller="sata", controller_model="ahci", bus_number=0,
                   unit_number=0, capacity_bytes=4096, thin=True),))

    sim.create_vm(config, name="x", datastore=None, disks={1: io.BytesIO(bytes(4096))})

    assert not leftover.exists()
    assert isinstance(sim, SimulatedProvider) and sim.find_vm("x").disks[0].capacity_bytes == 4096
