"""``make bench``, second part: the daemon under a scheduled load, on SQLite and PostgreSQL.

Run as ``.venv/bin/python bench/daemon.py --lab bench-lab/daemon``. For each state DB, a lab of
its own: a simulated provider with ``--jobs`` x ``--vms`` (default 100 x 10) VMs of one empty
1 MiB disk each (nothing to read: every second of a session is engine overhead), one repository,
and that many jobs, all on the same ``cron`` schedule: the first whole minute at least
:data:`LEAD_SECONDS` ahead (UTC). ``backupd daemon`` runs as a subprocess; the figures:

trigger to first snapshot
    Per session, the scheduled time (the daemon's log line "started (scheduled for ...)") to
    the first "snapshot ... created" line of its session log. Median, p95, max.
per-VM overhead
    Per successful session, its recorded duration (``started_at`` to ``ended_at``: the claim
    by its process to its end) / its VMs. No VM reads a byte (checked), so no transfer time is
    subtracted: snapshot creation and removal, state DB writes, the manifest commit and garbage
    collection are all of it. Median and p95 over the sessions, under the load; and the median
    of :data:`ALONE_RUNS` sessions of a job ``alone`` of as many VMs, run in the foreground
    (``job start --wait``) before the daemon starts: the same work without contention.
    Target: at most 10 ms per VM.
CPU per VM under the load
    The wall time above includes waiting for the CPU that other sessions hold (8 sessions of
    4 VM threads on this machine's cores); these do not. The session processes' CPU time (user
    + system) per VM: the ``cutime`` + ``cstime`` (``/proc/PID/stat``) of the processes that
    reaped them, the daemon and its fork server, read when the load has ended. And the whole
    machine's CPU time per VM over the load, from the minute to the last session's end
    (``/proc/stat``, all but idle, iowait and steal): the daemon, the session processes, the
    state DB's server, and whatever else ran.
memory
    The daemon's ``VmRSS`` (``/proc/PID/status``) at rest, before the minute, and its
    ``VmHWM`` (peak) after the load; its fork server's ``VmHWM``; its session processes (the
    processes below it named ``backupd-session``, one per session), sampled every
    :data:`SAMPLE_SECONDS`: the largest ``VmHWM`` of one, and the largest sums of ``VmRSS`` and
    of ``Pss`` (``/proc/PID/smaps_rollup``) of those alive at one sample. Forked from one fork
    server, they share its pages: each one's RSS counts them whole, its PSS a share.
immediate stop
    A job of :data:`STOP_VMS` VMs (32 MiB disks filled by ``sim write --blocks 32``) on a
    provider throttled to :data:`STOP_THROTTLE_MIB_S` MiB/s per disk, ``max_parallel_vms`` =
    :data:`STOP_VMS`, handed to the daemon with ``job start``; once every VM is ``running``
    with bytes moving, ``job stop --immediate --wait``, timed from outside, plus the session's
    own record (stop requested to ended) and a check that ``vm list`` shows no snapshot (see
    ``bench_immediate_stop`` in bench/run.py). Median of :data:`STOP_TRIALS` trials.

PostgreSQL (127.0.0.1:5432, user postgres, trust) gets a database ``backupd_bench_<random>``,
dropped afterwards; when this build cannot open a state DB there, that half is skipped with
the reason. The daemon is always stopped: SIGTERM, SIGKILL after :data:`DAEMON_EXIT_SECONDS`.
The table goes to stdout, every number to ``LAB/results.json``, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Sequence

from run import Backupd, BenchError, bench_immediate_stop, progress, verdict

from backupd.disk_images import toml_string

#: VMs processed at once by a job of the load: a common proxy setting, and the example
#: config's order of magnitude; every session's 10 VMs take 3 waves
LOAD_PARALLEL_VMS = 4
#: the scheduled minute is at least this far ahead when the daemon starts, so it is up and
#: at rest (its RSS measured) before the minute
LEAD_SECONDS = 20
#: the stop job: its VMs, their disks (MiB, filled) and the per-disk read throttle (MiB/s):
#: each VM needs 64 s, so all are surely in flight when the stop comes, even on a machine
#: where one ``session show`` takes seconds; its repository's 64 KiB blocks make bytes_read
#: grow between two polls
STOP_VMS = 8
STOP_DISK_MIB = 32
STOP_THROTTLE_MIB_S = 0.5
STOP_TRIALS = 3
#: sessions of the job ``alone`` run before the load, for the overhead without contention
ALONE_RUNS = 5
#: seconds between two samples of the session processes' memory
SAMPLE_SECONDS = 0.25
#: the load must end within this many seconds of the minute
LOAD_TIMEOUT_SECONDS = 900
#: how long the daemon gets to exit after SIGTERM before SIGKILL
DAEMON_EXIT_SECONDS = 60
TARGET_OVERHEAD_MS = 10.0
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"


# --------------------------------------------------------------------------- the lab


def next_minute(now: datetime) -> datetime:
    """The first whole minute (UTC) at least :data:`LEAD_SECONDS` after ``now``."""
    return (now + timedelta(seconds=LEAD_SECONDS + 60)).replace(second=0, microsecond=0)


def write_config(lab: Path, state_url: str, jobs: int, vms: int, minute: datetime) -> Path:
    """``LAB/backupd.toml``: the load (``jobs`` jobs of ``vms`` empty VMs each, provider
    ``sim``, all on ``cron`` at ``minute``), the job ``alone`` (as many VMs, no schedule)
    and the stop job (provider ``slow``)."""
    def vm(provider: str, name: str, size: str) -> list[str]:
        return ["", f"[[providers.{provider}.vms]]", f"name = {toml_string(name)}",
                f"disks = [{toml_string(size)}]"]

    def job(name: str, provider: str, repository: str, names: Sequence[str], parallel: int) -> list[str]:
        return ["", f"[jobs.{name}]", f"provider = {toml_string(provider)}",
                f"repository = {toml_string(repository)}",
                f"vms = [{', '.join(toml_string(n) for n in names)}]",
                f"max_parallel_vms = {parallel}"]

    cron = f"{minute.minute} {minute.hour} * * *"
    lines = ["# Written by bench/daemon.py; rewritten on every run.",
             "[state]", f"url = {toml_string(state_url)}",
             "", "[providers.sim]", 'type = "simulated"', 'state_dir = "sim"']
    for j in range(jobs):
        for v in range(vms):
            lines += vm("sim", f"vm-{j:03d}-{v:02d}", "1 MiB")
    for v in range(vms):
        lines += vm("sim", f"alone-{v:02d}", "1 MiB")
    lines += ["", "[providers.slow]", 'type = "simulated"', 'state_dir = "sim-slow"',
              f"read_mib_per_s = {STOP_THROTTLE_MIB_S}"]
    for name in stop_vms():
        lines += vm("slow", name, f"{STOP_DISK_MIB} MiB")
    lines += ["", "[repositories.repo]", 'path = "repo"',
              "", "[repositories.repo-stop]", 'path = "repo-stop"', 'block_size = "64 KiB"']
    for j in range(jobs):
        lines += job(load_job(j), "sim", "repo", [f"vm-{j:03d}-{v:02d}" for v in range(vms)],
                     LOAD_PARALLEL_VMS)
        lines.append(f'schedule = {{ cron = "{cron}", timezone = "UTC" }}')
    lines += job("alone", "sim", "repo", [f"alone-{v:02d}" for v in range(vms)], LOAD_PARALLEL_VMS)
    lines += job("stop-8", "slow", "repo-stop", stop_vms(), STOP_VMS)
    config = lab / "backupd.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def load_job(number: int) -> str:
    return f"load-{number:03d}"


def stop_vms() -> list[str]:
    return [f"stop-{n}" for n in range(1, STOP_VMS + 1)]


def create_pg_database() -> str:
    """A fresh database ``backupd_bench_<random>`` on the local server; its name.

    :raises BenchError: psql failed (no server, no trust access)
    """
    name = f"backupd_bench_{secrets.token_hex(4)}"
    psql(f"CREATE DATABASE {name}")
    return name


def psql(command: str) -> None:
    """One SQL command as user postgres on 127.0.0.1:5432.

    :raises BenchError: psql failed
    """
    done = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-v", "ON_ERROR_STOP=1",
                           "-qc", command], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"psql -c {command!r}: {done.stderr.strip()}")


# --------------------------------------------------------------------------- processes


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of a process, KiB; empty when it has gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {key: int(value.split()[0]) for key, value in
            (line.split(":", 1) for line in text.splitlines()) if key in ("VmRSS", "VmHWM")}


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has spent since boot, seconds (``/proc/stat``: user, nice,
    system, irq, softirq; not idle, iowait or steal)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> tuple[str, list[str]] | None:
    """A process's name and the fields after it in ``/proc/PID/stat`` (``fields[0]`` its
    state, ``[1]`` its parent's pid, ...); None when it has gone. The name may hold spaces
    and parentheses: the fields follow the last ``)``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.find("(") + 1:text.rfind(")")], text[text.rfind(")") + 2:].split()


