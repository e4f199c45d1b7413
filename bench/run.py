"""``make bench``: backupd's speed and memory, side by side with restic (issue 2, section 9).

Run as ``.venv/bin/python bench/run.py --lab bench-lab``. Every backupd figure comes from the
public CLI in a subprocess (``python -m backupd -c LAB/backupd.toml …``), timed from outside;
restic (Debian package ``restic``) backs up the very same disk file on the same machine in the
same run. The figures:

full backup
    A 2 GiB ext4 image built by ``mkfs.ext4 -d`` from 700 MiB of files: ``/usr/share``,
    topped up from ``/usr/lib`` when ``/usr/share`` is smaller (about 900 MiB in use once
    ext4's own metadata and block rounding are counted). Logical bytes (the whole disk) / wall
    time of the whole ``job start --wait`` process, against ``restic backup`` of the VM's live
    disk file into a fresh restic repository. Target: at least 1.5x restic.
incremental
    ``sim write --blocks 20`` changes 20 random 1 MiB blocks, then a second ``job start
    --wait``. The VM task's recorded duration (snapshot creation to commit and snapshot
    removal, ``duration_seconds`` of the VM in ``session show``; the whole session's is shown
    too) and the process wall time, against restic's second backup of the changed disk file.
    Targets: at least 15x and 3x faster.
CLI start-up
    Median wall time of ``backupd --help`` (the console script) over several runs. Target:
    under 300 ms.
peak memory
    Peak RSS of the ``job start --wait`` process (``ru_maxrss`` from ``wait4``) during the full
    backups of the 2 GiB disk and of a 1 GiB disk. Target: at most 300 MiB, flat in disk size.
immediate stop
    Four VMs on a throttled provider, ``max_parallel_vms = 4``: once all four are ``running``
    with bytes moving, ``job stop --immediate --wait``; the time from the request until the
    session is ``stopped`` and ``vm list`` shows no snapshot, and the session's own record
    (stop request to end).

The 2 GiB figures come from :data:`ROUNDS` rounds (full into a fresh repository, 20 blocks
written, incremental; backupd then restic each time) and the stop from :data:`STOP_TRIALS`
trials; the table shows medians, ``results.json`` every value. Disk images are built once and
reused; the simulated hypervisor's state, the repositories and the state DB are reset on every
run. The table goes to stdout, the numbers to ``LAB/results.json``, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from backupd import render
from backupd.disk_images import (
    MiB,
    DiskImageError,
    ImageSpec,
    build_ext4_image,
    find_tool,
    live_disk,
    toml_string,
)

GiB = 1 << 30

#: the VMs and their disk recipes; the stop VMs all import the same small image
BIG_VM = "share-2g"
SMALL_VM = "share-1g"
STOP_VMS = ("stop-1", "stop-2", "stop-3", "stop-4")
SHARE = (("/usr/share", "usr/share"), ("/usr/lib", "usr/lib"))
IMAGES = {
    "share-2g": ImageSpec(2 * GiB, "share-2g", SHARE, cap_bytes=700 * MiB),
    "share-1g": ImageSpec(1 * GiB, "share-1g", SHARE, cap_bytes=600 * MiB),
    "doc-256m": ImageSpec(256 * MiB, "doc-256m", (("/usr/share/doc", "usr/share/doc"),),
                          cap_bytes=160 * MiB),
}

#: per-disk read throttle of the stop VMs, MiB/s: a 256 MiB disk takes ~30 s, so all four
#: are surely in flight when the stop comes
STOP_THROTTLE_MIB_S = 8

#: how many ``backupd --help`` runs the start-up median is taken over
HELP_RUNS = 7

#: measuring rounds of the 2 GiB VM (full + incremental, backupd and restic) and immediate
#: stop trials; figures are medians, so one noisy run on a shared machine does not decide
ROUNDS = 3
STOP_TRIALS = 3

TARGETS = {
    "full_throughput_ratio": 1.5,
    "incremental_session_ratio": 15.0,
    "incremental_process_ratio": 3.0,
    "cli_startup_ms": 300.0,
    "peak_rss_mib": 300.0,
}


def progress(message: str) -> None:
    """Print one progress line on stderr."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A step of the benchmark could not be carried out; the message says which and why."""


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Measured:
    """One finished subprocess: exit code, output, wall time and peak memory."""

    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    wall_seconds: float
    #: peak resident set size of the process, bytes (``ru_maxrss`` as ``wait4`` reports it)
    peak_rss_bytes: int

    def json(self) -> Any:
        """The JSON document on stdout.

        :raises BenchError: stdout is not one JSON document
        """
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError as exc:
            raise BenchError(f"`{' '.join(self.argv)}` printed no JSON: {self.stdout[:300]!r}"
                             f"\n{self.stderr[-1500:]}") from exc


