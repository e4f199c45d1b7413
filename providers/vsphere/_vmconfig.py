"""A VM's configuration both ways: vSphere's ``VirtualMachineConfigInfo`` → :class:`VmConfig`
(what a restore point keeps), and :class:`VmConfig` → the device specs of ``CreateVM_Task``.

One table per device family, used in both directions: controllers (kind, model) ↔ pyVmomi
class, network adapters (adapter type) ↔ pyVmomi class.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pyVmomi import vim

from providers.base import DiskConfig, NicConfig, ProviderError, VmConfig

Device = vim.vm.device
#: (controller kind, model) ↔ the pyVmomi controller class (vSphere API: VirtualController)
CONTROLLERS: Mapping[tuple[str, str], type] = {
    ("scsi", "pvscsi"): Device.ParaVirtualSCSIController,
    ("scsi", "lsilogic"): Device.VirtualLsiLogicController,
    ("scsi", "lsilogic-sas"): Device.VirtualLsiLogicSASController,
    ("scsi", "buslogic"): Device.VirtualBusLogicController,
    ("sata", "ahci"): Device.VirtualAHCIController,
    ("nvme", "nvme"): Device.VirtualNVMEController,
    ("ide", "ide"): Device.VirtualIDEController,
}
#: adapter type ↔ the pyVmomi network adapter class (vSphere API: VirtualEthernetCard)
NICS: Mapping[str, type] = {
    "vmxnet3": Device.VirtualVmxnet3,
    "e1000e": Device.VirtualE1000e,
    "e1000": Device.VirtualE1000,
    "vmxnet2": Device.VirtualVmxnet2,
    "pcnet32": Device.VirtualPCNet32,
}
#: IDE controllers every new VM has (keys 200 and 201, buses 0 and 1)
_IDE_KEYS = {0: 200, 1: 201}


def _controller_kind(device: Any) -> tuple[str, str]:
    for (kind, model), cls in CONTROLLERS.items():
        if type(device) is cls:
            return kind, model
    raise ProviderError(f"unknown disk controller type {type(device).__name__} ({device.deviceInfo.label if device.deviceInfo else device.key})")


def _nic_type(device: Any) -> str:
    for name, cls in NICS.items():
        if type(device) is cls:
            return name
    return type(device).__name__


def to_vm_config(name: str, config: Any, network_names: Mapping[str, str]) -> VmConfig:
    """A VM's (or a snapshot's) ``config`` as a :class:`VmConfig`.

    :param network_names: distributed port group key → name (port group backings name a
        key, not a network).
    :raises ProviderError: a disk on a controller of an unknown type.
    """
    devices = {device.key: device for device in config.hardware.device or ()}
    disks, nics = [], []
    for device in config.hardware.device or ():
        label = device.deviceInfo.label if device.deviceInfo else str(device.key)
        if isinstance(device, Device.VirtualDisk):
            controller = devices.get(device.controllerKey)
            if controller is None:
                raise ProviderError(f"{label}: its controller {device.controllerKey} is not among the devices")
            kind, model = _controller_kind(controller)
            disks.append(DiskConfig(
                key=device.key, label=label, controller=kind, controller_model=model,
                bus_number=int(controller.busNumber), unit_number=int(device.unitNumber or 0),
                capacity_bytes=int(device.capacityInBytes or (device.capacityInKB or 0) * 1024),
                thin=bool(getattr(device.backing, "thinProvisioned", False)),
            ))
        elif isinstance(device, Device.VirtualEthernetCard):
            backing = device.backing
            if isinstance(backing, Device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
                network = network_names.get(backing.port.portgroupKey, backing.port.portgroupKey)
            else:
                network = getattr(backing, "deviceName", None) or ""
            nics.append(NicConfig(label=label, network=network, adapter_type=_nic_type(device)))
    return VmConfig(
        name=name,
        guest_os=config.guestId or "otherGuest",
        cpus=int(config.hardware.numCPU),
        memory_bytes=int(config.hardware.memoryMB) << 20,
        firmware=config.firmware or "bios",
        disks=tuple(disks),
        nics=tuple(nics),
    )


def device_changes(config: VmConfig, disk_files: Mapping[int, str], networks: Mapping[str, Any]) -> list[Any]:
    """The ``deviceChange`` of ``CreateVM_Task``: a controller per (kind, model, bus), the
    disks attached as existing files (no file operation), the NICs.

    :param disk_files: disk key → datastore path of its uploaded ``.vmdk`` descriptor.
    :param networks: network name → its moref (``vim.Network``, or a distributed port group).
    :raises ProviderError: an unknown controller or adapter, a network that does not exist.
    """
    changes: list[Any] = []
    controller_keys: dict[tuple[str, str, int], int] = {}
    next_key = iter(range(-100, -10_000, -1))
    for disk in config.disks:
        spot = (disk.controller, disk.controller_model, disk.bus_number)
        if spot not in controller_keys:
            cls = CONTROLLERS.get((disk.controller, disk.controller_model))
            if cls is None:
                raise ProviderError(f"{disk.label}: unknown controller {disk.controller}/{disk.controller_model}")
            if disk.controller == "ide":
                controller_keys[spot] = _IDE_KEYS[disk.bus_number]
            else:
                key = next(next_key)
                controller = cls(key=key, busNumber=disk.bus_number)
                if isinstance(controller, Device.VirtualSCSIController):
                    controller.sharedBus = Device.VirtualSCSIController.Sharing.noSharing
                changes.append(Device.VirtualDeviceSpec(operation="add", device=controller))
                controller_keys[spot] = key
        backing = Device.VirtualDisk.FlatVer2BackingInfo(
            fileName=disk_files[disk.key], diskMode="persistent", thinProvisioned=disk.thin
        )
        device = Device.VirtualDisk(
            key=next(next_key), controllerKey=controller_keys[spot], unitNumber=disk.unit_number,
            capacityInBytes=disk.capacity_bytes, backing=backing,
        )
        changes.append(Device.VirtualDeviceSpec(operation="add", device=device))
    for nic in config.nics:
        cls = NICS.get(nic.adapter_type)
        if cls is None:
            raise ProviderError(f"{nic.label}: unknown network adapter type {nic.adapter_type!r}")
        network = networks.get(nic.network)
        if network is None:
            raise ProviderError(f"{nic.label}: no network {nic.network!r} here (networks: {', '.join(sorted(networks)) or 'none'})")
        changes.append(Device.VirtualDeviceSpec(operation="add", device=cls(key=next(next_key), backing=_nic_backing(network))))
    return changes


def _nic_backing(network: Any) -> Any:
    if isinstance(network, vim.dvs.DistributedVirtualPortgroup):
        switch = network.config.distributedVirtualSwitch
        return Device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
            port=vim.dvs.PortConnection(switchUuid=switch.uuid, portgroupKey=network.key)
        )
    return Device.VirtualEthernetCard.NetworkBackingInfo(deviceName=network.name, network=network)


def descriptor(flat_name: str, capacity_bytes: int, *, thin: bool, adapter: str) -> bytes:
    """A monolithic-flat VMDK descriptor for a ``-flat.vmdk`` extent of ``capacity_bytes``
    (VMware "Virtual Disk Format 5.0": ``createType="vmfs"``, one ``RW n VMFS`` extent).

    :raises ProviderError: the capacity is not whole 512-byte sectors.
    """
    if capacity_bytes % 512:
        raise ProviderError(f"a disk of {capacity_bytes} bytes is not whole 512-byte sectors")
    sectors = capacity_bytes // 512
    cylinders = max(1, min(sectors // (255 * 63), 65535))
    lines = [
        "# Disk DescriptorFile", "version=1", 'encoding="UTF-8"', "CID=fffffffe", "parentCID=ffffffff",
        'createType="vmfs"', "", "# Extent description", f'RW {sectors} VMFS "{flat_name}"', "",
        "# The Disk Data Base", "#DDB", "", f'ddb.adapterType = "{adapter}"',
        f'ddb.geometry.cylinders = "{cylinders}"', 'ddb.geometry.heads = "255"', 'ddb.geometry.sectors = "63"',
        f'ddb.thinProvisioned = "{1 if thin else 0}"', 'ddb.virtualHWVersion = "13"', "",
    ]
    return "\n".join(lines).encode()


def adapter_type(disk: DiskConfig) -> str:
    """The descriptor's ``ddb.adapterType`` for a disk's controller."""
    return {"ide": "ide", "sata": "ide", "nvme": "lsilogic"}.get(disk.controller, "lsilogic" if disk.controller_model != "buslogic" else "buslogic")


def network_map(records: Iterable[tuple[Any, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """(network name → moref, distributed port group key → name) from retrieved networks
    (properties ``name`` and, for port groups, ``key``)."""
    by_name: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for obj, props in records:
        name = props.get("name", obj._moId)
        by_name.setdefault(name, obj)
        if "key" in props:
            keys[props["key"]] = name
    return by_name, keys