def reaped_cpu_seconds(pid: int) -> float:
    """``cutime`` + ``cstime`` of a process (``/proc/PID/stat``): the CPU time, user + system,
    of the children it has reaped, seconds; 0 when it has gone."""
    stat = proc_stat(pid)
    if stat is None:
        return 0.0
    fields = stat[1]
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def pss_kib(pid: int) -> int:
    """``Pss`` of a process (``/proc/PID/smaps_rollup``), KiB: its pages, each shared one
    divided by its sharers; 0 when it has gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:")), 0)


def descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid`` (children, theirs, ...), each with its name (``comm``),
    from ``/proc/*/stat``."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = proc_stat(int(entry.name))
        if stat is not None:
            parents[int(entry.name)] = (int(stat[1][1]), stat[0])
    found: dict[int, str] = {}
    frontier = {pid}
    while frontier:
        frontier = {child for child, (parent, _) in parents.items() if parent in frontier and child not in found}
        found.update((child, parents[child][1]) for child in frontier)
    return found


class Daemon:
    """``backupd daemon`` of a lab, its stderr in ``LAB/daemon.log``."""

    def __init__(self, cli: Backupd, lab: Path) -> None:
        self.log_path = lab / "daemon.log"
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen([*cli.argv, "daemon"], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 60
        while cli.json("daemon", "status").get("pid") != self.proc.pid:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the daemon did not come up:\n{self.log()[-2000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after :data:`DAEMON_EXIT_SECONDS`; its exit code (None: it
        had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(DAEMON_EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            progress(f"the daemon did not exit {DAEMON_EXIT_SECONDS} s after SIGTERM: SIGKILL")
            self.proc.kill()
            self.proc.wait()
            return None


class SessionMemory:
    """Peak memory of the daemon's session processes and of its fork server, from samples."""

    def __init__(self, daemon_pid: int) -> None:
        self.daemon_pid = daemon_pid
        self.peak_kib: dict[int, int] = {}
        self.max_sum_kib = 0
        self.max_sum_pss_kib = 0
        self.fork_server_peak_kib = 0

    def sample(self) -> None:
        total = total_pss = 0
        for pid, name in descendants(self.daemon_pid).items():
            memory = memory_kib(pid)
            if not memory:
                continue
            if name != "backupd-session":  # the fork server
                self.fork_server_peak_kib = max(self.fork_server_peak_kib, memory["VmHWM"])
                continue
            self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), memory["VmHWM"])
            total += memory["VmRSS"]
            total_pss += pss_kib(pid)
        self.max_sum_kib = max(self.max_sum_kib, total)
        self.max_sum_pss_kib = max(self.max_sum_pss_kib, total_pss)


# --------------------------------------------------------------------------- the state DB


def utc(value: datetime | str) -> datetime:
    """A timestamp from the state DB (SQLite gives text, PostgreSQL naive datetimes; UTC)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


class StateDb:
    """Read-only queries on the state DB (plain SQL through SQLAlchemy: SQLite and PostgreSQL)."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            url = f"sqlite:///file:{parsed.database}?mode=ro&uri=true"
        self.engine = create_engine(url)

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        from sqlalchemy import text

        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(text(sql), params)]

    def ended_load_sessions(self) -> int:
        return self.rows("SELECT count(*) AS n FROM job_session WHERE job LIKE 'load-%' "
                         "AND state = 'stopped'")[0]["n"]

    def load_sessions(self, jobs: str = "load-%") -> list[dict[str, Any]]:
        """The sessions of the jobs matching ``jobs`` (SQL ``LIKE``; default: the load's),
        each with its VM tasks and log lines."""
        sessions = self.rows("SELECT id, job, result, created_at, started_at, ended_at "
                             "FROM job_session WHERE job LIKE :jobs ORDER BY id", jobs=jobs)
        for session in sessions:
            session["tasks"] = self.rows("SELECT vm, status, bytes_read, started_at, ended_at "
                                         "FROM vm_task WHERE session_id = :id", id=session["id"])
            session["log"] = self.rows("SELECT at, vm, text FROM session_log "
                                       "WHERE session_id = :id ORDER BY id", id=session["id"])
        return sessions


