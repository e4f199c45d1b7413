"""Hypervisor providers behind one interface (:class:`providers.base.Provider`).

``open_provider(name, config)`` builds the provider a config section describes; the
implementation modules are imported only when used, so the CLI starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from providers.base import Provider


def open_provider(name: str, config: object) -> "Provider":
    """Build the provider for one ``[providers.NAME]`` config section.

    :param name: the section's name, used in messages and snapshot descriptions.
    :param config: the validated section (a provider config model; its ``type`` selects the
        implementation).
    :raises ValueError: for a ``type`` no implementation exists for.
    """
    kind = getattr(config, "type", None)
    if kind == "simulated":
        from providers.simulated import SimulatedProvider

        return SimulatedProvider(name, config)  # type: ignore[arg-type]
    if kind == "vsphere":
        from providers.vsphere import VsphereProvider

        return VsphereProvider(name, config)  # type: ignore[arg-type]
    raise ValueError(f"provider {name!r}: unknown type {kind!r}")
