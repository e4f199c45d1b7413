"""Restoring a restore point into raw disk images.

Each disk becomes ``<to_dir>/<vm-key>-disk<key>.img`` (``vm-key`` as in the repository's
``points/`` folder, so any VM name gives a safe file name), a sparse file of exactly the
disk's capacity: zero blocks are skipped, never written. Images are written under a hidden
temporary name and linked to their final names only when every disk of the point restored
and checked, so a final name never holds a partial image.

Partial images and what a killed restore leaves: each is ``<to_dir>/.<image name>.<8 hex
digits>.partial``, and its writer holds an exclusive ``flock(2)`` on it from creating it until
it is unlinked, so the kernel drops the lock when the writer dies, even by ``kill -9`` (which
runs no cleanup and leaves the file behind). Every restore first removes, from its target
folder, the files of exactly that name pattern whose lock it can take: their writers are dead.
Partials whose lock is held belong to a live restore (say, of another VM into the same
folder) and are left alone; nothing else in the folder is touched. Like the repository, the
target folder therefore needs working ``flock`` to be cleaned up.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from backupd.errors import RepositoryCorruptError, RepositoryError

from ._blocks import DIGEST_SIZE, ZERO_DIGEST, BlockStore, block_workers, map_blocks
from ._layout import DIR_MODE, FILE_MODE, Layout, fsync_dir, vm_key
from ._locking import lock_shared
from ._manifest import PointDisk, read_manifest

log = logging.getLogger(__name__)

#: the names restore gives partial images, ``.<vm-key>-disk<key>.img.<8 hex digits>.partial``
#: (see :func:`image_name` and :func:`backupd.repository._layout.vm_key`), and only those
PARTIAL_NAME_RE = re.compile(
    r"\.(?P<image>[A-Za-z0-9_-][A-Za-z0-9._-]{0,47}-[0-9a-f]{8}-disk-?[0-9]+\.img)\.[0-9a-f]{8}\.partial"
)


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
        discard_dead_partials(to_dir)
        for final in finals:
            if os.path.lexists(final):
                raise RepositoryError(f"{final}: exists; refusing to overwrite it")
        partials: list[tuple[Path, int]] = []  # path, descriptor holding its flock
        published: list[Path] = []
        try:
            try:
                for final in finals:
                    partials.append(_create_partial(final))
                done = 0

                def advance(nbytes: int) -> None:
                    nonlocal done
                    done += nbytes
                    if progress is not None:
                        progress(done, info.logical_bytes)

                with ThreadPoolExecutor(block_workers(), thread_name_prefix="restore") as pool:
                    for disk, block_map, (_, fd) in zip(info.disks, maps, partials, strict=True):
                        _restore_disk(pool, store, block_size, point_id, disk, block_map, fd, advance)
                for (temp, _), final in zip(partials, finals, strict=True):
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
                _remove_all([temp for temp, _ in partials])
        finally:
            for _, fd in partials:  # only now: a partial whose lock is free may be removed by anyone
                os.close(fd)
    finally:
        lock.release()
    return finals


def discard_dead_partials(folder: Path) -> list[tuple[str, int]]:
    """Remove the partial images that restores killed while writing left in ``folder``.

    Only regular files named by :data:`PARTIAL_NAME_RE` whose ``flock`` can be taken are
    removed (their writer is dead); locked ones belong to a live restore and are left alone,
    as is everything else. Each removal is logged (INFO), all of them together once (WARNING),
    so the command line says so on stderr. A file that vanishes meanwhile is skipped.

    :returns: the names removed and the bytes each occupied (0 for a name that was a second
        link of a published image).
    """
    try:
        names = sorted(name for name in os.listdir(folder) if PARTIAL_NAME_RE.fullmatch(name))
    except OSError as exc:
        log.warning("%s: cannot look for leftover partial images: %s", folder, exc.strerror or exc)
        return []
    removed = [(name, freed) for name in names if (freed := _discard_if_dead(folder / name)) is not None]
    if removed:
        log.warning(
            "removed %d leftover partial image(s) of an interrupted restore: %s (%d bytes)",
            len(removed), ", ".join(str(folder / name) for name, _ in removed), sum(freed for _, freed in removed),
        )
    return removed


def _discard_if_dead(path: Path) -> int | None:
    """Unlink ``path`` if it is a regular file whose flock is free; the bytes freed, or None."""
    try:
        # O_NOFOLLOW: a symlink is not ours; O_NONBLOCK: opening a FIFO must not wait
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None  # vanished, a symlink, or not ours to read
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # BlockingIOError: its restore is alive
        try:
            if os.lstat(path).st_ino != st.st_ino:
                return None  # replaced since we opened it
            os.unlink(path)
        except OSError:
            return None  # vanished meanwhile (another restore removed it)
        freed = st.st_blocks * 512 if st.st_nlink == 1 else 0
        log.info("removed %s, a partial image left by a restore that is no longer running (%d bytes)", path, freed)
        return freed
    finally:
        os.close(fd)


def _create_partial(final: Path) -> tuple[Path, int]:
    """Create and flock a new partial image for ``final``; its path and descriptor.

    Between ``open`` and ``flock`` another restore's :func:`discard_dead_partials` can take the
    lock and unlink the file; the writer then holds a file with no name and starts over under a
    fresh name. On a file system without ``flock`` the restore goes on unlocked (a warning says
    what that costs): no restore can then take the lock to remove the file either.
    """
    while True:
        temp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.partial")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                log.warning(
                    "%s: cannot lock (does the file system support flock?): %s; if this restore is "
                    "killed, no later restore will remove this partial image", temp, exc.strerror or exc,
                )
                return temp, fd
            if os.fstat(fd).st_nlink > 0:
                return temp, fd
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)


def _restore_disk(
    pool: ThreadPoolExecutor,
    store: BlockStore,
    block_size: int,
    point_id: str,
    disk: PointDisk,
    block_map: bytes,
    fd: int,
    advance: Callable[[int], None],
) -> None:
    """Write one disk image to the empty file ``fd``: data blocks at their offsets, holes for zeros.

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

    for length in map_blocks(pool, restore_block, range(len(block_map) // DIGEST_SIZE)):
        advance(length)
    os.ftruncate(fd, disk.capacity_bytes)
    os.fsync(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
