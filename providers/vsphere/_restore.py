"""Full-VM restore: a new, powered-off VM from a :class:`VmConfig` and its disks' bytes.

Steps (all or nothing): the datastore folder ``[DS] NAME`` (``FileManager.MakeDirectory``);
per disk, its bytes uploaded as ``NAME/NAME_N-flat.vmdk`` and a monolithic-flat descriptor
``NAME/NAME_N.vmdk`` (``PUT`` on the datastore endpoint); then ``Folder.CreateVM_Task`` in
the datacenter's VM folder and the first compute resource's resource pool, the disks
attached as existing files, controllers and NICs as the config says. On any failure or
interruption (``KeyboardInterrupt`` included) the VM is destroyed (``Destroy_Task``, which
deletes its files) or, before it exists, the folder is deleted (``DeleteDatastoreFile_Task``)
— only what this call created.

Limit: the upload writes every byte, so a thin disk's zeros take space on a datastore that
does not thin out written zeros (VMFS allocates them; NFS and vSAN may not).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, BinaryIO

from pyVmomi import vim

from providers.base import ProviderError, VmConfig, VmExists
from providers.vsphere._errors import Operation, translate
from providers.vsphere._snapshots import task_info, wait_task
from providers.vsphere._transport import DatastoreFile, DiskTransport
from providers.vsphere._vmconfig import adapter_type, descriptor, device_changes

log = logging.getLogger("backupd.providers.vsphere")


def create_vm(
    content: vim.ServiceInstanceContent,
    transport: DiskTransport,
    *,
    datacenter: Any,
    datacenter_name: str,
    datastore: str,
    config: VmConfig,
    name: str,
    disks: Mapping[int, BinaryIO],
    networks: Mapping[str, Any],
    timeout: float,
) -> vim.VirtualMachine:
    """Create the VM; see the module docstring.

    :param datacenter: the datacenter's moref; ``datacenter_name`` its inventory path.
    :param datastore: the datastore's name.
    :raises VmExists: the datastore folder ``NAME`` exists already (nothing was created).
    :raises ProviderError: the VM could not be created; nothing was left behind.
    """
    missing = [disk.label for disk in config.disks if disk.key not in disks]
    if missing:
        raise ProviderError(f"restoring VM {name!r}: no data given for {', '.join(missing)}")
    folder = f"[{datastore}] {name}"
    file_manager = content.fileManager
    try:
        file_manager.MakeDirectory(name=folder, datacenter=datacenter, createParentDirectories=False)
    except vim.fault.FileAlreadyExists as exc:
        raise VmExists(f"restoring VM {name!r}: datastore folder {folder} exists already") from exc
    vm = None
    try:
        disk_files: dict[int, str] = {}
        for number, disk in enumerate(config.disks, start=1):
            base = f"{name}/{name}_{number}"
            flat = DatastoreFile(datacenter_name, datastore, f"{base}-flat.vmdk")
            transport.upload(flat, disks[disk.key], disk.capacity_bytes)
            text = descriptor(f"{name}_{number}-flat.vmdk", disk.capacity_bytes, thin=disk.thin, adapter=adapter_type(disk))
            vmdk = DatastoreFile(datacenter_name, datastore, f"{base}.vmdk")
            transport.upload(vmdk, _Bytes(text), len(text))
            disk_files[disk.key] = vmdk.datastore_path
        spec = vim.vm.ConfigSpec(
            name=name,
            guestId=config.guest_os,
            numCPUs=config.cpus,
            memoryMB=config.memory_bytes >> 20,
            firmware=config.firmware,
            files=vim.vm.FileInfo(vmPathName=folder),
            deviceChange=device_changes(config, disk_files, networks),
        )
        operation = Operation(f"creating VM {name!r}", failed=ProviderError)
        task = datacenter.vmFolder.CreateVM_Task(config=spec, pool=_resource_pool(content, datacenter))
        try:
            vm = wait_task(content, task, timeout=timeout, operation=operation)
        except BaseException:
            vm = _cancel(content, task, timeout)
            raise
        return vm
    except BaseException as exc:
        _undo(content, vm, folder, datacenter, timeout, name)
        if isinstance(exc, vim.fault.DuplicateName):
            raise VmExists(f"restoring VM {name!r}: a VM of that name exists in the folder") from exc
        if isinstance(exc, Exception) and not isinstance(exc, ProviderError):
            raise translate(exc, Operation(f"restoring VM {name!r}")) from exc
        raise


class _Bytes:
    """A descriptor's bytes as a stream."""

    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def read(self, size: int) -> bytes:
        chunk = self._data[self._at : self._at + size]
        self._at += len(chunk)
        return chunk


def _resource_pool(content: vim.ServiceInstanceContent, datacenter: Any) -> Any:
    view = content.viewManager.CreateContainerView(datacenter.hostFolder, [vim.ComputeResource], True)
    try:
        for compute in view.view:
            if compute.resourcePool is not None:
                return compute.resourcePool
    finally:
        view.Destroy()
    raise ProviderError("no compute resource with a resource pool in the datacenter")


def _cancel(content: vim.ServiceInstanceContent, task: Any, timeout: float) -> Any:
    """Cancel a CreateVM task; the VM it made anyway, if any."""
    try:
        info = task_info(content, task)
        if info.state in ("queued", "running") and info.cancelable:
            task.CancelTask()
        wait_task(content, task, timeout=timeout, operation=Operation("cancelling the VM creation"))
        return task_info(content, task).result
    except BaseException:  # noqa: BLE001 - cancelled, failed or interrupted: look once more
        try:
            info = task_info(content, task)
            return info.result if info.state == "success" else None
        except BaseException:  # noqa: BLE001
            return None


def _undo(content: vim.ServiceInstanceContent, vm: Any, folder: str, datacenter: Any, timeout: float, name: str) -> None:
    """Remove what a failed restore created; failures are logged (the restore's error wins)."""
    try:
        if vm is not None:
            wait_task(content, vm.Destroy_Task(), timeout=timeout, operation=Operation(f"removing the half-restored VM {name!r}"))
        task = content.fileManager.DeleteDatastoreFile_Task(name=folder, datacenter=datacenter)
        try:
            wait_task(content, task, timeout=timeout, operation=Operation(f"deleting {folder}"))
        except ProviderError as exc:
            if vm is None:
                raise
            log.debug("%s after Destroy_Task: %s", folder, exc)  # Destroy_Task took the folder with it
    except BaseException as exc:  # noqa: BLE001
        log.error("restoring VM %r: could not remove what was created (%s: %s); remove %s by hand", name, type(exc).__name__, exc, folder)
        if isinstance(exc, KeyboardInterrupt):
            raise