def measure(argv: Sequence[str], env: dict[str, str] | None = None) -> Measured:
    """Run ``argv`` to its end; time it from spawn to exit and take its peak RSS.

    Output goes to temporary files (no pipe can fill up and stall the child). ``os.wait4``
    reaps the child itself, so its ``ru_maxrss`` is this one process's peak, not the
    maximum over every child this benchmark ever ran (``RUSAGE_CHILDREN``).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(tuple(argv), proc.returncode, out.read().decode(), err.read().decode(),
                        wall, usage.ru_maxrss * 1024)


class Backupd:
    """The public CLI of the lab's config: ``python -m backupd -c CONFIG …``."""

    def __init__(self, config: Path) -> None:
        self.argv = [sys.executable, "-m", "backupd", "-c", str(config)]

    def run(self, *args: str, ok: Sequence[int] = (0,)) -> Measured:
        """Run one command, measured.

        :param ok: exit codes that count as success
        :raises BenchError: any other exit code
        """
        done = measure([*self.argv, *args])
        if done.exit_code not in ok:
            raise BenchError(f"`backupd {' '.join(args)}` exited {done.exit_code} after "
                             f"{done.wall_seconds:.2f} s:\n{done.stderr[-3000:]}")
        return done

    def json(self, *args: str, ok: Sequence[int] = (0,)) -> Any:
        """Run ``backupd ARGS --json`` and return its JSON document."""
        return self.run(*args, "--json", ok=ok).json()


class Restic:
    """``restic`` on one repository, its cache in a given folder (both inside the lab)."""

    def __init__(self, executable: str, repo: Path, cache: Path) -> None:
        self.argv = [executable, "--repo", str(repo), "--cache-dir", str(cache)]
        self.env = {**os.environ, "RESTIC_PASSWORD": "bench"}

    def run(self, *args: str) -> Measured:
        """Run one restic command, measured.

        :raises BenchError: a non-zero exit code
        """
        done = measure([*self.argv, *args], env=self.env)
        if done.exit_code != 0:
            raise BenchError(f"`restic {' '.join(args)}` exited {done.exit_code}:\n"
                             f"{done.stderr[-2000:]}")
        return done


