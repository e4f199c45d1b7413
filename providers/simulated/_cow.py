"""Copy-on-write: how a snapshot keeps the disk content of its point in time.

A snapshot does not copy the disk. It owns, per disk, a sparse *CoW file* as long as the disk
and a small *map file*: an 8-byte generation counter followed by one bit per 1 MiB grain
(bit ``g % 8`` of byte ``g // 8``). Before a guest write changes a grain that a snapshot has
not saved yet, the writer copies the grain's old content into the snapshot's CoW file at the
same offset (all-zero grains are only marked: the sparse file already reads as zeros), sets
the grain's bit and bumps the generation. A snapshot read takes saved grains from the CoW
file and every other grain from the live disk, which has not changed there since the
snapshot. Removing a snapshot sets its generation to :data:`REMOVED` (so open readers fail
instead of reading live data) and deletes its files.

Writers hold the disk lock exclusively; readers hold it shared, and re-read a map only when
its generation moved.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from providers.simulated._layout import SnapshotPaths, open_file, read_counter, write_counter

#: copy-on-write granularity in bytes (1 MiB, vSphere's default CBT block size order)
GRAIN = 1 << 20
#: generation of the map of a removed snapshot
REMOVED = 2**64 - 1
_HEADER = 8


def grains(capacity: int) -> int:
    """Number of grains of a disk of ``capacity`` bytes (the last one may be partial)."""
    return -(-capacity // GRAIN)


def create(snapshot: SnapshotPaths, key: int, capacity: int) -> None:
    """Create the empty CoW file and map of disk ``key`` in a new snapshot's folder."""
    fd = open_file(snapshot.cow(key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, capacity)
    finally:
        os.close(fd)
    fd = open_file(snapshot.map(key), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.pwrite(fd, bytes(_HEADER + -(-grains(capacity) // 8)), 0)
    finally:
        os.close(fd)


def load_map(fd: int) -> tuple[int, bytes]:
    """The generation and the bitmap of an open map file."""
    raw = os.pread(fd, os.fstat(fd).st_size, 0)
    return read_counter(fd), raw[_HEADER:]


def generation(fd: int) -> int:
    """The generation of an open map file (one ``pread`` of 8 bytes)."""
    return read_counter(fd)


def is_saved(bitmap: bytes, grain: int) -> bool:
    """Whether ``grain`` is saved according to ``bitmap``."""
    return bool(bitmap[grain >> 3] & (1 << (grain & 7)))


def saved_grains(bitmap: bytes) -> Iterator[int]:
    """The numbers of the saved grains, ascending."""
    for index, byte in enumerate(bitmap):
        if byte:
            for bit in range(8):
                if byte & (1 << bit):
                    yield index * 8 + bit


def mark_removed(snapshot: SnapshotPaths, key: int) -> None:
    """Tell open readers of disk ``key`` of this snapshot that it is gone."""
    fd = open_file(snapshot.map(key), os.O_WRONLY)
    try:
        write_counter(fd, REMOVED)
    finally:
        os.close(fd)


def preserve(
    live_fd: int,
    capacity: int,
    key: int,
    snapshots: Sequence[SnapshotPaths],
    offset: int,
    length: int,
) -> None:
    """Save, in every snapshot that has not yet, the grains a guest write is about to change.

    Call with the disk lock held exclusively, before writing the live disk.

    :param live_fd: the live disk, open for reading.
    :param capacity: disk size in bytes.
    :param key: the disk's device key.
    :param snapshots: the VM's snapshots; those without this disk (taken before it was added)
        are skipped.
    :param offset: first byte the write changes.
    :param length: number of bytes it changes, > 0.
    """
    first, last = offset // GRAIN, (offset + length - 1) // GRAIN
    span = slice(_HEADER + (first >> 3), _HEADER + (last >> 3) + 1)
    fds: list[int] = []
    targets: list[tuple[int, int, bytearray]] = []  # map fd, CoW fd, map bytes of first..last
    try:
        for snapshot in snapshots:
            try:
                map_fd = open_file(snapshot.map(key), os.O_RDWR)
            except FileNotFoundError:
                continue
            fds.append(map_fd)
            cow_fd = open_file(snapshot.cow(key), os.O_WRONLY)
            fds.append(cow_fd)
            bits = bytearray(os.pread(map_fd, span.stop - span.start, span.start))
            targets.append((map_fd, cow_fd, bits))
        before = [bytes(bits) for _, _, bits in targets]
        for grain in range(first, last + 1):
            old: bytes | None = None
            index, bit = (grain >> 3) - (first >> 3), 1 << (grain & 7)
            for _, cow_fd, bits in targets:
                if bits[index] & bit:
                    continue
                if old is None:
                    old = os.pread(live_fd, min(GRAIN, capacity - grain * GRAIN), grain * GRAIN)
                if old.count(0) != len(old):
                    os.pwrite(cow_fd, old, grain * GRAIN)
                bits[index] |= bit
        for (map_fd, _, bits), was in zip(targets, before, strict=True):
            if bits != was:  # the data is saved; now the bits that point at it
                os.pwrite(map_fd, bits, span.start)
                write_counter(map_fd, read_counter(map_fd) + 1)
    finally:
        for fd in fds:
            os.close(fd)
