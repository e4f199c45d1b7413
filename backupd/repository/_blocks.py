"""The block store: content-addressed, zstd-compressed blocks under ``<root>/blocks``.

A block is named by the BLAKE3 digest (32 bytes) of its *uncompressed* bytes and stored as
one zstd frame (content size recorded) in ``blocks/<first two hex digits>/<64 hex digits>``.
The same bytes always get the same name, so a block that exists is never written again,
across restore points and across VMs. All-zero blocks are never stored: block maps record
them as :data:`ZERO_DIGEST`.

New blocks are first *staged* inside the writer's staging folder and *published* (renamed
into ``blocks/``) only at commit, after the file system was flushed. A block therefore
appears under its final name only when its bytes are durable, and a crash never leaves a
truncated block that a later writer would deduplicate against.

A block that any read finds damaged (missing, unreadable, not a zstd frame, not matching its
name) is *quarantined*: its file is moved to ``quarantine/<64 hex>`` (an empty file there when
it was missing). From then on no writer deduplicates against it, an incremental transfer whose
base point references it reads those bytes from the snapshot again, and the first point that
stores the same bytes again heals every older point that references it (blocks are named by
content). docs/repository-format.md, "Damage".
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import blake3
import zstandard

from backupd.errors import RepositoryCorruptError, RepositoryError

from ._layout import FILE_MODE, make_private_dir, write_all

log = logging.getLogger(__name__)

#: bytes in a block digest (BLAKE3 default output)
DIGEST_SIZE = 32
#: the block-map entry of an all-zero block; BLAKE3 of any data equals it with negligible odds
ZERO_DIGEST = bytes(DIGEST_SIZE)
_HEX_NAME_LENGTH = 2 * DIGEST_SIZE
#: blocks handed to a thread pool at a time by :func:`map_blocks` (bounds futures and memory)
_WINDOW = 64


def block_workers() -> int:
    """Threads for reading blocks in parallel (verify, restore): decompression and BLAKE3
    release the GIL, so up to 4 cores help; more mostly adds I/O contention."""
    return min(4, os.cpu_count() or 1)


def map_blocks(pool: ThreadPoolExecutor, work: Callable, items: Iterable) -> Iterator:
    """Like ``pool.map(work, items)``: results in order, at most a window of items in flight.

    When the caller stops early or ``work`` raises, the items still in flight are finished
    (or cancelled) before this returns, so ``work`` never outlives what it writes to (the
    restore's file descriptor, for one).
    """
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(work, item))
            if len(pending) >= _WINDOW:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        wait(pending)


def block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3 digest (32 bytes) of a block's uncompressed bytes."""
    return blake3.blake3(data).digest()


class BlockStore:
    """Reads and writes blocks of one repository. Thread-safe.

    zstd compression and decompression contexts are not thread-safe, so each thread gets
    its own pair (kept in a :class:`threading.local`); BLAKE3 and zstd release the GIL,
    which is what lets several threads compress at once.

    :param folder: ``<root>/blocks``.
    :param quarantine: ``<root>/quarantine``, where damaged blocks are moved.
    :param block_size: bytes per block; a stored frame claiming more is corrupt.
    :param compression_level: zstd level for new blocks (3 is zstd's default: ~0.5 GB/s per
        core with a useful ratio; higher levels trade speed for size).
    """

    def __init__(self, folder: Path, *, quarantine: Path, block_size: int, compression_level: int) -> None:
        self.folder = folder
        self.quarantine_folder = quarantine
        self._prefix = str(folder)
        self._block_size = block_size
        self._level = compression_level
        self._local = threading.local()

    def path_of(self, digest: bytes) -> str:
        """File name of a block (whether or not it exists)."""
        name = digest.hex()
        return f"{self._prefix}/{name[:2]}/{name}"

    def contains(self, digest: bytes) -> bool:
        """Whether a block is stored (one ``stat``). A quarantined block is not."""
        return os.path.exists(self.path_of(digest))

    def stage(self, staging: Path, digest: bytes, data: bytes | bytearray) -> int:
        """Compress a block into ``<staging>/<aa>/<hex digest>`` unless it is staged already.

        :param staging: the writer's staging folder; if it is gone (the writer was aborted)
            nothing is written.
        :param digest: :func:`block_digest` of ``data``.
        :returns: compressed bytes written, 0 when another put of this restore point staged
            the same block first.
        :raises RepositoryError: the file cannot be written (e.g. ``ENOSPC``, staging gone);
            nothing is left behind under the staged name.
        """
        name = digest.hex()
        folder = f"{staging}/{name[:2]}"
        path = f"{folder}/{name}"
        if os.path.exists(path):
            return 0
        frame = self._compressor().compress(data)
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            except FileNotFoundError:
                make_private_dir(Path(folder))  # fails in turn if staging itself is gone
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            return 0  # a concurrent put of the same bytes won the race
        except OSError as exc:
            raise RepositoryError(f"{path}: cannot stage block: {exc.strerror or exc}") from exc
        try:
            try:
                write_all(fd, frame)
            finally:
                os.close(fd)
        except OSError as exc:
            os.unlink(path)  # never leave a short file that a later put would trust
            raise RepositoryError(f"{path}: cannot stage block: {exc.strerror or exc}") from exc
        return len(frame)

    def publish(self, staged: str, digest: bytes) -> bool:
        """Move a staged (and already flushed) block to its final name.

        :returns: True if the block is new to the store, False if a concurrent writer
            published the same block first (the staged copy is then dropped).
        :raises OSError: the rename failed.
        """
        final = self.path_of(digest)
        if os.path.exists(final):
            os.unlink(staged)
            return False
        try:
            os.rename(staged, final)
        except FileNotFoundError:
            make_private_dir(Path(final).parent)
            os.rename(staged, final)
        return True

    def read(self, digest: bytes) -> bytes:
        """Read, decompress and check one block; a damaged block is quarantined.

        :returns: the block's uncompressed bytes (at most ``block_size``).
        :raises RepositoryCorruptError: the block is missing (or quarantined earlier),
            unreadable (``EIO``), not a valid zstd frame, larger than a block, or does not
            hash to ``digest``; it is in quarantine afterwards.
        :raises RepositoryError: any other I/O failure (e.g. permissions).
        """
        try:
            return self._read_checked(digest)
        except RepositoryCorruptError as exc:
            self.quarantine(digest, str(exc))
            raise

    def _read_checked(self, digest: bytes) -> bytes:
        path = self.path_of(digest)
        try:
            with open(path, "rb") as file:
                frame = file.read()
        except FileNotFoundError:
            if self.is_quarantined(digest):
                raise RepositoryCorruptError(
                    f"block {digest.hex()} is quarantined (found damaged or missing earlier); the next "
                    f"backup that reads the same bytes stores it again"
                ) from None
            raise RepositoryCorruptError(f"block {digest.hex()} is missing ({path})") from None
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise RepositoryCorruptError(f"block {digest.hex()} cannot be read: {exc}") from exc
            raise RepositoryError(f"{path}: cannot read block: {exc.strerror or exc}") from exc
        try:
            if zstandard.frame_content_size(frame) > self._block_size:
                raise zstandard.ZstdError("frame larger than a block")
            data = self._decompressor().decompress(frame, max_output_size=self._block_size)
        except zstandard.ZstdError as exc:
            raise RepositoryCorruptError(f"block {digest.hex()} does not decompress: {exc}") from exc
        if block_digest(data) != digest:
            raise RepositoryCorruptError(f"block {digest.hex()} does not match its hash")
        return data

    def quarantine(self, digest: bytes, reason: str) -> None:
        """Take a damaged block out of use: move its file to ``quarantine/<hex>`` (kept for
        inspection), or leave an empty file there when it is missing. Idempotent, and
        best effort: a failure is logged, since the caller is already reporting the damage.

        Afterwards :meth:`contains` is False for it, so the next writer that reads the same
        bytes stores them again under the same name.
        """
        name = digest.hex()
        target = self.quarantine_folder / name
        try:
            make_private_dir(self.quarantine_folder)  # absent in repositories made before it
            try:
                os.rename(self.path_of(digest), target)
            except FileNotFoundError:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, FILE_MODE))
        except OSError as exc:
            log.error("cannot quarantine damaged block %s: %s", name, exc)
            return
        log.warning("quarantined block %s: %s", name, reason)

    def is_quarantined(self, digest: bytes) -> bool:
        """Whether the block was found damaged or missing and not stored again since."""
        return os.path.exists(self.quarantine_folder / digest.hex()) and not self.contains(digest)

    def quarantined(self) -> Iterator[tuple[bytes, str]]:
        """Every quarantine entry as ``(digest, path)``, healed or not."""
        try:
            names = os.listdir(self.quarantine_folder)
        except FileNotFoundError:
            return
        for name in names:
            if len(name) == _HEX_NAME_LENGTH:
                try:
                    yield bytes.fromhex(name), str(self.quarantine_folder / name)
                except ValueError:
                    continue

    def scan(self) -> Iterator[tuple[bytes, str, int]]:
        """Every stored block as ``(digest, path, size in bytes)``; other files are skipped.

        :raises OSError: a folder cannot be listed.
        """
        with os.scandir(self.folder) as prefixes:
            for prefix in prefixes:
                if not prefix.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(prefix.path) as entries:
                    for entry in entries:
                        if len(entry.name) != _HEX_NAME_LENGTH:
                            continue
                        try:
                            digest = bytes.fromhex(entry.name)
                        except ValueError:
                            continue
                        yield digest, entry.path, entry.stat(follow_symlinks=False).st_size

    def _compressor(self) -> zstandard.ZstdCompressor:
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self._level)
        return compressor

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        return decompressor