# --------------------------------------------------------------------------- the figures


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, p95 (nearest rank) and max."""
    ordered = sorted(values)
    p95 = ordered[max(0, -(-95 * len(ordered) // 100) - 1)]
    return {"median": statistics.median(ordered), "p95": p95, "max": ordered[-1]}


def scheduled_times(daemon_log: str) -> dict[int, datetime]:
    """Session id → its scheduled time, from the daemon's "started (scheduled for ...)" lines."""
    pattern = re.compile(r"session (\d+) of job \S+ started \(scheduled for ([^)]+)\)")
    return {int(m[1]): datetime.fromisoformat(m[2]) for m in pattern.finditer(daemon_log)}


def first_snapshot(session: dict[str, Any]) -> datetime | None:
    created = VM_STEPS[0][1]
    times = [utc(line["at"]) for line in session["log"] if created.match(line["text"])]
    return min(times, default=None)


#: the steps of a VM task, each ending at a line of its session log, timed from the previous
VM_STEPS = (("lock + snapshot", re.compile(r"snapshot \S+ created")),
            # the plan's line of a transfer with nothing to read comes with this one
            ("plan (CBT query) + commit (0 bytes)", re.compile(r"restore point \S+ committed")))
#: the last step: its log line ("snapshot ... removed") is written with the task's end record
VM_TAIL = "snapshot removal, retention, task end"


def vm_steps(session: dict[str, Any]) -> dict[str, list[float]]:
    """Per step of :data:`VM_STEPS`, the seconds each VM of the session spent on it: from its
    task's ``started_at`` through its log lines in order; and :data:`VM_TAIL` (the last
    line to the task's ``ended_at``)."""
    seconds: dict[str, list[float]] = {name: [] for name, _ in VM_STEPS}
    seconds[VM_TAIL] = []
    for task in session["tasks"]:
        if task["started_at"] is None or task["ended_at"] is None:  # never started
            continue
        previous = utc(task["started_at"])
        lines = iter(line for line in session["log"] if line["vm"] == task["vm"])
        for name, pattern in VM_STEPS:
            line = next((line for line in lines if pattern.match(line["text"])), None)
            if line is None:
                break
            seconds[name].append((utc(line["at"]) - previous).total_seconds())
            previous = utc(line["at"])
        else:
            seconds[VM_TAIL].append((utc(task["ended_at"]) - previous).total_seconds())
    return seconds


def session_steps(session: dict[str, Any]) -> dict[str, float]:
    """The session's own steps: process start (created → claimed), setup (claimed → "session
    started": repository, provider, orphan check), and the tail (last VM task's end → session
    end: garbage collection, the end record)."""
    started = utc(session["started_at"])
    setup_done = utc(next(l["at"] for l in session["log"] if l["text"].startswith("session started")))
    last_task = max(utc(t["ended_at"]) for t in session["tasks"])
    return {"process start": (started - utc(session["created_at"])).total_seconds(),
            "setup": (setup_done - started).total_seconds(),
            "tail (gc, end)": (utc(session["ended_at"]) - last_task).total_seconds()}


def load_figures(sessions: list[dict[str, Any]], scheduled: dict[int, datetime],
                 minute: datetime) -> dict[str, Any]:
    """Latency, per-VM overhead and where the time goes, from the load's sessions."""
    latencies = [(first_snapshot(s) - scheduled[s["id"]]).total_seconds() for s in sessions
                 if s["id"] in scheduled and first_snapshot(s) is not None]
    overhead_ms = [1000 * (utc(s["ended_at"]) - utc(s["started_at"])).total_seconds()
                   / len(s["tasks"]) for s in sessions if s["result"] == "success"]
    steps: dict[str, list[float]] = {}
    for session in sessions:
        for name, values in vm_steps(session).items():
            steps.setdefault(f"VM: {name}", []).extend(values)
        if session["result"] == "success":
            for name, value in session_steps(session).items():
                steps.setdefault(f"session: {name}", []).append(value)
    return {
        "sessions": len(sessions),
        "scheduled_by_daemon": len(scheduled),
        "results": {r: sum(s["result"] == r for s in sessions)
                    for r in sorted({str(s["result"]) for s in sessions})},
        "bytes_read": sum(t["bytes_read"] for s in sessions for t in s["tasks"]),
        "trigger_to_first_snapshot_seconds": spread(latencies) if latencies else None,
        "overhead_ms_per_vm": spread(overhead_ms) if overhead_ms else None,
        "minute_to_last_end_seconds": max((utc(s["ended_at"]) - minute).total_seconds()
                                          for s in sessions if s["ended_at"]),
        "steps_median_seconds": {name: statistics.median(v) for name, v in steps.items() if v},
    }


def wait_for_load(db: StateDb, daemon: Daemon, memory: SessionMemory, sessions: int,
                  minute: datetime) -> None:
    """Sample memory until the load's sessions have all ended.

    :raises BenchError: the daemon died, or :data:`LOAD_TIMEOUT_SECONDS` passed
    """
    last_count = time.monotonic()
    while True:
        memory.sample()
        if time.monotonic() - last_count >= 1:
            last_count = time.monotonic()
            ended = db.ended_load_sessions() if datetime.now(timezone.utc) >= minute else 0
            if ended >= sessions:
                return
            if daemon.proc.poll() is not None:
                raise BenchError(f"the daemon exited during the load:\n{daemon.log()[-2000:]}")
            if (datetime.now(timezone.utc) - minute).total_seconds() > LOAD_TIMEOUT_SECONDS:
                raise BenchError(f"{ended} of {sessions} sessions ended {LOAD_TIMEOUT_SECONDS} s "
                                 f"after the minute")
        time.sleep(SAMPLE_SECONDS)


def overhead_alone(cli: Backupd, runs_wanted: int = ALONE_RUNS) -> list[float]:
    """ms per VM of ``runs_wanted`` sessions of ``alone`` in the foreground (``--wait``)."""
    runs = []
    for _ in range(runs_wanted):
        session = cli.json("job", "start", "alone", "--wait")
        runs.append(1000 * session["duration_seconds"] / len(session["vms"]))
    return runs


class StateDbUnavailable(BenchError):
    """The state DB of the lab's config cannot be opened by this build."""


def check_state_db(cli: Backupd) -> None:
    """Open the state DB through the CLI (``job list``).

    :raises StateDbUnavailable: with backupd's own last words
    """
    done = cli.run("job", "list", "--json", ok=range(256))
    if done.exit_code != 0:
        raise StateDbUnavailable(done.stderr.strip().splitlines()[-1])


def prepare_lab(lab: Path, state_url: str, jobs: int, vms: int) -> Backupd:
    """A fresh lab on that state DB, every VM made (``vm list``: the simulated provider makes
    a declared VM on its first use, which a hypervisor's VMs do not need, so no timed
    session pays for it), the stop VMs' disks filled and all of it on disk; its CLI. The cron minute of this
    config does not matter: no daemon reads it (:func:`bench_backend` rewrites it).

    :raises StateDbUnavailable: this build cannot open the state DB
    """
    shutil.rmtree(lab, ignore_errors=True)
    lab.mkdir(parents=True)
    cli = Backupd(write_config(lab, state_url, jobs, vms, datetime.now(timezone.utc)))
    check_state_db(cli)
    cli.json("vm", "list", "--provider", "sim")
    for name in stop_vms():
        cli.json("sim", "write", name, "--blocks", str(STOP_DISK_MIB))
    # The lab's files (thousands, and the stop VMs' disks) written back now, not while the
    # first sessions are timed.
    os.sync()
    return cli


