"""Live disks: creating and importing them, the guest write path, allocation queries.

A live disk is a sparse file exactly as long as the disk. A guest write, under the disk's
exclusive lock, (1) records the write in the change log, (2) lets every snapshot save the
grains it is about to change (:func:`providers.simulated._cow.preserve`), (3) writes the
live file. Each step is safe to interrupt: a change logged but not made only widens the next
incremental, and a grain saved but not yet overwritten reads the same from both places.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from providers.base import Extent, ProviderError
from providers.simulated import _cow
from providers.simulated._cbt import ChangeLog, merge_extents
from providers.simulated._layout import DiskPaths, SnapshotPaths, VmPaths, locked, open_file

_COPY_CHUNK = 4 << 20  # bytes read per call when importing an image
_ZERO_CHECK = 64 << 10  # all-zero runs of this size are left as holes when importing


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``, fewer only at end of file (``os.pread`` may return less
    than asked for large requests)."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    done = len(data)
    while done < length:
        more = os.pread(fd, length - done, offset + done)
        if not more:
            break
        parts.append(more)
        done += len(more)
    return b"".join(parts)


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The allocated ``(offset, length)`` ranges of ``fd`` within ``[start, end)``
    (``SEEK_DATA`` / ``SEEK_HOLE``); the whole range where the file system cannot tell."""
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past position
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield position, end - position
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        position = hole


def create_empty(path: Path, capacity: int) -> None:
    """Create the live disk ``path``: ``capacity`` bytes, all zero, nothing allocated."""
    fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, capacity)
    finally:
        os.close(fd)


def import_image(source: Path, path: Path) -> int:
    """Copy the disk image ``source`` to the new live disk ``path``, sparsely: all-zero runs
    of 64 KiB are skipped with a seek, and the file is truncated to the image's size. The
    image itself is only read.

    The copy goes to a temporary name first, so an interrupted import leaves no disk behind.

    :returns: the disk's capacity in bytes (the image's size).
    :raises FileNotFoundError: ``source`` does not exist.
    :raises ValueError: ``source`` is not a regular file, or is empty.
    :raises OSError: ``source`` cannot be read or ``path`` written.
    """
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(src)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size == 0:
            raise ValueError("the image is empty")
        partial = path.with_name(path.name + ".importing")
        dst = open_file(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for offset, length in data_extents(src, 0, info.st_size):
                for position in range(offset, offset + length, _COPY_CHUNK):
                    chunk = os.pread(src, min(_COPY_CHUNK, offset + length - position), position)
                    _write_non_zero(dst, chunk, position)
            os.ftruncate(dst, info.st_size)
        finally:
            os.close(dst)
        os.replace(partial, path)
        return info.st_size
    finally:
        os.close(src)


def fill_from_stream(path: Path, stream: BinaryIO, capacity: int, what: str) -> None:
    """Create the disk ``path`` from exactly ``capacity`` bytes read sequentially from
    ``stream``, sparsely (all-zero runs of 64 KiB are skipped). Whatever the stream raises
    propagates unchanged.

    :param what: the disk, for messages.
    :raises ProviderError: the stream ended before ``capacity`` bytes.
    :raises OSError: ``path`` cannot be written.
    """
    fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        position = 0
        while position < capacity:
            chunk = stream.read(min(_COPY_CHUNK, capacity - position))
            if not chunk:
                raise ProviderError(f"{what}: the data ended after {position} of {capacity} bytes")
            _write_non_zero(fd, chunk, position)
            position += len(chunk)
        os.ftruncate(fd, capacity)
    finally:
        os.close(fd)


def _write_non_zero(fd: int, chunk: bytes, offset: int) -> None:
    view = memoryview(chunk)
    run_start: int | None = None
    for position in range(0, len(chunk), _ZERO_CHECK):
        piece = chunk[position : position + _ZERO_CHECK]
        if piece.count(0) == len(piece):
            if run_start is not None:
                os.pwrite(fd, view[run_start:position], offset + run_start)
                run_start = None
        elif run_start is None:
            run_start = position
    if run_start is not None:
        os.pwrite(fd, view[run_start:], offset + run_start)


def guest_write(vm: VmPaths, key: int, capacity: int, offset: int, data: bytes) -> None:
    """Write ``data`` at byte ``offset`` of live disk ``key`` as the guest would: CBT records
    it, the VM's snapshots keep their old content. The caller has checked that the range is
    inside the disk and not empty.
    """
    disk = vm.disk(key)
    with locked(disk.lock, exclusive=True):
        ChangeLog(disk.cbt).append(offset, len(data))
        fd = open_file(disk.image, os.O_RDWR)
        try:
            _cow.preserve(fd, capacity, key, vm.snapshot_folders(), offset, len(data))
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)


def in_use_extents(
    disk: DiskPaths, snapshot: SnapshotPaths, key: int, capacity: int
) -> list[Extent]:
    """Every area that may hold non-zero data in disk ``key`` as ``snapshot`` holds it: the
    live file's allocated ranges plus the grains the snapshot saved. Call with the disk lock
    held (shared).
    """
    image = open_file(disk.image, os.O_RDONLY)
    try:
        ranges = list(data_extents(image, 0, capacity))
    finally:
        os.close(image)
    bitmap_fd = open_file(snapshot.map(key), os.O_RDONLY)
    try:
        _, bitmap = _cow.load_map(bitmap_fd)
    finally:
        os.close(bitmap_fd)
    ranges.extend((grain * _cow.GRAIN, _cow.GRAIN) for grain in _cow.saved_grains(bitmap))
    return merge_extents(ranges, capacity)
