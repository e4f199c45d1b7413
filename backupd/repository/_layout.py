"""Where things live in a repository, and the small file-system primitives every part uses.

::

    <root>/
      repository.json              format version, block size, hash, compression
      lock                         flock target: writers shared, garbage collection exclusive
      gc-pending                   present while unreferenced blocks may exist
      gc-last                      its modification time: when the last garbage collection
                                   completed (absent before the first)
      blocks/<aa>/<digest>         one zstd-compressed block, named by its BLAKE3 digest (hex)
      points/<vm-key>/<id>.manifest  one restore point: JSON header line + binary block maps;
                                   ``<vm-key>`` from the VM's id (format 2), or from its
                                   name for points written by format 1
      staging/<id>/                an unfinished restore point: owner file, staged blocks, tmp
      quarantine/<digest>          a block found damaged or missing: its damaged bytes (or
                                   nothing), moved out of ``blocks/`` so no point reuses it

Every name under the root is built here from validated parts: VM ids and names go through
:func:`vm_key`, point ids must match :data:`POINT_ID_RE`, digests are hex. Nothing a VM is
called can therefore name a path outside the root. Files are created 0600 and folders 0700:
a repository holds whole disk images.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import blake3

from backupd.errors import NotFoundError, RepositoryError

#: the repository format this code writes and the newest it reads (2: restore points carry
#: the VM's stable id and configuration and live in a folder by id; 1: by name only, still read)
FORMAT_VERSION = 2
FILE_MODE = 0o600
DIR_MODE = 0o700
MANIFEST_SUFFIX = ".manifest"
#: restore point ids: creation time (UTC, microseconds) and 8 random hex digits; sortable
POINT_ID_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}$")
_VM_KEY_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_VM_KEY_MAX_PREFIX = 48


def vm_key(vm: str) -> str:
    """Derive the folder name that holds a VM's restore points.

    The VM name is sanitized (``[A-Za-z0-9._-]`` kept, anything else becomes ``_``, leading
    dots stripped, at most 48 characters) and followed by ``-`` and 8 hex digits of the
    BLAKE3 hash of the exact name, so two names that sanitize alike still get two folders and
    the result is never empty, ``.``, ``..`` or a path. Example: ``"web 01"`` →
    ``"web_01-3c1e0f7a"``.

    :param vm: the VM name as the provider reports it; any string, including empty ones,
        NUL characters and lone surrogates.
    :returns: a single path component of at most 57 ASCII characters.
    """
    exact = vm.encode("utf-8", "surrogatepass")
    prefix = _VM_KEY_SAFE.sub("_", vm).lstrip(".")[:_VM_KEY_MAX_PREFIX] or "vm"
    return f"{prefix}-{blake3.blake3(exact).hexdigest(4)}"


def new_point_id(created_at: datetime) -> str:
    """A fresh restore point id such as ``20260521T045711.123456Z-1a2b3c4d``.

    :param created_at: the point's creation time, timezone-aware UTC.
    """
    return f"{created_at:%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(4)}"


def make_private_dir(path: Path) -> None:
    """Create one folder 0700 unless it exists (the parent must exist)."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass


