"""Keeping a repository healthy: retention, garbage collection and verification.

Retention only deletes manifests; the blocks those points referenced become garbage, and
:func:`collect_garbage` deletes every block no remaining manifest references. Because
every restore point lists every block of every disk, no point ever depends on another and
retention can delete any subset.

:func:`verify` re-reads the blocks of the chosen points from disk, as restore would.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from backupd.errors import NotFoundError, RepositoryCorruptError, RepositoryError

from ._blocks import DIGEST_SIZE, ZERO_DIGEST, BlockStore, block_workers, map_blocks
from ._layout import FILE_MODE, Layout, fsync_dir
from ._locking import discard_dead_staging, lock_shared, try_lock_exclusive
from ._manifest import read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcResult:
    """What a garbage collection did.

    :ivar removed_blocks: block files deleted.
    :ivar freed_bytes: their compressed size in bytes.
    :ivar deferred: True when writers (or a restore, or a verify) held the repository, so
        nothing was collected; ``gc-pending`` stays, and the next
        :meth:`Repository.collect_garbage` (a job session's end) tries again.
    :ivar damaged_points: ids of restore points whose manifest is damaged; while there is
        one, nothing is deleted (a damaged manifest may reference any block) until it is
        deleted with :meth:`Repository.delete_points`.
    :ivar healed_blocks: quarantined copies removed because the block was stored again.
    """

    removed_blocks: int
    freed_bytes: int
    deferred: bool
    damaged_points: tuple[str, ...] = ()
    healed_blocks: int = 0


@dataclass(frozen=True)
class VerifyResult:
    """What a verification found.

    :ivar ok: True when no block and no manifest was damaged.
    :ivar damaged_points: ids of every checked point that a damaged block or its own damaged
        manifest makes unrestorable, newest first.
    :ivar damaged_blocks: number of distinct blocks missing, undecompressable or not
        matching their hash.
    :ivar checked_blocks: number of distinct (non-zero) blocks read and hashed.
    :ivar problems: one human-readable line per damaged manifest or block.
    """

    ok: bool
    damaged_points: tuple[str, ...]
    damaged_blocks: int
    checked_blocks: int
    problems: tuple[str, ...]


def delete_manifests(layout: Layout, doomed: Iterable[tuple[str, Path]]) -> list[str]:
    """Delete the manifests of restore points and note that garbage may now exist.

    :param doomed: ``(point id, manifest path)`` pairs.
    :returns: the ids deleted (a point deleted meanwhile by someone else counts too).
    :raises RepositoryError: a manifest cannot be deleted.
    """
    removed = []
    for point_id, path in doomed:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RepositoryError(f"{path}: cannot delete restore point: {exc.strerror or exc}") from exc
        removed.append(point_id)
        fsync_dir(path.parent)
    if removed:
        _mark_gc_pending(layout)
    return removed


def gc_pending(layout: Layout) -> bool:
    """Whether points were deleted (or a collection deferred) since the last collection."""
    return layout.gc_pending_file.exists()


def last_collection(layout: Layout) -> float | None:
    """When the last garbage collection completed, seconds since the epoch (``gc-last``'s
    modification time), or None before the first."""
    try:
        return layout.gc_last_file.stat().st_mtime
    except FileNotFoundError:
        return None


def _mark_gc_pending(layout: Layout) -> None:
    try:
        os.close(os.open(layout.gc_pending_file, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    except OSError as exc:
        raise RepositoryError(f"{layout.gc_pending_file}: cannot write: {exc.strerror or exc}") from exc


def collect_garbage(layout: Layout, store: BlockStore, block_size: int) -> GcResult:
    """Delete every block that no manifest references, and quarantined copies of blocks
    that were stored again.

    Runs only with the repository lock exclusive, taken without waiting: while any writer is
    open it may have deduplicated against a block no manifest references yet, so the
    collection is deferred instead (``deferred=True``, remembered in ``gc-pending``).
    Every manifest is read in full and checked against its checksum. If one is damaged it
    may reference any block, so nothing is deleted (``damaged_points`` names them and
    ``gc-pending`` stays) until those points are deleted. Memory: about 100 bytes per
    distinct referenced block (a set of digests), i.e. ~100 MB per TiB of distinct data at
    1 MiB blocks.

    :raises RepositoryError: the repository cannot be read or a block cannot be deleted.
    """
    lock = try_lock_exclusive(layout.lock_file)
    if lock is None:
        _mark_gc_pending(layout)
        return GcResult(removed_blocks=0, freed_bytes=0, deferred=True)
    try:
        # cleared first: a deletion that happens while this collection runs marks it again
        layout.gc_pending_file.unlink(missing_ok=True)
        discard_dead_staging(layout.staging)
        referenced: set[bytes] = set()
        damaged: list[str] = []
        for point_id, path in layout.manifests():
            try:
                _info, maps = read_manifest(path, block_size)
            except NotFoundError:
                continue  # deleted by retention meanwhile
            except RepositoryCorruptError as exc:
                log.warning("garbage collection deletes nothing while restore point %s is damaged: %s", point_id, exc)
                damaged.append(point_id)
                continue
            for block_map in maps:
                referenced.update(_entries(block_map))
        if damaged:
            _mark_gc_pending(layout)
            return GcResult(0, 0, deferred=False, damaged_points=tuple(sorted(damaged, reverse=True)))
        removed = freed = 0
        for digest, path, size in store.scan():
            if digest not in referenced:
                os.unlink(path)
                removed += 1
                freed += size
        healed = 0
        for digest, path in store.quarantined():
            if store.contains(digest) or digest not in referenced:
                os.unlink(path)
                healed += store.contains(digest)
        layout.gc_last_file.touch(mode=FILE_MODE)  # its mtime says when (last_collection)
    except OSError as exc:
        raise RepositoryError(f"{layout.root}: garbage collection failed: {exc}") from exc
    finally:
        lock.release()
    log.info("garbage collection removed %d blocks, %d bytes", removed, freed)
    return GcResult(removed_blocks=removed, freed_bytes=freed, deferred=False, healed_blocks=healed)


def verify(
    layout: Layout,
    store: BlockStore,
    block_size: int,
    point_ids: list[str] | None,
    progress: Callable[[int, int], None] | None,
) -> VerifyResult:
    """Check restore points end to end (see :meth:`Repository.verify`).

    Pass 1 reads each manifest in full and checks its checksum; pass 2 reads every distinct
    block the readable manifests reference once (decompress + BLAKE3, on a few threads, in
    digest order for locality); pass 3, only when blocks are damaged, finds every point
    that references one. Holds the repository lock shared so garbage collection cannot
    delete blocks meanwhile.
    """
    lock = lock_shared(layout.lock_file)
    try:
        if point_ids is None:
            targets = sorted(layout.manifests())
        else:
            targets = [(point_id, layout.find_manifest(point_id)) for point_id in point_ids]
        damaged_points: set[str] = set()
        problems: list[str] = []
        readable = []
        wanted: set[bytes] = set()
        for point_id, path in targets:
            try:
                _info, maps = read_manifest(path, block_size)
            except NotFoundError:
                continue  # deleted by retention after it was listed
            except RepositoryCorruptError as exc:
                damaged_points.add(point_id)
                problems.append(str(exc))
                continue
            readable.append((point_id, path))
            for block_map in maps:
                wanted.update(_entries(block_map))
        wanted.discard(ZERO_DIGEST)
        damaged = _check_blocks(store, sorted(wanted), progress, problems)
        if damaged:
            for point_id, path in readable:
                try:
                    _info, maps = read_manifest(path, block_size)
                except NotFoundError:
                    continue
                if any(not damaged.isdisjoint(_entries(block_map)) for block_map in maps):
                    damaged_points.add(point_id)
    finally:
        lock.release()
    return VerifyResult(
        ok=not damaged_points,
        damaged_points=tuple(sorted(damaged_points, reverse=True)),
        damaged_blocks=len(damaged),
        checked_blocks=len(wanted),
        problems=tuple(problems),
    )


def _entries(block_map: bytes) -> Iterable[bytes]:
    return (block_map[i : i + DIGEST_SIZE] for i in range(0, len(block_map), DIGEST_SIZE))


def _check_blocks(
    store: BlockStore, digests: list[bytes], progress: Callable[[int, int], None] | None, problems: list[str]
) -> set[bytes]:
    """Read every block; returns the damaged digests and appends one problem line each."""

    def check(digest: bytes) -> str | None:
        try:
            store.read(digest)
        except RepositoryCorruptError as exc:
            return str(exc)
        return None

    damaged = set()
    with ThreadPoolExecutor(block_workers(), thread_name_prefix="verify") as pool:
        for done, (digest, problem) in enumerate(zip(digests, map_blocks(pool, check, digests), strict=True), start=1):
            if problem is not None:
                damaged.add(digest)
                problems.append(problem)
            if progress is not None:
                progress(done, len(digests))
    return damaged
