"""Real ext4 disk images for a lab of simulated VMs: build them, look inside them, compare them.

``make demo`` (:mod:`backupd.demo`) and ``make bench`` (``bench/run.py``) back up simulated VMs
whose disks are real filesystems, so that what a backup reads, deduplicates and restores is what
it would meet on a real hypervisor. This module holds what both need for that:

* :func:`build_ext4_image`: an ext4 image made by ``mkfs.ext4 -d`` from directory trees of
  this machine plus generated files, as an :class:`ImageSpec` says; reused while the recipe is
  unchanged;
* :func:`file_extents`, :func:`dump_file`, :func:`e2fsck_clean`: where a file's blocks lie in an
  image, a file copied out of it, and whether ``e2fsck`` finds the filesystem clean (restore
  checks);
* :func:`files_differ_at`: a streaming byte-for-byte comparison of two disk files;
* :func:`live_disk`: the live disk file of a simulated VM, and :func:`toml_string` for the lab
  config that names the images;
* :func:`find_tool`: the e2fsprogs executables, with the Debian package to install when one is
  missing.

Errors::

    DiskImageError        an image could not be built or read
    └── MissingTool       a command-line tool is not installed
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

MiB = 1 << 20

#: ext4 block size of every image, so ``debugfs`` block numbers convert to bytes the same way
FS_BLOCK_SIZE = 4096


class DiskImageError(Exception):
    """A disk image could not be built or read; the message says which and why."""


class MissingTool(DiskImageError):
    """A command-line tool the lab needs is not installed."""


def find_tool(name: str, package: str) -> str:
    """Return the path of the executable ``name``.

    ``/usr/sbin`` and ``/sbin`` are searched too: Debian installs ``mkfs.ext4`` and ``e2fsck``
    there, and a regular user's ``PATH`` often lacks them.

    :param name: executable name, e.g. ``mkfs.ext4``
    :param package: the Debian package that provides it, named in the error
    :raises MissingTool: when it is not found
    """
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    path = shutil.which(name, path=search)
    if path is None:
        raise MissingTool(
            f"{name} not found: it comes with the Debian package {package} "
            f"(sudo apt-get install {package})"
        )
    return path


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class GeneratedFile:
    """A file of seeded pseudo-random bytes placed into an image (e.g. a database file).

    Random bytes do not compress or deduplicate, like the pages of a real database.
    """

    path: str  #: path inside the image, relative to its root
    size: int  #: bytes
    seed: int

    def content(self) -> bytes:
        """The file's bytes: the same for the same seed and size."""
        return random.Random(self.seed).randbytes(self.size)


@dataclass(frozen=True)
class ImageSpec:
    """The recipe of one ext4 disk image; a built image is reused while its recipe is unchanged.

    ``sources`` pairs a directory of this machine with the folder it becomes inside the image
    (``""`` for the image root). Files are copied in sorted path order until ``cap_bytes`` of
    file data are in, so the image fits whatever the size of the tree on this machine.
    """

    size_bytes: int
    label: str
    sources: tuple[tuple[str, str], ...]
    cap_bytes: int
    generated: tuple[GeneratedFile, ...] = field(default=())


def stage_tree(sources: Sequence[tuple[str, str]], stage: Path, cap_bytes: int) -> int:
    """Copy directory trees into ``stage``, at most ``cap_bytes`` of file data.

    Symbolic links are copied as links; sockets, devices and unreadable files are skipped.

    :returns: bytes of file data copied
    """
    copied = 0
    for source, inside in sources:
        root = Path(source)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            here = Path(dirpath)
            target_dir = stage / inside / here.relative_to(root)
            target_dir.mkdir(parents=True, exist_ok=True)
            for name in sorted(filenames):
                src = here / name
                try:
                    if src.is_symlink():
                        os.symlink(os.readlink(src), target_dir / name)
                        continue
                    if not src.is_file():
                        continue
                    size = src.stat().st_size
                    if copied + size > cap_bytes:
                        return copied
                    shutil.copy2(src, target_dir / name)
                except OSError:
                    continue
                copied += size
    return copied


