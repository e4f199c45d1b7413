"""What each cassette holds: one function per scenario, run against a provider when recording
(``record_cassettes.py``) and replayed by ``test_cassettes.py``, which asserts on what it returns.

Each scenario takes the provider and returns plain data (names, ids, kinds of errors).
The VM the scenarios use is the first one listed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from providers.base import CbtUnavailable, ProviderError, VmNotFound
from providers.vsphere import VsphereProvider


def connect_and_inventory(provider: VsphereProvider) -> dict[str, Any]:
    vms = provider.list_vms()
    first = vms[0]
    by_path = provider.find_vm(_path(provider, first.name))
    return {"names": [vm.name for vm in vms], "ids": [vm.id for vm in vms], "first": first.name, "by_path_id": by_path.id}


def snapshot_create(provider: VsphereProvider) -> dict[str, Any]:
    vm = provider.list_vms()[0]
    snapshot = provider.create_snapshot(vm, name="backupd-cassette-1", description="cassette session 1", quiesce=False)
    listed = provider.list_snapshots(vm)
    config = provider.vm_config(snapshot)
    return {
        "snapshot": snapshot.name, "listed": [s.id for s in listed], "id": snapshot.id,
        "found": provider.find_snapshot(snapshot.id).name, "disks": [d.key for d in provider.disks(snapshot)],
        "config_name": config.name, "config_disks": len(config.disks),
    }


def snapshot_remove(provider: VsphereProvider) -> dict[str, Any]:
    vm = provider.list_vms()[0]
    snapshot = provider.create_snapshot(vm, name="backupd-cassette-2", description="cassette session 2", quiesce=False)
    provider.remove_snapshot(snapshot)
    provider.remove_snapshot(snapshot)  # idempotent: already gone
    return {"left": [s.name for s in provider.list_snapshots(vm) if s.name == snapshot.name]}


def fault_paths(provider: VsphereProvider) -> dict[str, Any]:
    outcome: dict[str, Any] = {}
    try:
        provider.find_vm("no-such-vm")
    except VmNotFound:
        outcome["unknown_vm"] = "VmNotFound"
    vm = provider.list_vms()[0]
    snapshot = provider.create_snapshot(vm, name="backupd-cassette-3", description="cassette faults", quiesce=False)
    disk = provider.disks(snapshot)[0]
    try:
        provider.changed_areas(snapshot, disk, "not-a-change-id")
        outcome["bad_change_id"] = "answered"
    except CbtUnavailable:
        outcome["bad_change_id"] = "CbtUnavailable"
    try:
        provider.find_snapshot("snapshot-999999")
    except ProviderError as exc:
        outcome["unknown_snapshot"] = type(exc).__name__
    return outcome


def _path(provider: VsphereProvider, name: str) -> str:
    from providers.vsphere import _inventory

    records = provider.connection.call(
        _inventory_operation(), lambda content: _inventory.scan(content, provider.config.datacenter)
    )
    return next(record.path for record in records if record.info.name == name)


def _inventory_operation():  # noqa: ANN202
    from providers.vsphere._errors import Operation

    return Operation("cassette: inventory paths")


#: cassette name → scenario
SCENARIOS: dict[str, Callable[[VsphereProvider], dict[str, Any]]] = {
    "connect_and_inventory": connect_and_inventory,
    "snapshot_create": snapshot_create,
    "snapshot_remove": snapshot_remove,
    "fault_paths": fault_paths,
}