def bench_backend(lab: Path, state_url: str, jobs: int, vms: int) -> dict[str, Any]:
    """The whole measurement on one state DB: the alone runs, then the daemon with the load
    and the stop trials."""
    cli = prepare_lab(lab, state_url, jobs, vms)
    progress(f"job start alone --wait, {ALONE_RUNS} times (no daemon, no load)")
    alone = {"ms_per_vm": overhead_alone(cli), "load_average": os.getloadavg()[0]}
    minute = next_minute(datetime.now(timezone.utc))
    write_config(lab, state_url, jobs, vms, minute)
    daemon = Daemon(cli, lab)
    try:
        memory = SessionMemory(daemon.proc.pid)
        while (minute - datetime.now(timezone.utc)).total_seconds() > 5:
            time.sleep(0.5)
        at_rest = {"rss_kib": memory_kib(daemon.proc.pid)["VmRSS"], "load_average": os.getloadavg()[0]}
        progress(f"daemon at rest: {at_rest['rss_kib'] / 1024:.1f} MiB; {jobs} x {vms} VMs due "
                 f"at {minute:%H:%M:%S} UTC")
        machine_before = machine_cpu_seconds()
        wait_for_load(StateDb(state_url), daemon, memory, jobs, minute)
        machine_during = machine_cpu_seconds() - machine_before
        reapers = [daemon.proc.pid, *(pid for pid, name in descendants(daemon.proc.pid).items()
                                     if name != "backupd-session")]
        cpu = {"session_processes_seconds": sum(map(reaped_cpu_seconds, reapers)),
               "machine_seconds": machine_during}
        load_average_at_end = os.getloadavg()[0]
        daemon_hwm = memory_kib(daemon.proc.pid)["VmHWM"]
        sessions = StateDb(state_url).load_sessions()
        progress(f"load ended; immediate stop of stop-8, {STOP_TRIALS} trials")
        stops = [{**bench_immediate_stop(cli, "stop-8", "slow"), "load_average": os.getloadavg()[0]}
                 for _ in range(STOP_TRIALS)]
    finally:
        exit_code = daemon.stop()
    return {
        "state_url": state_url,
        "minute": minute.isoformat(),
        "load": {**load_figures(sessions, scheduled_times(daemon.log()), minute),
                 "load_average_at_end": load_average_at_end,
                 "cpu_ms_per_vm": {name.removesuffix("_seconds"): 1000 * value / (jobs * vms)
                                   for name, value in cpu.items()}},
        "daemon_rss_kib": {"at_rest": at_rest, "peak_vmhwm": daemon_hwm},
        "session_processes": {"count": len(memory.peak_kib),
                              "max_peak_kib": max(memory.peak_kib.values(), default=0),
                              "max_sum_rss_kib": memory.max_sum_kib,
                              "max_sum_pss_kib": memory.max_sum_pss_kib},
        "fork_server_peak_vmhwm_kib": memory.fork_server_peak_kib,
        "immediate_stop": stops,
        "overhead_alone": alone,
        "daemon_exit_code": exit_code,
    }


def bench_postgresql(lab: Path, jobs: int, vms: int) -> dict[str, Any]:
    """:func:`bench_backend` on a fresh PostgreSQL database, dropped afterwards; a
    ``skipped`` reason when this build cannot use it."""
    try:
        name = create_pg_database()
    except (BenchError, FileNotFoundError) as exc:
        return {"skipped": f"no PostgreSQL server to use: {exc}"}
    try:
        return bench_backend(lab, f"{POSTGRES}/{name}", jobs, vms)
    except StateDbUnavailable as exc:
        return {"skipped": f"PostgreSQL state DB not available in this build: {exc}"}
    finally:
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --------------------------------------------------------------------------- summary


