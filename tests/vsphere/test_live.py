"""The vSphere provider against the vCenter simulator (the project's launcher, through the
``vcsim_factory`` fixture of ``tests/vsphere_fixtures.py``): inventory, snapshots,
configuration, full-VM restore, a renamed VM, an expired session, CBT through
``QueryChangedDiskAreas`` in pieces, disk reads over the datastore endpoint (a 503 included),
faults, and TLS (pinned thumbprint, CA file, a wrong pin).

Skipped where Go or the govmomi source is missing, failed under ``CI``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from providers.base import (
    CbtUnavailable,
    Extent,
    ProviderError,
    QuiesceError,
    SnapshotError,
    TransientProviderError,
    VmExists,
    VmInfo,
    VmNotFound,
)
from providers.vsphere import VsphereProvider
from providers.vsphere.config import VsphereProviderConfig
from vsphere_sim import Vcsim

pytestmark = pytest.mark.vsphere

MiB = 1 << 20
CHUNK = 64 << 10  # the launcher's change tracking granularity
PASSWORD_ENV = "BACKUPD_TEST_VC_PASSWORD"
IMAGE_SIZE = 8 * MiB
#: data in the image at the start: offset → bytes (the rest is a hole)
IMAGE_DATA = {100: b"boot" * 1000, 3 * MiB + 7: os.urandom(200_000)}


def write_at(path: Path, offset: int, data: bytes) -> None:
    """A guest write: the launcher's disk is a symbolic link to this image file."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "web-01.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    for offset, data in IMAGE_DATA.items():
        write_at(path, offset, data)
    return path


def spec(image: Path) -> dict:
    return {"vms": [
        {"name": "web-01", "folder": "prod", "cbt": True, "guest_id": "ubuntu64Guest", "cpus": 2, "memory_mib": 1024,
         "disks": [{"image": str(image)}, {"capacity_bytes": MiB, "controller": "lsilogic"}],
         "nics": [{"network": "VM Network"}]},
        {"name": "legacy", "cbt": False, "disks": [{"capacity_bytes": 2 * MiB}]},
    ]}


MakeProvider = Callable[..., VsphereProvider]


@pytest.fixture
def make_provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeProvider]:
    """``make(sim, trust="thumbprint", **overrides)`` → a provider on ``sim``; closed after."""
    made: list[VsphereProvider] = []

    def make(sim: Vcsim, trust: str = "thumbprint", **overrides: object) -> VsphereProvider:
        monkeypatch.setenv(PASSWORD_ENV, sim.password)
        values = {**sim.provider_values(PASSWORD_ENV, trust=trust), **overrides}
        provider = VsphereProvider("vc", VsphereProviderConfig.model_validate(values))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


@pytest.fixture
def vcsim(vcsim_factory, image: Path) -> Vcsim:  # noqa: ANN001 - the rig's factory
    # 1 MiB per QueryChangedDiskAreas answer: an 8 MiB disk takes 8 calls
    return vcsim_factory(spec(image), extra_args=("-cbt-window", str(MiB)))


@pytest.fixture
def provider(vcsim: Vcsim, make_provider: MakeProvider) -> VsphereProvider:
    return make_provider(vcsim)


@pytest.fixture
def vm(provider: VsphereProvider) -> VmInfo:
    return provider.find_vm("web-01")


def test_every_listed_vm_is_found_by_name_and_by_inventory_path(provider: VsphereProvider, vcsim: Vcsim) -> None:
    from providers.vsphere import _inventory
    from providers.vsphere._errors import Operation

    records = provider.connection.call(Operation("test"), lambda content: _inventory.scan(content, None))
    assert sorted(record.info.name for record in records) == ["legacy", "web-01"]
    for record in records:
        assert record.path.startswith(f"{record.datacenter}/vm/")
        assert provider.find_vm(record.path).id == record.info.id
    assert provider.find_vm(f"{vcsim.datacenter}/vm/prod/web-01").id == vcsim.vm_state("web-01")["instance_uuid"]
    with pytest.raises(VmNotFound):
        provider.find_vm(f"{vcsim.datacenter}/vm/no-such-vm")


def test_a_snapshot_is_listed_described_found_by_id_and_removed_idempotently(provider: VsphereProvider, vm: VmInfo) -> None:
    snapshot = provider.create_snapshot(vm, name="backupd-live-1", description="session 1", quiesce=False)

    assert snapshot in provider.list_snapshots(vm)
    assert provider.find_snapshot(snapshot.id) == snapshot
    assert [disk.key for disk in provider.disks(snapshot)] == [disk.key for disk in vm.disks]
    config = provider.vm_config(snapshot)
    assert (config.name, config.guest_os, config.cpus, config.memory_bytes) == (vm.name, "ubuntu64Guest", 2, 1024 * MiB)
    assert [d.key for d in config.disks] == [d.key for d in vm.disks]
    assert [d.capacity_bytes for d in config.disks] == [IMAGE_SIZE, MiB]
    assert [n.network for n in config.nics] == ["VM Network"]
    provider.remove_snapshot(snapshot)
    provider.remove_snapshot(snapshot)
    assert snapshot not in provider.list_snapshots(vm)
    with pytest.raises(SnapshotError):
        provider.disks(snapshot)


def test_a_renamed_vm_keeps_its_id_and_its_snapshots(provider: VsphereProvider, vm: VmInfo, vcsim: Vcsim) -> None:
    vcsim.rename(vm.name, f"{vm.name}-renamed")

    renamed = provider.find_vm(f"{vm.name}-renamed")

    assert renamed.id == vm.id
    snapshot = provider.create_snapshot(vm, name="backupd-live-2", description="after rename", quiesce=False)
    assert snapshot.vm_name == renamed.name  # found by id, named as it is now
    assert provider.list_snapshots(renamed) == [snapshot]
    provider.remove_snapshot(snapshot)


def test_an_expired_session_logs_in_again(provider: VsphereProvider, vm: VmInfo, vcsim: Vcsim) -> None:
    provider.list_snapshots(vm)
    assert vcsim.expire_sessions() >= 1

    # the VM's reference was cached with the old session: calls through it log in again too
    snapshot = provider.create_snapshot(vm, name="backupd-live-relogin", description="relogin", quiesce=False)
    assert provider.list_snapshots(vm) == [snapshot]
    vcsim.expire_sessions()
    assert provider.changed_areas(snapshot, provider.disks(snapshot)[0], "*")
    provider.remove_snapshot(snapshot)
    assert provider.find_vm(vm.name).id == vm.id


def test_a_quiesce_fault_is_a_quiesce_error_and_leaves_no_snapshot(provider: VsphereProvider, vm: VmInfo, vcsim: Vcsim) -> None:
    vcsim.fault("CreateSnapshot_Task", vm.name, "ApplicationQuiesceFault", times=1)

    with pytest.raises(QuiesceError):
        provider.create_snapshot(vm, name="backupd-live-3", description="quiesce", quiesce=True)

    assert provider.list_snapshots(vm) == []
    assert vcsim.vm_state(vm.name)["snapshots"] == []


def test_a_permanent_snapshot_fault_is_a_snapshot_error_not_retryable(provider: VsphereProvider, vm: VmInfo, vcsim: Vcsim) -> None:
    vcsim.fault("CreateSnapshot_Task", vm.name, "SnapshotFault", times=1000)

    with pytest.raises(SnapshotError) as raised:
        provider.create_snapshot(vm, name="backupd-live-6", description="fault", quiesce=False)

    assert not isinstance(raised.value, (TransientProviderError, QuiesceError))
    assert "backupd-live-6" in str(raised.value) and vm.name in str(raised.value)
    assert vcsim.vm_state(vm.name)["snapshots"] == []


def test_a_transient_fault_is_retryable_and_the_next_call_succeeds(provider: VsphereProvider, vm: VmInfo, vcsim: Vcsim) -> None:
    vcsim.fault("CreateSnapshot_Task", vm.name, "TaskInProgress", times=1)

    with pytest.raises(TransientProviderError):
        provider.create_snapshot(vm, name="backupd-live-7", description="busy", quiesce=False)
    snapshot = provider.create_snapshot(vm, name="backupd-live-7", description="busy", quiesce=False)

    assert provider.list_snapshots(vm) == [snapshot]
    provider.remove_snapshot(snapshot)


# -- disk data and CBT ----------------------------------------------------------------------------


def read_in_pieces(provider: VsphereProvider, snapshot, disk, extents: list[Extent], piece: int = 100_000) -> dict[int, bytes]:  # noqa: ANN001
    """offset → bytes of every extent, read in ``piece``-byte requests."""
    out = {}
    with provider.open_disk(snapshot, disk) as reader:
        for extent in extents:
            out[extent.offset] = b"".join(
                reader.read(offset, min(piece, extent.end - offset)) for offset in range(extent.offset, extent.end, piece)
            )
    return out


