"""The one error of the simulated hypervisor's own: a request that makes no sense."""

from __future__ import annotations

from providers.base import ProviderError


class InvalidArgument(ProviderError, ValueError):
    """An administration call with an argument the simulated hypervisor cannot honour (a disk
    index out of range, a write past the end of the disk, an unknown fault op). It is both a
    :class:`ProviderError` and a :class:`ValueError`.

    :param message: what is wrong, in the words of the call.
    :param argument: the name of the argument out of range (``disk``, ``blocks``, ``offset``,
        ``data``, ``op``, ``times``), so a command line can name its own option.
    """

    def __init__(self, message: str, *, argument: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument
