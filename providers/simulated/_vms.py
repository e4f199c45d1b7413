"""The VMs: from their config to their folders, made on first use and cached.

A VM's folder is named ``vm-<n>`` (allocated once and kept in ``provider.json``), so whatever
a VM is called never becomes a path. Its stable id, the one restore points and CBT chains
follow, is a random UUID kept in its ``vm.json`` (as vSphere's ``instanceUuid``), so VMs of two
simulated providers never share an id; a rename (:meth:`VmCatalog.rename`) changes the name →
folder index and ``vm.json``'s name, never the id. The VMs of a provider are the ones its state folder holds plus the ones the
config declares that were not made yet: a VM the config declares is made the first time it is
used, under the VM lock, so two processes racing never import an image twice (a disk declared
as a size becomes an empty sparse file, one declared as an image path is copied sparsely).
``vm.json`` lists the disks made so far; a disk added to the config later is made on the next
use, and a disk already made keeps its content whatever its config entry says now. A VM made
by a full-VM restore (``create_vm``) is in the state folder only, with its configuration in
its ``vm.json``; a VM whose config entry is removed stays in the state folder, as a VM removed
from backupd's config stays on a real hypervisor.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from providers.base import DiskConfig, NicConfig, ProviderError, VmConfig, VmNotFound
from providers.simulated._cbt import ChangeLog
from providers.simulated._disk import create_empty, import_image
from providers.simulated._errors import InvalidArgument
from providers.simulated._layout import Layout, VmPaths, locked, read_json, write_json
from providers.simulated.config import CONTROLLER_KINDS, SimulatedVmConfig
from providers.vm_config_json import config_from_json

#: device key of a VM's first disk; the next ones count up (vSphere numbers SCSI disks so)
FIRST_DISK_KEY = 2000
#: disks per controller bus, by controller kind (vSphere: 15 SCSI targets besides the
#: controller's own unit 7, 30 SATA ports, 15 NVMe namespaces, 2 IDE devices)
_UNITS_PER_BUS = {"scsi": 15, "sata": 30, "nvme": 15, "ide": 2}
#: the configuration of a VM whose config entry is gone (only its disks are known)
_DEFAULTS = SimulatedVmConfig(name="defaults", disks=[1])


@dataclass(frozen=True)
class DiskRecord:
    """A live disk: device key, label (``Hard disk <n>``) and size in bytes."""

    key: int
    label: str
    capacity_bytes: int


@dataclass(frozen=True)
class Vm:
    """A VM whose disks exist.

    :ivar config: its configuration now (what a snapshot captures).
    """

    name: str
    id: str
    power_state: str
    paths: VmPaths
    disks: tuple[DiskRecord, ...]
    config: VmConfig

    def disk_at(self, index: int) -> DiskRecord:
        """The disk at ``index`` in the config's order (0 = ``Hard disk 1``).

        :raises InvalidArgument: no such disk.
        """
        if not 0 <= index < len(self.disks):
            raise InvalidArgument(
                f"VM {self.name!r} has {len(self.disks)} disk(s)"
                f" (index 0..{len(self.disks) - 1}); no disk {index}",
                argument="disk",
            )
        return self.disks[index]


class VmCatalog:
    """The VMs of one provider, thread-safe.

    :param provider_name: for messages.
    :param layout: the state folder.
    :param configs: the VMs declared in the config.
    """

    def __init__(
        self, provider_name: str, layout: Layout, configs: list[SimulatedVmConfig]
    ) -> None:
        self._provider_name = provider_name
        self._layout = layout
        self._configs = {vm.name: vm for vm in configs}
        self._vms: dict[str, Vm] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Every VM's name, sorted: those the state folder holds and those declared."""
        made = {name for name, folder in self._layout.vm_names().items() if self._paths(folder).meta.exists()}
        return sorted(made | set(self._configs))

    def declared(self, name: str) -> bool:
        """Whether the config declares a VM called ``name``."""
        return name in self._configs

    def get(self, name: str) -> Vm:
        """The VM ``name``, its declared disks made if this is their first use.

        :raises VmNotFound: neither the state folder nor the config has such a VM.
        :raises ProviderError: a disk image is missing or cannot be read.
        """
        with self._lock:
            known = self._vms.get(name)
        if known is not None:
            return known
        declared = self._configs.get(name)
        if declared is None and self._layout.vm_id(name) is None:
            raise VmNotFound(f"no VM named {name!r} on simulated provider {self._provider_name!r}")
        paths = self._layout.vm_paths(name)
        meta = read_json(paths.meta)
        if declared is not None and (meta is None or len(meta["disks"]) < len(declared.disks)):
            with locked(paths.lock, exclusive=True):
                meta = _make_disks(declared, paths)
        if meta is None:  # an index entry whose disks were never made, and no config now
            raise VmNotFound(f"no VM named {name!r} on simulated provider {self._provider_name!r}")
        if "uuid" not in meta:  # a VM made before ids were UUIDs: given one now, for good
            with locked(paths.lock, exclusive=True):
                meta = read_json(paths.meta)
                meta.setdefault("uuid", str(uuid.uuid4()))
                write_json(paths.meta, meta)
        records = meta["disks"][: len(declared.disks)] if declared is not None else meta["disks"]
        disks = tuple(DiskRecord(d["key"], d["label"], d["capacity_bytes"]) for d in records)
        vm = Vm(
            name=name,
            id=meta["uuid"],
            power_state=declared.power_state if declared is not None else meta.get("power_state", "poweredOn"),
            paths=paths,
            disks=disks,
            config=_configuration(name, declared, meta, disks),
        )
        with self._lock:
            return self._vms.setdefault(name, vm)

    def in_folder(self, folder: str) -> Vm | None:
        """The VM of folder ``vms/<folder>`` under its current name, or None when no name maps
        to it."""
        for name, known in self._layout.vm_names().items():
            if known == folder:
                return self.get(name)
        return None

    def holding(self, snapshot_id: str, *, recorded_name: str) -> Vm | None:
        """The VM whose folder holds snapshot ``snapshot_id`` (a valid snapshot id), or None.

        :param recorded_name: the VM name the snapshot records: the folder of the VM called
            that (as this catalog knows it, else as the index says) is looked in first, one
            ``stat``; only when it does not hold the snapshot (the VM was renamed since) is
            every VM folder looked in.
        """
        with self._lock:
            known = self._vms.get(recorded_name)
        if known is not None and known.paths.snapshot(snapshot_id).root.exists():
            return known  # as :meth:`get` answers: a VM this catalog has met under that name
        names = self._layout.vm_names()
        recorded = names.get(recorded_name)
        if recorded is not None and self._paths(recorded).snapshot(snapshot_id).root.exists():
            return self.get(recorded_name)
        for name, folder in sorted(names.items(), key=lambda item: item[1]):
            if folder != recorded and self._paths(folder).snapshot(snapshot_id).root.exists():
                return self.get(name)
        return None

    def rename(self, old: str, new: str) -> Vm:
        """Call the VM ``old`` ``new`` from now on (id, disks, snapshots and CBT unchanged).

        A config entry still called ``old`` declares a new VM from then on, made on its first
        use; rename it in the config too.

        :raises VmNotFound: no VM ``old``.
        :raises VmExists: a VM ``new`` exists (a VM the config declares but that was never
            used does not exist yet: the renamed VM becomes the one that entry declares).
        """
        vm = self.get(old)  # a declared VM not made yet is made first: it has an id then
        with locked(vm.paths.lock, exclusive=True):
            self._layout.rename(old, new)
            meta = read_json(vm.paths.meta)
            meta["name"] = new
            write_json(vm.paths.meta, meta)
        self.forget()
        return self.get(new)

    def forget(self) -> None:
        """Drop the cache (VMs are re-read from ``state_dir`` on next use)."""
        with self._lock:
            self._vms.clear()

    def _paths(self, folder: str) -> VmPaths:
        return VmPaths(self._layout.root / "vms" / folder)


