"""The :class:`Repository` facade: open or create, write, list, maintain and restore points."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from backupd.errors import NotFoundError, RepositoryCorruptError
from providers.base import VmConfig

from . import _maintenance
from ._blocks import BlockStore
from ._layout import FORMAT_VERSION, Layout, RepositoryConfig
from ._locking import discard_dead_staging
from ._maintenance import GcResult, VerifyResult
from ._manifest import BasePoint, DamagedPoint, PointInfo, peek_header, read_header, read_manifest
from ._restore import restore
from ._stream import PointReader
from ._writer import PointWriter

log = logging.getLogger(__name__)


class Repository:
    """A deduplicating store of restore points on a local (or flock-capable) file system.

    Several processes may use one repository at once: point writers run side by side,
    garbage collection waits for none of them and defers instead (see ``_locking``).
    Instances hold no open files and may be shared between threads.

    :ivar path: the repository folder.
    :ivar block_size: bytes per block, fixed when the repository was created.
    """

    def __init__(self, layout: Layout, config: RepositoryConfig, compression_level: int) -> None:
        self._layout = layout
        self._config = config
        block_size = config.block_size
        self.path = layout.root
        self.block_size = block_size
        self._store = BlockStore(
            layout.blocks, quarantine=layout.quarantine, block_size=block_size, compression_level=compression_level
        )

    def __repr__(self) -> str:
        return f"Repository({str(self.path)!r}, block_size={self.block_size})"

    @classmethod
    def open(
        cls, path: Path, *, create: bool = False, block_size: int = 1 << 20, compression_level: int = 3
    ) -> Repository:
        """Open a repository, creating it first if asked and absent.

        Opening also discards staging folders of writers of this host that died (a crashed
        backup never becomes a restore point and leaves no staged data behind).

        :param path: the repository folder.
        :param create: initialise the repository if ``path`` is absent or an empty folder
            (``repository.json``: format version, ``block_size``, hash ``blake3``,
            compression ``zstd``; files 0600, folders 0700).
        :param block_size: bytes per block for a *new* repository (a multiple of 4096, 4 KiB
            to 64 MiB; 1 MiB matches CBT extent granularity well); an existing repository
            keeps its own and this is ignored.
        :param compression_level: zstd level (1-22) for blocks written through this
            instance; existing blocks are unaffected.
        :raises ValueError: block_size or compression_level out of range.
        :raises RepositoryError: not a repository (and ``create`` is false), unreadable,
            written by a newer backupd, or ``create`` on a non-empty folder that is not a
            repository; the message names the path.
        """
        if not 1 <= compression_level <= 22:
            raise ValueError(f"compression_level must be 1..22, got {compression_level}")
        layout = Layout(Path(path))
        if create and not layout.config_file.exists():
            layout.initialise(block_size)
        config = layout.read_config()
        discard_dead_staging(layout.staging)
        return cls(layout, config, compression_level)

    def new_point(
        self, *, vm: str, vm_id: str, vm_config: VmConfig | None = None, job: str, session: str, mode: str,
        base: BasePoint | None = None,
    ) -> PointWriter:
        """Start writing a restore point of one VM.

        Holds the repository lock shared until commit or abort (waits while a garbage
        collection runs); use the writer as a context manager so it is always released. The
        first point written into a format 1 repository upgrades ``repository.json`` to
        format 2 (:meth:`Layout.upgrade_config`).

        :param vm: the VM's name now (any string; stored exactly, shown to people).
        :param vm_id: the VM's stable id (:attr:`providers.base.VmInfo.id`; any string,
            sanitized for paths): the point's folder, and what chains follow.
        :param vm_config: the VM's configuration the snapshot captured (stored in the
            manifest header, under its checksum).
        :param job: the job name.
        :param session: the job session id.
        :param mode: ``"full"`` or ``"incremental"`` (a :class:`~backupd.enums.TransferMode`
            member is accepted and stored by value).
        :param base: what :meth:`base_point` returned, when the disks name that point as their
            ``base_point``: its block maps, read and checked there, are not read again.
        :raises RepositoryError: the staging folder or lock cannot be created.
        """
        if self._config.version < FORMAT_VERSION:
            self._config = self._layout.upgrade_config(self._config)
        return PointWriter(
            self._layout, self._store, self.block_size,
            vm=vm, vm_id=vm_id, vm_config=vm_config, job=job, session=session, mode=mode, base=base,
        )

    def points(
        self, *, vm: str | None = None, vm_id: str | None = None, job: str | None = None
    ) -> list[PointInfo]:
        """Restore points that look sound, newest first, optionally only those made under
        the VM name ``vm``, of the VM id ``vm_id`` and/or of one job (damaged ones:
        :meth:`damaged_points`; a VM's whole chain: :meth:`chain`).

        Reads one header line and the size of each manifest, never the block maps, so it
        stays cheap for any disk size.

        :raises RepositoryError: the points folder cannot be listed.
        """
        return self._scan(_Match(vm, vm_id, job))[0]

    def damaged_points(
        self, *, vm: str | None = None, vm_id: str | None = None, job: str | None = None
    ) -> list[DamagedPoint]:
        """Restore points whose manifest is unreadable, not a manifest, or truncated, newest
        first (as cheap as :meth:`points`; a changed byte inside the block maps is found by
        :meth:`verify`). With a filter, points whose header is unreadable are included, since
        their VM and job are unknown.

        :raises RepositoryError: the points folder cannot be listed.
        """
        return self._scan(_Match(vm, vm_id, job))[1]

    def chain(self, *, vm_id: str, vm: str, job: str) -> list[PointInfo]:
        """The sound restore points of one VM made by one job, newest first: those of id
        ``vm_id``, and those of format 1 (no id) made under the name ``vm`` (the VM's name
        now), so a VM backed up before ids were recorded goes on with its chain.

        :raises RepositoryError: the points folder cannot be listed.
        """
        return self._chain(vm_id, vm, job)[0]

    def _chain(self, vm_id: str, vm: str, job: str) -> tuple[list[PointInfo], list[DamagedPoint]]:
        folders = [self._layout.vm_dir(vm_id, vm), self._layout.vm_dir(None, vm)]
        return self._scan(_Match(None, None, job, chain=(vm_id, vm)), folders)

    def _scan(
        self, match: "_Match", folders: list[Path] | None = None
    ) -> tuple[list[PointInfo], list[DamagedPoint]]:
        found: list[PointInfo] = []
        damaged: list[DamagedPoint] = []
        for point_id, manifest in self._layout.manifests(folders):
            try:
                info = read_header(manifest)
            except NotFoundError:
                continue  # deleted by retention while listing
            except RepositoryCorruptError as exc:
                damaged.append(DamagedPoint(point_id, manifest.parent.name, str(exc), peek_header(manifest)))
                continue
            if match(info):
                found.append(info)
        damaged = [d for d in damaged if d.info is None or match(d.info)]
        found.sort(key=lambda info: (info.created_at, info.id), reverse=True)
        damaged.sort(key=lambda d: d.id, reverse=True)
        return found, damaged

    def point(self, point_id: str) -> PointInfo:
        """One restore point's header.

        :raises NotFoundError: no such point.
        :raises RepositoryCorruptError: its header is unreadable or its manifest truncated.
        """
        return read_header(self._layout.find_manifest(point_id))

    def holds(self, point_id: str) -> bool:
        """Whether this repository has a restore point of that id, sound or damaged."""
        try:
            self._layout.find_manifest(point_id)
        except NotFoundError:
            return False
        return True

    def base_point(self, *, vm_id: str, vm: str, job: str) -> tuple[BasePoint | None, list[DamagedPoint]]:
        """The newest restore point of a VM's :meth:`chain` made by a job whose manifest is
        whole (read in full, checksum checked): the base of the next incremental transfer.

        :returns: that point with its block maps (None: no sound point, a full transfer is
            needed; hand it to :meth:`new_point`) and the damaged points of the VM and job
            newer than it, which were passed over.
        :raises RepositoryError: the repository cannot be read.
        """
        sound, damaged = self._chain(vm_id, vm, job)
        passed_over = list(damaged)
        for info in sound:
            path = self._layout.manifest_path(info.vm_id, info.vm, info.id)
            try:
                base = BasePoint(*read_manifest(path, self.block_size))
            except NotFoundError:
                continue
            except RepositoryCorruptError as exc:
                passed_over.append(DamagedPoint(info.id, path.parent.name, str(exc), info))
                continue
            return base, sorted((d for d in passed_over if d.id > info.id), key=lambda d: d.id, reverse=True)
        return None, sorted(passed_over, key=lambda d: d.id, reverse=True)

    def delete_points(self, point_ids: list[str]) -> list[str]:
        """Delete restore points (sound or damaged) by id, then collect garbage.

        :returns: the ids deleted, in the order given.
        :raises NotFoundError: an id is not in this repository (nothing is deleted).
        :raises RepositoryError: a manifest cannot be deleted.
        """
        paths = [self._layout.find_manifest(point_id) for point_id in point_ids]
        removed = _maintenance.delete_manifests(self._layout, list(zip(point_ids, paths)))
        self.collect_garbage()
        return removed

    def apply_retention(self, *, vm_id: str, vm: str, job: str, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` restore points of one VM's :meth:`chain` made
        by one job.

        Points of other jobs and other VMs are untouched. Only manifests are deleted: the
        blocks they alone referenced become garbage, marked pending (:meth:`garbage_pending`)
        and freed by the next :meth:`collect_garbage`. A job session collects at most once, at
        its end, for all its VMs, when the repository's ``gc_interval_seconds`` has passed
        (:meth:`last_collection`): a collection reads every manifest of the repository, so one
        per VM would make a session's cost grow with VMs x restore points.

        :param keep: restore points to keep, >= 1 (deleting the last point of a VM is never
            what retention means).
        :returns: the deleted point ids, newest first.
        :raises ValueError: keep < 1.
        :raises RepositoryError: a manifest or block cannot be deleted.
        """
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        doomed = self.chain(vm_id=vm_id, vm=vm, job=job)[keep:]
        return _maintenance.delete_manifests(
            self._layout, [(info.id, self._layout.manifest_path(info.vm_id, info.vm, info.id)) for info in doomed]
        )

    def garbage_pending(self) -> bool:
        """Whether restore points were deleted (or a collection deferred) since the last
        completed garbage collection: only then can unreferenced blocks exist."""
        return _maintenance.gc_pending(self._layout)

    def last_collection(self) -> datetime | None:
        """When the last garbage collection completed (UTC), or None before the first. A job
        session collects only when the repository's ``gc_interval_seconds`` has passed since
        then: a collection reads every manifest of the repository, which is not something
        every session should pay for (restic's ``prune`` and kopia's full maintenance run
        apart from backups for the same reason)."""
        last = _maintenance.last_collection(self._layout)
        return None if last is None else datetime.fromtimestamp(last, timezone.utc)

    def collect_garbage(self) -> GcResult:
        """Delete blocks no restore point references, unless writers are busy.

        :returns: blocks removed, bytes freed, or ``deferred=True`` when a writer, restore
            or verify holds the repository, or ``damaged_points`` when a damaged manifest
            (which may reference any block) keeps everything (nothing is deleted then).
        :raises RepositoryError: the repository cannot be read or changed.
        """
        return _maintenance.collect_garbage(self._layout, self._store, self.block_size)

    def verify(
        self, point_ids: list[str] | None = None, *, progress: Callable[[int, int], None] | None = None
    ) -> VerifyResult:
        """Re-read and re-hash every block the chosen restore points reference.

        Each distinct block is read once (decompress, BLAKE3, compare with its name). A
        missing, undecompressable or mismatching block damages every checked point that
        references it; a manifest whose checksum fails damages its own point.

        :param point_ids: the points to check; None for all.
        :param progress: called as ``progress(blocks checked, distinct blocks to check)``.
        :raises NotFoundError: a point id does not exist.
        :raises RepositoryError: the repository cannot be read (other than damage).
        """
        return _maintenance.verify(self._layout, self._store, self.block_size, point_ids, progress)

    def open_point(self, point_id: str) -> PointReader:
        """Open a restore point to read its disks as sequential streams (full-VM restore);
        every block is checked against its hash as it is read. Holds the repository lock
        shared until closed; use it as a context manager.

        :raises NotFoundError: no such point.
        :raises RepositoryCorruptError: its manifest is damaged.
        """
        return PointReader(self._layout, self._store, self.block_size, point_id)

    def restore(
        self, point_id: str, to_dir: Path, *, progress: Callable[[int, int], None] | None = None
    ) -> list[Path]:
        """Restore every disk of a point as a raw image ``<to_dir>/<vm-key>-disk<key>.img``.

        Images are sparse (zero blocks are holes), exactly ``capacity_bytes`` long, checked
        block by block against their hashes, and appear under their final names only when
        all of them are complete. ``to_dir`` is created (0700) if absent; images are 0600.
        Partial images that a killed restore left in ``to_dir`` (hidden
        ``.<image>.<8 hex>.partial`` files whose writer no longer holds their ``flock``) are
        removed first and logged as a warning; those of live restores are left alone.

        :param progress: called as ``progress(bytes restored, total bytes of all disks)``.
        :returns: the image paths, in the point's disk order.
        :raises NotFoundError: no such point.
        :raises RepositoryError: an image already exists (named; nothing is written), or
            writing failed (nothing is left behind).
        :raises RepositoryCorruptError: a block or the manifest is damaged (nothing is left
            behind).
        """
        return restore(self._layout, self._store, self.block_size, point_id, Path(to_dir), progress)


class _Match:
    """Which restore points a listing keeps: made under the VM name ``vm``, of the VM id
    ``vm_id``, by ``job`` (None: any), and, with ``chain=(vm_id, name)``, of that VM's chain
    (:meth:`PointInfo.of_vm`)."""

    def __init__(
        self, vm: str | None, vm_id: str | None, job: str | None, *, chain: tuple[str, str] | None = None
    ) -> None:
        self.vm, self.vm_id, self.job, self.chain = vm, vm_id, job, chain

    def __call__(self, info: PointInfo) -> bool:
        return (
            (self.vm is None or info.vm == self.vm)
            and (self.vm_id is None or info.vm_id == self.vm_id)
            and (self.job is None or info.job == self.job)
            and (self.chain is None or info.of_vm(*self.chain))
        )
