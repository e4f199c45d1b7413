"""The simulated hypervisor as a :class:`~providers.base.Provider`, plus its administration API
(what ``backupd sim ...`` and the tests call: guest writes, faults, CBT reset)."""

from __future__ import annotations

import functools
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, ParamSpec, TypeVar

from providers.base import (
    CbtUnavailable,
    Disk,
    DiskReader,
    DiskReadError,
    Extent,
    OperationCancelled,
    Provider,
    ProviderError,
    Snapshot,
    SnapshotError,
    VmConfig,
    VmInfo,
)
from providers.simulated import _cow, _create
from providers.simulated._cbt import CbtState, ChangeLog
from providers.simulated._disk import guest_write, in_use_extents
from providers.simulated._errors import InvalidArgument
from providers.simulated._faults import FaultStore, ReadFaultProbe
from providers.simulated._layout import (
    Layout,
    SnapshotPaths,
    VmPaths,
    is_snapshot_id,
    locked,
    make_dir,
    read_json,
    write_json,
)
from providers.simulated._reader import Pacer, SnapshotDiskReader
from providers.simulated._vms import Vm, VmCatalog
from providers.simulated.config import SimulatedProviderConfig
from providers.vm_config_json import config_from_json, config_to_json

_MiB = 1 << 20
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _maps_os_errors(
    error: type[ProviderError] = ProviderError,
) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Turn an ``OSError`` from the state folder (disk full, a file deleted by hand) into
    ``error`` naming the operation and the file: the provider's boundary."""

    def decorate(method: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(method)
        def mapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return method(*args, **kwargs)
            except OSError as exc:
                raise error(f"simulated hypervisor: {method.__name__}: {exc}") from exc

        return mapped

    return decorate


class SimulatedProvider(Provider):
    """A hypervisor whose VMs, disks, snapshots, CBT logs and faults are files in
    ``config.state_dir``, shared by every process that opens the same folder.

    VMs are the ones the state folder holds (made from ``config.vms`` on their first use, disks
    imported from their image or created empty; or made by :meth:`create_vm`), plus the ones
    ``config.vms`` declares that were not used yet. Safe to call from several threads and
    processes at once.

    :param name: the ``[providers.NAME]`` section's name, used in messages.
    :param config: the validated section; ``state_dir`` and image paths absolute.
    :raises OSError: ``state_dir`` cannot be created.
    """

    def __init__(self, name: str, config: SimulatedProviderConfig) -> None:
        self.name = name
        self.config = config
        self._layout = Layout(config.state_dir)
        self._vms = VmCatalog(name, self._layout, config.vms)
        #: snapshot records read by this instance and not removed through it (:meth:`_snapshot`)
        self._records: dict[str, tuple[Vm, SnapshotPaths, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    # -- the Provider contract ---------------------------------------------------------------

    @_maps_os_errors()
    def list_vms(self) -> list[VmInfo]:
        """Every VM, sorted by name, with live disks and changeIds.

        :raises ProviderError: a VM's disk image cannot be imported.
        """
        return [self._info(self._vms.get(name)) for name in self._vms.names()]

    @_maps_os_errors()
    def find_vm(self, name: str) -> VmInfo:
        """The VM called ``name``, with live disks and changeIds.

        :raises VmNotFound: no such VM.
        :raises ProviderError: its disk image cannot be imported.
        """
        return self._info(self._vms.get(name))

    @_maps_os_errors(SnapshotError)
    def create_snapshot(
        self, vm: VmInfo, *, name: str, description: str, quiesce: bool, cancel: threading.Event | None = None
    ) -> Snapshot:
        """Take a snapshot of every disk of the VM; it takes ``snapshot_create_seconds``, and
        first waits as long as ``create_snapshot`` is paused (:meth:`pause`). ``cancel`` set
        during those seconds abandons it before anything is made; a paused creation models a
        hypervisor task that cannot be cancelled, so it completes.

        :param name: stored as given.
        :param description: stored as given.
        :param quiesce: pretend to quiesce the guest; only then can a ``quiesce`` fault fire.
        :raises VmNotFound: no such VM.
        :raises SnapshotError: a permanent ``create_snapshot`` fault is armed.
        :raises QuiesceError: a permanent ``quiesce`` fault is armed (no snapshot is left).
        :raises TransientProviderError: a transient ``create_snapshot`` or ``quiesce`` fault.
        :raises OperationCancelled: ``cancel`` was set while it took its time.
        """
        target = self._vms.get(vm.name)
        faults = FaultStore(target.name, target.paths)
        faults.hold("create_snapshot")
        seconds = self.config.snapshot_create_seconds
        if cancel is None or seconds == 0:
            _take(seconds)
        elif cancel.wait(seconds):  # a creation under way is cancellable; a held one is not
            raise OperationCancelled(f"snapshot {name!r} of VM {target.name!r}: creation cancelled")
        faults.fire("create_snapshot")
        if quiesce:
            faults.fire("quiesce")
        snapshot = Snapshot(
            id=self._layout.next_snapshot_id(),
            vm_name=target.name,
            name=name,
            description=description,
            created_at=datetime.now(timezone.utc),
            quiesced=quiesce,
        )
        keys = [disk.key for disk in target.disks]
        with locked(target.paths.lock, exclusive=True), _disks_locked(target.paths, keys):
            _sweep(target.paths)
            partial = SnapshotPaths(target.paths.snapshots / f".{snapshot.id}.creating")
            make_dir(partial.root)
            disks = []
            for disk in target.disks:
                _cow.create(partial, disk.key, disk.capacity_bytes)
                state = ChangeLog(target.paths.disk(disk.key).cbt).state()
                disks.append(
                    {
                        "key": disk.key,
                        "label": disk.label,
                        "capacity_bytes": disk.capacity_bytes,
                        "change_id": state.change_id,
                    }
                )
            write_json(
                partial.meta,
                {
                    "id": snapshot.id,
                    "vm_name": snapshot.vm_name,
                    "name": name,
                    "description": description,
                    "created_at": snapshot.created_at.isoformat(),
                    "quiesced": quiesce,
                    "disks": disks,
                    "config": config_to_json(target.config),
                },
            )
            os.rename(partial.root, target.paths.snapshot(snapshot.id).root)
        return snapshot

    @_maps_os_errors(SnapshotError)
    def remove_snapshot(self, snapshot: Snapshot) -> None:
        """Remove the snapshot and delete its files; it takes ``snapshot_remove_seconds``.
        Readers still open on it fail with :class:`DiskReadError` from then on.

        Idempotent: a snapshot already gone is not an error (and fires no fault).

        :raises VmNotFound: its VM does not exist any more.
        :raises SnapshotError: a permanent ``remove_snapshot`` fault is armed, or the id is not
            one this provider hands out.
        :raises TransientProviderError: a transient ``remove_snapshot`` fault is armed.
        """
        with self._lock:
            self._records.pop(snapshot.id, None)
        target = self._owner(snapshot)
        folder = _snapshot_folder(target, snapshot)
        if not folder.root.exists():
            return
        _take(self.config.snapshot_remove_seconds)
        FaultStore(target.name, target.paths).fire("remove_snapshot")
        with locked(target.paths.lock, exclusive=True):
            record = read_json(folder.meta)
            if record is None:  # removed meanwhile
                return
            keys = [disk["key"] for disk in record["disks"]]
            gone = target.paths.snapshots / f".{snapshot.id}.removing"
            with _disks_locked(target.paths, keys):
                for key in keys:
                    _cow.mark_removed(folder, key)
                os.rename(folder.root, gone)
            shutil.rmtree(gone)

    @_maps_os_errors()
    def list_snapshots(self, vm: VmInfo) -> list[Snapshot]:
        """The VM's snapshots, oldest first.

        :raises VmNotFound: no such VM.
        """
        target = self._vms.get(vm.name)
        records = (read_json(folder.meta) for folder in target.paths.snapshot_folders())
        return [_snapshot_of(record) for record in records if record is not None]

    @_maps_os_errors()
    def disks(self, snapshot: Snapshot) -> list[Disk]:
        """The snapshot's disks in device order, each with its changeId at the snapshot.

        :raises SnapshotError: the snapshot does not exist (any more).
        """
        _, _, record = self._snapshot(snapshot)
        return [_disk_of(entry) for entry in record["disks"]]

    @_maps_os_errors()
    def changed_areas(self, snapshot: Snapshot, disk: Disk, since: str) -> list[Extent]:
        """The byte extents of ``disk`` written after the state ``since`` and up to the
        snapshot, exactly as the guest wrote them, merged and clipped to the disk.

        :param since: a changeId of this disk from the snapshot's CBT epoch, not newer than
            the snapshot's; or ``"*"``: every allocated area at the snapshot (a superset of
            the non-zero data, holes skipped).
        :raises SnapshotError: the snapshot does not exist (any more).
        :raises ProviderError: the disk is not part of the snapshot.
        :raises CbtUnavailable: ``since`` is malformed, from another epoch (CBT was reset),
            newer than the snapshot, or CBT was reset after the snapshot.
        """
        target, folder, record = self._snapshot(snapshot)
        entry = _disk_entry(snapshot, record, disk.key)
        paths = target.paths.disk(disk.key)
        capacity = entry["capacity_bytes"]
        if since == "*":
            with locked(paths.lock, exclusive=False):
                return in_use_extents(paths, folder, disk.key, capacity)
        at_snapshot = CbtState.parse(entry["change_id"])
        earlier = CbtState.parse(since)
        where = f"VM {target.name!r} disk {disk.key} at {snapshot.id}"
        if at_snapshot is None or earlier is None:
            raise CbtUnavailable(f"{where}: {since!r} is not a changeId")
        if earlier.epoch != at_snapshot.epoch:
            raise CbtUnavailable(f"{where}: changeId {since!r} is from another CBT epoch")
        if earlier.seq > at_snapshot.seq:
            raise CbtUnavailable(f"{where}: changeId {since!r} is newer than the snapshot")
        log = ChangeLog(paths.cbt)
        with locked(paths.lock, exclusive=False):
            if log.state().epoch != at_snapshot.epoch:
                raise CbtUnavailable(f"{where}: CBT was reset after the snapshot")
            return log.changed(earlier.seq, at_snapshot.seq, capacity)

    def open_disk(self, snapshot: Snapshot, disk: Disk) -> DiskReader:
        """A reader of ``disk`` as the snapshot holds it, throttled to ``read_mib_per_s``;
        its reads wait as long as ``read`` is paused (:meth:`pause`).

        :raises SnapshotError: the snapshot does not exist (any more).
        :raises ProviderError: the disk is not part of the snapshot.
        :raises DiskReadError: the disk's files cannot be opened.
        """
        target, folder, record = self._snapshot(snapshot)
        entry = _disk_entry(snapshot, record, disk.key)
        what = f"VM {target.name!r} disk {disk.key} at {snapshot.id}"
        probe = ReadFaultProbe(FaultStore(target.name, target.paths), target.paths)
        try:
            return SnapshotDiskReader(
                what,
                target.paths.disk(disk.key),
                folder,
                disk.key,
                entry["capacity_bytes"],
                probe,
                Pacer(self.config.read_mib_per_s * _MiB),
            )
        except OSError as exc:
            if not folder.meta.exists():
                raise SnapshotError(f"{what}: the snapshot was removed") from exc
            raise DiskReadError(f"{what}: cannot open the disk: {exc}") from exc

    @_maps_os_errors()
    def vm_config(self, snapshot: Snapshot) -> VmConfig:
        """The VM's configuration when the snapshot was taken (kept in ``snapshot.json``):
        guest OS, CPUs, memory, firmware, disks and NICs as the VM's config entry gives them
        (see :class:`~providers.simulated.config.SimulatedVmConfig`), or as :meth:`create_vm`
        stored them.

        :raises SnapshotError: the snapshot does not exist (any more).
        """
        target, _, record = self._snapshot(snapshot)
        if "config" not in record:  # a snapshot taken by a backupd that did not capture it
            return target.config
        try:
            return config_from_json(record["config"])
        except ValueError as exc:
            raise ProviderError(f"snapshot {snapshot.id} of VM {target.name!r}: damaged configuration: {exc}") from exc

    @_maps_os_errors()
    def create_vm(
        self,
        config: VmConfig,
        *,
        name: str,
        datastore: str | None,
        disks: Mapping[int, BinaryIO],
    ) -> VmInfo:
        """Make a new, powered-off VM ``name`` from ``config`` in the state folder, its disks
        filled from ``disks`` (keys, labels and sizes as ``config`` gives them), all or
        nothing (see :mod:`providers.simulated._create`). The VM is then like any other:
        listed, snapshotted, backed up; it is not in ``config.vms`` and needs not be.

        :param datastore: ignored: the simulated hypervisor has one store, its state folder.
        :raises VmExists: a VM ``name`` exists or ``config.vms`` declares one.
        :raises ProviderError: a disk stream is missing or short, or the state folder cannot
            be written; nothing was created.
        """
        _create.create_vm(self._layout, self._vms, config, name, disks)
        return self.find_vm(name)

    def close(self) -> None:
        """Forget cached VM descriptions. Idempotent; open readers stay usable."""
        self._vms.forget()

    # -- administration (``backupd sim ...``) ----------------------------------------------

    @_maps_os_errors()
    def rename_vm(self, old: str, new: str) -> VmInfo:
        """Rename a VM, as renaming it in vCenter does: its id, disks, snapshots and CBT stay,
        so backupd's restore point chain goes on. A config entry still called ``old`` declares
        a new VM from then on (made on first use): rename it in the config too.

        :returns: the VM under its new name.
        :raises VmNotFound: no VM ``old``.
        :raises VmExists: a VM ``new`` exists.
        """
        return self._info(self._vms.rename(old, new))

    @_maps_os_errors()
    def write_data(self, vm_name: str, *, disk: int = 0, offset: int, data: bytes) -> Extent:
        """Write ``data`` at byte ``offset`` of a disk as the guest would (any alignment):
        snapshots keep their content, CBT records the extent.

        :param disk: the disk's index in the VM's config (0 = ``Hard disk 1``).
        :returns: the extent written.
        :raises VmNotFound: no such VM.
        :raises InvalidArgument: no such disk, ``data`` empty, or the range is not inside the
            disk.
        """
        target = self._vms.get(vm_name)
        record = target.disk_at(disk)
        if not data:
            raise InvalidArgument(f"VM {vm_name!r} {record.label}: nothing to write (0 bytes)", argument="data")
        if offset < 0 or offset + len(data) > record.capacity_bytes:
            raise InvalidArgument(
                f"VM {vm_name!r} {record.label}: cannot write {len(data)} bytes at offset"
                f" {offset}; the disk has {record.capacity_bytes} bytes",
                argument="offset",
            )
        guest_write(target.paths, record.key, record.capacity_bytes, offset, bytes(data))
        return Extent(offset, len(data))

    @_maps_os_errors()
    def write_random_blocks(
        self, vm_name: str, *, disk: int = 0, blocks: int, seed: int | None = None
    ) -> list[Extent]:
        """Write ``blocks`` 1 MiB blocks of random bytes at distinct random 1 MiB-aligned
        offsets of a disk, as the guest would (the last block of a disk whose size is not a
        multiple of 1 MiB is shorter).

        :param disk: the disk's index in the VM's config.
        :param blocks: how many blocks, ``0 <= blocks <= ceil(capacity / 1 MiB)``.
        :param seed: the same seed on the same disk size writes the same blocks.
        :returns: the extents written, sorted by offset.
        :raises VmNotFound: no such VM.
        :raises InvalidArgument: no such disk, or ``blocks`` out of range.
        """
        target = self._vms.get(vm_name)
        record = target.disk_at(disk)
        slots = range(0, record.capacity_bytes, _MiB)
        if not 0 <= blocks <= len(slots):
            raise InvalidArgument(
                f"VM {vm_name!r} {record.label} has {len(slots)} blocks of 1 MiB;"
                f" cannot write {blocks}",
                argument="blocks",
            )
        rng = random.Random(seed)
        extents = []
        for offset in sorted(rng.sample(slots, blocks)):
            data = rng.randbytes(min(_MiB, record.capacity_bytes - offset))
            guest_write(target.paths, record.key, record.capacity_bytes, offset, data)
            extents.append(Extent(offset, len(data)))
        return extents

    @_maps_os_errors()
    def set_fault(self, vm_name: str, op: str, *, times: int = 1, permanent: bool = False) -> None:
        """Arm a fault for the VM's ``op``, seen at once by every process on this state_dir.

        :param op: ``create_snapshot``, ``quiesce``, ``remove_snapshot`` or ``read``.
        :param times: the next ``times`` calls fail with :class:`TransientProviderError`.
        :param permanent: every call fails with the op's own error (``SnapshotError``,
            ``QuiesceError``, ``SnapshotError``, ``DiskReadError``) until cleared.
        :raises VmNotFound: no such VM.
        :raises InvalidArgument: unknown op, or ``times < 1`` for a transient fault.
        """
        target = self._vms.get(vm_name)
        FaultStore(target.name, target.paths).arm(op, times=times, permanent=permanent)

    @_maps_os_errors()
    def clear_faults(self, vm_name: str) -> None:
        """Disarm every fault and lift every pause of the VM.

        :raises VmNotFound: no such VM.
        """
        target = self._vms.get(vm_name)
        FaultStore(target.name, target.paths).clear()

    @_maps_os_errors()
    def pause(self, vm_name: str, op: str) -> None:
        """Make the VM's ``op`` calls block, without failing, until :meth:`resume` or
        :meth:`clear_faults`; seen at once by every process on this state_dir, including by
        readers already open. A blocked call notices the resume within
        ``PAUSE_POLL_SECONDS`` (50 ms), then goes on as usual (an armed fault of the op
        fires then). Nothing else interrupts it: a VM task blocked in a read holds on
        until the VM is resumed.

        :param op: ``read`` (``DiskReader.read``) or ``create_snapshot`` (before the
            snapshot exists, so a held creation leaves none).
        :raises VmNotFound: no such VM.
        :raises InvalidArgument: ``op`` cannot be paused.
        """
        target = self._vms.get(vm_name)
        FaultStore(target.name, target.paths).pause(op)

    @_maps_os_errors()
    def resume(self, vm_name: str, op: str | None = None) -> None:
        """Lift the pause of the VM's ``op`` (None: every pause of the VM); armed faults
        stay armed.

        :raises VmNotFound: no such VM.
        :raises InvalidArgument: ``op`` cannot be paused.
        """
        target = self._vms.get(vm_name)
        FaultStore(target.name, target.paths).resume(op)

    @_maps_os_errors()
    def paused(self, vm_name: str) -> dict[str, int]:
        """The VM's paused ops, each with how many of its calls are blocked right now in
        any process on this state_dir: ``{op: calls}``. A test waits for ``calls`` to reach
        the number of VM tasks it expects inside the op.

        :raises VmNotFound: no such VM.
        """
        target = self._vms.get(vm_name)
        store = FaultStore(target.name, target.paths)
        blocked = store.blocked()
        return {op: blocked.get(op, 0) for op in store.paused()}

    @_maps_os_errors()
    def faults(self, vm_name: str) -> dict[str, dict[str, Any]]:
        """The VM's armed faults: ``{op: {"permanent": bool, "remaining": int | None}}``.

        :raises VmNotFound: no such VM.
        """
        target = self._vms.get(vm_name)
        return FaultStore(target.name, target.paths).armed()

    @_maps_os_errors()
    def reset_cbt(self, vm_name: str) -> None:
        """Start a new CBT epoch on every disk of the VM: earlier changeIds stop working
        (:class:`CbtUnavailable`), ``"*"`` keeps working.

        :raises VmNotFound: no such VM.
        """
        target = self._vms.get(vm_name)
        for record in target.disks:
            paths = target.paths.disk(record.key)
            with locked(paths.lock, exclusive=True):
                ChangeLog(paths.cbt).reset()

    @_maps_os_errors()
    def disk_path(self, vm_name: str, disk: int = 0) -> Path:
        """The live disk's file: the disk's bytes, exactly ``capacity_bytes`` long.

        :param disk: the disk's index in the VM's config.
        :raises VmNotFound: no such VM.
        :raises InvalidArgument: no such disk.
        """
        target = self._vms.get(vm_name)
        return target.paths.disk(target.disk_at(disk).key).image

    # -- internals --------------------------------------------------------------------------

    def _info(self, vm: Vm) -> VmInfo:
        disks = []
        for record in vm.disks:
            paths = vm.paths.disk(record.key)
            with locked(paths.lock, exclusive=False):
                change_id = ChangeLog(paths.cbt).state().change_id
            disks.append(Disk(record.key, record.label, record.capacity_bytes, change_id))
        return VmInfo(name=vm.name, id=vm.id, power_state=vm.power_state, disks=tuple(disks))

    def _owner(self, snapshot: Snapshot) -> Vm:
        """The VM a snapshot belongs to: the one whose folder holds it (whatever the VM is
        called now: it may have been renamed since), else the one of the name it records.

        :raises VmNotFound: neither exists.
        """
        holder = self._vms.holding(snapshot.id, recorded_name=snapshot.vm_name) if is_snapshot_id(snapshot.id) else None
        return holder or self._vms.get(snapshot.vm_name)

    def _snapshot(self, snapshot: Snapshot) -> tuple[Vm, SnapshotPaths, dict[str, Any]]:
        """The snapshot's VM, folder and record (``snapshot.json``, read-only for callers).
        A record is written once, when the snapshot is created, and never changed, so it is
        kept in memory after its first read; each use checks the folder still has it (one
        ``stat``), so a removed snapshot is never answered from memory.

        :raises SnapshotError: the snapshot does not exist (any more).
        """
        with self._lock:
            known = self._records.get(snapshot.id)
        if known is not None:
            if known[1].meta.exists():
                return known
            with self._lock:
                self._records.pop(snapshot.id, None)
        target = self._owner(snapshot)
        folder = _snapshot_folder(target, snapshot)
        record = read_json(folder.meta)
        if record is None:
            raise SnapshotError(f"snapshot {snapshot.id} of VM {target.name!r} does not exist")
        with self._lock:
            self._records[snapshot.id] = (target, folder, record)
        return target, folder, record


@contextmanager
def _disks_locked(paths: VmPaths, keys: Iterable[int]) -> Iterator[None]:
    """Hold the exclusive locks of the disks ``keys``, in ascending key order."""
    with ExitStack() as stack:
        for key in sorted(keys):
            stack.enter_context(locked(paths.disk(key).lock, exclusive=True))
        yield


def _sweep(paths: VmPaths) -> None:
    """Delete snapshot folders a crashed process left half created or half removed; the VM
    lock is held, so no live operation owns them."""
    for name in os.listdir(paths.snapshots):
        if name.startswith("."):
            shutil.rmtree(paths.snapshots / name, ignore_errors=True)


def _take(seconds: float) -> None:
    """Let an operation take ``seconds``."""
    if seconds > 0:
        time.sleep(seconds)


def _snapshot_folder(vm: Vm, snapshot: Snapshot) -> SnapshotPaths:
    try:
        return vm.paths.snapshot(snapshot.id)
    except ValueError as exc:
        raise SnapshotError(f"VM {vm.name!r}: {exc}") from exc


def _snapshot_of(record: dict[str, Any]) -> Snapshot:
    return Snapshot(
        id=record["id"],
        vm_name=record["vm_name"],
        name=record["name"],
        description=record["description"],
        created_at=datetime.fromisoformat(record["created_at"]),
        quiesced=record["quiesced"],
    )


def _disk_of(entry: dict[str, Any]) -> Disk:
    return Disk(entry["key"], entry["label"], entry["capacity_bytes"], entry["change_id"])


def _disk_entry(snapshot: Snapshot, record: dict[str, Any], key: int) -> dict[str, Any]:
    entries: list[dict[str, Any]] = record["disks"]
    for entry in entries:
        if entry["key"] == key:
            return entry
    raise ProviderError(
        f"disk {key} is not part of snapshot {snapshot.id} of VM {snapshot.vm_name!r}"
    )