def test_a_whole_disk_reads_back_the_image(provider: VsphereProvider, vm: VmInfo, image: Path) -> None:
    snapshot = provider.create_snapshot(vm, name="backupd-live-8", description="read", quiesce=False)
    disk = provider.disks(snapshot)[0]

    data = read_in_pieces(provider, snapshot, disk, [Extent(0, disk.capacity_bytes)], piece=3 * MiB)

    assert data[0] == image.read_bytes()
    with provider.open_disk(snapshot, disk) as reader:
        assert reader.read(disk.capacity_bytes - 10, 100) == image.read_bytes()[-10:]
        assert reader.read(disk.capacity_bytes, 1) == b""
    provider.remove_snapshot(snapshot)


def test_an_http_503_on_a_disk_read_is_transient_and_a_retry_reads(provider: VsphereProvider, vm: VmInfo, vcsim: Vcsim, image: Path) -> None:
    snapshot = provider.create_snapshot(vm, name="backupd-live-9", description="503", quiesce=False)
    disk = provider.disks(snapshot)[0]
    with provider.open_disk(snapshot, disk) as reader:
        vcsim.http_503(times=1)

        with pytest.raises(TransientProviderError, match="503"):
            reader.read(0, 4096)
        assert reader.read(0, 4096) == image.read_bytes()[:4096]
    assert vcsim.state()["http_503"] == 0
    provider.remove_snapshot(snapshot)