def report(results: dict[str, Any]) -> str:
    """The table: figure, SQLite, PostgreSQL, target, verdict; then the breakdown."""
    backends = {"SQLite": results["sqlite"], "PostgreSQL": results["postgresql"]}

    def cell(run: dict[str, Any], pick: Any, unit: str) -> str:
        if "skipped" in run:
            return "skipped"
        value = pick(run)
        if isinstance(value, float):
            return f"{value:.1f}{unit}" if unit else f"{value:.2f}"
        return str(value)

    def verdicts(pick: Any) -> str:
        return " / ".join(verdict(None if "skipped" in run else pick(run), TARGET_OVERHEAD_MS,
                                  False) for run in backends.values())

    def mib(kib: int) -> float:
        return kib / 1024

    def stop_median(key: str) -> Any:
        return lambda r: statistics.median(s[key] for s in r["immediate_stop"])

    jobs, vms = results["jobs"], results["vms_per_job"]
    rows: list[tuple[Any, ...]] = [
        ("trigger to first snapshot, median (s)",
         lambda r: r["load"]["trigger_to_first_snapshot_seconds"]["median"], "", "figure"),
        ("  p95 / max (s)", lambda r: "{p95:.2f} / {max:.2f}".format(
            **r["load"]["trigger_to_first_snapshot_seconds"]), "", ""),
        ("per-VM wall time of a session under the load, median (ms)",
         lambda r: r["load"]["overhead_ms_per_vm"]["median"], "", "<= 10 ms"),
        ("  p95 (ms)", lambda r: r["load"]["overhead_ms_per_vm"]["p95"], "", "<= 10 ms"),
        ("CPU per VM under the load: session processes (ms)",
         lambda r: r["load"]["cpu_ms_per_vm"]["session_processes"], "", "<= 10 ms"),
        ("  the whole machine, minute to last end (ms)",
         lambda r: r["load"]["cpu_ms_per_vm"]["machine"], "", ""),
        (f"per-VM overhead, one session alone, median of {ALONE_RUNS} (ms)",
         lambda r: statistics.median(r["overhead_alone"]["ms_per_vm"]), "", "<= 10 ms"),
        ("daemon RSS at rest", lambda r: mib(r["daemon_rss_kib"]["at_rest"]["rss_kib"]), " MiB",
         "figure"),
        ("daemon peak RSS (VmHWM) after the load", lambda r: mib(r["daemon_rss_kib"]["peak_vmhwm"]),
         " MiB", "figure"),
        ("fork server peak RSS (VmHWM)", lambda r: mib(r.get("fork_server_peak_vmhwm_kib", 0)), " MiB",
         "figure"),
        ("session process peak RSS, largest one",
         lambda r: mib(r["session_processes"]["max_peak_kib"]), " MiB", "figure"),
        ("session processes, largest sum of RSS at once",
         lambda r: mib(r["session_processes"]["max_sum_rss_kib"]), " MiB", "figure"),
        ("  the same in PSS (shared pages shared out)",
         lambda r: mib(r["session_processes"].get("max_sum_pss_kib", 0)), " MiB", ""),
        ("load: the minute to the last session's end (s)",
         lambda r: r["load"]["minute_to_last_end_seconds"], "", "figure"),
        ("load sessions by result", lambda r: ", ".join(f"{n} {k}" for k, n in
                                                        r["load"]["results"].items()), "", ""),
        (f"immediate stop, {STOP_VMS} VMs in flight, median of {STOP_TRIALS} (s)",
         stop_median("stopped_and_clean_seconds"), "", "figure"),
        ("  as the session recorded it (requested → ended) (s)",
         stop_median("recorded_seconds"), "", ""),
        ("  snapshots left / restore points made",
         lambda r: f"{sum(not s['snapshots_removed'] for s in r['immediate_stop'])} / "
                   f"{sum(len(s['restore_points']) for s in r['immediate_stop'])}", "", "0 / 0"),
    ]
    table = [("figure", "SQLite", "PostgreSQL", "target", "verdict")]
    for label, pick, unit, target in rows:
        judged = verdicts(pick) if target == "<= 10 ms" else ""
        table.append((label, *(cell(run, pick, unit) for run in backends.values()), target, judged))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))).rstrip() for row in table]
    lines.insert(1, "-" * max(map(len, lines)))
    lines += ["", f"load: {jobs} jobs x {vms} VMs (empty 1 MiB disks), max_parallel_vms "
              f"{LOAD_PARALLEL_VMS}, one cron minute"]
    for name, run in backends.items():
        if "skipped" in run:
            lines.append(f"{name}: {run['skipped']}")
            continue
        steps = ", ".join(f"{k} {1000 * v:.0f}" for k, v in run["load"]["steps_median_seconds"].items())
        lines += [f"{name}: where the time goes, medians in ms: {steps}",
                  f"{name}: load average {run['daemon_rss_kib']['at_rest']['load_average']:.1f} at rest, "
                  f"{run['load']['load_average_at_end']:.1f} when the load ended, stop trials "
                  + " / ".join(f"{s['load_average']:.1f}" for s in run["immediate_stop"])
                  + f", alone {run['overhead_alone']['load_average']:.1f}; bytes read by the load "
                  f"{run['load']['bytes_read']}; alone runs (ms/VM) "
                  + " / ".join(f"{v:.1f}" for v in run["overhead_alone"]["ms_per_vm"])]
    return "\n".join(lines)


