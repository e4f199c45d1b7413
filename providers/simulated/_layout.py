"""Where the simulated hypervisor keeps its state, and how processes share it.

Everything lives under ``state_dir`` (the tree is drawn in the package docstring). Processes
and threads coordinate through ``fcntl.flock`` on lock files, with a fresh open file
description per acquisition, so two threads of one process exclude each other exactly as two
processes do. Metadata is JSON written atomically (temporary file, then ``rename``), so a
reader without a lock sees either the old or the new document, never a torn one. Folders are
created 0700 and files 0600: disk images hold guest data.

Lock order, everywhere: ``provider.lock`` → ``vm.lock`` → disk locks by ascending key.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from providers.base import ProviderError, VmExists, VmNotFound

_FORMAT = 1
_COUNTER = struct.Struct("<Q")
_SNAPSHOT_ID_PREFIX = "snapshot-"
_CREATING_SUFFIX = ".creating"
#: bytes per read of a state file (most are under 1 KB; the VM index grows with the VMs)
_READ_CHUNK = 1 << 16


def creating_vm_id(folder_name: str) -> str:
    """The VM id in the name of a folder :meth:`Layout.creating` made."""
    return folder_name[1 : -len(_CREATING_SUFFIX)]


def make_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) unless it exists; missing parents are created too (with
    the default mode: they are outside the state)."""
    os.makedirs(path, mode=0o700, exist_ok=True)


def open_file(path: Path, flags: int) -> int:
    """``os.open`` with mode 0600 for files it creates, close-on-exec.

    :param flags: ``os.O_*`` flags.
    :returns: the file descriptor.
    :raises OSError: as ``os.open``.
    """
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


@contextmanager
def locked(path: Path, *, exclusive: bool) -> Iterator[int]:
    """Hold ``flock`` on the lock file ``path`` (created if missing) for the ``with`` block.

    :param exclusive: an exclusive lock (writers) or a shared one (readers).
    :returns: (as the ``with`` target) the lock file's descriptor, valid inside the block;
        lock files that carry a counter are read and written through it.
    """
    fd = open_file(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)  # closing the only descriptor of this open file releases the lock


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file in the same folder + rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as the JSON document ``path``, atomically, on one line (``jq .``
    shows it indented): an indented document goes through the json module's pure-Python
    encoder, several times slower than its C one."""
    write_atomic(path, json.dumps(value, sort_keys=True).encode())


def read_json(path: Path) -> Any | None:
    """The JSON document ``path``, or None when the file does not exist.

    :raises ProviderError: the file is not valid JSON (damaged state).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:  # not Path.read_bytes: its buffered file adds an fstat, an ioctl and lseeks per read
        chunks = []
        while chunk := os.read(fd, _READ_CHUNK):
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        return json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ProviderError(f"simulated hypervisor state file {path} is damaged: {exc}") from exc


def read_counter(fd: int, offset: int = 0) -> int:
    """The unsigned 64-bit little-endian counter at byte ``offset`` of ``fd`` (0 if absent)."""
    raw = os.pread(fd, _COUNTER.size, offset)
    return _COUNTER.unpack(raw)[0] if len(raw) == _COUNTER.size else 0


def write_counter(fd: int, value: int, offset: int = 0) -> None:
    """Store ``value`` as the counter at byte ``offset`` of ``fd``, in place."""
    os.pwrite(fd, _COUNTER.pack(value), offset)


@dataclass(frozen=True)
class DiskPaths:
    """The files of one live disk.

    :ivar image: the disk's bytes: a sparse file exactly ``capacity_bytes`` long.
    :ivar lock: exclusive for guest writes, snapshot creation and removal, CBT resets;
        shared for snapshot reads and CBT queries.
    :ivar cbt: the change log (see :mod:`providers.simulated._cbt`).
    """

    image: Path
    lock: Path
    cbt: Path


@dataclass(frozen=True)
class SnapshotPaths:
    """The folder of one snapshot and its per-disk copy-on-write files."""

    root: Path

    @property
    def meta(self) -> Path:
        """``snapshot.json``: id, name, description, creation time, each disk's changeId."""
        return self.root / "snapshot.json"

    def cow(self, key: int) -> Path:
        """Saved grains of disk ``key``, at their own offsets in a sparse file."""
        return self.root / f"disk-{key}.cow"

    def map(self, key: int) -> Path:
        """Generation counter + one bit per grain of disk ``key``: set once the grain is saved."""
        return self.root / f"disk-{key}.map"