def test_changed_areas_between_two_snapshots_cover_exactly_the_written_chunks(provider: VsphereProvider, vm: VmInfo, image: Path) -> None:
    first = provider.create_snapshot(vm, name="backupd-live-10", description="before", quiesce=False)
    before = provider.disks(first)[0]
    writes = {5 * CHUNK + 10: b"x" * 20, 20 * CHUNK - 3: b"y" * 6, 7 * MiB + 100: os.urandom(3 * CHUNK)}
    for offset, data in writes.items():
        write_at(image, offset, data)
    second = provider.create_snapshot(vm, name="backupd-live-11", description="after", quiesce=False)
    after = provider.disks(second)[0]

    changed = provider.changed_areas(second, after, before.change_id or "")

    chunks = sorted({c for offset, data in writes.items() for c in range(offset // CHUNK, (offset + len(data) - 1) // CHUNK + 1)})
    expected: list[Extent] = []
    for c in chunks:  # adjacent chunks merge
        if expected and expected[-1].end == c * CHUNK:
            expected[-1] = Extent(expected[-1].offset, expected[-1].length + CHUNK)
        else:
            expected.append(Extent(c * CHUNK, CHUNK))
    assert changed == expected
    content = image.read_bytes()
    for offset, data in read_in_pieces(provider, second, after, changed).items():
        assert data == content[offset : offset + len(data)]
    assert before.change_id != after.change_id
    for snapshot in (first, second):
        provider.remove_snapshot(snapshot)


def test_star_gives_the_allocated_areas_of_a_full_read(provider: VsphereProvider, vm: VmInfo, image: Path) -> None:
    snapshot = provider.create_snapshot(vm, name="backupd-live-12", description="full", quiesce=False)
    disk = provider.disks(snapshot)[0]

    in_use = provider.changed_areas(snapshot, disk, "*")

    content = image.read_bytes()
    for offset, data in IMAGE_DATA.items():
        assert any(e.offset <= offset and offset + len(data) <= e.end for e in in_use), offset
    covered = bytearray(len(content))
    for extent in in_use:
        covered[extent.offset : extent.end] = content[extent.offset : extent.end]
    assert bytes(covered) == content  # nothing outside the areas is non-zero
    assert sum(e.length for e in in_use) < IMAGE_SIZE // 4
    provider.remove_snapshot(snapshot)


def test_changed_areas_after_a_cbt_reset_are_cbt_unavailable(provider: VsphereProvider, vm: VmInfo, vcsim: Vcsim) -> None:
    first = provider.create_snapshot(vm, name="backupd-live-13", description="before", quiesce=False)
    before = provider.disks(first)[0]
    vcsim.cbt_reset(vm.name)
    second = provider.create_snapshot(vm, name="backupd-live-14", description="after", quiesce=False)
    after = provider.disks(second)[0]

    with pytest.raises(CbtUnavailable):
        provider.changed_areas(second, after, before.change_id or "")
    assert provider.changed_areas(second, after, "*")
    for snapshot in (first, second):
        provider.remove_snapshot(snapshot)


def test_enable_cbt_turns_tracking_on_from_the_next_snapshot(provider: VsphereProvider, vcsim: Vcsim) -> None:
    legacy = provider.find_vm("legacy")
    without = provider.create_snapshot(legacy, name="backupd-live-15", description="no cbt", quiesce=False)
    assert [d.change_id for d in provider.disks(without)] == [None]
    with pytest.raises(CbtUnavailable):
        provider.changed_areas(without, provider.disks(without)[0], "52 00/1")

    assert provider.enable_cbt(legacy) is True
    assert provider.enable_cbt(legacy) is False

    assert vcsim.vm_state("legacy")["cbt_enabled"] is True
    with_cbt = provider.create_snapshot(legacy, name="backupd-live-16", description="cbt", quiesce=False)
    disk = provider.disks(with_cbt)[0]
    assert disk.change_id
    assert provider.changed_areas(with_cbt, disk, disk.change_id) == []
    for snapshot in (without, with_cbt):
        provider.remove_snapshot(snapshot)


# -- full-VM restore ------------------------------------------------------------------------------


def test_a_restored_vm_has_the_captured_configuration_and_a_taken_name_is_refused(provider: VsphereProvider, vm: VmInfo, vcsim: Vcsim) -> None:
    snapshot = provider.create_snapshot(vm, name="backupd-live-4", description="restore", quiesce=False)
    config = provider.vm_config(snapshot)
    provider.remove_snapshot(snapshot)
    data = {disk.key: os.urandom(4096) * (disk.capacity_bytes // 4096) for disk in config.disks}

    restored = provider.create_vm(
        config, name=f"{vm.name}-restored", datastore=vcsim.datastore,
        disks={key: io.BytesIO(payload) for key, payload in data.items()},
    )

    assert restored.name == f"{vm.name}-restored" and restored.id != vm.id
    assert restored.power_state == "poweredOff"
    assert [d.capacity_bytes for d in restored.disks] == [d.capacity_bytes for d in config.disks]
    again = provider.create_snapshot(restored, name="backupd-live-5", description="read back", quiesce=False)
    assert provider.vm_config(again).guest_os == config.guest_os
    for disk, captured in zip(provider.disks(again), config.disks, strict=True):
        with provider.open_disk(again, disk) as reader:
            assert reader.read(0, disk.capacity_bytes) == data[captured.key]
    provider.remove_snapshot(again)
    files_before = {f["path"] for f in vcsim.state()["files"]}
    with pytest.raises(VmExists):
        provider.create_vm(config, name=vm.name, datastore=vcsim.datastore, disks={k: io.BytesIO(v) for k, v in data.items()})
    assert {f["path"] for f in vcsim.state()["files"]} == files_before


# -- TLS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trust", ["thumbprint", "ca_file"])
def test_https_with_a_pinned_thumbprint_or_a_ca_file_reads_disks(vcsim_factory, image: Path, make_provider: MakeProvider, trust: str) -> None:  # noqa: ANN001
    sim = vcsim_factory(spec(image), tls=True)
    provider = make_provider(sim, trust=trust)
    vm = provider.find_vm("web-01")

    snapshot = provider.create_snapshot(vm, name="backupd-live-tls", description="tls", quiesce=False)
    disk = provider.disks(snapshot)[0]
    with provider.open_disk(snapshot, disk) as reader:
        assert reader.read(0, IMAGE_SIZE) == image.read_bytes()
    provider.remove_snapshot(snapshot)


def test_a_wrong_thumbprint_is_refused_with_a_clear_error(vcsim_factory, image: Path, make_provider: MakeProvider) -> None:  # noqa: ANN001
    sim = vcsim_factory(spec(image), tls=True)
    wrong = "SHA256:" + ":".join(["AB"] * 32)
    provider = make_provider(sim, thumbprint=wrong)

    with pytest.raises(ProviderError) as raised:
        provider.list_vms()

    assert not isinstance(raised.value, TransientProviderError)
    message = str(raised.value)
    assert "thumbprint" in message and sim.thumbprint in message.upper() and "AB:AB:AB" in message


def test_https_without_trusting_the_self_signed_certificate_is_refused(vcsim_factory, image: Path, make_provider: MakeProvider) -> None:  # noqa: ANN001
    sim = vcsim_factory(spec(image), tls=True)
    provider = make_provider(sim, thumbprint=None)  # the system CAs do not know it

    with pytest.raises(ProviderError, match="(?i)certificate"):
        provider.list_vms()
