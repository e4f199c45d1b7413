"""Repository throughput on its own: put_block + commit, dedup, verify and restore.

Run as ``.venv/bin/python bench/repository_throughput.py`` (``--help`` for options). It builds
about 512 MiB of realistic mixed data by concatenating the bytes of files under
``/usr/share`` (text, images, compressed archives, binaries), then, in a fresh repository:

full backup
    every 1 MiB block through ``DiskWriter.put_block`` from ``--threads`` worker threads (the
    engine's block pool), then ``commit``; logical MB/s from the first put to the committed
    manifest, and the compressed bytes stored.
identical second point
    the same data again: every block is found by hash (deduplication), nothing is stored.
verify / restore
    ``Repository.verify`` (every block decompressed and re-hashed) and ``Repository.restore``
    of the full point into a raw image, compared byte for byte with the input.
restic (``--restic``)
    ``restic backup`` of the same data written as one file, into a fresh restic repository on
    the same file system, timed from outside, when ``restic`` is on ``PATH``.

The data is held in memory so the figures measure the repository, not the source disk.
Figures go to stdout as one line each; MB is 10^6 bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from backupd.repository import Repository

MiB = 1 << 20


def mixed_data(size: int, source: Path) -> bytes:
    """The first ``size`` bytes of the regular files under ``source``, in sorted walk order.

    :raises SystemExit: ``source`` holds less than ``size`` bytes.
    """
    parts: list[bytes] = []
    total = 0
    for folder, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as file:
                    chunk = file.read(size - total)
            except OSError:
                continue
            parts.append(chunk)
            total += len(chunk)
            if total >= size:
                return b"".join(parts)
    raise SystemExit(f"{source} holds only {total} bytes of files; ask for less with --size-mib")


def write_point(repo: Repository, data: bytes, threads: int, vm: str) -> tuple[float, int]:
    """One restore point of one disk holding ``data``; returns (seconds, stored bytes)."""
    block_size = repo.block_size
    blocks = -(-len(data) // block_size)
    started = time.perf_counter()
    with repo.new_point(vm=vm, vm_id=vm, job="bench", session="bench", mode="full") as writer:
        disk = writer.add_disk(key=2000, label="Hard disk 1", capacity_bytes=len(data), change_id=None)
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(lambda i: disk.put_block(i, data[i * block_size : (i + 1) * block_size]), range(blocks)):
                pass
        info = writer.commit()
    return time.perf_counter() - started, info.stored_bytes


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:7.0f} MB/s ({nbytes / 1e6:.0f} MB in {seconds:.2f} s)"


def run_restic(data: bytes, workdir: Path) -> float | None:
    """Seconds ``restic backup`` takes for ``data`` as one file, or None without restic."""
    restic = shutil.which("restic")
    if restic is None:
        print("restic: not on PATH (Debian package 'restic'); skipped")
        return None
    source = workdir / "disk.img"
    source.write_bytes(data)
    env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": str(workdir / "restic-repo")}
    subprocess.run([restic, "init", "--quiet"], env=env, check=True)
    started = time.perf_counter()
    subprocess.run([restic, "backup", "--quiet", str(source)], env=env, check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512, help="data to back up, MiB (default 512)")
    parser.add_argument("--threads", type=int, default=2, help="put_block worker threads (default 2)")
    parser.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    parser.add_argument("--source", type=Path, default=Path("/usr/share"), help="where the data comes from")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--restic", action="store_true", help="also time restic on the same data")
    args = parser.parse_args(argv)

    data = mixed_data(args.size_mib * MiB, args.source)
    workdir = Path(tempfile.mkdtemp(prefix="repo-bench-", dir=args.dir))
    try:
        repo = Repository.open(workdir / "repo", create=True, compression_level=args.level)
        print(f"data: {len(data) / 1e6:.0f} MB from {args.source}; {args.threads} threads; zstd level {args.level}; "
              f"{os.cpu_count()} CPUs")
        seconds, stored = write_point(repo, data, args.threads, "bench-a")
        print(f"full backup (put_block + commit): {rate(len(data), seconds)}; stored {stored / 1e6:.0f} MB "
              f"({stored / len(data):.2f} of logical)")
        full_seconds = seconds
        seconds, stored = write_point(repo, data, args.threads, "bench-b")
        print(f"identical second point (dedup):   {rate(len(data), seconds)}; stored {stored} bytes")
        started = time.perf_counter()
        result = repo.verify()
        print(f"verify (all points):              {rate(len(data), time.perf_counter() - started)}; ok={result.ok}")
        started = time.perf_counter()
        [image] = repo.restore(repo.points(vm="bench-a")[0].id, workdir / "restored")
        print(f"restore:                          {rate(len(data), time.perf_counter() - started)}")
        if image.read_bytes() != data:
            print("restore: MISMATCH")
            return 1
        image.unlink()
        if args.restic:
            restic_seconds = run_restic(data, workdir)
            if restic_seconds is not None:
                print(f"restic backup:                    {rate(len(data), restic_seconds)}; "
                      f"backupd repository is {restic_seconds / full_seconds:.2f}x restic")
    finally:
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
