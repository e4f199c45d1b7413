"""The Provider contract (:mod:`providers.base`), asserted the same way on every backend."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest

from providers.base import (
    CbtUnavailable,
    Disk,
    Extent,
    Provider,
    Snapshot,
    SnapshotError,
    VmInfo,
    VmNotFound,
)

MiB = 1 << 20
TakeSnapshot = Callable[[], Snapshot]
GuestWrite = Callable[[str, int, int, bytes], None]


def read_all(provider: Provider, snapshot: Snapshot, disk: Disk) -> bytes:
    with provider.open_disk(snapshot, disk) as reader:
        return b"".join(reader.read(offset, MiB) for offset in range(0, disk.capacity_bytes, MiB))


def first_disk(provider: Provider, snapshot: Snapshot) -> Disk:
    return provider.disks(snapshot)[0]


# -- VMs ------------------------------------------------------------------------------------------


def test_list_vms_is_sorted_by_name_and_find_vm_returns_each_listed_vm(provider: Provider) -> None:
    listed = provider.list_vms()

    assert listed, "the backend has VMs"
    assert [vm.name for vm in listed] == sorted(vm.name for vm in listed)
    assert len({vm.id for vm in listed}) == len(listed)
    for vm in listed:
        assert provider.find_vm(vm.name) == vm


def test_find_vm_of_an_unknown_name_raises_vm_not_found(provider: Provider) -> None:
    with pytest.raises(VmNotFound, match="no-such-vm"):
        provider.find_vm("no-such-vm")


def test_vm_disks_have_distinct_keys_labels_sizes_and_change_ids(vm: VmInfo) -> None:
    assert vm.power_state in {"poweredOn", "poweredOff", "suspended"}
    assert vm.disks
    assert len({disk.key for disk in vm.disks}) == len(vm.disks)
    assert len({disk.label for disk in vm.disks}) == len(vm.disks)
    for disk in vm.disks:
        assert disk.capacity_bytes > 0
        assert disk.change_id


# -- snapshots ------------------------------------------------------------------------------------


def test_snapshot_keeps_what_it_was_given_and_a_utc_creation_time(
    provider: Provider, vm: VmInfo
) -> None:
    before = datetime.now(timezone.utc)
    snapshot = provider.create_snapshot(
        vm, name="backupd-contract-fields", description="job nightly, session 7", quiesce=True
    )
    try:
        assert snapshot.vm_name == vm.name
        assert snapshot.name == "backupd-contract-fields"
        assert snapshot.description == "job nightly, session 7"
        assert snapshot.quiesced is True
        assert snapshot.created_at.utcoffset() == timedelta(0)
        assert before - timedelta(seconds=5) <= snapshot.created_at <= datetime.now(timezone.utc)
        assert provider.list_snapshots(vm) == [snapshot]
    finally:
        provider.remove_snapshot(snapshot)


def test_snapshots_are_listed_oldest_first_until_removed(
    provider: Provider, vm: VmInfo, take_snapshot: TakeSnapshot
) -> None:
    first, second = take_snapshot(), take_snapshot()
    assert first.id != second.id
    assert provider.list_snapshots(vm) == [first, second]

    provider.remove_snapshot(first)

    assert provider.list_snapshots(vm) == [second]


def test_removing_a_snapshot_that_is_already_gone_succeeds(
    provider: Provider, vm: VmInfo, take_snapshot: TakeSnapshot
) -> None:
    snapshot = take_snapshot()
    provider.remove_snapshot(snapshot)

    provider.remove_snapshot(snapshot)

    assert provider.list_snapshots(vm) == []


def test_a_removed_snapshot_can_neither_be_described_nor_opened(
    provider: Provider, take_snapshot: TakeSnapshot
) -> None:
    snapshot = take_snapshot()
    disk = first_disk(provider, snapshot)
    provider.remove_snapshot(snapshot)

    with pytest.raises(SnapshotError):
        provider.disks(snapshot)
    with pytest.raises(SnapshotError):
        provider.open_disk(snapshot, disk)


def test_snapshot_reads_do_not_see_later_guest_writes(
    shared_snapshot_data: str, guest_write: GuestWrite, provider: Provider, vm: VmInfo, take_snapshot: TakeSnapshot
) -> None:
    if shared_snapshot_data:
        pytest.skip(shared_snapshot_data)
    snapshot = take_snapshot()
    disk = first_disk(provider, snapshot)
    before = read_all(provider, snapshot, disk)
    with provider.open_disk(snapshot, disk) as open_before:
        open_before.read(0, MiB)

        guest_write(vm.name, 0, 0, os.urandom(MiB + 123))
        guest_write(vm.name, 0, 7 * MiB - 50, os.urandom(100))

        assert open_before.read(0, 2 * MiB) == before[: 2 * MiB]
        assert open_before.read(7 * MiB - 50, 100) == before[7 * MiB - 50 : 7 * MiB + 50]
    assert read_all(provider, snapshot, disk) == before
    later = take_snapshot()
    assert read_all(provider, later, first_disk(provider, later)) != before


def test_read_is_short_only_past_the_end_of_the_disk(
    provider: Provider, take_snapshot: TakeSnapshot
) -> None:
    snapshot = take_snapshot()
    disk = first_disk(provider, snapshot)
    size = disk.capacity_bytes
    with provider.open_disk(snapshot, disk) as reader:
        assert len(reader.read(size - 2 * MiB, MiB)) == MiB
        assert len(reader.read(size - 10, 100)) == 10
        assert reader.read(size, 100) == b""
        assert reader.read(size + MiB, 1) == b""
        assert reader.read(0, 0) == b""


# -- changed block tracking -----------------------------------------------------------------------


def test_snapshot_disks_carry_the_change_id_the_disk_had_at_the_snapshot(
    guest_write: GuestWrite, provider: Provider, vm: VmInfo, take_snapshot: TakeSnapshot
) -> None:
    snapshot = take_snapshot()
    at_snapshot = provider.disks(snapshot)
    assert [(d.key, d.label, d.capacity_bytes) for d in at_snapshot] == [
        (d.key, d.label, d.capacity_bytes) for d in vm.disks
    ]
    assert [d.change_id for d in at_snapshot] == [
        d.change_id for d in provider.find_vm(vm.name).disks
    ]

    guest_write(vm.name, 0, 0, b"changed")
    later = take_snapshot()

    assert provider.disks(later)[0].change_id != at_snapshot[0].change_id
    assert provider.disks(snapshot) == at_snapshot


def test_changed_areas_since_an_earlier_snapshot_are_the_written_blocks(
    guest_write: GuestWrite, provider: Provider, vm: VmInfo, take_snapshot: TakeSnapshot
) -> None:
    earlier = first_disk(provider, take_snapshot())
    guest_write(vm.name, 0, 2 * MiB, os.urandom(MiB))
    guest_write(vm.name, 0, 3 * MiB, os.urandom(MiB))
    guest_write(vm.name, 0, 9 * MiB, os.urandom(MiB))
    later = take_snapshot()

    changed = provider.changed_areas(later, first_disk(provider, later), earlier.change_id or "")

    assert changed == [Extent(2 * MiB, 2 * MiB), Extent(9 * MiB, MiB)]


def test_changed_areas_since_the_snapshot_itself_are_empty(
    provider: Provider, take_snapshot: TakeSnapshot
) -> None:
    snapshot = take_snapshot()
    disk = first_disk(provider, snapshot)

    assert provider.changed_areas(snapshot, disk, disk.change_id or "") == []


def test_changed_areas_star_cover_all_non_zero_data_and_skip_holes(
    guest_write: GuestWrite, provider: Provider, vm: VmInfo, take_snapshot: TakeSnapshot
) -> None:
    guest_write(vm.name, 0, 11 * MiB + 5, os.urandom(3000))
    snapshot = take_snapshot()
    disk = first_disk(provider, snapshot)
    content = read_all(provider, snapshot, disk)

    in_use = provider.changed_areas(snapshot, disk, "*")

    assert in_use == sorted(in_use, key=lambda e: e.offset)
    gaps, position = [], 0
    for extent in in_use:
        assert extent.offset >= position and extent.length > 0
        gaps.append((position, extent.offset))
        position = extent.end
    assert position <= disk.capacity_bytes
    gaps.append((position, disk.capacity_bytes))
    for start, end in gaps:
        assert content[start:end].count(0) == end - start, f"non-zero data in [{start}, {end})"
    assert sum(e.length for e in in_use) < disk.capacity_bytes // 2


def test_changed_areas_raise_cbt_unavailable_after_a_cbt_reset(
    guest_write: GuestWrite,
    reset_cbt: Callable[[str], None],
    provider: Provider,
    vm: VmInfo,
    take_snapshot: TakeSnapshot,
) -> None:
    earlier = first_disk(provider, take_snapshot())
    reset_cbt(vm.name)
    guest_write(vm.name, 0, 0, b"after the reset")
    later = take_snapshot()
    disk = first_disk(provider, later)

    with pytest.raises(CbtUnavailable):
        provider.changed_areas(later, disk, earlier.change_id or "")
    assert provider.changed_areas(later, disk, "*")


def test_changed_areas_raise_cbt_unavailable_for_a_string_that_is_no_change_id(
    provider: Provider, take_snapshot: TakeSnapshot
) -> None:
    snapshot = take_snapshot()
    with pytest.raises(CbtUnavailable):
        provider.changed_areas(snapshot, first_disk(provider, snapshot), "not a changeId")
