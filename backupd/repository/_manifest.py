"""Restore point manifests: one file per point, a JSON header line followed by block maps.

::

    {"block_size":1048576,"bytes_read":...,"checksum":"<64 hex>","created_at":"...",
     "disks":[{"blocks":N,"capacity_bytes":...,"change_id":...,"key":2000,"label":...}],
     "format":"backupd-point","hash":"blake3","id":"...","job":"...",
     "logical_bytes":...,"mode":"full","session":"...","stored_bytes":...,"version":2,
     "vm":"...","vm_config":{...},"vm_id":"..."}\\n
    <disk 0 block map: N × 32-byte digests><disk 1 block map>...

The header is canonical JSON (sorted keys, no spaces, ASCII) on the first line, so listing
restore points reads one short line per manifest however large the disks are. A block map
has one entry per block of the disk (``ceil(capacity_bytes / block_size)``), in disk order;
an all-zero entry (:data:`~._blocks.ZERO_DIGEST`) is a zero block. ``checksum`` is the
BLAKE3 hex digest of the canonical header *without* ``checksum``, a newline, and all maps.

Version 2 added ``vm_id`` (the VM's stable id, :attr:`providers.base.VmInfo.id`) and
``vm_config`` (:func:`providers.vm_config_json.config_to_json` of what the snapshot captured,
or null when the provider gave none); version 1 manifests have neither and read as None.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import blake3

from backupd.errors import NotFoundError, RepositoryCorruptError, RepositoryError
from providers.base import VmConfig
from providers.vm_config_json import config_from_json, config_to_json

from ._blocks import DIGEST_SIZE
from ._layout import write_durably

MANIFEST_FORMAT = "backupd-point"
MANIFEST_VERSION = 2
#: the header line is a few hundred bytes per disk; anything longer is not a manifest
_MAX_HEADER = 1 << 20
#: bytes of a manifest read first for its header line (a header is about 1 KB)
_HEADER_READ = 8192


@dataclass(frozen=True)
class PointDisk:
    """One disk of a restore point.

    :ivar key: the disk's device key (vSphere ``VirtualDisk.key``), unique within the VM.
    :ivar label: human name, e.g. ``"Hard disk 1"``.
    :ivar capacity_bytes: size of the disk in bytes; a restored image has exactly this size.
    :ivar change_id: the CBT changeId of the disk at this point (the ``since`` of the next
        incremental transfer), or None when CBT was off.
    """

    key: int
    label: str
    capacity_bytes: int
    change_id: str | None


@dataclass(frozen=True)
class PointInfo:
    """What the header of a restore point says; listing reads only this.

    :ivar id: the point's id, e.g. ``20260521T045711.123456Z-1a2b3c4d`` (sorts by time).
    :ivar vm: the VM's name when the point was made, exactly as given to ``new_point``.
    :ivar job: the job that made the point.
    :ivar session: the job session that made the point.
    :ivar mode: the transfer mode, ``"full"`` or ``"incremental"``; either way the point
        is complete.
    :ivar created_at: when the writer was opened (timezone-aware UTC).
    :ivar disks: the disks in the order they were added; restore follows it.
    :ivar logical_bytes: sum of the disks' capacities.
    :ivar stored_bytes: compressed bytes of the blocks this point added to the repository.
    :ivar bytes_read: bytes handed to ``put_block`` (what the transfer read).
    :ivar vm_id: the VM's stable id (chains follow it); None for a point of format 1, made
        before backupd knew VM ids.
    :ivar vm_config: the VM's configuration as the snapshot captured it; None for a point
        of format 1.
    """

    id: str
    vm: str
    job: str
    session: str
    mode: str
    created_at: datetime
    disks: tuple[PointDisk, ...]
    logical_bytes: int
    stored_bytes: int
    bytes_read: int
    vm_id: str | None = None
    vm_config: VmConfig | None = None

    def of_vm(self, vm_id: str, vm: str) -> bool:
        """Whether this point belongs to the VM of id ``vm_id``, now called ``vm``: its id
        is ``vm_id``, or it has none (format 1) and was made under the name ``vm``."""
        return self.vm_id == vm_id if self.vm_id is not None else self.vm == vm


@dataclass(frozen=True)
class BasePoint:
    """The restore point an incremental transfer builds on, its manifest read in full and
    its checksum checked (:meth:`Repository.base_point`).

    :ivar info: its header.
    :ivar maps: one block map per disk of ``info.disks``, in that order: ``blocks * 32``
        bytes, entry ``i`` the digest of block ``i``.
    """

    info: PointInfo
    maps: list[bytes]


@dataclass(frozen=True)
class DamagedPoint:
    """A restore point whose manifest cannot be trusted: it is listed as damaged, never
    used as the base of an incremental transfer, and stops garbage collection until it is
    deleted (it may reference any block).

    :ivar id: the point id, from the manifest's file name.
    :ivar vm_key: the folder of the VM it belongs to (``points/<vm_key>/``).
    :ivar problem: what is wrong, for people.
    :ivar info: the header, when it is readable (e.g. block maps truncated or changed).
    """

    id: str
    vm_key: str
    problem: str
    info: PointInfo | None = None


def blocks_in(capacity_bytes: int, block_size: int) -> int:
    """Number of block-map entries of a disk: ``ceil(capacity_bytes / block_size)``."""
    return -(-capacity_bytes // block_size)


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def write_manifest(
    final: Path, *, tmp: Path, info: PointInfo, block_size: int, maps: Sequence[bytearray]
) -> None:
    """Write a manifest durably and atomically: ``final`` appears complete or not at all.

    :param final: ``points/<vm-key>/<id>.manifest``; must not exist.
    :param tmp: scratch name on the same file system (the writer's staging folder).
    :param info: the header; ``info.disks[i]`` is described by ``maps[i]``.
    :param maps: per disk, ``blocks_in(capacity) * 32`` bytes of digests.
    :raises OSError: the file could not be written.
    """
    header = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "hash": "blake3",
        "block_size": block_size,
        "id": info.id,
        "vm": info.vm,
        "vm_id": info.vm_id,
        "vm_config": config_to_json(info.vm_config) if info.vm_config is not None else None,
        "job": info.job,
        "session": info.session,
        "mode": info.mode,
        "created_at": info.created_at.isoformat(),
        "disks": [
            {
                "key": disk.key,
                "label": disk.label,
                "capacity_bytes": disk.capacity_bytes,
                "change_id": disk.change_id,
                "blocks": blocks_in(disk.capacity_bytes, block_size),
            }
            for disk in info.disks
        ],
        "logical_bytes": info.logical_bytes,
        "stored_bytes": info.stored_bytes,
        "bytes_read": info.bytes_read,
    }
    hasher = blake3.blake3(_canonical(header) + b"\n")
    for block_map in maps:
        hasher.update(block_map)
    header["checksum"] = hasher.hexdigest()
    write_durably(final, [_canonical(header) + b"\n", *maps], tmp=tmp, exclusive=True)


def read_header(path: Path) -> PointInfo:
    """Read a manifest's header line only (cheap for any disk size; not checksummed), and
    check that the file is as long as the header says (a truncated manifest is caught here;
    a changed byte in the block maps only by :func:`read_manifest`'s checksum).

    A header read before is answered from memory while the file is the same one, unchanged
    (inode, size and modification time, from one ``stat``): a manifest is written once and
    never changed, and a VM task reads its VM's chain twice (base point, retention).

    :raises NotFoundError: the manifest does not exist (any more).
    :raises RepositoryCorruptError: the header is not a valid manifest header, or the block
        maps are not the size it gives.
    :raises RepositoryError: the file cannot be read.
    """
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise NotFoundError(f"restore point manifest {path} does not exist") from None
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot read manifest: {exc.strerror or exc}") from exc
    return _read_header(str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _read_header(path: str, _inode: int, _size: int, _mtime_ns: int) -> PointInfo:
    """:func:`read_header` for one version of the file (the key); failures are not kept."""
    line, size = _header_line(path)
    header, info = _parse_header(path, line)
    _check_map_size(path, header, size - len(line))
    return info


def peek_header(path: Path) -> PointInfo | None:
    """The header of a manifest if its first line parses, whatever the rest holds (for
    describing a damaged point); None otherwise."""
    try:
        return _parse_header(path, _header_line(str(path))[0])[1]
    except (NotFoundError, RepositoryError):
        return None


def _header_line(path: str) -> tuple[bytes, int]:
    """A manifest's first line (with its newline; at most :data:`_MAX_HEADER` bytes, cut
    there when longer) and the file's size, read with one ``open``, ``fstat``, ``pread``
    and ``close`` (a buffered file object adds an ``ioctl``, ``lseek`` and a second
    ``fstat``: listing restore points reads one header per point).

    :raises NotFoundError: the manifest does not exist (any more).
    :raises RepositoryError: the file cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(f"restore point manifest {path} does not exist") from None
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot read manifest: {exc.strerror or exc}") from exc
    try:
        size = os.fstat(fd).st_size
        data = b""
        while len(data) < _MAX_HEADER:
            chunk = os.pread(fd, min(max(_HEADER_READ, len(data)), _MAX_HEADER - len(data)), len(data))
            end = chunk.find(b"\n")
            if end >= 0:
                return data + chunk[: end + 1], size
            data += chunk
            if not chunk:
                break
        return data, size
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot read manifest: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _check_map_size(path: str | Path, header: dict, map_bytes: int) -> None:
    expected = sum(disk["blocks"] for disk in header["disks"]) * DIGEST_SIZE
    if map_bytes != expected:
        raise RepositoryCorruptError(
            f"{path}: block maps are {map_bytes} bytes, the header says {expected} (truncated or "
            f"damaged restore point {header.get('id')})"
        )


def read_manifest(path: Path, block_size: int) -> tuple[PointInfo, list[bytes]]:
    """Read a whole manifest and check its checksum.

    :param block_size: the repository's block size; the header must agree.
    :returns: the header and, per disk, its block map (``blocks * 32`` bytes).
    :raises NotFoundError: the manifest does not exist (any more).
    :raises RepositoryCorruptError: checksum mismatch, malformed header, wrong map sizes.
    :raises RepositoryError: the file cannot be read.
    """
    with _open(path) as file:
        line = file.readline(_MAX_HEADER)
        header, info = _parse_header(path, line)
        _check_map_size(path, header, os.fstat(file.fileno()).st_size - len(line))
        claimed = header.pop("checksum", None)
        hasher = blake3.blake3(_canonical(header) + b"\n")
        maps = []
        for disk in header["disks"]:
            block_map = file.read(disk["blocks"] * DIGEST_SIZE)
            hasher.update(block_map)
            maps.append(block_map)
    if claimed != hasher.hexdigest():
        raise RepositoryCorruptError(f"{path}: manifest checksum mismatch (damaged restore point {info.id})")
    if header["block_size"] != block_size or any(
        disk["blocks"] != blocks_in(disk["capacity_bytes"], block_size) for disk in header["disks"]
    ):
        raise RepositoryCorruptError(f"{path}: block maps do not fit block size {block_size}")
    return info, maps


def _open(path: Path):  # noqa: ANN202 (a binary file object)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise NotFoundError(f"restore point manifest {path} does not exist") from None
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot read manifest: {exc.strerror or exc}") from exc


def _parse_header(path: str | Path, line: bytes) -> tuple[dict, PointInfo]:
    try:
        if not line.endswith(b"\n"):
            raise ValueError("no header line")
        header = json.loads(line)
        if header["format"] != MANIFEST_FORMAT:
            raise ValueError(f"format {header['format']!r}")
        if header["version"] > MANIFEST_VERSION:
            raise ValueError(f"manifest version {header['version']} is newer than this backupd")
        if not isinstance(header["block_size"], int) or not all(
            isinstance(disk["blocks"], int) and disk["blocks"] >= 0 for disk in header["disks"]
        ):
            raise ValueError("block_size and disks[].blocks must be integers")
        created_at = datetime.fromisoformat(header["created_at"])
        if created_at.tzinfo is None:
            raise ValueError("created_at has no time zone")
        disks = tuple(
            PointDisk(
                key=int(disk["key"]),
                label=str(disk["label"]),
                capacity_bytes=int(disk["capacity_bytes"]),
                change_id=None if disk["change_id"] is None else str(disk["change_id"]),
            )
            for disk in header["disks"]
        )
        vm_config = header.get("vm_config")
        info = PointInfo(
            id=str(header["id"]),
            vm=str(header["vm"]),
            vm_id=None if header.get("vm_id") is None else str(header["vm_id"]),
            vm_config=None if vm_config is None else config_from_json(vm_config),
            job=str(header["job"]),
            session=str(header["session"]),
            mode=str(header["mode"]),
            created_at=created_at.astimezone(timezone.utc),
            disks=disks,
            logical_bytes=int(header["logical_bytes"]),
            stored_bytes=int(header["stored_bytes"]),
            bytes_read=int(header["bytes_read"]),
        )
        if f"{info.id}.manifest" != os.path.basename(path):
            raise ValueError(f"header names point {info.id}")
    except (ValueError, KeyError, TypeError) as exc:
        raise RepositoryCorruptError(f"{path}: not a valid restore point manifest: {exc}") from exc
    return header, info
