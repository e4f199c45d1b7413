"""Changed block tracking: ``QueryChangedDiskAreas`` and turning CBT on.

vSphere API: ``VirtualMachine.QueryChangedDiskAreas(snapshot, deviceKey, startOffset,
changeId)`` answers a ``DiskChangeInfo`` (``startOffset``, ``length``: the part of the disk
it covers; ``changedArea``: ``DiskChangeExtent`` start/length list) that may cover only part
of the disk: it is called again from ``startOffset + length`` until the whole capacity is
covered. ``changeId = "*"`` gives every allocated area (a full transfer skips the holes).

An invalid changeId (CBT was reset or switched off, the VM was moved or its snapshots
consolidated) is answered ``InvalidArgument`` (and ``FileFault`` / ``NotFound`` for the
change tracking file); those become :class:`~providers.base.CbtUnavailable`, and the engine
reads the whole disk.

CBT is switched on by ``ReconfigVM_Task`` with ``changeTrackingEnabled = true``; it takes
effect at the VM's next snapshot (stun/unstun), so the session that switches it on is full.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyVmomi import vim

from providers.base import CbtUnavailable, Disk, Extent, ProviderError, SnapshotError
from providers.vsphere._errors import Operation

#: faults that mean "this changeId cannot be answered" in QueryChangedDiskAreas
_CBT_FAULTS = {
    "vmodl.fault.InvalidArgument": CbtUnavailable,
    "vmodl.fault.NotSupported": CbtUnavailable,
    "vmodl.fault.InvalidRequest": CbtUnavailable,  # MethodNotFound: a host without CBT
    "vim.fault.FileFault": CbtUnavailable,
    "vim.fault.NotFound": CbtUnavailable,
}


def query_operation(what: str) -> Operation:
    """The :class:`Operation` of a ``QueryChangedDiskAreas`` call: CBT faults become
    :class:`CbtUnavailable`, a snapshot that is gone a :class:`SnapshotError`."""
    return Operation(what, failed=ProviderError, gone=SnapshotError, overrides=_CBT_FAULTS)


def changed_areas(query: Callable[[int], Any], disk: Disk, since: str) -> list[Extent]:
    """The changed areas of ``disk`` since ``since``, the whole capacity covered.

    :param query: ``query(start_offset)`` → a ``DiskChangeInfo`` (one
        ``QueryChangedDiskAreas`` call for this snapshot, disk and changeId).
    :returns: sorted, merged extents inside ``[0, disk.capacity_bytes)``.
    :raises CbtUnavailable: ``since`` is neither ``"*"`` nor a changeId, or the disk has no
        changeId (CBT off at the snapshot).
    :raises ProviderError: an answer that does not advance (the loop would not end).
    """
    if since != "*" and (not since or disk.change_id is None):
        raise CbtUnavailable(f"{disk.label}: CBT is off at this snapshot (no changeId), or changeId {since!r} is empty")
    extents: list[Extent] = []
    offset = 0
    while offset < disk.capacity_bytes:
        info = query(offset)
        start, length = int(info.startOffset), int(info.length)
        for area in info.changedArea or ():
            begin = max(int(area.start), 0)
            end = min(int(area.start) + int(area.length), disk.capacity_bytes)
            if end > begin:
                extents.append(Extent(begin, end - begin))
        if start + length <= offset:
            raise ProviderError(
                f"{disk.label}: QueryChangedDiskAreas from offset {offset} answered {start}+{length} bytes,"
                " which does not advance"
            )
        offset = start + length
    return _merge(extents)


def _merge(extents: list[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for extent in sorted(extents, key=lambda e: e.offset):
        if merged and extent.offset <= merged[-1].end:
            last = merged[-1]
            merged[-1] = Extent(last.offset, max(last.end, extent.end) - last.offset)
        else:
            merged.append(extent)
    return merged


def enable_spec() -> vim.vm.ConfigSpec:
    """The ``ReconfigVM_Task`` spec that switches CBT on."""
    return vim.vm.ConfigSpec(changeTrackingEnabled=True)
