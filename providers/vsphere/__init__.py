"""VMware vSphere through pyVmomi: the :class:`~providers.base.Provider` for real VMs.

Modules, one concern each: ``config`` (the ``[providers.NAME]`` model), ``_connection``
(session, TLS, timeouts, relogin), ``_errors`` (every fault, HTTP and network error mapped to
the ProviderError tree), ``_inventory`` (VMs by name or inventory path), ``_snapshots``
(snapshots and task waits), ``_cbt`` (QueryChangedDiskAreas, enabling CBT), ``_transport``
(disk data over the datastore HTTP endpoint, behind :class:`DiskTransport`), ``_vmconfig``
(VM configuration both ways), ``_restore`` (full-VM restore), ``_provider`` (the Provider).
See ``docs/vsphere.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DiskTransport", "VsphereProvider"]


def __getattr__(name: str) -> Any:
    """Import pyVmomi only when the provider is used: ``providers.vsphere.config`` is read with
    every config, and the CLI starts fast."""
    if name == "VsphereProvider":
        from providers.vsphere._provider import VsphereProvider

        return VsphereProvider
    if name == "DiskTransport":
        from providers.vsphere._transport import DiskTransport

        return DiskTransport
    raise AttributeError(name)