@dataclass(frozen=True)
class VmPaths:
    """The folder of one VM (named by its id, never by its name) and the files in it."""

    root: Path

    @property
    def meta(self) -> Path:
        """``vm.json``: name, id and the disks made so far (key, label, capacity, source)."""
        return self.root / "vm.json"

    @property
    def lock(self) -> Path:
        """Serialises disk creation and snapshot creation/removal of this VM."""
        return self.root / "vm.lock"

    @property
    def faults(self) -> Path:
        """``faults.json``: the armed faults."""
        return self.root / "faults.json"

    @property
    def pauses(self) -> Path:
        """``pauses.json``: the paused ops."""
        return self.root / "pauses.json"

    @property
    def faults_generation(self) -> Path:
        """Lock of ``faults.json`` and ``pauses.json`` holding a counter bumped on every
        change of either."""
        return self.root / "faults.gen"

    @property
    def paused_calls(self) -> Path:
        """Folder of the calls blocked by a pause: one file each, locked by its call."""
        return self.root / "paused"

    @property
    def snapshots(self) -> Path:
        """Folder of the snapshot folders; names starting with ``.`` are in transit."""
        return self.root / "snapshots"

    def disk(self, key: int) -> DiskPaths:
        """The files of live disk ``key``."""
        stem = self.root / f"disk-{key}"
        return DiskPaths(
            image=stem.with_suffix(".img"),
            lock=stem.with_suffix(".lock"),
            cbt=stem.with_suffix(".cbt"),
        )

    def snapshot(self, snapshot_id: str) -> SnapshotPaths:
        """The folder of snapshot ``snapshot_id`` (which need not exist).

        :raises ValueError: ``snapshot_id`` is not of the form ``snapshot-<n>``.
        """
        if not is_snapshot_id(snapshot_id):
            raise ValueError(f"{snapshot_id!r} is not a simulated snapshot id")
        return SnapshotPaths(self.snapshots / snapshot_id)

    def snapshot_folders(self) -> list[SnapshotPaths]:
        """The existing snapshots, oldest first (by id number)."""
        try:
            names = [n for n in os.listdir(self.snapshots) if is_snapshot_id(n)]
        except FileNotFoundError:
            return []
        names.sort(key=lambda n: int(n[len(_SNAPSHOT_ID_PREFIX) :]))
        return [SnapshotPaths(self.snapshots / n) for n in names]


def is_snapshot_id(text: str) -> bool:
    """Whether ``text`` is a snapshot id this provider hands out (``snapshot-<n>``)."""
    number = text[len(_SNAPSHOT_ID_PREFIX) :]
    return text.startswith(_SNAPSHOT_ID_PREFIX) and number.isascii() and number.isdigit()


