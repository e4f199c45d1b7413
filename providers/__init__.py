"""Hypervisor providers behind one interface (:class:`providers.base.Provider`).

``open_provider(name, config)`` builds the provider a config section describes; the
implementation modules are imported only when used (:func:`provider_type`), so the CLI
starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from providers.base import Provider


def provider_type(config: object) -> "type[Provider]":
    """The implementation class for one ``[providers.NAME]`` config section, its module
    imported (pyVmomi for vSphere: a fraction of a second).

    :param config: the validated section (a provider config model; its ``type`` selects the
        implementation).
    :raises ValueError: for a ``type`` no implementation exists for.
    """
    kind = getattr(config, "type", None)
    if kind == "simulated":
        from providers.simulated import SimulatedProvider

        return SimulatedProvider
    if kind == "vsphere":
        from providers.vsphere import VsphereProvider

        return VsphereProvider
    raise ValueError(f"unknown provider type {kind!r}")


def open_provider(name: str, config: object) -> "Provider":
    """Build the provider for one ``[providers.NAME]`` config section.

    :param name: the section's name, used in messages and snapshot descriptions.
    :param config: as :func:`provider_type`.
    :raises ValueError: for a ``type`` no implementation exists for.
    """
    return provider_type(config)(name, config)  # type: ignore[call-arg]
