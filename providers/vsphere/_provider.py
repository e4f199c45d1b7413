"""The vSphere provider: :class:`~providers.base.Provider` over one vCenter session."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, BinaryIO

from pyVmomi import vim

from providers.base import (
    Disk,
    DiskReader,
    DiskReadError,
    Extent,
    Provider,
    ProviderError,
    Snapshot,
    SnapshotError,
    VmConfig,
    VmExists,
    VmInfo,
    VmNotFound,
)
from providers.vsphere import _cbt, _inventory, _restore, _snapshots
from providers.vsphere._connection import Connection
from providers.vsphere._errors import Operation
from providers.vsphere._inventory import VmRecord, live_disks, retrieve, retrieve_view
from providers.vsphere._transport import OBJECT_DATASTORES, DatastoreFile, DatastoreHttpTransport, DiskTransport
from providers.vsphere._vmconfig import network_map, to_vm_config
from providers.vsphere.config import VsphereProviderConfig


class VsphereProvider(Provider):
    """VMs of one vCenter (or ESXi host), through pyVmomi.

    :param name: the ``[providers.NAME]`` section's name.
    :param config: its validated config.
    :param transport: how disk data moves; default the datastore HTTP endpoint.
    """

    def __init__(self, name: str, config: VsphereProviderConfig, *, transport: DiskTransport | None = None) -> None:
        self.name = name
        self.config = config
        self.connection = Connection(name, config)
        self.transport = transport or DatastoreHttpTransport(self.connection)
        self._where = f"vCenter {config.host} (provider {name!r})"
        self._morefs: dict[str, vim.VirtualMachine] = {}  # instanceUuid → moref, from the last scan
        self._lock = threading.Lock()

    # -- VMs --------------------------------------------------------------------------------------

    def _scan(self) -> list[VmRecord]:
        records = self.connection.call(
            Operation(f"listing the VMs of {self._where}"), lambda content: _inventory.scan(content, self.config.datacenter)
        )
        with self._lock:
            self._morefs = {record.info.id: record.moref for record in records}
        return records

    def list_vms(self) -> list[VmInfo]:
        return [record.info for record in self._scan()]

    def find_vm(self, name: str) -> VmInfo:
        """The VM called ``name``, or at inventory path ``name`` (``DC0/vm/prod/web-01``).

        :raises VmNotFound: no such VM.
        :raises AmbiguousVmName: a bare name several VMs have.
        """
        return _inventory.resolve(self._scan(), name, where=self._where).info

    def _vm(self, vm: VmInfo) -> vim.VirtualMachine:
        """The moref of a VM by its stable id (a rename does not lose it).

        :raises VmNotFound: no VM has that instanceUuid any more.
        """
        with self._lock:
            moref = self._morefs.get(vm.id)
        if moref is None:
            self._scan()
            with self._lock:
                moref = self._morefs.get(vm.id)
        if moref is None:
            raise VmNotFound(f"no VM with instanceUuid {vm.id} ({vm.name!r}) on {self._where}")
        return moref

    # -- snapshots --------------------------------------------------------------------------------

    def create_snapshot(
        self, vm: VmInfo, *, name: str, description: str, quiesce: bool, cancel: threading.Event | None = None
    ) -> Snapshot:
        moref = self._vm(vm)
        pending: list[str] = []
        return self.connection.call(
            Operation(f"creating snapshot {name!r} of VM {vm.name!r}", failed=SnapshotError, gone=VmNotFound),
            lambda content: _snapshots.create(
                content, rebind(content, moref), vm_name=vm.name, name=name, description=description, quiesce=quiesce,
                timeout=self.config.task_timeout_seconds, pending=pending, cancel=cancel,
            ),
        )

    def remove_snapshot(self, snapshot: Snapshot) -> None:
        what = f"removing snapshot {snapshot.name!r} ({snapshot.id}) of VM {snapshot.vm_name!r}"
        self.connection.call(
            Operation(what, failed=SnapshotError),
            lambda content: _snapshots.remove(content, snapshot.id, what=what, timeout=self.config.task_timeout_seconds),
        )

    def list_snapshots(self, vm: VmInfo) -> list[Snapshot]:
        moref = self._vm(vm)
        return self.connection.call(
            Operation(f"listing the snapshots of VM {vm.name!r}", gone=VmNotFound),
            lambda content: _snapshots.list_snapshots(content, rebind(content, moref)),
        )

    def find_snapshot(self, snapshot_id: str) -> Snapshot:
        """A snapshot by its id (the snapshot moref's value), from any process: what the snapshot
        hunter removes orphans by.

        :raises SnapshotError: no snapshot has that id.
        """
        def find(content: vim.ServiceInstanceContent) -> Snapshot:
            ref = _snapshots.snapshot_ref(content, snapshot_id)
            for _, props in retrieve(content, [ref], vim.vm.Snapshot, ["vm"]):
                for snapshot in _snapshots.list_snapshots(content, props["vm"]):
                    if snapshot.id == snapshot_id:
                        return snapshot
            raise SnapshotError(f"no snapshot {snapshot_id} on {self._where}")

        return self.connection.call(Operation(f"looking up snapshot {snapshot_id}", failed=SnapshotError), find)

    def _snapshot_props(self, snapshot: Snapshot, what: str) -> dict[str, Any]:
        """The snapshot's ``config`` and ``vm``.

        :raises SnapshotError: the snapshot does not exist any more.
        """
        def read(content: vim.ServiceInstanceContent) -> dict[str, Any]:
            ref = _snapshots.snapshot_ref(content, snapshot.id)
            for _, props in retrieve(content, [ref], vim.vm.Snapshot, ["config", "vm"]):
                if "config" in props:
                    return props
            raise SnapshotError(f"{what}: snapshot {snapshot.id} has no configuration")

        return self.connection.call(Operation(f"{what} of snapshot {snapshot.name!r} ({snapshot.id})", failed=SnapshotError), read)

    def disks(self, snapshot: Snapshot) -> list[Disk]:
        config = self._snapshot_props(snapshot, "reading the disks")["config"]
        return list(live_disks(config.hardware.device))

    def vm_config(self, snapshot: Snapshot) -> VmConfig:
        config = self._snapshot_props(snapshot, "reading the configuration")["config"]
        _, keys = self._networks()
        return to_vm_config(config.name or snapshot.vm_name, config, keys)

    def _networks(self) -> tuple[dict[str, Any], dict[str, str]]:
        def read(content: vim.ServiceInstanceContent) -> tuple[dict[str, Any], dict[str, str]]:
            names = list(retrieve_view(content, content.rootFolder, vim.Network, ["name"]))
            groups = dict((obj._moId, props) for obj, props in retrieve_view(
                content, content.rootFolder, vim.dvs.DistributedVirtualPortgroup, ["key"]))
            return network_map((obj, {**props, **groups.get(obj._moId, {})}) for obj, props in names)

        return self.connection.call(Operation(f"listing the networks of {self._where}"), read)

    # -- CBT --------------------------------------------------------------------------------------

    def changed_areas(self, snapshot: Snapshot, disk: Disk, since: str) -> list[Extent]:
        props = self._snapshot_props(snapshot, "reading changed areas")
        what = f"QueryChangedDiskAreas of {disk.label} at snapshot {snapshot.name!r} since {since!r}"

        def query(content: vim.ServiceInstanceContent) -> list[Extent]:
            ref = _snapshots.snapshot_ref(content, snapshot.id)
            return _cbt.changed_areas(
                lambda offset: rebind(content, props["vm"]).QueryChangedDiskAreas(snapshot=ref, deviceKey=disk.key, startOffset=offset, changeId=since),
                disk, since,
            )

        return self.connection.call(_cbt.query_operation(what), query)

    def enable_cbt(self, vm: VmInfo) -> bool:
        """Switch changed block tracking on for the VM if it is off (``ReconfigVM_Task`` with
        ``changeTrackingEnabled``); it takes effect at the next snapshot.

        :returns: True when it was off (and is now on), False when it was on already.
        :raises ProviderError: the VM could not be reconfigured (the message names a missing
            ``VirtualMachine.Config.ChangeTracking`` privilege).
        """
        moref = self._vm(vm)
        operation = Operation(f"switching CBT on for VM {vm.name!r}", gone=VmNotFound)

        def enable(content: vim.ServiceInstanceContent) -> bool:
            vm_ref = rebind(content, moref)
            for _, props in retrieve(content, [vm_ref], vim.VirtualMachine, ["config.changeTrackingEnabled"]):
                if props.get("config.changeTrackingEnabled"):
                    return False
            task = vm_ref.ReconfigVM_Task(spec=_cbt.enable_spec())
            _snapshots.wait_task(content, task, timeout=self.config.task_timeout_seconds, operation=operation)
            return True

        return self.connection.call(operation, enable)

    def notices(self) -> list[str]:
        if self.config.insecure:
            return [f"TLS certificate verification is OFF (insecure = true): anyone between backupd and"
                    f" {self.config.host} can read the password and the disks"]
        return []

    # -- disk data --------------------------------------------------------------------------------

    def open_disk(self, snapshot: Snapshot, disk: Disk) -> DiskReader:
        props = self._snapshot_props(snapshot, "opening a disk")
        device = next(
            (d for d in props["config"].hardware.device if isinstance(d, vim.vm.device.VirtualDisk) and d.key == disk.key), None
        )
        if device is None:
            raise DiskReadError(f"snapshot {snapshot.name!r} has no disk {disk.key} ({disk.label})")
        backing = device.backing
        what = f"{disk.label} of VM {snapshot.vm_name!r}"
        if not isinstance(backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo):
            raise DiskReadError(f"{what}: a {type(backing).__name__.rsplit('.', 1)[-1]} backing (RDM, SE sparse ...) cannot be read over the datastore endpoint")
        if backing.parent is not None:
            raise DiskReadError(
                f"{what}: its backing {backing.fileName} is a delta disk (the VM had snapshots of its own before"
                " backupd's); the datastore transport reads flat disks only"
            )
        datacenter, kind = self.connection.call(
            Operation(f"locating the datastore of {what}", failed=DiskReadError),
            lambda content: _datastore_facts(content, rebind(content, props["vm"]), rebind(content, backing.datastore)),
        )
        if kind in OBJECT_DATASTORES:
            raise DiskReadError(f"{what}: on a {kind} datastore (objects, not files): the datastore transport cannot read it")
        file = DatastoreFile.parse(datacenter, backing.fileName)
        return self.transport.open(file, disk.capacity_bytes, label=what)

    # -- full-VM restore --------------------------------------------------------------------------

    def create_vm(self, config: VmConfig, *, name: str, datastore: str | None, disks: Mapping[int, BinaryIO]) -> VmInfo:
        if any(record.info.name == name for record in self._scan()):
            raise VmExists(f"a VM called {name!r} exists on {self._where}")
        networks, _ = self._networks()

        def create(content: vim.ServiceInstanceContent) -> vim.VirtualMachine:
            dc, dc_name = _datacenter(content, self.config.datacenter)
            store = datastore or _first_datastore(content, dc)
            return _restore.create_vm(
                content, self.transport, datacenter=dc, datacenter_name=dc_name, datastore=store, config=config,
                name=name, disks=disks, networks=networks, timeout=self.config.task_timeout_seconds,
            )

        moref = self.connection.call(Operation(f"restoring VM {name!r} on {self._where}"), create)
        for record in self._scan():
            if record.moref._moId == moref._moId:
                return record.info
        raise ProviderError(f"VM {name!r} was created ({moref._moId}) but is not in the inventory")

    def close(self) -> None:
        self.transport.close()
        self.connection.close()


def rebind(content: vim.ServiceInstanceContent, ref: Any) -> Any:
    """``ref`` (a managed object reference, or None) bound to the session of ``content``.

    A reference keeps the SOAP stub it was read with; after a relogin that stub's session is
    gone and every call through it answers ``NotAuthenticated`` again, so references kept
    between calls (the VM cache, a snapshot's ``vm``) are bound anew inside each call.
    """
    return None if ref is None else type(ref)(ref._moId, content.rootFolder._stub)


def _datastore_facts(content: vim.ServiceInstanceContent, vm: Any, datastore: Any) -> tuple[str, str]:
    """(the VM's datacenter's inventory path, the datastore's ``summary.type``)."""
    kind = ""
    if datastore is not None:
        for _, props in retrieve(content, [datastore], vim.Datastore, ["summary.type"]):
            kind = props.get("summary.type", "")
    parts: list[str] = []
    current = vm
    inside = False
    while current is not None and current._moId != content.rootFolder._moId:
        props = next((p for _, p in retrieve(content, [current], vim.ManagedEntity, ["name", "parent"])), {})
        if isinstance(current, vim.Datacenter):
            inside = True
        if inside:
            parts.append(props.get("name", current._moId))
        current = props.get("parent")
    if not parts:
        raise DiskReadError(f"VM {vm._moId} is in no datacenter")
    return "/".join(reversed(parts)), kind


def _datacenter(content: vim.ServiceInstanceContent, wanted: str | None) -> tuple[Any, str]:
    found = [(obj, props.get("name", "")) for obj, props in retrieve_view(content, content.rootFolder, vim.Datacenter, ["name"])]
    found.sort(key=lambda item: item[1])
    for obj, name in found:
        if wanted is None or name == wanted:
            return obj, name
    raise ProviderError(f"no datacenter {wanted!r}" if wanted else "the vCenter has no datacenter")


def _first_datastore(content: vim.ServiceInstanceContent, datacenter: Any) -> str:
    stores = sorted(
        (props.get("name", ""), props.get("summary.accessible", True))
        for _, props in retrieve(content, datacenter.datastore, vim.Datastore, ["name", "summary.accessible"])
    )
    for name, accessible in stores:
        if accessible:
            return name
    raise ProviderError("no accessible datastore in the datacenter")
