"""``make demo``: the main job on real input (issue 2, section 8).

Builds a lab in a folder of its own and drives the public CLI the way an administrator would:

1. three VMs whose disks are real ext4 filesystem images, made by ``mkfs.ext4 -d`` from
   directory trees of this machine (the Python standard library, ``/usr/share/doc`` and
   ``/usr/share/locale``), plus a config for the simulated hypervisor, a local repository and an
   SQLite state DB, all inside the lab folder;
2. ``job start demo --wait``: the first session, every VM full;
3. ``sim write db-01 --file … --offset …``: the guest rewrites 4 MiB in the middle of a database
   file. The bytes land inside that file's data extent (found with ``debugfs``), so the
   filesystem stays consistent, as it would after a real guest write;
4. ``job start demo --wait``: the second session, incremental;
5. ``restore db-01 --to …``: the newest restore point as a raw image, then the checks: the image
   equals the VM's disk byte for byte (nothing writes to it after the second snapshot),
   ``e2fsck -fn`` finds it clean, and the database file inside it holds the rewritten bytes;
6. a summary: per VM mode, bytes read, bytes stored and duration; throughput per session; the
   repository's deduplication and compression ratio.

Disk images are built once and reused while their recipe is unchanged; the simulated
hypervisor's state, the repository, the state DB and the restore folder are reset on every run,
so every run starts with a full backup. Progress goes to stderr, the summary to stdout; the exit
status is 0 when every check passes and 1 otherwise.

Building and inspecting the disk images is :mod:`backupd.disk_images`, shared with
``bench/run.py``; this module is the demo's lab, its steps, checks and summary.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from backupd import render
from backupd.disk_images import (
    FS_BLOCK_SIZE,
    MiB,
    DiskImageError,
    GeneratedFile,
    ImageSpec,
    build_ext4_image,
    dump_file,
    e2fsck_clean,
    file_extents,
    files_differ_at,
    find_tool,
    live_disk,
    toml_string,
)

#: the job the demo config defines
JOB = "demo"

#: the VM whose database file the guest rewrites between the two sessions
CHANGED_VM = "db-01"

#: the database file inside CHANGED_VM, its size, and the part of it the guest rewrites
DB_FILE = "srv/db/table.dat"
DB_FILE_SIZE = 24 * MiB
DB_PATCH_SIZE = 4 * MiB


class DemoError(Exception):
    """A step of the demo could not be carried out; the message says which and why."""


def progress(message: str) -> None:
    """Print one progress line on stderr."""
    print(f"demo: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the lab


def lab_images() -> dict[str, ImageSpec]:
    """The VMs of the demo lab and the recipe of each one's disk.

    ``web-01`` and ``web-02`` are two servers deployed from the same template (the Python
    standard library), so most of their blocks deduplicate across VMs; ``db-01`` carries
    documentation and translations plus a database file the guest rewrites between sessions.
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    web = ((stdlib, "usr/lib/python3"),)
    return {
        "web-01": ImageSpec(320 * MiB, "web-01", web, cap_bytes=160 * MiB),
        "web-02": ImageSpec(320 * MiB, "web-02", web, cap_bytes=160 * MiB),
        CHANGED_VM: ImageSpec(
            384 * MiB,
            CHANGED_VM,
            (("/usr/share/doc", "usr/share/doc"), ("/usr/share/locale", "usr/share/locale")),
            cap_bytes=200 * MiB,
            generated=(GeneratedFile(DB_FILE, DB_FILE_SIZE, seed=1),),
        ),
    }


def write_config(lab: Path, vms: Sequence[str]) -> Path:
    """Write ``LAB/backupd.toml``: the simulated provider with one ext4 image per VM, a local
    repository, an SQLite state DB and the job ``demo`` over ``vms``; paths relative to the lab.
    """
    lines = [
        "# Written by `python -m backupd.demo`; rewritten on every run.",
        "[state]",
        'url = "sqlite:///state.db"',
        "",
        "[providers.lab]",
        'type = "simulated"',
        'state_dir = "sim"',
    ]
    for vm in vms:
        lines += ["", "[[providers.lab.vms]]", f"name = {toml_string(vm)}",
                  f"disks = [{toml_string(f'images/{vm}.img')}]"]
    lines += [
        "",
        "[repositories.local]",
        'path = "repo"',
        "",
        f"[jobs.{JOB}]",
        'provider = "lab"',
        'repository = "local"',
        f"vms = [{', '.join(toml_string(vm) for vm in vms)}]",
        "max_parallel_vms = 2",
    ]
    config = lab / "backupd.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def reset_lab(lab: Path) -> None:
    """Remove what a previous run left: simulated hypervisor state, repository, state DB,
    restored images and scratch files. The disk images are kept."""
    for folder in ("sim", "repo", "restore", "work"):
        shutil.rmtree(lab / folder, ignore_errors=True)
    for db in lab.glob("state.db*"):
        db.unlink()


