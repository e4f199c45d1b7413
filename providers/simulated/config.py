"""Config model of a ``[providers.NAME]`` section with ``type = "simulated"``.

Validated by pydantic as part of the whole config (see :mod:`backupd.config`); relative paths
are already resolved against the config file's folder when a provider receives this.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ByteSize, ConfigDict, Field, PlainValidator, TypeAdapter, field_validator

from providers.config_types import FolderPath, Name, check_path_text

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_SIZE = TypeAdapter(ByteSize)

#: largest disk, in bytes: 62 TiB, vSphere's largest virtual disk (VMware's "Configuration
#: Maximums", since vSphere 5.5); the simulated hypervisor keeps to the same limit
MAX_DISK_BYTES = 62 << 40
#: longest simulated snapshot creation or removal, in seconds (an hour)
MAX_SNAPSHOT_SECONDS = 3600.0
#: slowest and fastest read throttle, in MiB/s (0 switches the throttle off)
MIN_READ_MIB_PER_S, MAX_READ_MIB_PER_S = 0.01, 1_000_000.0

#: a string read as a size rather than a path: a digit first, or a sign and a digit
_LOOKS_LIKE_A_SIZE = re.compile(r"\s*[-+]?\.?\d")


def _disk(item: object) -> int | Path:
    """A ``disks`` entry: a size (a string such as ``"8 GiB"``, or bytes as an integer) becomes
    an int of bytes, anything else a disk image path."""
    if isinstance(item, str) and _LOOKS_LIKE_A_SIZE.match(item):
        try:
            size = int(_SIZE.validate_python(item))  # pydantic's size parser: "8 GiB", "512MiB"
        except ValueError as exc:
            raise ValueError(f"bad size string {item!r} (use e.g. '8 GiB')") from exc
    elif isinstance(item, int) and not isinstance(item, bool):
        size = item  # a size in bytes, as model_dump() writes it
    elif isinstance(item, (str, Path)):
        return Path(check_path_text(str(item)))
    else:
        raise ValueError(f"a disk is a path or a size string, got {item!r}")
    if size <= 0:
        raise ValueError(f"disk size must be positive, got {item!r}")
    if size > MAX_DISK_BYTES:
        raise ValueError(f"disk size {item!r} is too large: at most 62 TiB, vSphere's largest virtual disk")
    return size


def _memory(item: object) -> int:
    """``memory``: a size string (``"4 GiB"``) or bytes; at least 4 MiB (vSphere's minimum),
    at most 24 TiB (vSphere 8's most per VM)."""
    if isinstance(item, str):
        try:
            size = int(_SIZE.validate_python(item))
        except ValueError as exc:
            raise ValueError(f"bad size string {item!r} (use e.g. '4 GiB')") from exc
    elif isinstance(item, int) and not isinstance(item, bool):
        size = item
    else:
        raise ValueError(f"memory is a size string or bytes, got {item!r}")
    if not 4 << 20 <= size <= 24 << 40:
        raise ValueError(f"memory {item!r} is out of range: 4 MiB to 24 TiB")
    return size


#: a disk: its size in bytes, or the image file to import
Disk = Annotated[Union[int, Path], PlainValidator(_disk)]


#: disk controller models and the kind of controller each is (vSphere's virtual controllers)
CONTROLLER_KINDS = {
    "pvscsi": "scsi", "lsilogic": "scsi", "lsilogic-sas": "scsi", "buslogic": "scsi",
    "ahci": "sata", "nvme": "nvme", "ide": "ide",
}


class SimulatedNicConfig(BaseModel):
    """One network adapter of a simulated VM: the network (port group) it is connected to."""

    model_config = _FROZEN

    network: Name
    adapter_type: Literal["vmxnet3", "e1000e", "e1000", "vmxnet2", "pcnet32"] = "vmxnet3"


def _default_nics() -> list[SimulatedNicConfig]:
    return [SimulatedNicConfig(network="VM Network")]


class SimulatedVmConfig(BaseModel):
    """One VM of the simulated hypervisor.

    ``disks`` entries are either a disk image file to import on first use (a path) or the size
    of an empty disk: a size string such as ``"8 GiB"`` (any string starting with a digit, or a
    sign and a digit, is read as a size; write ``"./1.img"`` for an image whose name starts so)
    or a number of bytes; from 1 byte to 62 TiB, vSphere's largest virtual disk
    (:data:`MAX_DISK_BYTES`).

    The other keys are the VM's configuration as a snapshot captures it
    (:meth:`~providers.base.Provider.vm_config`, stored with each restore point): the guest OS
    (a vSphere ``guestId``), CPUs, memory (a size string or bytes), firmware, the disk
    controller all disks sit on (SCSI units 0-6 and 8-15, unit 7 being the controller's own,
    as in vSphere), whether disks are thin, and the network adapters.
    """

    model_config = _FROZEN

    name: Name
    disks: list[Disk] = Field(min_length=1)
    power_state: Literal["poweredOn", "poweredOff", "suspended"] = "poweredOn"
    guest_os: Name = "otherLinux64Guest"
    cpus: int = Field(default=1, ge=1, le=768)  # 768: vSphere 8's most vCPUs per VM
    memory: Annotated[int, PlainValidator(_memory)] = 1 << 30
    firmware: Literal["bios", "efi"] = "bios"
    disk_controller: Literal["pvscsi", "lsilogic", "lsilogic-sas", "buslogic", "ahci", "nvme", "ide"] = "pvscsi"
    thin_disks: bool = True
    nics: list[SimulatedNicConfig] = Field(default_factory=_default_nics)


class SimulatedProviderConfig(BaseModel):
    """The simulated hypervisor: its VMs and their disks live under ``state_dir``."""

    model_config = _FROZEN

    type: Literal["simulated"]
    #: folder holding the VMs, disks, snapshots, CBT logs and faults; shared by every process
    state_dir: FolderPath
    #: per-disk read throttle in MiB/s: 0 (unthrottled) or 0.01 to 1,000,000
    read_mib_per_s: float = Field(default=0.0, ge=0, le=MAX_READ_MIB_PER_S, allow_inf_nan=False)
    #: seconds a snapshot creation takes, 0 to 3600
    snapshot_create_seconds: float = Field(default=0.0, ge=0, le=MAX_SNAPSHOT_SECONDS, allow_inf_nan=False)
    #: seconds a snapshot removal takes, 0 to 3600
    snapshot_remove_seconds: float = Field(default=0.0, ge=0, le=MAX_SNAPSHOT_SECONDS, allow_inf_nan=False)
    vms: list[SimulatedVmConfig] = Field(default_factory=list)

    @field_validator("read_mib_per_s")
    @classmethod
    def _throttle_off_or_measurable(cls, value: float) -> float:
        if 0 < value < MIN_READ_MIB_PER_S:
            raise ValueError(f"must be 0 (unthrottled) or at least {MIN_READ_MIB_PER_S} MiB/s")
        return value

    @field_validator("vms")
    @classmethod
    def _unique_names(cls, vms: list[SimulatedVmConfig]) -> list[SimulatedVmConfig]:
        seen: set[str] = set()
        for vm in vms:
            if vm.name in seen:
                raise ValueError(f"duplicate VM name {vm.name!r}")
            seen.add(vm.name)
        return vms