def used_bytes(image: Path) -> int:
    """Bytes in use in an ext4 image: (block count - free blocks) x block size (``dumpe2fs -h``)."""
    dumpe2fs = find_tool("dumpe2fs", "e2fsprogs")
    done = subprocess.run([dumpe2fs, "-h", str(image)], capture_output=True, text=True)
    fields = dict(line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
    try:
        count, free, size = (int(fields[k]) for k in ("Block count", "Free blocks", "Block size"))
    except KeyError as exc:
        raise BenchError(f"dumpe2fs -h {image}: no {exc} in its output") from exc
    return (count - free) * size


def parse_time(text: str) -> datetime:
    """An ISO 8601 timestamp from the CLI's JSON."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --------------------------------------------------------------------------- the lab


def full_job(round_number: int) -> str:
    """The job of one measuring round: the 2 GiB VM into a repository of its own."""
    return f"full-2g-{round_number}"


def write_config(lab: Path) -> Path:
    """Write ``LAB/backupd.toml``: an unthrottled provider with the two big VMs, a throttled
    one with the four stop VMs; one job and repository per measuring round of the 2 GiB VM
    (so each round's first session is a cold full backup), ``full-1g`` and ``stop-4``."""
    def vm(provider: str, name: str, image: str) -> list[str]:
        return ["", f"[[providers.{provider}.vms]]", f"name = {toml_string(name)}",
                f"disks = [{toml_string(f'images/{image}.img')}]"]

    def job(name: str, provider: str, vms: Sequence[str]) -> list[str]:
        return ["", f"[repositories.{name}]", f"path = {toml_string(f'repo-{name}')}",
                "", f"[jobs.{name}]", f"provider = {toml_string(provider)}",
                f"repository = {toml_string(name)}",
                f"vms = [{', '.join(toml_string(v) for v in vms)}]",
                f"max_parallel_vms = {len(vms)}"]

    lines = ["# Written by bench/run.py; rewritten on every run.",
             "[state]", 'url = "sqlite:///state.db"',
             "", "[providers.fast]", 'type = "simulated"', 'state_dir = "sim-fast"']
    lines += vm("fast", BIG_VM, BIG_VM) + vm("fast", SMALL_VM, SMALL_VM)
    lines += ["", "[providers.slow]", 'type = "simulated"', 'state_dir = "sim-slow"',
              f"read_mib_per_s = {STOP_THROTTLE_MIB_S}"]
    for name in STOP_VMS:
        lines += vm("slow", name, "doc-256m")
    for number in range(1, ROUNDS + 1):
        lines += job(full_job(number), "fast", [BIG_VM])
    lines += job("full-1g", "fast", [SMALL_VM]) + job("stop-4", "slow", STOP_VMS)
    config = lab / "backupd.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def reset_lab(lab: Path) -> None:
    """Remove what a previous run left, except the disk images."""
    for path in lab.iterdir():
        if path.name in {"sim-fast", "sim-slow"} or path.name.startswith(("repo-", "restic-")):
            shutil.rmtree(path)
        elif path.name.startswith("state.db") or path.name == "results.json":
            path.unlink()


# --------------------------------------------------------------------------- the figures


def bench_startup() -> dict[str, Any]:
    """``backupd --help`` (the console script) ``HELP_RUNS`` times: median, min and max in ms."""
    script = Path(sys.executable).with_name("backupd")
    argv = [str(script), "--help"]
    runs = [measure(argv) for _ in range(HELP_RUNS)]
    if any(run.exit_code != 0 for run in runs):
        raise BenchError(f"`{script} --help` failed:\n{runs[0].stderr[-2000:]}")
    ms = sorted(run.wall_seconds * 1000 for run in runs)
    return {"command": f"{script} --help", "runs": HELP_RUNS, "median_ms": statistics.median(ms),
            "min_ms": ms[0], "max_ms": ms[-1]}


def bench_session(cli: Backupd, job: str, logical_bytes: int, mode: str) -> dict[str, Any]:
    """One foreground session ``job start JOB --wait --json`` of a one-VM job, measured whole.

    :param logical_bytes: the VM's disk capacity
    :param mode: the transfer mode the session should use; another one is reported on stderr
        (the figure is then not what it claims to be)
    :raises BenchError: the session did not end ``success``
    """
    done = cli.run("job", "start", job, "--wait", "--json")
    session = done.json()
    if session["result"] != "success":
        raise BenchError(f"session {session['id']} of {job} ended {session['result']}: "
                         f"{session['message']}")
    vm = session["vms"][0]
    if vm["mode"] != mode:
        progress(f"WARNING: session {session['id']} of {job} transferred {vm['mode']}, "
                 f"not {mode}")
    return {
        "session": session["id"],
        "mode": vm["mode"],
        "wall_seconds": done.wall_seconds,
        "session_seconds": session["duration_seconds"],
        "vm_seconds": vm["duration_seconds"],
        "logical_bytes": logical_bytes,
        "bytes_read": vm["bytes_read"],
        "bytes_stored": vm["bytes_stored"],
        "throughput_bytes_per_s": logical_bytes / done.wall_seconds,
        "peak_rss_bytes": done.peak_rss_bytes,
    }


def bench_restic_backup(restic: Restic, disk: Path) -> dict[str, Any]:
    """``restic backup DISK``, measured whole."""
    done = restic.run("backup", "--quiet", str(disk))
    size = disk.stat().st_size
    return {"wall_seconds": done.wall_seconds, "logical_bytes": size,
            "throughput_bytes_per_s": size / done.wall_seconds,
            "peak_rss_bytes": done.peak_rss_bytes}


def bench_round(cli: Backupd, restic_exe: str | None, lab: Path, number: int,
                disk: Path) -> dict[str, Any]:
    """One measuring round on the 2 GiB VM, backupd then restic each time: a full backup into
    a fresh repository, ``sim write --blocks 20``, an incremental backup.

    :param disk: the VM's live disk file, which restic backs up
    """
    size = IMAGES[BIG_VM].size_bytes
    job = full_job(number)
    progress(f"round {number}: job start {job} --wait (full)")
    full = bench_session(cli, job, size, "full")
    restic_full = restic_incr = None
    if restic_exe:
        restic = Restic(restic_exe, lab / f"restic-repo-{number}", lab / "restic-cache")
        restic.run("init")
        progress(f"round {number}: restic backup {disk}")
        restic_full = bench_restic_backup(restic, disk)
    cli.json("sim", "write", BIG_VM, "--blocks", "20", "--seed", str(number))
    progress(f"round {number}: sim write {BIG_VM} --blocks 20; job start {job} --wait "
             f"(incremental)")
    incr = bench_session(cli, job, size, "incremental")
    if restic_exe:
        progress(f"round {number}: restic backup (changed disk)")
        restic_incr = bench_restic_backup(restic, disk)
    return {"backupd": {"full": full, "incremental": incr},
            "restic": {"full": restic_full, "incremental": restic_incr}}


def bench_immediate_stop(cli: Backupd, job: str = "stop-4", provider: str = "slow") -> dict[str, Any]:
    """Start ``job`` (detached, or handed to the daemon when one runs), wait until all its
    VMs are ``running`` with bytes moving, then ``job stop JOB --immediate --wait``.

    :param provider: the job's provider, whose ``vm list`` must show no snapshot afterwards
    :returns: seconds from the stop request until the session is ``stopped`` with no snapshot
        left on any VM: the stop command's wall time when ``session show`` and ``vm list``
        run right after it find that (``clean_when_stop_returned``), else the time they first
        do; the session's own record (stop requested_at → ended_at); the VM statuses; the
        bytes read when the stop came
    :raises BenchError: the VMs never were all in flight, or the stop left something behind
    """
    session_id = str(cli.json("job", "start", job)["session"])
    seen: dict[str, int] = {}
    # a VM counts as moving once two polls saw its bytes grow, not necessarily the last two:
    # on a loaded machine one poll (a CLI process) can take seconds
    moving: set[str] = set()
    deadline = time.monotonic() + 120
    while True:
        show = cli.json("session", "show", session_id)
        now = {vm["name"]: vm["bytes_read"] for vm in show["vms"]}
        moving |= {name for name, read in now.items() if name in seen and read > seen[name]}
        if moving == set(now) and all(vm["status"] == "running" for vm in show["vms"]):
            break
        if show["state"] == "stopped" or time.monotonic() > deadline:
            raise BenchError(f"session {session_id} never had all its VMs in flight: {show}")
        seen = now
        time.sleep(0.2)
    progress(f"{job} session {session_id}: {len(now)} VMs in flight "
             f"({', '.join(render.size(b) for b in now.values())} read); "
             f"job stop {job} --immediate --wait")
    start = time.perf_counter()
    stop = cli.json("job", "stop", job, "--immediate", "--wait")
    returned = time.perf_counter() - start
    clean = None
    while True:
        show = cli.json("session", "show", session_id)
        snapshots = [s for vm in cli.json("vm", "list", "--provider", provider)
                     for s in vm["snapshots"]]
        if show["state"] == "stopped" and not snapshots:
            break
        # not clean when the stop command returned: the figure becomes the time a poll
        # first sees it clean
        clean = time.perf_counter() - start
        if clean > 120:
            raise BenchError(f"2 minutes after the immediate stop: session state "
                             f"{show['state']}, snapshots left {snapshots}")
        time.sleep(0.05)
    if clean is not None:
        clean = time.perf_counter() - start
    recorded = parse_time(show["ended_at"]) - parse_time(show["stop"]["requested_at"])
    return {
        "session": session_id,
        "stop_command": stop,
        "stop_command_seconds": returned,
        "clean_when_stop_returned": clean is None,
        "stopped_and_clean_seconds": returned if clean is None else clean,
        "recorded_seconds": recorded.total_seconds(),
        "bytes_in_flight": now,
        "result": show["result"],
        "statuses": {vm["name"]: vm["status"] for vm in show["vms"]},
        "snapshots_removed": all(vm["snapshot"] is None or vm["snapshot"]["removed"]
                                 for vm in show["vms"]),
        "restore_points": [vm["restore_point"] for vm in show["vms"] if vm["restore_point"]],
    }


# --------------------------------------------------------------------------- summary


def median_of(rounds: Sequence[dict[str, Any]], tool: str, kind: str, key: str) -> float | None:
    """Median over the rounds of ``round[tool][kind][key]``; None when the tool did not run."""
    values = [r[tool][kind][key] for r in rounds if r[tool][kind] is not None]
    return statistics.median(values) if values else None


def summarise(rounds: Sequence[dict[str, Any]], stops: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The headline figures: medians over the rounds and stop trials, ratios of medians."""
    def med(tool: str, kind: str, key: str) -> float | None:
        return median_of(rounds, tool, kind, key)

    def over(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    full = med("backupd", "full", "wall_seconds")
    incr_vm = med("backupd", "incremental", "vm_seconds")
    incr_session = med("backupd", "incremental", "session_seconds")
    incr_wall = med("backupd", "incremental", "wall_seconds")
    restic_full = med("restic", "full", "wall_seconds")
    restic_incr = med("restic", "incremental", "wall_seconds")
    return {
        "full_wall_seconds": {"backupd": full, "restic": restic_full},
        "full_throughput_bytes_per_s": {
            "backupd": IMAGES[BIG_VM].size_bytes / full,
            "restic": None if restic_full is None else IMAGES[BIG_VM].size_bytes / restic_full},
        "incremental_vm_seconds": incr_vm,
        "incremental_session_seconds": incr_session,
        "incremental_wall_seconds": {"backupd": incr_wall, "restic": restic_incr},
        "ratios": {"full_throughput": over(restic_full, full),
                   "incremental_vm_task": over(restic_incr, incr_vm),
                   "incremental_session": over(restic_incr, incr_session),
                   "incremental_process": over(restic_incr, incr_wall)},
        "peak_rss_bytes": {
            "backupd_2g_max": max(r["backupd"]["full"]["peak_rss_bytes"] for r in rounds),
            "restic_2g_max": max((r["restic"]["full"]["peak_rss_bytes"] for r in rounds
                                  if r["restic"]["full"]), default=None)},
        "immediate_stop_seconds": statistics.median(s["stopped_and_clean_seconds"] for s in stops),
        "immediate_stop_recorded_seconds": statistics.median(s["recorded_seconds"] for s in stops),
    }


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    """``'met'`` / ``'MISSED'`` / ``'-'`` (no value to compare)."""
    if value is None:
        return "-"
    return "met" if (value >= target if higher_is_better else value <= target) else "MISSED"


def report(results: dict[str, Any]) -> str:
    """The table ``make bench`` prints."""
    summary, rounds, stops = results["summary"], results["rounds"], results["immediate_stop"]
    ratios, startup, small = summary["ratios"], results["startup"], results["full_1g"]
    rss = summary["peak_rss_bytes"]

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{render.size(round(value))}/s"

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}x"

    def each(tool: str, kind: str, key: str) -> str:
        values = [r[tool][kind][key] for r in rounds if r[tool][kind] is not None]
        return " / ".join(f"{v:.2f}" for v in values) or "-"

    rows = [
        ("figure (median of rounds)", "backupd", "restic", "ratio", "target", ""),
        ("full backup, 2 GiB disk, whole process", rate(summary["full_throughput_bytes_per_s"]
                                                        ["backupd"]),
         rate(summary["full_throughput_bytes_per_s"]["restic"]), times(ratios["full_throughput"]),
         ">= 1.5x", verdict(ratios["full_throughput"], TARGETS["full_throughput_ratio"])),
        ("  wall time", secs(summary["full_wall_seconds"]["backupd"]),
         secs(summary["full_wall_seconds"]["restic"]), "", "", ""),
        ("incremental, 20 x 1 MiB changed: snapshot to commit", secs(summary["incremental_vm_seconds"]),
         secs(summary["incremental_wall_seconds"]["restic"]), times(ratios["incremental_vm_task"]),
         ">= 15x", verdict(ratios["incremental_vm_task"], TARGETS["incremental_session_ratio"])),
        ("  whole session as recorded", secs(summary["incremental_session_seconds"]),
         "", times(ratios["incremental_session"]), "", ""),
        ("incremental: whole process", secs(summary["incremental_wall_seconds"]["backupd"]),
         secs(summary["incremental_wall_seconds"]["restic"]),
         times(ratios["incremental_process"]), ">= 3x",
         verdict(ratios["incremental_process"], TARGETS["incremental_process_ratio"])),
        (f"CLI start-up (backupd --help), median of {startup['runs']}",
         f"{startup['median_ms']:.0f} ms", "", "", "< 300 ms",
         verdict(startup["median_ms"], TARGETS["cli_startup_ms"], False)),
        ("peak RSS, full backup, 2 GiB disk", render.size(rss["backupd_2g_max"]),
         render.size(rss["restic_2g_max"]), "",
         "<= 300 MiB", verdict(rss["backupd_2g_max"] / MiB, TARGETS["peak_rss_mib"], False)),
        ("peak RSS, full backup, 1 GiB disk", render.size(small["peak_rss_bytes"]), "", "",
         "flat", "met" if rss["backupd_2g_max"] <= 1.1 * small["peak_rss_bytes"] + 16 * MiB
         else "MISSED"),
        (f"immediate stop, 4 VMs in flight, median of {len(stops)}",
         secs(summary["immediate_stop_seconds"]), "", "", "figure", ""),
        ("  as the sessions recorded it (requested → ended)",
         secs(summary["immediate_stop_recorded_seconds"]), "", "", "", ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    image, first = results["image"], rounds[0]["backupd"]
    lines += [
        "",
        f"each round, seconds: backupd full {each('backupd', 'full', 'wall_seconds')}; "
        f"restic full {each('restic', 'full', 'wall_seconds')}; backupd incremental VM task "
        f"{each('backupd', 'incremental', 'vm_seconds')}, session "
        f"{each('backupd', 'incremental', 'session_seconds')}, process "
        f"{each('backupd', 'incremental', 'wall_seconds')}; restic incremental "
        f"{each('restic', 'incremental', 'wall_seconds')}",
        "immediate stop, each trial: "
        + "; ".join(f"{s['stopped_and_clean_seconds']:.2f} s (recorded "
                    f"{s['recorded_seconds']:.2f} s, {s['result']}, "
                    f"{sorted(set(s['statuses'].values()))}, snapshots removed "
                    f"{s['snapshots_removed']})" for s in stops),
        f"disk: {render.size(image['size_bytes'])} ext4 image, {render.size(image['used_bytes'])}"
        f" in use ({image['sources']}); page cache warm for both tools",
        f"round 1: backupd full read {render.size(first['full']['bytes_read'])}, stored "
        f"{render.size(first['full']['bytes_stored'])}; incremental read "
        f"{render.size(first['incremental']['bytes_read'])}, stored "
        f"{render.size(first['incremental']['bytes_stored'])}",
        f"machine: {results['machine']['cpus']} CPUs ({results['machine']['cpu']}), load average "
        f"{results['machine']['load_before']:.1f} before, {results['load_after']:.1f} after; "
        f"{results['machine']['restic'] or 'restic absent'}",
    ]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy it was (1-minute load average) when
    the bench started: other work on the machine slows both tools unevenly."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    restic = shutil.which("restic")
    version = None
    if restic:
        version = subprocess.run([restic, "version"], capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu": cpu, "load_before": os.getloadavg()[0],
            "kernel": platform.release(),
            "python": platform.python_version(), "restic": version}


# --------------------------------------------------------------------------- the run


def run_bench(lab: Path) -> dict[str, Any]:
    """Build the lab, measure every figure, and return them (the content of results.json).

    :raises BenchError: a step could not be carried out
    :raises DiskImageError: a disk image could not be built or read (e.g. a missing tool)
    """
    lab = lab.resolve()
    lab.mkdir(parents=True, exist_ok=True)
    host = machine()
    for name, spec in IMAGES.items():
        image = lab / "images" / f"{name}.img"
        if build_ext4_image(image, spec):
            progress(f"built {image.relative_to(lab)}: {render.size(spec.size_bytes)} ext4")
    reset_lab(lab)
    config = write_config(lab)
    cli = Backupd(config)
    restic_exe = shutil.which("restic")
    if restic_exe is None:
        progress("restic not found: `sudo apt-get install restic` to compare; restic columns "
                 "skipped")

    # a simulated VM's disk is imported (copied) from its image on first use: do it now, so
    # no timed session pays for what a real hypervisor never does
    progress("importing the VMs' disks: vm list")
    imported = cli.run("vm", "list", "--json")
    progress("backupd --help start-up")
    startup = bench_startup()
    disk = live_disk(config, "fast", BIG_VM)
    rounds = [bench_round(cli, restic_exe, lab, n, disk) for n in range(1, ROUNDS + 1)]
    progress("job start full-1g --wait (peak RSS of a 1 GiB disk)")
    small = bench_session(cli, "full-1g", IMAGES[SMALL_VM].size_bytes, "full")
    stops = []
    for trial in range(STOP_TRIALS):
        stops.append(bench_immediate_stop(cli))
    return {
        "machine": host,
        "image": {"size_bytes": IMAGES[BIG_VM].size_bytes,
                  "used_bytes": used_bytes(lab / "images" / f"{BIG_VM}.img"),
                  "sources": "700 MiB of files from /usr/share, topped up from /usr/lib"},
        "disk_import_seconds": imported.wall_seconds,
        "summary": summarise(rounds, stops),
        "startup": startup,
        "rounds": rounds,
        "full_1g": small,
        "immediate_stop": stops,
        "targets": TARGETS,
        "load_after": os.getloadavg()[0],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``bench/run.py [--lab DIR]``: print the table, write ``LAB/results.json``."""
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", type=Path, default=Path("bench-lab"),
                        help="folder for the lab (images are kept and reused; default: bench-lab)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        results = run_bench(args.lab)
    except (BenchError, DiskImageError) as exc:
        progress(f"error: {exc}")
        return 1
    (args.lab / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    progress(f"done in {time.perf_counter() - started:.0f} s; numbers in {args.lab / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
