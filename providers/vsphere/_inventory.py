"""VMs of a vCenter: one PropertyCollector pass over a ContainerView of the whole inventory.

A VM is named in a job as vSphere shows it (``web-01``) or by its inventory path from the root
folder (``DC0/vm/prod/web-01``: datacenter, the ``vm`` folder, subfolders, name). vSphere
names are unique per folder, not per vCenter, so a bare name matching several VMs is refused
with :class:`~providers.base.AmbiguousVmName` listing their paths. With ``datacenter`` in the
config only that datacenter's VMs are seen. Templates are not VMs to back up and are skipped.

Properties are read with ``RetrievePropertiesEx`` / ``ContinueRetrievePropertiesEx`` (vSphere
API: ``PropertyCollector``): a property that is unset (a VM still being created has no
``config``) is simply absent from the answer, never read through an accessor that fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim, vmodl

from providers.base import AmbiguousVmName, Disk, VmInfo, VmNotFound

#: objects per RetrievePropertiesEx page
_PAGE = 500
_VM_PROPERTIES = ["name", "parent", "config.instanceUuid", "config.template", "config.hardware.device", "runtime.powerState"]


@dataclass(frozen=True)
class VmRecord:
    """A VM as the inventory pass saw it.

    :ivar moref: the VM's managed object reference.
    :ivar path: its inventory path from the root folder, ``DC0/vm/prod/web-01``.
    :ivar datacenter: the name of its datacenter.
    :ivar info: what the Provider interface shows.
    """

    moref: vim.VirtualMachine
    path: str
    datacenter: str
    info: VmInfo


def retrieve(content: vim.ServiceInstanceContent, objects: Iterable[Any], object_type: type, paths: list[str]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """``(moref, {property path: value})`` for each object, through the PropertyCollector;
    unset properties are missing from the dict.

    :param objects: morefs of ``object_type``.
    """
    specs = [vmodl.query.PropertyCollector.ObjectSpec(obj=obj, skip=False) for obj in objects]
    if not specs:
        return
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=specs,
        propSet=[vmodl.query.PropertyCollector.PropertySpec(type=object_type, pathSet=paths, all=False)],
    )
    yield from _pages(content, spec)


def retrieve_view(content: vim.ServiceInstanceContent, root: Any, object_type: type, paths: list[str]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """``(moref, properties)`` of every ``object_type`` under ``root`` (a ContainerView,
    destroyed afterwards)."""
    view = content.viewManager.CreateContainerView(root, [object_type], True)
    try:
        traversal = vmodl.query.PropertyCollector.TraversalSpec(
            name="view", type=vim.view.ContainerView, path="view", skip=False
        )
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[traversal])],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=object_type, pathSet=paths, all=False)],
        )
        yield from _pages(content, spec)
    finally:
        view.Destroy()


def _pages(content: vim.ServiceInstanceContent, spec: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    collector = content.propertyCollector
    options = vmodl.query.PropertyCollector.RetrieveOptions(maxObjects=_PAGE)
    result = collector.RetrievePropertiesEx([spec], options)
    while result is not None:
        for item in result.objects:
            yield item.obj, {prop.name: prop.val for prop in item.propSet or []}
        if not result.token:
            break
        result = collector.ContinueRetrievePropertiesEx(result.token)


def live_disks(devices: Iterable[Any]) -> tuple[Disk, ...]:
    """The VirtualDisks among ``devices``, in device order, as :class:`Disk` values."""
    return tuple(
        Disk(
            key=device.key,
            label=device.deviceInfo.label if device.deviceInfo else f"disk {device.key}",
            capacity_bytes=int(device.capacityInBytes or (device.capacityInKB or 0) * 1024),
            change_id=getattr(device.backing, "changeId", None) or None,
        )
        for device in devices or ()
        if isinstance(device, vim.vm.device.VirtualDisk)
    )


def scan(content: vim.ServiceInstanceContent, datacenter: str | None) -> list[VmRecord]:
    """Every VM (templates excepted), sorted by name then path.

    :param datacenter: only VMs of the datacenter of that name.
    """
    names: dict[str, tuple[str, Any]] = {}  # moref value → (name, parent moref)
    kinds: dict[str, type] = {}
    for kind in (vim.Folder, vim.Datacenter):
        for obj, props in retrieve_view(content, content.rootFolder, kind, ["name", "parent"]):
            names[obj._moId] = (props.get("name", obj._moId), props.get("parent"))
            kinds[obj._moId] = kind
    records = []
    for obj, props in retrieve_view(content, content.rootFolder, vim.VirtualMachine, _VM_PROPERTIES):
        if props.get("config.template") or "config.instanceUuid" not in props:
            continue  # a template, or a VM still being created (no config yet)
        parts, dc_name = [props["name"]], ""
        parent = props.get("parent")
        while parent is not None and parent._moId in names and parent._moId != content.rootFolder._moId:
            name, grand = names[parent._moId]
            parts.append(name)
            if kinds[parent._moId] is vim.Datacenter:
                dc_name = name
            parent = grand
        if datacenter is not None and dc_name != datacenter:
            continue
        info = VmInfo(
            name=props["name"],
            id=props["config.instanceUuid"],
            power_state=str(props.get("runtime.powerState", "poweredOff")),
            disks=live_disks(props.get("config.hardware.device") or ()),
        )
        records.append(VmRecord(moref=obj, path="/".join(reversed(parts)), datacenter=dc_name, info=info))
    records.sort(key=lambda record: (record.info.name, record.path))
    return records


def resolve(records: list[VmRecord], name: str, *, where: str) -> VmRecord:
    """The VM a job names: an inventory path (it has a ``/``) or a name.

    :param where: the provider, for messages.
    :raises VmNotFound: nothing matches.
    :raises AmbiguousVmName: a bare name matches several VMs.
    """
    if "/" in name:
        matches = [record for record in records if record.path == name.strip("/")]
    else:
        matches = [record for record in records if record.info.name == name]
    if not matches:
        raise VmNotFound(f"no VM {name!r} on {where}")
    if len(matches) > 1:
        raise AmbiguousVmName(name, [record.path for record in matches])
    return matches[0]
