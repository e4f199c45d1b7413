"""Reading a disk as a snapshot holds it, fast, optionally throttled.

A read costs a few system calls besides the data copy itself: the fault counter (one
``pread``), the shared disk lock (``flock`` twice), the snapshot's map generation (one
``pread``), then one ``pread`` of the live disk for each run of grains the snapshot has not
saved and of its CoW file for each run it has. The map is re-read only when its generation
moved.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from providers.base import DiskReader, DiskReadError
from providers.simulated import _cow
from providers.simulated._disk import pread_exact
from providers.simulated._faults import ReadFaultProbe
from providers.simulated._layout import DiskPaths, SnapshotPaths, open_file


class Pacer:
    """Sleep-based pacing of a byte stream to a rate.

    :param bytes_per_second: the rate; 0 or less means no pacing.
    """

    def __init__(self, bytes_per_second: float) -> None:
        self._rate = bytes_per_second
        self._due = time.monotonic()

    def account(self, nbytes: int) -> None:
        """Count ``nbytes`` just transferred; sleep until the stream is back under the rate."""
        if self._rate <= 0:
            return
        now = time.monotonic()
        self._due = max(self._due, now) + nbytes / self._rate
        if self._due > now:
            time.sleep(self._due - now)


class SnapshotDiskReader(DiskReader):
    """Reads of one disk of one snapshot. Not thread-safe: one per thread.

    :param what: names the VM, disk and snapshot in error messages.
    :param disk: the live disk's files.
    :param snapshot: the snapshot's folder.
    :param key: the disk's device key.
    :param capacity: the disk's size in bytes.
    :param faults: holds reads while ``read`` is paused, fires ``read`` faults; closed with
        the reader.
    :param pacer: throttles the reader.
    :raises FileNotFoundError: the snapshot's files are gone.
    """

    def __init__(
        self,
        what: str,
        disk: DiskPaths,
        snapshot: SnapshotPaths,
        key: int,
        capacity: int,
        faults: ReadFaultProbe,
        pacer: Pacer,
    ) -> None:
        self._what = what
        self._capacity = capacity
        self._faults = faults
        self._pacer = pacer
        self._fds: list[int] = []
        try:
            self._map = self._open(snapshot.map(key))
            self._cow = self._open(snapshot.cow(key))
            self._live = self._open(disk.image)
            self._lock = self._open(disk.lock)
        except BaseException:
            self.close()
            raise
        self._generation = -1
        self._bitmap = b""
        self._any_saved = False

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at byte ``offset`` of the disk as the snapshot holds it; fewer only
        past the end of the disk. Blocks, first, as long as the VM's ``read`` is paused.

        :raises ValueError: negative ``offset`` or ``length``.
        :raises DiskReadError: the snapshot was removed, a file cannot be read (the VM's
            faults and pauses included), or a permanent ``read`` fault is armed.
        :raises TransientProviderError: a transient ``read`` fault is armed.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"offset and length must be >= 0, got {offset}, {length}")
        if not self._fds:
            raise DiskReadError(f"{self._what}: the reader is closed")
        try:
            self._faults.check()
        except OSError as exc:
            raise DiskReadError(f"{self._what}: cannot check the VM's faults and pauses: {exc}") from exc
        end = min(offset + length, self._capacity)
        if end <= offset:
            return b""
        try:
            fcntl.flock(self._lock, fcntl.LOCK_SH)
            try:
                data = self._read_locked(offset, end)
            finally:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
        except OSError as exc:
            raise DiskReadError(f"{self._what}: reading {length} bytes at {offset}: {exc}") from exc
        if len(data) != end - offset:
            raise DiskReadError(f"{self._what}: disk file shorter than the disk ({offset=})")
        self._pacer.account(len(data))
        return data

    def close(self) -> None:
        """Close the reader's files. Idempotent."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self._faults.close()

    def _open(self, path: Path) -> int:
        fd = open_file(path, os.O_RDONLY)
        self._fds.append(fd)
        return fd

    def _read_locked(self, offset: int, end: int) -> bytes:
        generation = _cow.generation(self._map)
        if generation != self._generation:
            if generation == _cow.REMOVED:
                raise DiskReadError(f"{self._what}: the snapshot was removed")
            self._generation, self._bitmap = _cow.load_map(self._map)
            self._any_saved = self._bitmap.count(0) != len(self._bitmap)
        if not self._any_saved:
            return pread_exact(self._live, end - offset, offset)
        parts = []
        position = offset
        while position < end:  # one pread per run of grains from the same file
            saved = _cow.is_saved(self._bitmap, position // _cow.GRAIN)
            run_end = min(end, (position // _cow.GRAIN + 1) * _cow.GRAIN)
            while run_end < end and _cow.is_saved(self._bitmap, run_end // _cow.GRAIN) == saved:
                run_end = min(end, run_end + _cow.GRAIN)
            parts.append(
                pread_exact(self._cow if saved else self._live, run_end - position, position)
            )
            position = run_end
        return b"".join(parts)
