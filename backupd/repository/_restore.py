"""Restoring a restore point into raw disk images.

Each disk becomes ``<to_dir>/<vm-key>-disk<key>.img`` (``vm-key`` as in the repository's
``points/`` folder, so any VM name gives a safe file name), a sparse file of exactly the
disk's capacity: zero blocks are skipped, never written. Images are written under a hidden
temporary name and linked to their final names only when every disk of the point restored
and checked, so a final name never holds a partial image.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from backupd.errors import RepositoryCorruptError, RepositoryError

from ._blocks import DIGEST_SIZE, ZERO_DIGEST, BlockStore, block_workers, map_blocks
from ._layout import DIR_MODE, FILE_MODE, Layout, fsync_dir, vm_key
from ._locking import lock_shared
from ._manifest import PointDisk, read_manifest


def image_name(vm: str, disk_key: int) -> str:
    """File name of a restored disk image, e.g. ``web01-3c1e0f7a-disk2000.img``."""
    return f"{vm_key(vm)}-disk{disk_key}.img"


def restore(
    layout: Layout,
    store: BlockStore,
    block_size: int,
    point_id: str,
    to_dir: Path,
    progress: Callable[[int, int], None] | None,
) -> list[Path]:
    """Restore every disk of a point (see :meth:`Repository.restore`)."""
    lock = lock_shared(layout.lock_file)  # garbage collection must not run meanwhile
    try:
        info, maps = read_manifest(layout.find_manifest(point_id), block_size)
        finals = [to_dir / image_name(info.vm, disk.key) for disk in info.disks]
        try:
            to_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise RepositoryError(f"{to_dir}: cannot create restore folder: {exc.strerror or exc}") from exc
        for final in finals:
            if os.path.lexists(final):
                raise RepositoryError(f"{final}: exists; refusing to overwrite it")
        token = secrets.token_hex(4)
        temps = [to_dir / f".{final.name}.{token}.partial" for final in finals]
        published: list[Path] = []
        try:
            done = 0

            def advance(nbytes: int) -> None:
                nonlocal done
                done += nbytes
                if progress is not None:
                    progress(done, info.logical_bytes)

            with ThreadPoolExecutor(block_workers(), thread_name_prefix="restore") as pool:
                for disk, block_map, temp in zip(info.disks, maps, temps, strict=True):
                    _restore_disk(pool, store, block_size, point_id, disk, block_map, temp, advance)
            for temp, final in zip(temps, finals, strict=True):
                try:
                    os.link(temp, final)  # unlike rename, never replaces a file created meanwhile
                except FileExistsError:
                    raise RepositoryError(f"{final}: exists; refusing to overwrite it") from None
                published.append(final)
            fsync_dir(to_dir)
        except OSError as exc:
            _remove_all(published)
            raise RepositoryError(f"restore of {point_id} into {to_dir} failed: {exc}") from exc
        except BaseException:
            _remove_all(published)
            raise
        finally:
            _remove_all(temps)
    finally:
        lock.release()
    return finals


def _restore_disk(
    pool: ThreadPoolExecutor,
    store: BlockStore,
    block_size: int,
    point_id: str,
    disk: PointDisk,
    block_map: bytes,
    temp: Path,
    advance: Callable[[int], None],
) -> None:
    """Write one disk image to ``temp``: data blocks at their offsets, holes for zeros.

    Blocks are read, decompressed, checked and written by ``pool``'s threads (``pwrite`` at
    distinct offsets needs no coordination); ``advance`` is called in disk order.
    """

    def restore_block(index: int) -> int:
        offset = index * block_size
        length = min(block_size, disk.capacity_bytes - offset)
        digest = block_map[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
        if digest == ZERO_DIGEST:
            return length
        where = f"restore point {point_id}, disk {disk.key}, block {index}"
        try:
            data = store.read(digest)
        except RepositoryCorruptError as exc:
            raise RepositoryCorruptError(f"{where}: {exc}") from exc
        if len(data) != length:
            raise RepositoryCorruptError(f"{where}: {len(data)} bytes where {length} belong")
        _pwrite_all(fd, data, offset)
        return length

    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        for length in map_blocks(pool, restore_block, range(len(block_map) // DIGEST_SIZE)):
            advance(length)
        os.ftruncate(fd, disk.capacity_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
