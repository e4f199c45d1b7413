"""The CPU time of one job session in a session process forked as the daemon forks it, in
seconds instead of the minutes of ``bench/daemon.py``:
``.venv/bin/python bench/session_cpu.py --lab DIR [--runs N] [--parallel N] [--first] [--postgresql]``.

``bench/daemon.py`` measures the daemon under a load of 100 sessions, and its CPU figures move
by up to a third between runs on a shared machine. This measures one session at a time, the way
to compare two versions of the engine (run both, alternating, several times each). The lab is
``bench/daemon.py``'s (100 jobs of 10 VMs of one empty 1 MiB disk each, and the job ``alone``
of 10 such VMs, in one config), on SQLite, or with ``--postgresql`` on a fresh database of the
local PostgreSQL server (dropped at the end, as the lab is made again). The parent prepares
what the daemon's fork server prepares (:mod:`backupd.forkserver`: the imports, the config
validated once, ``gc.freeze``, and the state DB's engine warmed up once the first session
exists) and registers itself as the running daemon, so a session skips the recovery pass as it
does under a daemon. Then, per run, it creates a session of ``alone`` (or, with ``--first``, of
the next load job never run: a VM's first session, no restore point to read or delete), forks,
the child hosts it (``backupd.host``), and the parent reads the child's CPU time, user and
system, and its minor page faults (``wait4``). Per VM: the figure ``bench/daemon.py`` calls
"CPU per VM, session processes", for one session alone.

``alone`` keeps 7 restore points per VM (the default retention): from its eighth run on, a
session reads 7 manifest headers per VM and deletes one point. ``--parallel`` sets the job's
``max_parallel_vms`` (default: the load's, 4).

Under ``valgrind --tool=callgrind --callgrind-out-file=cg.%p`` with ``--runs 1``, the child's
file counts what the parent had done before the fork too: its total minus the parent's is, to
within the parent's few steps after the fork, the session's user instructions, the same from
run to run where CPU time is not (system time it does not see).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from daemon import POSTGRES, create_pg_database, load_job, prepare_lab, psql  # bench/daemon.py: the same lab

if TYPE_CHECKING:
    from backupd.service import Backupd

#: the job run by default; its VMs are as many as a load job's
JOB = "alone"


def next_first_job(service: "Backupd") -> str:
    """The first load job that has no session yet.

    :raises SystemExit: every one has run; make the lab again (``--new``).
    """
    ran = {session.job for session in service.store.sessions()}
    for number in range(100):
        if load_job(number) not in ran:
            return load_job(number)
    raise SystemExit("every load job of the lab has run: make it again with --new")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/session_cpu.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", type=Path, default=Path("bench-lab/session-cpu"),
                        help="the lab's folder, made by the first run (--new to make it again)")
    parser.add_argument("--new", action="store_true", help="make the lab again")
    parser.add_argument("--runs", type=int, default=10, help="sessions to run (default 10)")
    parser.add_argument("--parallel", type=int, default=4, help="max_parallel_vms of the job (default 4)")
    parser.add_argument("--postgresql", action="store_true",
                        help="the state DB on the local PostgreSQL server (the lab is made again)")
    parser.add_argument("--first", action="store_true",
                        help="each run a load job's first session instead of a session of alone")
    args = parser.parse_args(argv)
    lab = args.lab.resolve()
    if not args.postgresql:
        url = f"sqlite:///{lab / 'state.db'}"
        if args.new or not (lab / "backupd.toml").exists():
            prepare_lab(lab, url, jobs=100, vms=10)
        return measure(lab, url, args)
    database = create_pg_database()
    try:
        url = f"{POSTGRES}/{database}"
        prepare_lab(lab, url, jobs=100, vms=10)
        return measure(lab, url, args)
    finally:
        psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def measure(lab: Path, url: str, args: argparse.Namespace) -> int:
    """Run ``args.runs`` sessions in forked processes; print their CPU per VM."""
    from backupd.config import load_config
    from backupd.forkserver import import_for_sessions
    from backupd.host import run_session_process
    from backupd.service import Backupd
    from backupd.state import DaemonRegistry, StateStore
    from backupd.vmtask import TASK_RECORDS

    config_path = lab / "backupd.toml"
    import_for_sessions(config_path)
    config = load_config(config_path)
    jobs = {name: job.model_copy(update={"max_parallel_vms": args.parallel}) for name, job in config.jobs.items()}
    config = config.model_copy(update={"jobs": jobs})
    store = StateStore(url)
    registry = DaemonRegistry(store)
    registry.register(str(config_path))
    service = Backupd(config, store=store)
    gc.collect()
    gc.freeze()
    per_vm: list[float] = []
    for run in range(args.runs):
        job = next_first_job(service) if args.first else JOB
        registry.beat()
        session = service.create_session(job)
        if run == 0:  # as the fork server does, at its first request: a session exists by then
            store.warm_up(TASK_RECORDS)
        store.engine.dispose()  # no connection crosses the fork
        pid = os.fork()
        if pid == 0:
            fd = os.open(lab / f"session-{session.id}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            store.after_fork()
            os._exit(run_session_process(session.id, lambda: config, store))
        _, status, usage = os.wait4(pid, 0)
        vms = len(config.job(job).vms)
        per_vm.append(1000 * (usage.ru_utime + usage.ru_stime) / vms)
        print(f"session {session.id} ({job}): exit {os.waitstatus_to_exitcode(status)}, CPU per VM "
              f"{per_vm[-1]:.2f} ms (user {1000 * usage.ru_utime / vms:.2f}, system "
              f"{1000 * usage.ru_stime / vms:.2f}), minor faults {usage.ru_minflt}", flush=True)
    print(f"CPU per VM: median {statistics.median(per_vm):.2f} ms, min {min(per_vm):.2f}, "
          f"max {max(per_vm):.2f} ({args.runs} sessions, max_parallel_vms {args.parallel})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
