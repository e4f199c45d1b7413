"""The VMs: from their config to their folders, made on first use and cached.

A VM's folder is named by its id (``vm-<n>``, allocated once and kept in ``provider.json``),
so whatever a VM is called never becomes a path. Its disks are made the first time the VM is
used, under the VM lock, so two processes racing never import an image twice: a disk declared
as a size becomes an empty sparse file, one declared as an image path is copied sparsely.
``vm.json`` lists the disks made so far; a disk added to the config later is made on the next
use, and a disk already made keeps its content whatever its config entry says now.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from providers.base import ProviderError, VmNotFound
from providers.simulated._cbt import ChangeLog
from providers.simulated._disk import create_empty, import_image
from providers.simulated._errors import InvalidArgument
from providers.simulated._layout import Layout, VmPaths, locked, read_json, write_json
from providers.simulated.config import SimulatedVmConfig

#: device key of a VM's first disk; the next ones count up (vSphere numbers SCSI disks so)
FIRST_DISK_KEY = 2000


@dataclass(frozen=True)
class DiskRecord:
    """A live disk: device key, label (``Hard disk <n>``) and size in bytes."""

    key: int
    label: str
    capacity_bytes: int


@dataclass(frozen=True)
class Vm:
    """A VM whose disks exist."""

    name: str
    id: str
    power_state: str
    paths: VmPaths
    disks: tuple[DiskRecord, ...]

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
        """The declared VM names, sorted."""
        return sorted(self._configs)

    def get(self, name: str) -> Vm:
        """The VM ``name``, its disks made if this is their first use.

        :raises VmNotFound: the config declares no such VM.
        :raises ProviderError: a disk image is missing or cannot be read.
        """
        with self._lock:
            known = self._vms.get(name)
        if known is not None:
            return known
        config = self._configs.get(name)
        if config is None:
            raise VmNotFound(f"no VM named {name!r} on simulated provider {self._provider_name!r}")
        paths = self._layout.vm_paths(name)
        meta = read_json(paths.meta)
        if meta is None or len(meta["disks"]) < len(config.disks):
            with locked(paths.lock, exclusive=True):
                meta = _make_disks(config, paths)
        vm = Vm(
            name=name,
            id=paths.root.name,
            power_state=config.power_state,
            paths=paths,
            disks=tuple(
                DiskRecord(d["key"], d["label"], d["capacity_bytes"])
                for d in meta["disks"][: len(config.disks)]
            ),
        )
        with self._lock:
            return self._vms.setdefault(name, vm)

    def forget(self) -> None:
        """Drop the cache (VMs are re-read from ``state_dir`` on next use)."""
        with self._lock:
            self._vms.clear()


def _make_disks(config: SimulatedVmConfig, paths: VmPaths) -> dict[str, Any]:
    """Make the disks of ``config`` that ``vm.json`` does not list yet; the VM lock is held."""
    meta = read_json(paths.meta) or {"name": config.name, "id": paths.root.name, "disks": []}
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
