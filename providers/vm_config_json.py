"""A :class:`~providers.base.VmConfig` as a JSON object and back: how restore point manifests
and the simulated hypervisor's state files store a VM's configuration.

The object mirrors the dataclasses field for field (sizes in bytes)::

    {"name": "web", "guest_os": "ubuntu64Guest", "cpus": 2, "memory_bytes": 4294967296,
     "firmware": "efi",
     "disks": [{"key": 2000, "label": "Hard disk 1", "controller": "scsi",
                "controller_model": "pvscsi", "bus_number": 0, "unit_number": 0,
                "capacity_bytes": 17179869184, "thin": true}],
     "nics": [{"label": "Network adapter 1", "network": "VM Network", "adapter_type": "vmxnet3"}]}
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from providers.base import DiskConfig, NicConfig, VmConfig

_SCALARS = tuple(f.name for f in fields(VmConfig) if f.name not in ("disks", "nics"))
_DISK = tuple(f.name for f in fields(DiskConfig))
_NIC = tuple(f.name for f in fields(NicConfig))


def config_to_json(config: VmConfig) -> dict[str, Any]:
    """``config`` as a JSON-ready dict (the shape in the module docstring). Built field by
    field: ``dataclasses.asdict`` deep-copies every value, several times slower, and this
    runs for every snapshot and restore point."""
    return {
        **{name: getattr(config, name) for name in _SCALARS},
        "disks": [{name: getattr(disk, name) for name in _DISK} for disk in config.disks],
        "nics": [{name: getattr(nic, name) for name in _NIC} for nic in config.nics],
    }


def config_from_json(value: Any) -> VmConfig:
    """The :class:`VmConfig` a :func:`config_to_json` dict describes.

    :raises ValueError: ``value`` is not such a dict (a key missing, a wrong type).
    """
    try:
        disks = tuple(
            DiskConfig(
                key=_int(d["key"]), label=_str(d["label"]), controller=_str(d["controller"]),
                controller_model=_str(d["controller_model"]), bus_number=_int(d["bus_number"]),
                unit_number=_int(d["unit_number"]), capacity_bytes=_int(d["capacity_bytes"]),
                thin=_bool(d["thin"]),
            )
            for d in value["disks"]
        )
        nics = tuple(
            NicConfig(label=_str(n["label"]), network=_str(n["network"]), adapter_type=_str(n["adapter_type"]))
            for n in value["nics"]
        )
        return VmConfig(
            name=_str(value["name"]), guest_os=_str(value["guest_os"]), cpus=_int(value["cpus"]),
            memory_bytes=_int(value["memory_bytes"]), firmware=_str(value["firmware"]), disks=disks, nics=nics,
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a VM configuration: {type(exc).__name__}: {exc}") from exc


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value
