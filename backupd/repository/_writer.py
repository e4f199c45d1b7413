"""Writing one restore point: :class:`PointWriter` (the point) and :class:`DiskWriter` (a disk).

Life of a writer: ``new_point`` takes the repository lock shared and creates
``staging/<id>/`` with a locked owner file; ``add_disk`` starts each disk's block map (all
zero, or a copy of a base point's); worker threads call ``put_block``, which stages blocks the
store does not have; ``commit`` flushes the file system, publishes the staged blocks into
``blocks/``, flushes again (both flushes skipped when no non-zero block was put), and only
then writes the manifest (tmp, fsync, link, fsync
folder). Until that last step nothing is a restore point; ``abort`` (or a crash, discarded on
the next open) leaves nothing behind but unreferenced blocks, which garbage collection
removes.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from datetime import datetime, timezone
from enum import Enum
from types import TracebackType

from backupd.errors import NotFoundError, RepositoryError
from providers.base import VmConfig

from ._blocks import DIGEST_SIZE, ZERO_DIGEST, BlockStore, block_digest
from ._layout import Layout, make_private_dir, new_point_id, sync_filesystem
from ._locking import Staging, lock_shared
from ._manifest import BasePoint, PointDisk, PointInfo, blocks_in, read_manifest, write_manifest

log = logging.getLogger(__name__)


class _State(Enum):
    OPEN = "open"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ABORTED = "aborted"


class PointWriter:
    """An unfinished restore point of one VM. Use as a context manager; get it from
    :meth:`Repository.new_point <backupd.repository.Repository.new_point>`.

    Leaving the ``with`` block without :meth:`commit` (normally or by an exception) aborts.

    :ivar id: the point's id, ``<UTC %Y%m%dT%H%M%S.%f>Z-<8 hex>``, unique and sortable.
    :ivar created_at: when the writer was opened (timezone-aware UTC).
    :ivar vm: the VM's name, as given to ``new_point``.
    :ivar vm_id: the VM's stable id.
    :ivar vm_config: the VM's configuration the snapshot captured, or None.
    :ivar job: the job name.
    :ivar session: the job session id.
    :ivar mode: ``"full"`` or ``"incremental"``.
    """

    def __init__(
        self,
        layout: Layout,
        store: BlockStore,
        block_size: int,
        *,
        vm: str,
        vm_id: str,
        vm_config: VmConfig | None,
        job: str,
        session: str,
        mode: str,
        base: BasePoint | None = None,
    ) -> None:
        for name, value in (("vm", vm), ("vm_id", vm_id), ("job", job), ("session", session), ("mode", mode)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        self._layout = layout
        self._store = store
        self._block_size = block_size
        self.vm, self.vm_id, self.vm_config, self.job, self.session = vm, vm_id, vm_config, job, session
        self.mode = mode.value if isinstance(mode, Enum) else mode  # accept TransferMode members
        self.created_at = datetime.now(timezone.utc)
        self.id = new_point_id(self.created_at)
        self._disks: list[DiskWriter] = []
        self._state = _State.OPEN
        self._guard = threading.Condition()
        self._in_flight = 0
        self._bytes_read = 0
        #: the base restore point's header and block maps, read once for all disks (or
        #: handed over by Repository.new_point)
        self._base = base
        #: a put_block recorded a non-zero block (stored now or deduplicated): the commit
        #: must flush; a point of zero blocks and inherited entries only references blocks
        #: made durable before their own point's manifest was written
        self._new_references = False
        self._repo_lock = lock_shared(layout.lock_file)
        try:
            self._staging = Staging.create(layout.staging, self.id)
        except BaseException:
            self._repo_lock.release()
            raise

    def __enter__(self) -> PointWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()

    def add_disk(
        self,
        *,
        key: int,
        label: str,
        capacity_bytes: int,
        change_id: str | None,
        base_point: str | None = None,
    ) -> DiskWriter:
        """Start one disk of this restore point.

        The disk's block map starts as a copy of ``base_point``'s map for the same disk key
        (an incremental transfer then puts only the changed blocks and the point is still
        complete), or all zero without a base (blocks never put restore as zeros).

        An inherited entry is trusted only if its block is stored: entries whose block is
        missing or quarantined are listed in :attr:`DiskWriter.missing`, and :meth:`commit`
        refuses the point until each of them has been put again (the caller reads those
        blocks from the snapshot), so no new point ever rests on a block known to be bad.

        :param key: device key, unique within this point.
        :param label: human name of the disk.
        :param capacity_bytes: disk size in bytes (>= 0); the map has
            ``ceil(capacity_bytes / block_size)`` entries.
        :param change_id: the disk's CBT changeId at this snapshot, or None.
        :param base_point: id of an earlier restore point of the same VM (same id, or a
            format 1 point made under this VM's name).
        :raises ValueError: a negative capacity or a key already added.
        :raises RepositoryError: the writer is no longer open; ``base_point`` does not exist,
            belongs to another VM, lacks this disk key or has another capacity for it.
        :raises RepositoryCorruptError: the base point's manifest is damaged.
        """
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        if any(disk.disk.key == key for disk in self._disks):
            raise ValueError(f"disk key {key} was already added to restore point {self.id}")
        self._require_open()
        blocks = blocks_in(capacity_bytes, self._block_size)
        block_map = bytearray(blocks * DIGEST_SIZE)
        missing: set[int] = set()
        if base_point is not None:
            block_map[:] = self._base_map(base_point, key, capacity_bytes)
            missing = self._unstored_entries(block_map)
        disk = DiskWriter(self, PointDisk(key, label, capacity_bytes, change_id), block_map, missing)
        self._disks.append(disk)
        return disk

    def _unstored_entries(self, block_map: bytearray) -> set[int]:
        """Indexes of non-zero entries whose block is not in the store (one ``stat`` per
        distinct block)."""
        stored: dict[bytes, bool] = {}
        missing = set()
        view = bytes(block_map)
        for index in range(len(view) // DIGEST_SIZE):
            digest = view[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
            if digest == ZERO_DIGEST:
                continue
            present = stored.get(digest)
            if present is None:
                present = stored[digest] = self._store.contains(digest)
            if not present:
                missing.add(index)
        return missing

    def _base_map(self, base_point: str, key: int, capacity_bytes: int) -> bytes:
        if self._base is None or self._base.info.id != base_point:
            # the base is of this VM's chain: its folders are looked in first (one stat, not
            # one per VM of the repository)
            chain = [self._layout.vm_dir(self.vm_id, self.vm), self._layout.vm_dir(None, self.vm)]
            try:
                self._base = BasePoint(*read_manifest(self._layout.find_manifest(base_point, first=chain),
                                                      self._block_size))
            except NotFoundError as exc:
                raise RepositoryError(f"base restore point {base_point} does not exist") from exc
        base, maps = self._base.info, self._base.maps
        if not base.of_vm(self.vm_id, self.vm):
            raise RepositoryError(
                f"base restore point {base_point} belongs to VM {base.vm!r} (id {base.vm_id}), not "
                f"{self.vm!r} (id {self.vm_id})"
            )
        for disk, block_map in zip(base.disks, maps, strict=True):
            if disk.key == key:
                if disk.capacity_bytes != capacity_bytes:
                    raise RepositoryError(
                        f"disk {key} has {capacity_bytes} bytes but {disk.capacity_bytes} in base "
                        f"restore point {base_point}; a full transfer is needed"
                    )
                return block_map
        raise RepositoryError(f"base restore point {base_point} has no disk {key}; a full transfer is needed")

    def commit(self) -> PointInfo:
        """Make the restore point durable and visible; the writer is finished afterwards.

        Order, for crash safety: flush the file system (staged blocks durable), rename the
        staged blocks into ``blocks/``, flush again (renames durable, including blocks this
        point deduplicated against that a concurrent writer just published), then write the
        manifest atomically. A crash at any step leaves either no point or a complete one.

        :returns: the new point's header.
        :raises RepositoryError: the writer is not open, ``put_block`` calls are still
            running, an inherited block listed in :attr:`DiskWriter.missing` was not put
            again (the writer stays open), or the commit failed (the writer is then aborted).
        """
        with self._guard:
            self._require_open()
            if self._in_flight:
                raise RepositoryError(f"restore point {self.id}: commit while put_block calls are running")
            for disk in self._disks:
                if disk.missing:
                    raise RepositoryError(
                        f"restore point {self.id}: disk {disk.disk.key}: {len(disk.missing)} block(s) "
                        f"inherited from the base point are damaged or missing and were not stored again"
                    )
            self._state = _State.COMMITTING
        try:
            stored_bytes = self._publish_blocks()
            disks = tuple(disk.disk for disk in self._disks)
            info = PointInfo(
                id=self.id,
                vm=self.vm,
                vm_id=self.vm_id,
                vm_config=self.vm_config,
                job=self.job,
                session=self.session,
                mode=self.mode,
                created_at=self.created_at,
                disks=disks,
                logical_bytes=sum(disk.capacity_bytes for disk in disks),
                stored_bytes=stored_bytes,
                bytes_read=self._bytes_read,
            )
            make_private_dir(self._layout.vm_dir(self.vm_id, self.vm))
            write_manifest(
                self._layout.manifest_path(self.vm_id, self.vm, self.id),
                tmp=self._staging.path / "manifest.tmp",
                info=info,
                block_size=self._block_size,
                maps=[disk.block_map for disk in self._disks],
            )
        except BaseException as exc:
            self._state = _State.ABORTED
            self._release()
            if isinstance(exc, OSError):
                raise RepositoryError(f"restore point {self.id}: commit failed: {exc}") from exc
            raise
        self._state = _State.COMMITTED
        self._release()
        return info

    def _publish_blocks(self) -> int:
        """Flush, move staged blocks into the store, flush; returns compressed bytes added.

        Nothing to flush (no ``syncfs``) when no ``put_block`` recorded a non-zero block: the
        point then references only zero entries and blocks inherited from its base point,
        which were durable before the base point's manifest was written (and
        :attr:`DiskWriter.missing` makes a block no longer stored be put again), and no block
        was staged.
        """
        if not self._new_references:
            return 0
        root = self._layout.root
        sync_filesystem(root)
        stored = 0
        with os.scandir(self._staging.path) as prefixes:
            for prefix in prefixes:
                if not prefix.is_dir(follow_symlinks=False):
                    continue  # the owner file
                with os.scandir(prefix.path) as staged:
                    for entry in staged:
                        size = entry.stat().st_size
                        if self._store.publish(entry.path, bytes.fromhex(entry.name)):
                            stored += size
        sync_filesystem(root)
        return stored

    def abort(self) -> None:
        """Discard this restore point: nothing becomes a point, staging is removed.

        Idempotent, and a no-op after :meth:`commit`. Refuses further ``put_block`` calls at
        once and waits for those already running (each is one block) before removing the
        staging folder. Blocks published by nothing are left to garbage collection.
        """
        with self._guard:
            if self._state is not _State.OPEN:
                return
            self._state = _State.ABORTED
            self._guard.wait_for(lambda: self._in_flight == 0)
        self._release()

    def _release(self) -> None:
        try:
            self._staging.remove()
        except OSError as exc:  # the point itself is settled; the next open cleans up
            log.warning("cannot remove staging of restore point %s: %s", self.id, exc)
        self._repo_lock.release()

    def _require_open(self) -> None:
        if self._state is not _State.OPEN:
            raise RepositoryError(
                f"restore point {self.id} is {self._state.value}, no longer open for writing"
            )

    def _enter_put(self) -> None:
        with self._guard:
            self._require_open()
            self._in_flight += 1

    def _leave_put(self, bytes_read: int, new_reference: bool) -> None:
        with self._guard:
            self._in_flight -= 1
            self._bytes_read += bytes_read
            self._new_references = self._new_references or new_reference
            self._guard.notify_all()


class DiskWriter:
    """The block map of one disk of a :class:`PointWriter`, filled by :meth:`put_block`.

    :ivar disk: what the manifest will say about the disk.
    :ivar block_map: ``blocks * 32`` bytes, entry ``i`` the digest of block ``i``.
    :ivar missing: block indexes inherited from the base point whose block is missing or
        quarantined; each must be put before commit. Shrinks as they are put.
    """

    def __init__(self, point: PointWriter, disk: PointDisk, block_map: bytearray, missing: set[int]) -> None:
        self._point = point
        self.disk = disk
        self.block_map = block_map
        self.missing = missing
        block_size = point._block_size
        self._block_size = block_size
        self._blocks = blocks_in(disk.capacity_bytes, block_size)
        self._last_size = disk.capacity_bytes - (self._blocks - 1) * block_size
        self._zero = _zeros(block_size)
        self._zero_last = _zeros(self._last_size)
        self._store = point._store
        self._staging = point._staging.path

    def put_block(self, index: int, data: bytes | bytearray | memoryview) -> int:
        """Store block ``index`` of this disk. Thread-safe: call it from many threads at once.

        An all-zero block is recorded as a zero entry and not stored. Otherwise the block is
        named by its BLAKE3 digest; if the repository (or this point) has it already, only
        the map changes (deduplication across points and VMs); if not, it is compressed with
        zstd and staged for :meth:`PointWriter.commit`.

        :param index: block number, ``offset // block_size``, in ``[0, blocks)``.
        :param data: the block's bytes: exactly ``block_size`` bytes, except the disk's last
            block which is ``capacity_bytes - index * block_size`` bytes.
        :returns: compressed bytes newly staged; 0 for a zero or already stored block.
        :raises ValueError: index out of range or data of the wrong length.
        :raises RepositoryError: the writer is no longer open (aborted, committed) or the
            block cannot be written.
        """
        if not 0 <= index < self._blocks:
            raise ValueError(f"block {index} is outside disk {self.disk.key} ({self._blocks} blocks)")
        if isinstance(data, memoryview):
            data = data.tobytes()  # bytes == memoryview compares item by item, ~40x slower
        last = index == self._blocks - 1
        if len(data) != (self._last_size if last else self._block_size):
            raise ValueError(f"block {index} of disk {self.disk.key} has {len(data)} bytes")
        self._point._enter_put()
        written = 0
        digest = ZERO_DIGEST
        try:
            if data != (self._zero_last if last else self._zero):
                digest = block_digest(data)
                if not self._store.contains(digest):
                    written = self._store.stage(self._staging, digest, data)
            self.block_map[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = digest
            self.missing.discard(index)
        finally:
            self._point._leave_put(len(data), digest != ZERO_DIGEST)
        return written


@functools.lru_cache(maxsize=8)
def _zeros(size: int) -> bytes:
    """``size`` zero bytes, one copy per size for the process: a fresh block of zeros for
    each disk writer cost a memset of a whole block (1-4 MiB) per disk."""
    return bytes(size)
