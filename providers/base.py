"""The provider interface: what backupd needs from a hypervisor.

A provider lists VMs, creates and removes snapshots, describes a snapshot's disks, reports
which disk areas changed since an earlier changeId (changed block tracking), and reads disk
data from a snapshot by byte range. The shape follows the vSphere API so the pyvmomi provider
maps onto it one to one: ``CreateSnapshot_Task`` / ``RemoveSnapshot_Task``,
``VirtualDisk.key`` and ``changeId``, ``QueryChangedDiskAreas`` returning ``DiskChangeExtent``
(start, length) lists, and range reads of the snapshot's backing files.

Errors (each provider maps its native faults into this tree at its boundary, ``raise ... from``
the original; only :class:`TransientProviderError` is retried by the engine)::

    ProviderError
     ├── TransientProviderError   a retry may succeed (timeouts, busy host, lost connection)
     ├── VmNotFound               no VM of that name
     ├── AmbiguousVmName          a name that matches several VMs (lists them)
     ├── VmExists                 a restore would create a VM whose name is taken
     ├── SnapshotError            a snapshot could not be created or removed
     │    └── QuiesceError        the guest could not be quiesced (the engine then takes a
     │                            crash-consistent snapshot and ends the VM ``warning``)
     ├── OperationCancelled       the caller's cancel event was set; nothing was left behind
     ├── CbtUnavailable           the changeId given is not valid any more (CBT was reset or
     │                            disabled); the engine falls back to a full read
     └── DiskReadError            disk data could not be read
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import BinaryIO


class ProviderError(Exception):
    """Base of every error a provider raises."""


class TransientProviderError(ProviderError):
    """A failure that may not happen again: the engine retries the operation."""


class VmNotFound(ProviderError):
    """No VM with the name asked for exists on this provider."""


class AmbiguousVmName(ProviderError):
    """A VM name matches several VMs (vSphere names are unique per folder, not per vCenter).

    :ivar matches: the inventory paths of the matching VMs, sorted.
    """

    def __init__(self, name: str, matches: list[str]) -> None:
        self.matches = sorted(matches)
        super().__init__(
            f"VM name {name!r} matches {len(self.matches)} VMs: {', '.join(self.matches)};"
            " name one by its inventory path"
        )


class VmExists(ProviderError):
    """A VM of the name asked for already exists (full-VM restore refuses to overwrite)."""


class SnapshotError(ProviderError):
    """A snapshot could not be created or removed (not retried)."""


class QuiesceError(SnapshotError):
    """The guest could not be quiesced (vSphere: ``ApplicationQuiesceFault``)."""


class OperationCancelled(ProviderError):
    """The caller's ``cancel`` event was set while the operation ran (an immediate stop); the
    operation was abandoned and left nothing behind (vSphere: ``CancelTask``, and a snapshot
    the task made anyway removed)."""


class CbtUnavailable(ProviderError):
    """Changed block tracking cannot answer for the changeId given (vSphere:
    ``QueryChangedDiskAreas`` fails after a CBT reset); the caller reads the whole disk."""


class DiskReadError(ProviderError):
    """Disk data could not be read from a snapshot."""


@dataclass(frozen=True)
class Extent:
    """A byte range of a disk (vSphere ``DiskChangeExtent``).

    :ivar offset: first byte, from the start of the disk.
    :ivar length: number of bytes, > 0.
    """

    offset: int
    length: int

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.offset + self.length


@dataclass(frozen=True)
class Disk:
    """One virtual disk of a VM, as seen live or through a snapshot.

    :ivar key: device key, stable for the life of the disk (vSphere ``VirtualDisk.key``).
    :ivar label: human name, e.g. ``"Hard disk 1"``.
    :ivar capacity_bytes: size of the disk in bytes.
    :ivar change_id: the CBT changeId of this state of the disk, or None when CBT is off.
        Passing it later as ``since`` to :meth:`Provider.changed_areas` yields the areas
        written after this state.
    """

    key: int
    label: str
    capacity_bytes: int
    change_id: str | None


@dataclass(frozen=True)
class DiskConfig:
    """One virtual disk as a VM's configuration declares it (what a full-VM restore rebuilds).

    :ivar key: device key (vSphere ``VirtualDisk.key``), the same as :attr:`Disk.key`.
    :ivar label: e.g. ``"Hard disk 1"``.
    :ivar controller: the controller's kind: ``"scsi"``, ``"sata"``, ``"nvme"`` or ``"ide"``.
    :ivar controller_model: the controller's model, e.g. ``"pvscsi"``, ``"lsilogic"``,
        ``"lsilogic-sas"``, ``"buslogic"``, ``"ahci"``, ``"nvme"``, ``"ide"``.
    :ivar bus_number: the controller's bus number (``SCSI controller 0`` → 0).
    :ivar unit_number: the disk's unit number on that controller.
    :ivar capacity_bytes: size in bytes.
    :ivar thin: thin provisioned (vSphere ``backing.thinProvisioned``).
    """

    key: int
    label: str
    controller: str
    controller_model: str
    bus_number: int
    unit_number: int
    capacity_bytes: int
    thin: bool


@dataclass(frozen=True)
class NicConfig:
    """One network adapter of a VM's configuration (no MAC address: a restored VM gets a new one).

    :ivar label: e.g. ``"Network adapter 1"``.
    :ivar network: the name of the network (port group) it is connected to.
    :ivar adapter_type: ``"vmxnet3"``, ``"e1000e"``, ``"e1000"``, ``"vmxnet2"``, ``"pcnet32"``.
    """

    label: str
    network: str
    adapter_type: str


@dataclass(frozen=True)
class VmConfig:
    """A VM's configuration as a snapshot captured it, stored with each restore point.

    :ivar name: the VM's name at the snapshot.
    :ivar guest_os: the guest OS identifier (vSphere ``guestId``, e.g. ``"ubuntu64Guest"``).
    :ivar cpus: number of virtual CPUs.
    :ivar memory_bytes: memory in bytes.
    :ivar firmware: ``"bios"`` or ``"efi"``.
    :ivar disks: the disks, in device order.
    :ivar nics: the network adapters, in device order.
    """

    name: str
    guest_os: str
    cpus: int
    memory_bytes: int
    firmware: str
    disks: tuple[DiskConfig, ...]
    nics: tuple[NicConfig, ...]


@dataclass(frozen=True)
class VmInfo:
    """A VM as listed by the provider.

    :ivar name: the VM's name, shown to people (it can change: a VM can be renamed).
    :ivar id: the provider's stable identifier, which restore points and CBT chains follow
        (vSphere: ``config.instanceUuid``; the simulated provider: the id it gave the VM).
    :ivar power_state: ``poweredOn``, ``poweredOff`` or ``suspended`` (vSphere words).
    :ivar disks: the live disks, in device order.
    """

    name: str
    id: str
    power_state: str
    disks: tuple[Disk, ...]


@dataclass(frozen=True)
class Snapshot:
    """A snapshot of one VM.

    :ivar id: the provider's identifier, unique per provider (vSphere snapshot moref).
    :ivar vm_name: the VM it belongs to (its name when the snapshot was taken).
    :ivar name: the snapshot's name; backupd names its own ``backupd-...``.
    :ivar description: free text; backupd stores the job and session there.
    :ivar created_at: creation time, timezone-aware UTC.
    :ivar quiesced: whether the guest was quiesced for it.
    """

    id: str
    vm_name: str
    name: str
    description: str
    created_at: datetime
    quiesced: bool


class DiskReader(ABC):
    """Random-access reads of one disk as a snapshot sees it. Not thread-safe: one per thread."""

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at byte ``offset``.

        Returns fewer bytes only when the range passes the end of the disk.

        :raises DiskReadError: the data could not be read.
        :raises TransientProviderError: a retry may succeed.
        """

    def close(self) -> None:
        """Release what the reader holds. Idempotent."""

    def __enter__(self) -> "DiskReader":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Provider(ABC):
    """A hypervisor backupd can back VMs up from.

    Implementations are safe to call from several threads at once (one VM task per thread).
    """

    #: the name of the ``[providers.NAME]`` section this provider was built from
    name: str

    @abstractmethod
    def list_vms(self) -> list[VmInfo]:
        """Every VM of this provider, sorted by name."""

    @abstractmethod
    def find_vm(self, name: str) -> VmInfo:
        """The VM called ``name``.

        :raises VmNotFound: no such VM.
        """

    @abstractmethod
    def create_snapshot(
        self, vm: VmInfo, *, name: str, description: str, quiesce: bool, cancel: threading.Event | None = None
    ) -> Snapshot:
        """Take a snapshot of the VM's disks, without memory (vSphere ``CreateSnapshot_Task``
        with ``memory=False``).

        :param quiesce: ask the guest to flush first (VMware Tools).
        :param cancel: when set while the creation runs, the provider abandons it (at its next
            check, at most about a second later) and removes the snapshot if one was made.
        :raises OperationCancelled: ``cancel`` was set; no snapshot was left behind.
        :raises QuiesceError: quiescing failed; no snapshot was left behind.
        :raises SnapshotError: the snapshot could not be created.
        :raises TransientProviderError: a retry may succeed.
        """

    @abstractmethod
    def remove_snapshot(self, snapshot: Snapshot) -> None:
        """Remove the snapshot and free its data (vSphere ``RemoveSnapshot_Task``).

        Idempotent: removing a snapshot that is already gone succeeds.

        :raises SnapshotError: the snapshot exists but could not be removed.
        :raises TransientProviderError: a retry may succeed.
        """

    @abstractmethod
    def list_snapshots(self, vm: VmInfo) -> list[Snapshot]:
        """The VM's current snapshots, oldest first."""

    @abstractmethod
    def disks(self, snapshot: Snapshot) -> list[Disk]:
        """The disks as the snapshot holds them, in device order, each with the changeId of
        that state.

        :raises SnapshotError: the snapshot does not exist any more.
        """

    @abstractmethod
    def changed_areas(self, snapshot: Snapshot, disk: Disk, since: str) -> list[Extent]:
        """The areas of ``disk`` that differ between the state ``since`` names and the
        snapshot (vSphere ``QueryChangedDiskAreas``).

        :param since: a changeId from an earlier :class:`Disk` of the same disk, or ``"*"``
            for every area in use (allocated) at the snapshot.
        :returns: sorted, non-overlapping extents, inside ``[0, capacity_bytes)``.
        :raises CbtUnavailable: ``since`` is not valid any more (CBT reset), or CBT is off.
        :raises TransientProviderError: a retry may succeed.
        """

    @abstractmethod
    def open_disk(self, snapshot: Snapshot, disk: Disk) -> DiskReader:
        """A reader of ``disk`` as the snapshot holds it: guest writes made after the
        snapshot do not show through.

        :raises SnapshotError: the snapshot does not exist any more.
        :raises DiskReadError: the disk cannot be opened.
        """

    @abstractmethod
    def vm_config(self, snapshot: Snapshot) -> VmConfig:
        """The VM's configuration as the snapshot captured it (vSphere: the snapshot's
        ``config``), stored with the restore point.

        :raises SnapshotError: the snapshot does not exist any more.
        :raises TransientProviderError: a retry may succeed.
        """

    @abstractmethod
    def create_vm(
        self,
        config: VmConfig,
        *,
        name: str,
        datastore: str | None,
        disks: Mapping[int, BinaryIO],
    ) -> VmInfo:
        """Create a new, powered-off VM from ``config`` named ``name``, its disks filled from
        ``disks`` (full-VM restore; vSphere: disks uploaded over the datastore endpoint, then
        ``CreateVM_Task`` with them attached).

        All or nothing: when anything fails, or the call is interrupted (an exception,
        ``KeyboardInterrupt``), whatever was created is removed before the error propagates.

        :param disks: for every disk of ``config`` (by key), a binary stream giving exactly
            ``capacity_bytes`` bytes, read sequentially once.
        :param datastore: where the disks go; None: the provider's default (vSphere: the
            datastore of the first disk in ``config``, else the first datastore found).
        :returns: the new VM.
        :raises VmExists: a VM called ``name`` exists; nothing was created.
        :raises ProviderError: the VM could not be created; nothing was left behind.
        """

    def enable_cbt(self, vm: VmInfo) -> bool:
        """Switch changed block tracking on for the VM when it is off (vSphere
        ``ReconfigVM_Task`` with ``changeTrackingEnabled``). It takes effect at the next
        snapshot, so the session that switches it on reads the disks in full.

        The default suits providers whose CBT is always on (the simulated hypervisor).

        :returns: True when CBT was off and is now on, False when it was on already.
        :raises ProviderError: it could not be switched on (e.g. a missing privilege).
        """
        return False

    def notices(self) -> list[str]:
        """Warnings about how this provider is set up, which every session using it writes to
        its log (vSphere: TLS certificate verification switched off). Default: none."""
        return []

    def close(self) -> None:
        """Release connections and files. Idempotent."""