class Layout:
    """The ``state_dir`` tree: the provider-wide counters and the VM name → id index (the
    index is what a VM's name means: a rename changes only the index entry and ``vm.json``).

    :param state_dir: the root folder; created (0700) if missing.
    """

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self._index = state_dir / "provider.json"
        self._lock = state_dir / "provider.lock"
        self._snapshot_counter = state_dir / "snapshot-counter.lock"
        self._index_cache: tuple[tuple[int, int, int], Mapping[str, str]] | None = None
        make_dir(state_dir)
        make_dir(state_dir / "vms")

    def vm_id(self, vm_name: str) -> str | None:
        """The folder (``vm-<n>``) of the VM called ``vm_name`` now, or None when the index
        has no such name."""
        return self._index_vms().get(vm_name)

    def vm_names(self) -> dict[str, str]:
        """Every VM name of the index with its folder: ``{name: "vm-<n>"}``."""
        return dict(self._index_vms())

    def _index_vms(self) -> Mapping[str, str]:
        """The index's ``vms`` (read-only), parsed again only when ``provider.json`` is another
        file or changed (inode, size, modification time: :func:`write_json` replaces it, so
        every write is a new inode). The index names every VM the provider ever made (a
        thousand VMs make 30 KB of JSON), and a VM task looks a VM up more than once."""
        try:
            stat = os.stat(self._index)
        except FileNotFoundError:
            return {}
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._index_cache
        if cached is None or cached[0] != key:
            vms = MappingProxyType(dict((read_json(self._index) or {}).get("vms", {})))
            cached = self._index_cache = (key, vms)
        return cached[1]

    def vm_paths(self, vm_name: str) -> VmPaths:
        """The folder of VM ``vm_name``, allocating its id and creating the folder on first use.

        :returns: paths whose ``root`` is ``vms/vm-<n>`` (the VM's folder, never renamed).
        """
        vm_id = self.vm_id(vm_name)
        if vm_id is None:
            with locked(self._lock, exclusive=True):
                index = self._load()
                vm_id = index["vms"].get(vm_name)
                if vm_id is None:
                    vm_id = self._allocate(index)
                    paths = VmPaths(self.root / "vms" / vm_id)
                    make_dir(paths.root)
                    make_dir(paths.snapshots)
                    index["vms"][vm_name] = vm_id
                    write_json(self._index, index)
        return VmPaths(self.root / "vms" / vm_id)

    def rename(self, old: str, new: str) -> str:
        """Give the VM called ``old`` the name ``new`` in the index; its id and folder stay.

        :returns: the VM's folder name.
        :raises VmNotFound: the index has no VM ``old``.
        :raises VmExists: ``new`` is in the index.
        """
        with locked(self._lock, exclusive=True):
            index = self._load()
            vm_id = index["vms"].get(old)
            if vm_id is None:
                raise VmNotFound(f"no VM named {old!r} in simulated hypervisor state {self.root}")
            if new in index["vms"]:
                raise VmExists(f"a VM named {new!r} exists in simulated hypervisor state {self.root}")
            index["vms"][new] = index["vms"].pop(old)
            write_json(self._index, index)
        return vm_id

    def new_vm_id(self) -> str:
        """A folder name ``vm-<n>`` never handed out before by this ``state_dir`` (for a VM
        being created; the index learns its name when :meth:`publish` adds it)."""
        with locked(self._lock, exclusive=True):
            index = self._load()
            vm_id = self._allocate(index)
            write_json(self._index, index)
        return vm_id

    def publish(self, vm_name: str, folder: Path, *, taken: Callable[[str], bool]) -> VmPaths:
        """Make the complete VM folder ``folder`` (``vms/.<id>.creating``) the VM ``vm_name``:
        rename it to ``vms/<id>`` and add the name to the index, in one step under the
        provider lock.

        :param taken: whether a name not in the index is taken anyway (declared in the
            config); called with the provider lock held.
        :raises VmExists: the name was taken meanwhile; ``folder`` is left as it is.
        """
        vm_id = creating_vm_id(folder.name)
        with locked(self._lock, exclusive=True):
            index = self._load()
            if vm_name in index["vms"] or taken(vm_name):
                raise VmExists(f"a VM named {vm_name!r} exists in simulated hypervisor state {self.root}")
            final = VmPaths(self.root / "vms" / vm_id)
            os.rename(folder, final.root)
            index["vms"][vm_name] = vm_id
            write_json(self._index, index)
        return final

    def creating(self, vm_id: str) -> Path:
        """The folder a VM being created is built in: ``vms/.<id>.creating``."""
        return self.root / "vms" / f".{vm_id}{_CREATING_SUFFIX}"

    def creating_folders(self) -> list[Path]:
        """The folders of VMs being created, or left half created by a process that died."""
        folder = self.root / "vms"
        return [folder / n for n in os.listdir(folder) if n.startswith(".") and n.endswith(_CREATING_SUFFIX)]

    @staticmethod
    def _allocate(index: dict[str, Any]) -> str:
        vm_id = f"vm-{index['next_vm']}"
        index["next_vm"] += 1
        return vm_id

    def next_snapshot_id(self) -> str:
        """A snapshot id never handed out before by this ``state_dir``: ``snapshot-<n>``.

        The counter is kept in its own lock file (8 bytes, :func:`read_counter`), not in the
        index, which a provider of a thousand VMs would otherwise read, parse and rewrite
        for every snapshot. A state folder from before starts from the index's
        ``next_snapshot``."""
        with locked(self._snapshot_counter, exclusive=True) as fd:
            number = read_counter(fd) or self._load()["next_snapshot"]
            write_counter(fd, number + 1)
        return f"{_SNAPSHOT_ID_PREFIX}{number}"

    def snapshot_ids_handed_out(self) -> int:
        """How many snapshot ids :meth:`next_snapshot_id` has handed out: every snapshot ever
        created in this ``state_dir`` (removed ones included)."""
        with locked(self._snapshot_counter, exclusive=False) as fd:
            return (read_counter(fd) or self._load()["next_snapshot"]) - 1

    def _load(self) -> dict[str, Any]:
        index = read_json(self._index) or {
            "format": _FORMAT,
            "next_vm": 1,
            "next_snapshot": 1,
            "vms": {},
        }
        if index.get("format") != _FORMAT:
            raise ProviderError(f"{self._index}: unknown state format {index.get('format')!r}")
        return index