def _configuration(
    name: str, declared: SimulatedVmConfig | None, meta: dict[str, Any], disks: tuple[DiskRecord, ...]
) -> VmConfig:
    """The VM's configuration: as ``create_vm`` stored it in ``vm.json``, else from its config
    entry (defaults when it has none any more) with its disks as made."""
    if "config" in meta:
        return replace(config_from_json(meta["config"]), name=name)
    source = declared or _DEFAULTS
    kind = CONTROLLER_KINDS[source.disk_controller]
    per_bus = _UNITS_PER_BUS[kind]
    disk_configs = []
    for index, disk in enumerate(disks):
        bus, unit = divmod(index, per_bus)
        if kind == "scsi" and unit >= 7:
            unit += 1  # unit 7 is the SCSI controller's own
        disk_configs.append(DiskConfig(
            key=disk.key, label=disk.label, controller=kind, controller_model=source.disk_controller,
            bus_number=bus, unit_number=unit, capacity_bytes=disk.capacity_bytes, thin=source.thin_disks,
        ))
    return VmConfig(
        name=name,
        guest_os=source.guest_os,
        cpus=source.cpus,
        memory_bytes=source.memory,
        firmware=source.firmware,
        disks=tuple(disk_configs),
        nics=tuple(
            NicConfig(label=f"Network adapter {n}", network=nic.network, adapter_type=nic.adapter_type)
            for n, nic in enumerate(source.nics, start=1)
        ),
    )


def _make_disks(config: SimulatedVmConfig, paths: VmPaths) -> dict[str, Any]:
    """Make the disks of ``config`` that ``vm.json`` does not list yet; the VM lock is held."""
    meta = read_json(paths.meta) or {"name": config.name, "uuid": str(uuid.uuid4()), "disks": []}
    for index in range(len(meta["disks"]), len(config.disks)):
        key = FIRST_DISK_KEY + index
        source = config.disks[index]
        disk = paths.disk(key)
        with locked(disk.lock, exclusive=True):
            if isinstance(source, Path):
                capacity = _import(config.name, source, disk.image)
            else:
                capacity = int(source)
                create_empty(disk.image, capacity)
            ChangeLog(disk.cbt).reset()
        meta["disks"].append(
            {
                "key": key,
                "label": f"Hard disk {index + 1}",
                "capacity_bytes": capacity,
                "source": str(source) if isinstance(source, Path) else "empty",
            }
        )
        write_json(paths.meta, meta)
    return meta


def _import(vm_name: str, source: Path, image: Path) -> int:
    try:
        return import_image(source, image)
    except FileNotFoundError as exc:
        raise ProviderError(f"VM {vm_name!r}: disk image {source} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise ProviderError(f"VM {vm_name!r}: cannot import disk image {source}: {exc}") from exc
