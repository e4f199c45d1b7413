"""Full-VM restore into the simulated hypervisor: a new VM made from a captured configuration
and disk streams, all or nothing.

The VM is built in ``vms/.<id>.creating/`` (its disks filled from the streams, its
``vm.json`` written with the configuration and ``"created": true``), then, under the provider
lock, renamed to ``vms/<id>`` and added to the name index in one step. Until that step no
process sees the VM; if anything fails or the call is interrupted (``KeyboardInterrupt``
included) the folder is removed before the error propagates. The builder holds ``flock`` on
``create.lock`` in the folder, so a folder whose lock is free was left by a process that died
mid-way (``kill -9``) and the next ``create_vm`` removes it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from providers.base import ProviderError, VmConfig, VmExists
from providers.simulated._cbt import ChangeLog
from providers.simulated._disk import fill_from_stream
from providers.simulated._layout import Layout, VmPaths, make_dir, open_file, write_json
from providers.simulated._vms import VmCatalog
from providers.vm_config_json import config_to_json

_LOCK = "create.lock"


def create_vm(
    layout: Layout, catalog: VmCatalog, config: VmConfig, name: str, disks: Mapping[int, BinaryIO]
) -> None:
    """Make the powered-off VM ``name`` from ``config``, each disk filled from ``disks[key]``.

    :raises VmExists: a VM ``name`` exists or the config declares one; nothing was created.
    :raises ProviderError: a disk has no stream, two disks share a key, a stream ended early,
        or the state folder could not be written; nothing was created.
    :raises BaseException: whatever a stream raises (a damaged block, ``KeyboardInterrupt``),
        unchanged; nothing was created.
    """
    _sweep_dead_creations(layout)
    if name in catalog.names():
        raise VmExists(f"a VM named {name!r} exists in simulated hypervisor state {layout.root}")
    keys = [disk.key for disk in config.disks]
    if len(set(keys)) != len(keys):
        raise ProviderError(f"VM configuration {config.name!r} has two disks with one device key: {keys}")
    missing = [key for key in keys if key not in disks]
    if missing:
        raise ProviderError(f"no data given for disk(s) {missing} of VM configuration {config.name!r}")
    folder = layout.creating(layout.new_vm_id())
    make_dir(folder)
    lock = open_file(folder / _LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build(folder, config, name, disks)
        final = layout.publish(name, folder, taken=catalog.declared)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    (final.root / _LOCK).unlink(missing_ok=True)


def _build(folder: Path, config: VmConfig, name: str, disks: Mapping[int, BinaryIO]) -> None:
    paths = VmPaths(folder)
    make_dir(paths.snapshots)
    records = []
    for disk in config.disks:
        files = paths.disk(disk.key)
        fill_from_stream(files.image, disks[disk.key], disk.capacity_bytes, f"VM {name!r} {disk.label} (disk {disk.key})")
        ChangeLog(files.cbt).reset()
        records.append({"key": disk.key, "label": disk.label, "capacity_bytes": disk.capacity_bytes,
                        "source": "restored"})
    write_json(paths.meta, {
        "name": name,
        "uuid": str(uuid.uuid4()),
        "disks": records,
        "created": True,
        "power_state": "poweredOff",
        "config": config_to_json(replace(config, name=name)),
    })


def _sweep_dead_creations(layout: Layout) -> None:
    """Remove the folders of creations whose process died (their lock is free)."""
    for folder in layout.creating_folders():
        try:
            fd = os.open(folder / _LOCK, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # just made, not locked yet; or removed meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live creation
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