def fsync_dir(path: Path) -> None:
    """Make the entries of a folder (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)


def sync_filesystem(path: Path) -> None:
    """Flush everything written to the file system holding ``path`` (Linux ``syncfs(2)``).

    One call makes every staged block of a restore point durable, which measured 15-20%
    faster than an ``fsync`` per block (docs/repository-format.md). Where the C library has
    no ``syncfs`` (not Linux) it falls back to ``sync(2)``, which flushes all file systems.

    :raises OSError: the flush failed (for example an I/O error on the device).
    """
    if _syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def write_durably(final: Path, chunks: Iterable[bytes], *, tmp: Path, exclusive: bool) -> None:
    """Write a file so that ``final`` either does not exist or holds all of ``chunks``.

    Writes ``tmp`` (0600), fsyncs it, moves it to ``final`` and fsyncs ``final``'s folder.

    :param tmp: a scratch name on the same file system, removed on failure.
    :param exclusive: True to fail rather than replace an existing ``final`` (uses a hard link,
        which cannot replace); False to rename over it.
    :raises FileExistsError: ``exclusive`` and ``final`` exists.
    :raises OSError: anything else the file system reports.
    """
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        try:
            for chunk in chunks:
                write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, final)
            os.unlink(tmp)
        else:
            os.rename(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(final.parent)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte is written (a single write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_tree(path: Path) -> None:
    """Remove a folder and everything in it; entries that vanish meanwhile are fine.

    :raises OSError: an entry could not be removed for another reason.
    """

    def tolerate_vanished(func, name, exc_info) -> None:  # noqa: ANN001 (shutil's signature)
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(path, onerror=tolerate_vanished)


@dataclass(frozen=True)
class RepositoryConfig:
    """The contents of ``repository.json``.

    :ivar version: format version the repository was created with.
    :ivar block_size: bytes per block, fixed for the life of the repository.
    :ivar hash: block hash, always ``"blake3"`` (32-byte digests).
    :ivar compression: block compression, always ``"zstd"``.
    """

    version: int
    block_size: int
    hash: str = "blake3"
    compression: str = "zstd"


class Layout:
    """The paths of one repository, and the lookups that walk them.

    :param root: the repository folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_file = root / "repository.json"
        self.lock_file = root / "lock"
        self.gc_pending_file = root / "gc-pending"
        self.gc_last_file = root / "gc-last"
        self.blocks = root / "blocks"
        self.points = root / "points"
        self.staging = root / "staging"
        self.quarantine = root / "quarantine"

    def initialise(self, block_size: int) -> None:
        """Create the repository at :attr:`root` (absent or an empty folder).

        Safe against another process initialising the same folder at the same moment: the
        config is published with a hard link, so exactly one ``repository.json`` wins and
        the loser keeps using it.

        :param block_size: bytes per block, a multiple of 4096 between 4 KiB and 64 MiB.
        :raises ValueError: block_size out of range.
        :raises RepositoryError: the folder exists, is not empty and is not a repository, or
            cannot be written.
        """
        if not (4096 <= block_size <= 64 << 20 and block_size % 4096 == 0):
            raise ValueError(f"block_size must be a multiple of 4096 in [4 KiB, 64 MiB], got {block_size}")
        try:
            self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            # what a concurrent or an interrupted initialise leaves
            ours = {"blocks", "points", "staging", "quarantine", "lock", "repository.json"}
            entries = {e for e in os.listdir(self.root) if not e.startswith(".repository.json.")}
            if entries - ours:
                raise RepositoryError(f"{self.root}: exists, is not empty and is not a backupd repository")
            os.chmod(self.root, DIR_MODE)
            for folder in (self.blocks, self.points, self.staging, self.quarantine):
                make_private_dir(folder)
            os.close(os.open(self.lock_file, os.O_RDONLY | os.O_CREAT, FILE_MODE))
            config = {
                "format": "backupd-repository",
                "version": FORMAT_VERSION,
                "block_size": block_size,
                "hash": "blake3",
                "compression": "zstd",
            }
            text = (json.dumps(config, indent=2) + "\n").encode()
            tmp = self.root / f".repository.json.{secrets.token_hex(4)}.tmp"
            try:
                write_durably(self.config_file, [text], tmp=tmp, exclusive=True)
            except FileExistsError:
                pass  # another process initialised it first; its block size stands
        except OSError as exc:
            raise RepositoryError(f"{self.root}: cannot create repository: {exc.strerror or exc}") from exc

    def read_config(self) -> RepositoryConfig:
        """Read and check ``repository.json``.

        :raises RepositoryError: missing (not a repository), unreadable, malformed, a newer
            format version, or a hash/compression this code does not know; the message
            names the path.
        """
        try:
            raw = self.config_file.read_bytes()
        except FileNotFoundError:
            raise RepositoryError(f"{self.root}: not a backupd repository (no repository.json)") from None
        except OSError as exc:
            raise RepositoryError(f"{self.config_file}: cannot read: {exc.strerror or exc}") from exc
        try:
            data = json.loads(raw)
            if data.get("format") != "backupd-repository":
                raise ValueError("not a backupd repository config")
            config = RepositoryConfig(
                version=int(data["version"]),
                block_size=int(data["block_size"]),
                hash=str(data["hash"]),
                compression=str(data["compression"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RepositoryError(f"{self.config_file}: malformed repository config: {exc}") from exc
        if config.version > FORMAT_VERSION:
            raise RepositoryError(
                f"{self.root}: repository format version {config.version} is newer than this "
                f"backupd supports ({FORMAT_VERSION}); upgrade backupd"
            )
        if (config.hash, config.compression) != ("blake3", "zstd") or config.block_size <= 0:
            raise RepositoryError(
                f"{self.config_file}: unsupported hash/compression/block size "
                f"{config.hash}/{config.compression}/{config.block_size}"
            )
        return config

    def upgrade_config(self, config: RepositoryConfig) -> RepositoryConfig:
        """Record in ``repository.json`` that this repository holds points of format
        :data:`FORMAT_VERSION` (before the first such point is written, so an older backupd
        refuses the repository instead of misreading it); atomic (tmp + rename). Nothing
        else changes: points of older formats stay where they are and are read as they are.

        :returns: the config as it is now.
        :raises RepositoryError: ``repository.json`` cannot be written.
        """
        if config.version >= FORMAT_VERSION:
            return config
        upgraded = RepositoryConfig(FORMAT_VERSION, config.block_size, config.hash, config.compression)
        document = {"format": "backupd-repository", "version": upgraded.version, "block_size": upgraded.block_size,
                    "hash": upgraded.hash, "compression": upgraded.compression}
        tmp = self.root / f".repository.json.{secrets.token_hex(4)}.tmp"
        try:
            write_durably(self.config_file, [(json.dumps(document, indent=2) + "\n").encode()], tmp=tmp,
                          exclusive=False)
        except OSError as exc:
            raise RepositoryError(f"{self.config_file}: cannot upgrade to format {FORMAT_VERSION}: "
                                  f"{exc.strerror or exc}") from exc
        return upgraded

    def vm_dir(self, vm_id: str | None, vm: str) -> Path:
        """Folder holding a VM's manifests: by its id (``vm_key("id:" + vm_id)``), or, for
        points of format 1 (``vm_id`` None), by its name (``vm_key(vm)``)."""
        return self.points / (vm_key(f"id:{vm_id}") if vm_id is not None else vm_key(vm))

    def manifest_path(self, vm_id: str | None, vm: str, point_id: str) -> Path:
        """Where the manifest of a restore point lives (see :meth:`vm_dir`)."""
        return self.vm_dir(vm_id, vm) / f"{point_id}{MANIFEST_SUFFIX}"

    def manifests(self, folders: list[Path] | None = None) -> Iterator[tuple[str, Path]]:
        """Every ``(point id, manifest path)`` stored, or only those in ``folders``; any order.

        Only names of the form ``<point id>.manifest`` count.

        :raises RepositoryError: the points folder cannot be listed.
        """
        folders = folders if folders is not None else self._list(self.points)
        for folder in folders:
            for entry in self._list(folder):
                point_id = entry.name.removesuffix(MANIFEST_SUFFIX)
                if entry.name.endswith(MANIFEST_SUFFIX) and POINT_ID_RE.match(point_id):
                    yield point_id, entry

    def find_manifest(self, point_id: str, *, first: Iterable[Path] = ()) -> Path:
        """The manifest of a restore point, whichever VM it belongs to.

        :param first: VM folders to look in before all the others (one ``stat`` each), when
            the caller knows whose point it likely is; otherwise every VM folder is tried.
        :raises NotFoundError: no restore point has that id (or the id is malformed).
        """
        if POINT_ID_RE.match(point_id):
            for folder in itertools.chain(first, self._list(self.points)):
                candidate = folder / f"{point_id}{MANIFEST_SUFFIX}"
                if candidate.is_file():
                    return candidate
        raise NotFoundError(f"no restore point {point_id!r} in repository {self.root}")

    @staticmethod
    def _list(folder: Path) -> list[Path]:
        try:
            return [folder / name for name in os.listdir(folder)]
        except FileNotFoundError:
            return []
        except OSError as exc:
            if exc.errno == errno.ENOTDIR:
                return []
            raise RepositoryError(f"{folder}: cannot list: {exc.strerror or exc}") from exc
