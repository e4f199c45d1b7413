"""Reading the disks of a restore point as sequential byte streams, for a full-VM restore:
the provider's ``create_vm`` reads each disk from start to end, as it uploads or writes it.

Every block is checked against its hash as :mod:`._restore` does (a damaged block is
quarantined and the read raises :class:`~backupd.errors.RepositoryCorruptError` naming the
point, disk and block), and zero blocks are made up without touching the store. A
:class:`PointReader` holds the repository lock shared from open to close, so garbage
collection cannot delete a block it has still to read.
"""

from __future__ import annotations

import io
from types import TracebackType

from backupd.errors import NotFoundError, RepositoryCorruptError

from ._blocks import DIGEST_SIZE, ZERO_DIGEST, BlockStore
from ._layout import Layout
from ._locking import lock_shared
from ._manifest import PointDisk, PointInfo, read_manifest


class PointReader:
    """One restore point opened for reading its disks; use as a context manager.

    :ivar info: the point's header (manifest checksum checked).
    :raises NotFoundError: no such point.
    :raises RepositoryCorruptError: its manifest is damaged.
    """

    def __init__(self, layout: Layout, store: BlockStore, block_size: int, point_id: str) -> None:
        self._store = store
        self._block_size = block_size
        self._lock = lock_shared(layout.lock_file)
        try:
            self.info: PointInfo
            self.info, maps = read_manifest(layout.find_manifest(point_id), block_size)
        except BaseException:
            self._lock.release()
            raise
        self._maps = {disk.key: (disk, block_map) for disk, block_map in zip(self.info.disks, maps, strict=True)}
        self._closed = False

    def disk(self, key: int) -> "DiskStream":
        """A new stream of disk ``key``'s bytes, from its first to its last (exactly
        ``capacity_bytes``), valid while the reader is open.

        :raises NotFoundError: the point has no disk ``key``.
        """
        if key not in self._maps:
            raise NotFoundError(f"restore point {self.info.id} has no disk {key}")
        disk, block_map = self._maps[key]
        return DiskStream(self._store, self._block_size, self.info.id, disk, block_map)

    def close(self) -> None:
        """Release the repository lock. Idempotent."""
        if not self._closed:
            self._closed = True
            self._lock.release()

    def __enter__(self) -> PointReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class DiskStream(io.RawIOBase):
    """A disk of a restore point as a read-only, forward-only binary stream.

    :meth:`read` returns at most one block per call (``b""`` at the end of the disk).
    :raises RepositoryCorruptError: (from reads) a block is missing or damaged.
    """

    def __init__(self, store: BlockStore, block_size: int, point_id: str, disk: PointDisk, block_map: bytes) -> None:
        super().__init__()
        self._store = store
        self._block_size = block_size
        self._point_id = point_id
        self._disk = disk
        self._map = block_map
        self._next = 0  # the next block to load
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._buffer:
            if self._next * DIGEST_SIZE >= len(self._map):
                return 0
            self._buffer = memoryview(self._load(self._next))
            self._next += 1
        count = min(len(target), len(self._buffer))
        target[:count] = self._buffer[:count]
        self._buffer = self._buffer[count:]
        return count

    def _load(self, index: int) -> bytes:
        offset = index * self._block_size
        length = min(self._block_size, self._disk.capacity_bytes - offset)
        digest = self._map[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
        if digest == ZERO_DIGEST:
            return bytes(length)
        where = f"restore point {self._point_id}, disk {self._disk.key}, block {index}"
        try:
            data = self._store.read(digest)
        except RepositoryCorruptError as exc:
            raise RepositoryCorruptError(f"{where}: {exc}") from exc
        if len(data) != length:
            raise RepositoryCorruptError(f"{where}: {len(data)} bytes where {length} belong")
        return data
