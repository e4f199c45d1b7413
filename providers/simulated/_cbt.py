"""Changed block tracking: one append-only change log per disk, and vSphere-shaped changeIds.

A change log file starts with a 16-byte random *epoch*, followed by one fixed-size record
``(seq, offset, length)`` (three little-endian u64) per guest write; record ``n`` has
``seq == n`` and sits at ``16 + (n - 1) * 24``. A disk's state is named by the changeId
``"<epoch as 16 hex bytes, vSphere style>/<seq>"``, e.g.
``"52 1f 0a 4c 9e 2b 77 d0-13 8a 5f 6e 01 c2 3d 9c/17"``: the disk as it was after guest
write 17 of that epoch. Resetting CBT starts a new epoch with an empty log, which makes every
earlier changeId unanswerable (vSphere: ``QueryChangedDiskAreas`` fails after CBT was
disabled and re-enabled).

Callers hold the disk's lock: exclusive to append or reset, shared to read.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from providers.base import Extent
from providers.simulated._layout import open_file, write_atomic

_EPOCH_BYTES = 16
_RECORD = struct.Struct("<QQQ")  # seq, offset, length
_CHANGE_ID = re.compile(
    r"((?:[0-9a-f]{2} ){7}[0-9a-f]{2})-((?:[0-9a-f]{2} ){7}[0-9a-f]{2})/([0-9]{1,19})"
)


@dataclass(frozen=True)
class CbtState:
    """A point in a disk's change history.

    :ivar epoch: 16 random bytes, replaced by every CBT reset.
    :ivar seq: number of guest writes recorded in this epoch.
    """

    epoch: bytes
    seq: int

    @property
    def change_id(self) -> str:
        """This state as a changeId string."""
        hexes = [f"{b:02x}" for b in self.epoch]
        return f"{' '.join(hexes[:8])}-{' '.join(hexes[8:])}/{self.seq}"

    @classmethod
    def parse(cls, change_id: str) -> CbtState | None:
        """The state a changeId names, or None when ``change_id`` is not one."""
        match = _CHANGE_ID.fullmatch(change_id)
        if match is None:
            return None
        return cls(bytes.fromhex(f"{match[1]} {match[2]}"), int(match[3]))


def merge_extents(ranges: Iterable[tuple[int, int]], capacity: int) -> list[Extent]:
    """Coalesce byte ranges into sorted, non-overlapping, non-adjacent extents.

    :param ranges: ``(offset, length)`` pairs in bytes, any order, overlaps allowed.
    :param capacity: the disk size in bytes; ranges are clipped to ``[0, capacity)``.
    """
    merged: list[list[int]] = []
    for offset, length in sorted(ranges):
        start, end = max(offset, 0), min(offset + length, capacity)
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [Extent(start, end - start) for start, end in merged]


class ChangeLog:
    """The change log file of one disk.

    :param path: the log file (``disk-<key>.cbt``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self) -> CbtState:
        """Start a new epoch with no writes recorded (atomic replace of the log)."""
        epoch = os.urandom(_EPOCH_BYTES)
        write_atomic(self.path, epoch)
        return CbtState(epoch, 0)

    def state(self) -> CbtState:
        """The current epoch and the number of writes recorded in it."""
        fd = open_file(self.path, os.O_RDONLY)
        try:
            return self._state(fd)
        finally:
            os.close(fd)

    def append(self, offset: int, length: int) -> int:
        """Record a guest write of ``length`` bytes at byte ``offset``.

        :returns: the write's sequence number.
        """
        fd = open_file(self.path, os.O_RDWR)
        try:
            seq = self._state(fd).seq + 1
            # at a computed position, so a record torn by a crash is overwritten, not kept
            os.pwrite(fd, _RECORD.pack(seq, offset, length), _position(seq))
            return seq
        finally:
            os.close(fd)

    def changed(self, after: int, upto: int, capacity: int) -> list[Extent]:
        """The areas written by writes ``after + 1 .. upto`` of the current epoch, merged.

        :param after: the seq of the earlier state (0 = the start of the epoch).
        :param upto: the seq of the later state, ``>= after``.
        :param capacity: disk size in bytes, to clip to.
        """
        fd = open_file(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, (upto - after) * _RECORD.size, _position(after + 1))
        finally:
            os.close(fd)
        return merge_extents(
            ((offset, length) for _, offset, length in _RECORD.iter_unpack(raw)), capacity
        )

    @staticmethod
    def _state(fd: int) -> CbtState:
        epoch = os.pread(fd, _EPOCH_BYTES, 0)
        seq = (os.fstat(fd).st_size - _EPOCH_BYTES) // _RECORD.size
        return CbtState(epoch, max(seq, 0))


def _position(seq: int) -> int:
    return _EPOCH_BYTES + (seq - 1) * _RECORD.size