def bench_alone(lab: Path, state_url: str, jobs: int, vms: int, runs: int) -> dict[str, Any]:
    """Only the sessions of ``alone`` (no daemon, no load): ``runs`` of them, ms per VM, and
    where their time goes (the steps of :func:`vm_steps` and :func:`session_steps`, medians
    over all the runs). The config holds the load's ``jobs`` too, as in the full bench: a
    session's recovery pass looks at every job."""
    cli = prepare_lab(lab, state_url, jobs, vms)
    ms_per_vm = overhead_alone(cli, runs)
    steps: dict[str, list[float]] = {}
    for session in StateDb(state_url).load_sessions("alone"):
        for name, values in vm_steps(session).items():
            steps.setdefault(f"VM: {name}", []).extend(values)
        setup_and_tail = session_steps(session)
        for name in ("setup", "tail (gc, end)"):
            steps.setdefault(f"session: {name}", []).append(setup_and_tail[name])
    return {"state_url": state_url, "ms_per_vm": ms_per_vm, "load_average": os.getloadavg()[0],
            "steps_median_seconds": {name: statistics.median(v) for name, v in steps.items() if v}}


def alone_only(lab: Path, jobs: int, vms: int, runs: int) -> dict[str, Any]:
    """``--alone-only``: :func:`bench_alone` on SQLite and on a fresh PostgreSQL database
    (skipped with the reason when there is none)."""
    results: dict[str, Any] = {"sqlite": bench_alone(lab / "sqlite", f"sqlite:///{lab / 'sqlite' / 'state.db'}",
                                                     jobs, vms, runs)}
    try:
        name = create_pg_database()
    except (BenchError, FileNotFoundError) as exc:
        results["postgresql"] = {"skipped": f"no PostgreSQL server to use: {exc}"}
        return results
    try:
        results["postgresql"] = bench_alone(lab / "postgresql", f"{POSTGRES}/{name}", jobs, vms, runs)
    except StateDbUnavailable as exc:
        results["postgresql"] = {"skipped": f"PostgreSQL state DB not available in this build: {exc}"}
    finally:
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return results


def report_alone(results: dict[str, Any]) -> str:
    """The ``--alone-only`` lines: per state DB, ms per VM of every run and the steps."""
    lines = []
    for name, key in (("SQLite", "sqlite"), ("PostgreSQL", "postgresql")):
        run = results[key]
        if "skipped" in run:
            lines.append(f"{name}: {run['skipped']}")
            continue
        steps = ", ".join(f"{k} {1000 * v:.1f}" for k, v in run["steps_median_seconds"].items())
        lines += [f"{name}: per-VM overhead alone, median {statistics.median(run['ms_per_vm']):.1f} ms "
                  f"(runs: {' / '.join(f'{v:.1f}' for v in run['ms_per_vm'])}; load average "
                  f"{run['load_average']:.1f})",
                  f"{name}: where the time goes, medians in ms: {steps}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``bench/daemon.py [--lab DIR] [--jobs N] [--vms N]``: print the table, write
    ``LAB/results.json``."""
    parser = argparse.ArgumentParser(prog="bench/daemon.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", type=Path, default=Path("bench-lab/daemon"),
                        help="folder for the labs, rebuilt on every run (default: bench-lab/daemon)")
    parser.add_argument("--jobs", type=int, default=100, help="jobs in the load (default 100)")
    parser.add_argument("--vms", type=int, default=10, help="VMs per job (default 10)")
    parser.add_argument("--alone-only", type=int, metavar="RUNS",
                        help="only the job alone, RUNS sessions per state DB, no daemon (the "
                             "config still holds --jobs jobs): the per-VM overhead without "
                             "contention and where it goes, in a minute")
    args = parser.parse_args(argv)
    lab = args.lab.resolve()
    if args.alone_only:
        try:
            results = alone_only(lab, args.jobs, args.vms, args.alone_only)
        except BenchError as exc:
            progress(f"error: {exc}")
            return 1
        (lab / "results-alone.json").write_text(json.dumps(results, indent=2) + "\n")
        print(report_alone(results))
        return 0
    started = time.perf_counter()
    results: dict[str, Any] = {"jobs": args.jobs, "vms_per_job": args.vms,
                               "load_average_before": os.getloadavg()[0], "cpus": os.cpu_count(),
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        progress("SQLite")
        results["sqlite"] = bench_backend(lab / "sqlite", f"sqlite:///{lab / 'sqlite' / 'state.db'}",
                                          args.jobs, args.vms)
        progress("PostgreSQL")
        results["postgresql"] = bench_postgresql(lab / "postgresql", args.jobs, args.vms)
    except BenchError as exc:
        progress(f"error: {exc}")
        return 1
    results["load_average_after"] = os.getloadavg()[0]
    (lab / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    progress(f"done in {time.perf_counter() - started:.0f} s; numbers in {lab / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