class CliError(DemoError):
    """A ``backupd`` command ended with an unexpected exit code or printed no JSON."""


class Cli:
    """The public CLI, run as a script would: ``python -m backupd -c CONFIG … --json``."""

    def __init__(self, config: Path) -> None:
        self.config = config

    def json(self, *args: str, ok: Sequence[int] = (0,)) -> Any:
        """Run ``backupd -c CONFIG ARGS --json`` and return the JSON document it printed.

        :param ok: exit codes that count as success
        :raises CliError: another exit code, or stdout that is not one JSON document
        """
        cmd = [sys.executable, "-m", "backupd", "-c", str(self.config), *args, "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        shown = " ".join(["backupd", *args, "--json"])
        if done.returncode not in ok:
            raise CliError(f"`{shown}` exited {done.returncode}:\n{done.stderr.strip()}")
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError as exc:
            raise CliError(f"`{shown}` printed no JSON document: {exc}\n{done.stdout[:500]}") from exc


# --------------------------------------------------------------------------- the guest write


@dataclass(frozen=True)
class DbPatch:
    """New bytes the guest writes into its database file."""

    disk_offset: int  #: byte offset in the disk image
    file_offset: int  #: byte offset in the database file
    data: bytes


def plan_db_patch(image: Path, seed: int) -> DbPatch:
    """Choose where ``DB_PATCH_SIZE`` new bytes go: inside one data extent of the database
    file, starting on a 1 MiB boundary of the disk (so exactly that many CBT blocks change).

    :raises DemoError: no extent of the file is large enough
    """
    for extent in sorted(file_extents(image, DB_FILE), key=lambda e: -e.length):
        start = extent.physical * FS_BLOCK_SIZE
        end = start + extent.length * FS_BLOCK_SIZE
        disk_offset = -(-(start + MiB) // MiB) * MiB  # a whole MiB into the extent, aligned
        if disk_offset + DB_PATCH_SIZE <= end:
            file_offset = extent.logical * FS_BLOCK_SIZE + (disk_offset - start)
            return DbPatch(disk_offset, file_offset, random.Random(seed).randbytes(DB_PATCH_SIZE))
    raise DemoError(f"/{DB_FILE} in {image} has no extent of {render.size(DB_PATCH_SIZE)}")


# --------------------------------------------------------------------------- checks and summary


@dataclass
class Checks:
    """Named pass/fail results, printed as they come; any failure fails the demo."""

    failed: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record and print one check; returns ``ok``."""
        progress(f"check {'ok  ' if ok else 'FAIL'} {name}{f': {detail}' if detail else ''}")
        if not ok:
            self.failed.append(name)
        return ok


def check_session(checks: Checks, session: dict[str, Any], mode: str) -> None:
    """The session succeeded and transferred every VM in ``mode`` (full or incremental)."""
    ok = session["result"] == "success"
    checks.check(f"session {session['id']} ended success", ok,
                 "" if ok else f"result {session['result']}: {session['message']}")
    modes = {vm["name"]: vm["mode"] for vm in session["vms"]}
    checks.check(f"session {session['id']} transferred every VM {mode}",
                 all(m == mode for m in modes.values()), str(modes))


def summary(sessions: Sequence[dict[str, Any]], points: Sequence[dict[str, Any]]) -> str:
    """The table the demo prints.

    One row per VM per session (mode, bytes read, bytes the restore point added to the
    repository, duration), then per session and in total the logical throughput (disk capacity
    covered per second of session) and the read rate, then the repository's reduction: logical
    bytes of every restore point against the bytes stored, and bytes read against bytes stored.

    :param sessions: ``session show --json`` documents
    :param points: ``restore-point list --json``
    """
    by_id = {p["id"]: p for p in points}
    rows = [("session", "vm", "mode", "read", "stored", "duration")]
    for session in sessions:
        for vm in session["vms"]:
            stored = by_id[vm["restore_point"]]["stored_bytes"] if vm["restore_point"] else 0
            rows.append((str(session["id"]), vm["name"], vm["mode"] or "-",
                         render.size(vm["bytes_read"]), render.size(stored),
                         f"{vm['duration_seconds']:.2f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i >= 3 else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    totals = [0, 0, 0.0]
    for session in sessions:
        logical = sum(p["logical_bytes"] for p in points if p["session"] == session["id"])
        read = sum(vm["bytes_read"] for vm in session["vms"])
        seconds = session["duration_seconds"]
        totals = [totals[0] + logical, totals[1] + read, totals[2] + seconds]
        lines.append(f"session {session['id']}: {render.size(logical)} of disks, "
                     f"{render.size(read)} read, in {seconds:.2f} s")
    logical, read, seconds = totals
    lines.append(f"throughput: {render.size(round(logical / seconds))}/s logical, "
                 f"{render.size(round(read / seconds))}/s read ({render.size(logical)} of disks, "
                 f"{render.size(read)} read in {seconds:.2f} s of sessions)")
    stored = sum(p["stored_bytes"] for p in points)
    lines.append(
        f"reduction: {len(points)} restore points hold {render.size(logical)} of disks in "
        f"{render.size(stored)} stored = {logical / max(stored, 1):.1f}x (zero blocks, "
        f"deduplication and compression); of the data read {read / max(stored, 1):.1f}x "
        f"(deduplication and compression)"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the run


def run_demo(lab: Path) -> int:
    """Build the lab under ``lab``, run both sessions, restore, check and print the summary.

    :returns: exit status: 0 when every check passed, 1 otherwise
    :raises DemoError: a step could not be carried out (CLI failure, no room for the guest write)
    :raises DiskImageError: a disk image could not be built or read (e.g. a missing tool)
    """
    for tool in ("mkfs.ext4", "e2fsck", "debugfs"):
        find_tool(tool, "e2fsprogs")
    lab = lab.resolve()
    images = lab_images()
    for vm, spec in images.items():
        image = lab / "images" / f"{vm}.img"
        if build_ext4_image(image, spec):
            progress(f"built {image.relative_to(lab)}: ext4, {render.size(spec.size_bytes)}")
        else:
            progress(f"reusing {image.relative_to(lab)}")
    reset_lab(lab)
    config = write_config(lab, list(images))
    cli = Cli(config)
    checks = Checks()

    progress(f"session 1: backupd -c {config} job start {JOB} --wait (full)")
    first = cli.json("job", "start", JOB, "--wait", ok=(0, 1, 2))
    check_session(checks, first, "full")

    patch = plan_db_patch(lab / "images" / f"{CHANGED_VM}.img", seed=2)
    patch_file = lab / "work" / "db-patch.bin"
    patch_file.parent.mkdir(parents=True, exist_ok=True)
    patch_file.write_bytes(patch.data)
    progress(f"guest write: {render.size(len(patch.data))} into /{DB_FILE} of {CHANGED_VM} "
             f"(disk offset {patch.disk_offset})")
    cli.json("sim", "write", CHANGED_VM, "--file", str(patch_file),
             "--offset", str(patch.disk_offset))

    progress(f"session 2: job start {JOB} --wait (incremental)")
    second = cli.json("job", "start", JOB, "--wait", ok=(0, 1, 2))
    check_session(checks, second, "incremental")

    restore_dir = lab / "restore"
    progress(f"restore {CHANGED_VM} --to {restore_dir}")
    restored = cli.json("restore", CHANGED_VM, "--to", str(restore_dir))
    image = Path(restored["images"][0])
    live = live_disk(config, "lab", CHANGED_VM)
    differ = files_differ_at(image, live)
    checks.check(f"restored image equals {CHANGED_VM}'s disk at snapshot time", differ is None,
                 "byte-identical" if differ is None else f"first difference at byte {differ}")
    clean, fsck_output = e2fsck_clean(image)
    checks.check("e2fsck -fn finds the restored filesystem clean", clean, fsck_output)
    db_out = lab / "work" / "table.dat"
    dump_file(image, DB_FILE, db_out)
    expected = bytearray(GeneratedFile(DB_FILE, DB_FILE_SIZE, seed=1).content())
    expected[patch.file_offset:patch.file_offset + len(patch.data)] = patch.data
    checks.check(f"/{DB_FILE} in the restored image holds the guest's new bytes",
                 db_out.read_bytes() == expected)
    verify = cli.json("restore-point", "verify", "--all", ok=(0, 2))
    checks.check("restore-point verify --all", verify["ok"],
                 f"{verify.get('checked_points')} restore points re-hashed")

    points = cli.json("restore-point", "list")
    print(summary([first, second], points))
    if checks.failed:
        progress(f"{len(checks.failed)} check(s) failed: {'; '.join(checks.failed)}")
        return 1
    progress("every check passed")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m backupd.demo [--lab DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m backupd.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", type=Path, default=Path("demo-lab"),
                        help="folder for the lab (images are kept and reused; default: demo-lab)")
    args = parser.parse_args(argv)
    try:
        return run_demo(args.lab)
    except (DemoError, DiskImageError) as exc:
        progress(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
