"""Who may touch the repository at once: the repository lock and the staging owners.

Two kinds of lock, both ``flock(2)`` so the kernel drops them when their process dies:

* ``<root>/lock`` — every point writer holds it **shared** from ``new_point`` until commit or
  abort (restore and verify too, while they run). Garbage collection takes it **exclusive,
  non-blocking**: if any writer is in flight it returns ``deferred`` instead of deleting
  blocks that writer may have deduplicated against (or inherited from its base point) but
  not yet referenced from a manifest. Writers never wait for each other, only for a
  garbage collection that is already running.
* ``<root>/staging/<id>/owner`` — the writer of restore point ``<id>`` holds it exclusive for
  its whole life. The file also records ``host`` and ``pid`` for people. On open, a staging
  folder of this host whose owner lock can be taken belongs to a dead (or abandoned) writer
  and is removed; folders of other hosts are left alone, because their owner may be alive
  on a file system whose locks this host cannot see.

The repository therefore needs a file system with working ``flock`` (local file systems;
NFSv4 and SMB3 emulate it). Locks are per open file, so two writers in one process exclude a
garbage collection in that process exactly as two processes would.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from pathlib import Path

from backupd.errors import RepositoryError

from ._layout import DIR_MODE, FILE_MODE, remove_tree, write_all

log = logging.getLogger(__name__)

OWNER_FILE = "owner"


class HeldLock:
    """An open file that holds an ``flock``; :meth:`release` (idempotent) drops it."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def lock_shared(lock_file: Path) -> HeldLock:
    """Take the repository lock shared, waiting while a garbage collection holds it.

    :raises RepositoryError: the lock file cannot be opened or locked.
    """
    return HeldLock(_flock(lock_file, fcntl.LOCK_SH))


def try_lock_exclusive(lock_file: Path) -> HeldLock | None:
    """Take the repository lock exclusive without waiting.

    :returns: the held lock, or None when any writer (or reader) holds it shared.
    :raises RepositoryError: the lock file cannot be opened or locked.
    """
    try:
        return HeldLock(_flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB))
    except BlockingIOError:
        return None


def _flock(path: Path, operation: int) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, FILE_MODE)
    except OSError as exc:
        raise RepositoryError(f"{path}: cannot open lock file: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        raise RepositoryError(f"{path}: cannot lock (does the file system support flock?): {exc}") from exc
    return fd


class Staging:
    """The staging folder of one unfinished restore point, owned by this process.

    :ivar path: ``<root>/staging/<point id>``; staged block files are named by digest (hex).
    """

    def __init__(self, path: Path, owner: HeldLock) -> None:
        self.path = path
        self._owner = owner

    @classmethod
    def create(cls, staging_root: Path, point_id: str) -> Staging:
        """Create and own ``<staging_root>/<point_id>``.

        The owner file is locked before its contents are written, so a concurrent recovery
        never sees this folder as abandoned.

        :raises RepositoryError: the folder or owner file cannot be created.
        """
        path = staging_root / point_id
        try:
            os.mkdir(path, DIR_MODE)
            fd = os.open(path / OWNER_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
            fcntl.flock(fd, fcntl.LOCK_EX)
            owner = HeldLock(fd)
            record = {"host": socket.gethostname(), "pid": os.getpid()}
            write_all(fd, json.dumps(record).encode())
        except OSError as exc:
            raise RepositoryError(f"{path}: cannot create staging folder: {exc.strerror or exc}") from exc
        return cls(path, owner)

    def remove(self) -> None:
        """Delete the folder and drop ownership; idempotent.

        :raises OSError: the folder could not be removed (ownership is dropped regardless;
            the next open of the repository removes what is left).
        """
        try:
            if self.path.exists():
                remove_tree(self.path)
        finally:
            self._owner.release()


def discard_dead_staging(staging_root: Path) -> list[str]:
    """Remove staging folders left by writers of this host that are no longer running.

    A folder whose owner file is missing or unreadable is left alone (its writer may be
    between creating the folder and writing the file; it holds no block data yet).

    :returns: the point ids whose staging was removed.
    :raises RepositoryError: the staging folder cannot be listed.
    """
    try:
        names = sorted(os.listdir(staging_root))
    except OSError as exc:
        raise RepositoryError(f"{staging_root}: cannot list: {exc.strerror or exc}") from exc
    host = socket.gethostname()
    removed = []
    for name in names:
        folder = staging_root / name
        try:
            fd = os.open(folder / OWNER_FILE, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            try:
                owner = json.loads(os.read(fd, 4096))
            except ValueError:
                continue
            if not isinstance(owner, dict) or owner.get("host") != host:
                continue
            log.info("discarding unfinished restore point %s (writer pid %s is gone)", name, owner.get("pid"))
            try:
                remove_tree(folder)
            except OSError as exc:
                log.warning("cannot remove %s: %s", folder, exc)
                continue
            removed.append(name)
        finally:
            os.close(fd)
    return removed
