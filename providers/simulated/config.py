"""Config model of a ``[providers.NAME]`` section with ``type = "simulated"``.

Validated by pydantic as part of the whole config (see :mod:`backupd.config`); relative paths
are already resolved against the config file's folder when a provider receives this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ByteSize, ConfigDict, Field, TypeAdapter, field_validator

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_SIZE = TypeAdapter(ByteSize)


class SimulatedVmConfig(BaseModel):
    """One VM of the simulated hypervisor.

    ``disks`` entries are either a disk image file to import on first use (a path) or the size
    of an empty disk (a size string such as ``"8 GiB"``; any string starting with a digit is
    read as a size).
    """

    model_config = _FROZEN

    name: str = Field(min_length=1, max_length=255)
    disks: list[Union[ByteSize, Path]] = Field(min_length=1)
    power_state: Literal["poweredOn", "poweredOff", "suspended"] = "poweredOn"

    @field_validator("disks", mode="before")
    @classmethod
    def _sizes_or_paths(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        out: list[object] = []
        for item in value:
            if isinstance(item, str) and item.strip()[:1].isdigit():
                try:
                    size = _SIZE.validate_python(item)  # pydantic's size parser: "8 GiB", "512MiB"
                except Exception as exc:  # noqa: BLE001 - re-raised as a validation error
                    raise ValueError(f"bad size string {item!r} (use e.g. '8 GiB')") from exc
                if size <= 0:
                    raise ValueError(f"disk size must be positive, got {item!r}")
                out.append(int(size))
            elif isinstance(item, (str, Path)):
                out.append(str(item))  # a disk image path
            elif isinstance(item, int) and not isinstance(item, bool) and item > 0:
                out.append(item)  # a size in bytes, as model_dump() writes it
            else:
                raise ValueError(f"a disk is a path or a size string, got {item!r}")
        return out


class SimulatedProviderConfig(BaseModel):
    """The simulated hypervisor: its VMs and their disks live under ``state_dir``."""

    model_config = _FROZEN

    type: Literal["simulated"]
    #: folder holding the VMs, disks, snapshots, CBT logs and faults; shared by every process
    state_dir: Path
    #: per-disk read throttle in MiB/s; 0 means unthrottled
    read_mib_per_s: float = Field(default=0.0, ge=0)
    #: seconds a snapshot creation takes
    snapshot_create_seconds: float = Field(default=0.0, ge=0)
    #: seconds a snapshot removal takes
    snapshot_remove_seconds: float = Field(default=0.0, ge=0)
    vms: list[SimulatedVmConfig] = Field(default_factory=list)

    @field_validator("vms")
    @classmethod
    def _unique_names(cls, vms: list[SimulatedVmConfig]) -> list[SimulatedVmConfig]:
        seen: set[str] = set()
        for vm in vms:
            if vm.name in seen:
                raise ValueError(f"duplicate VM name {vm.name!r}")
            seen.add(vm.name)
        return vms