def build_ext4_image(image: Path, spec: ImageSpec) -> bool:
    """Make ``image`` an ext4 filesystem built by ``mkfs.ext4 -d`` as ``spec`` says.

    An existing image whose recipe (kept next to it as ``IMAGE.spec.json``) equals ``spec`` is
    reused. A new image is built under a temporary name and renamed when complete, so an
    interrupted build is never mistaken for a finished one.

    :returns: True if the image was built, False if an existing one was reused
    :raises MissingTool: ``mkfs.ext4`` is not installed
    :raises DiskImageError: ``mkfs.ext4`` failed
    """
    recipe = image.with_name(image.name + ".spec.json")
    wanted = json.dumps(asdict(spec), indent=2, sort_keys=True)
    if image.exists() and recipe.exists() and recipe.read_text() == wanted:
        return False
    mkfs = find_tool("mkfs.ext4", "e2fsprogs")
    image.parent.mkdir(parents=True, exist_ok=True)
    stage = image.with_name(f".stage-{image.name}")
    partial = image.with_name(f".partial-{image.name}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        stage_tree(spec.sources, stage, spec.cap_bytes)
        for generated in spec.generated:
            target = stage / generated.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(generated.content())
        partial.unlink(missing_ok=True)
        cmd = [mkfs, "-q", "-F", "-b", str(FS_BLOCK_SIZE), "-L", spec.label, "-d", str(stage),
               str(partial), f"{spec.size_bytes // 1024}k"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise DiskImageError(
                f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        partial.rename(image)
        recipe.write_text(wanted)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        partial.unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------- inspecting


@dataclass(frozen=True)
class Extent:
    """A run of a file's blocks: file blocks ``logical..`` live at image blocks ``physical..``."""

    logical: int  #: first file block
    physical: int  #: first image block
    length: int  #: blocks


def file_extents(image: Path, path: str) -> list[Extent]:
    """The data extents of the file ``path`` inside the ext4 ``image`` (``debugfs -R ex``).

    Block numbers and lengths are in blocks of :data:`FS_BLOCK_SIZE` bytes.

    :raises MissingTool: ``debugfs`` is not installed
    :raises DiskImageError: ``debugfs`` failed or the file is not there
    """
    debugfs = find_tool("debugfs", "e2fsprogs")
    done = subprocess.run([debugfs, "-R", f"ex /{path}", str(image)], capture_output=True,
                          text=True)
    # e.g. " 0/ 0   1/  1     0 -  4095  2089 -  6184   4096": level/depth, entry/entries,
    # logical range, physical range, length; only leaf lines (level == depth) map data
    line = re.compile(r"^\s*(\d+)/\s*(\d+)\s+\d+/\s*\d+\s+(\d+)\s*-\s*\d+\s+(\d+)\s*-\s*\d+\s+(\d+)")
    extents = []
    for text in done.stdout.splitlines():
        match = line.match(text)
        if match and match[1] == match[2]:
            extents.append(Extent(int(match[3]), int(match[4]), int(match[5])))
    if not extents:
        raise DiskImageError(f"no extents for /{path} in {image}: {done.stderr.strip()}")
    return extents


def dump_file(image: Path, path: str, out: Path) -> None:
    """Copy the file ``path`` out of the ext4 ``image`` to ``out`` (``debugfs -R dump``).

    :raises MissingTool: ``debugfs`` is not installed
    :raises DiskImageError: nothing was written to ``out`` (e.g. the file is not there)
    """
    debugfs = find_tool("debugfs", "e2fsprogs")
    out.unlink(missing_ok=True)
    done = subprocess.run([debugfs, "-R", f"dump /{path} {out}", str(image)],
                          capture_output=True, text=True)
    if not out.exists():
        raise DiskImageError(
            f"debugfs could not dump /{path} from {image}: {done.stderr.strip()}")


def e2fsck_clean(image: Path) -> tuple[bool, str]:
    """Run ``e2fsck -fn`` (forced, read-only) on ``image``.

    :returns: (True if it exits 0, i.e. no errors; its summary line when clean, else its
              whole output)
    :raises MissingTool: ``e2fsck`` is not installed
    """
    e2fsck = find_tool("e2fsck", "e2fsprogs")
    done = subprocess.run([e2fsck, "-fn", str(image)], capture_output=True, text=True)
    if done.returncode == 0:
        return True, done.stdout.strip().splitlines()[-1]
    return False, f"exit {done.returncode}\n{done.stdout}{done.stderr}".strip()


def files_differ_at(a: Path, b: Path, chunk: int = 4 * MiB) -> int | None:
    """Compare two files in chunks (streaming; memory stays at two chunks).

    :param chunk: bytes read from each file at a time
    :returns: None if they are byte-identical, else the offset of the first difference
              (the shorter file's length when one is a prefix of the other)
    """
    offset = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(chunk), fb.read(chunk)
            if ca != cb:
                for i, (x, y) in enumerate(zip(ca, cb)):
                    if x != y:
                        return offset + i
                return offset + min(len(ca), len(cb))
            if not ca:
                return None
            offset += len(ca)


# --------------------------------------------------------------------------- the lab's VMs


def live_disk(config: Path, provider: str, vm: str, disk: int = 0) -> Path:
    """The live disk file of a simulated VM (what the guest sees; sparse, written in place).

    Read through the provider's own API (:meth:`SimulatedProvider.disk_path`) so callers do
    not depend on the layout of its ``state_dir``.

    :param config: the config file naming the provider
    :param provider: the ``[providers.NAME]`` of a simulated provider
    :param disk: the disk's index in the VM's config
    """
    from backupd.config import load_config
    from providers.simulated import SimulatedProvider

    section = load_config(config).providers[provider]
    return SimulatedProvider(provider, section).disk_path(vm, disk)


def toml_string(value: object) -> str:
    """A TOML basic string holding ``str(value)`` (JSON string escapes are valid TOML)."""
    return json.dumps(str(value))
