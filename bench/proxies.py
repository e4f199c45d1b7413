"""``make bench``, third part: backup proxies (``backupd proxy``) on PostgreSQL and RabbitMQ.

Run as ``.venv/bin/python bench/proxies.py --lab bench-lab/proxies``. One lab: a PostgreSQL state
DB (a database ``backupd_bench_<random>`` on 127.0.0.1:5432, dropped afterwards), the RabbitMQ
broker at 127.0.0.1:5672 (guest/guest), one repository, simulated VMs, and two configs over the
same state DB, provider state and repository: ``proxies.toml`` (with ``[proxies]``: VM tasks go
to the proxies of a pool of this run's own) and ``local.toml`` (without: VM tasks run in the
session's process, as in the daemon's session processes). The figures:

dispatch rate
    A job of :data:`EMPTY_VMS` VMs with one empty 1 MiB disk each (nothing to read: every
    second is the engine's overhead: dispatch through the broker, claim, VM lock, snapshot,
    manifest commit, snapshot removal, state DB writes), ``max_parallel_vms`` =
    :data:`PARALLEL`, on 2 proxies of ``--max-tasks`` :data:`MAX_TASKS` and in-process. VM
    tasks per second = VMs / the session's recorded duration (``started_at`` → ``ended_at``).
throughput
    A job of :data:`DATA_VMS` VMs of :data:`DATA_MIB` MiB of incompressible data each, read
    at :data:`READ_MIB_S` MiB/s per disk (the simulated hypervisor's throttle, so the number of
    VM tasks in flight shows), ``max_parallel_vms`` = :data:`PARALLEL`, ``--full``: in-process,
    on 1 proxy, on 2 proxies (each ``--max-tasks`` :data:`MAX_TASKS`). MiB/s = the job's bytes
    / the session's recorded duration. A first in-process run, not counted, stores the blocks,
    so every measured run writes the same (deduplicated) data.
immediate stop
    A job of 8 VMs on 2 proxies, all in flight, ``job stop --immediate --wait``: request to
    ``stopped`` with no snapshot left (``bench_immediate_stop`` of bench/run.py). Median of
    :data:`STOP_TRIALS`.

The table goes to stdout, every number to ``LAB/results.json``, progress to stderr. Proxies
are always stopped (SIGTERM, SIGKILL after :data:`PROXY_EXIT_SECONDS`). Without a reachable
PostgreSQL server or broker the bench says so and exits 0 (``make bench`` goes on).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from daemon import POSTGRES, create_pg_database, psql
from run import Backupd, BenchError, bench_immediate_stop, parse_time, progress

from backupd.disk_images import toml_string

#: the broker (guest/guest is RabbitMQ's default, local connections only)
BROKER = "amqp://guest:guest@127.0.0.1:5672//"
#: VM tasks a job keeps in flight, and the ``--max-tasks`` of each proxy
PARALLEL = 8
MAX_TASKS = 4
#: the dispatch-rate job: VMs with one empty 1 MiB disk
EMPTY_VMS = 48
#: the throughput job: VMs, their disk (MiB, filled) and the per-disk read throttle (MiB/s)
DATA_VMS = 12
DATA_MIB = 64
READ_MIB_S = 16
#: the stop job: 8 VMs of 8 MiB read at 0.5 MiB/s (16 s each: all surely in flight)
STOP_VMS = 8
STOP_MIB = 8
STOP_READ_MIB_S = 0.5
STOP_TRIALS = 3
#: how long a proxy gets to exit after SIGTERM before SIGKILL (seconds)
PROXY_EXIT_SECONDS = 60


def write_configs(lab: Path, state_url: str, pool: str) -> tuple[Path, Path]:
    """``LAB/proxies.toml`` (with ``[proxies]``, the jobs on ``pool``) and ``LAB/local.toml``
    (the same without ``[proxies]``): providers ``empty``, ``data`` and ``slow``, jobs
    ``empty``, ``data`` and ``stop``."""
    def vms(provider: str, prefix: str, count: int, size: str) -> list[str]:
        lines = []
        for n in range(count):
            lines += ["", f"[[providers.{provider}.vms]]", f'name = "{prefix}-{n:02d}"', f"disks = [{toml_string(size)}]"]
        return lines

    def job(name: str, provider: str, count: int, repository: str = "repo") -> list[str]:
        names = ", ".join(f'"{name}-{n:02d}"' for n in range(count))
        return ["", f"[jobs.{name}]", f"provider = {toml_string(provider)}", f"repository = {toml_string(repository)}",
                f"vms = [{names}]", f"max_parallel_vms = {PARALLEL}", f"proxy_pool = {toml_string(pool)}"]

    lines = ["# Written by bench/proxies.py; rewritten on every run.", "[state]", f"url = {toml_string(state_url)}",
             "", "[repositories.repo]", 'path = "repo"',
             "", "[providers.empty]", 'type = "simulated"', 'state_dir = "sim-empty"']
    lines += vms("empty", "empty", EMPTY_VMS, "1 MiB")
    lines += ["", "[providers.data]", 'type = "simulated"', 'state_dir = "sim-data"', f"read_mib_per_s = {READ_MIB_S}"]
    lines += vms("data", "data", DATA_VMS, f"{DATA_MIB} MiB")
    lines += ["", "[providers.slow]", 'type = "simulated"', 'state_dir = "sim-slow"', f"read_mib_per_s = {STOP_READ_MIB_S}"]
    lines += vms("slow", "stop", STOP_VMS, f"{STOP_MIB} MiB")
    lines += job("empty", "empty", EMPTY_VMS) + job("data", "data", DATA_VMS)
    # the stop job's 64 KiB blocks make bytes_read grow between two polls of ``session show``
    lines += job("stop", "slow", STOP_VMS, "repo-stop")
    lines += ["", "[repositories.repo-stop]", 'path = "repo-stop"', 'block_size = "64 KiB"']
    local = lab / "local.toml"
    local.write_text("\n".join(lines) + "\n")
    proxies = lab / "proxies.toml"
    proxies.write_text("\n".join(lines + ["", "[proxies]", f"broker = {toml_string(BROKER)}"]) + "\n")
    return local, proxies


class ProxyProcess:
    """One ``backupd proxy`` of the lab, up once ``proxy list`` shows it."""

    def __init__(self, cli: Backupd, lab: Path, pool: str, host: str) -> None:
        self.host = host
        self.err = (lab / f"proxy-{host}.log").open("w")
        self.proc = subprocess.Popen([*cli.argv, "proxy", "--pool", pool, "--max-tasks", str(MAX_TASKS),
                                      "--host-id", host], stdout=subprocess.DEVNULL, stderr=self.err)
        deadline = time.monotonic() + 120
        while not any(p["pid"] == self.proc.pid and p["status"] == "up" for p in cli.json("proxy", "list")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"proxy {host} did not come up; see {self.err.name}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(PROXY_EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


def fill(cli: Backupd, lab: Path, vm: str, mib: int) -> None:
    """Fill the VM's whole disk with random (incompressible, never deduplicated) bytes
    through the guest write path (``sim write --file --offset 0``)."""
    payload = lab / "payload.bin"
    payload.write_bytes(os.urandom(mib * 1024 * 1024))
    cli.json("sim", "write", vm, "--file", str(payload), "--offset", "0")
    payload.unlink()


def timed_session(cli: Backupd, job: str, *extra: str) -> dict[str, Any]:
    """``job start JOB --wait`` (exit 0 expected); the session's recorded duration (seconds),
    its VMs' bytes read and where they ran."""
    doc = cli.json("job", "start", job, "--wait", *extra)
    if doc["result"] != "success":
        raise BenchError(f"session {doc['id']} of {job} ended {doc['result']}: {doc.get('message')}")
    seconds = (parse_time(doc["ended_at"]) - parse_time(doc["started_at"])).total_seconds()
    hosts = sorted({vm["proxy"]["host"] for vm in doc["vms"] if vm.get("proxy")})
    return {"session": doc["id"], "seconds": seconds, "vms": len(doc["vms"]),
            "bytes_read": sum(vm["bytes_read"] for vm in doc["vms"]), "proxies": hosts}


class ServiceUnavailable(BenchError):
    """PostgreSQL or RabbitMQ cannot be reached: the bench is skipped, not failed."""


def check_broker() -> None:
    """:raises ServiceUnavailable: the broker does not answer."""
    from kombu import Connection

    try:
        with Connection(BROKER, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - kombu raises the transport's own errors
        raise ServiceUnavailable(f"RabbitMQ not reachable at {BROKER.replace('guest:guest', 'guest:***')}: {exc}") from exc


def run_bench(lab: Path) -> dict[str, Any]:
    """The whole measurement (see the module docstring) on a fresh lab and database.

    :raises ServiceUnavailable: no broker, or no PostgreSQL server to create a database on
    :raises BenchError: a step failed
    """
    check_broker()
    try:
        database = create_pg_database()
    except BenchError as exc:
        raise ServiceUnavailable(str(exc)) from exc
    shutil.rmtree(lab, ignore_errors=True)
    lab.mkdir(parents=True)
    pool = f"bench-{secrets.token_hex(3)}"
    started: list[ProxyProcess] = []
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_before": os.getloadavg(),
        "cpus": os.cpu_count(), "settings": {"parallel": PARALLEL, "max_tasks": MAX_TASKS, "empty_vms": EMPTY_VMS,
                                             "data_vms": DATA_VMS, "data_mib": DATA_MIB, "read_mib_s": READ_MIB_S}}
    try:
        local_config, proxies_config = write_configs(lab, f"{POSTGRES}/{database}", pool)
        local, remote = Backupd(local_config), Backupd(proxies_config)
        for vms, size in ((("data", n) for n in range(DATA_VMS)), DATA_MIB), ((("stop", n) for n in range(STOP_VMS)), STOP_MIB):
            for prefix, n in vms:
                fill(local, lab, f"{prefix}-{n:02d}", size)
        progress("data job, in-process, first run (stores the blocks; not counted)")
        timed_session(local, "data", "--full")

        progress("in-process: empty job, data job")
        results["in_process"] = {"empty": timed_session(local, "empty", "--full"),
                                 "data": timed_session(local, "data", "--full")}
        started.append(ProxyProcess(remote, lab, pool, "bench-a"))
        progress("1 proxy: empty job, data job")
        results["one_proxy"] = {"empty": timed_session(remote, "empty", "--full"),
                                "data": timed_session(remote, "data", "--full")}
        started.append(ProxyProcess(remote, lab, pool, "bench-b"))
        progress("2 proxies: empty job, data job")
        results["two_proxies"] = {"empty": timed_session(remote, "empty", "--full"),
                                  "data": timed_session(remote, "data", "--full")}
        stops = []
        for trial in range(1, STOP_TRIALS + 1):
            progress(f"immediate stop on 2 proxies, trial {trial}")
            stops.append(bench_immediate_stop(remote, job="stop", provider="slow"))
        results["stops"] = stops
        results["load_after"] = os.getloadavg()
    finally:
        for proxy in started:
            proxy.stop()
        psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    (lab / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def report(results: dict[str, Any]) -> str:
    """The table of the figures."""
    mib = 1024 * 1024
    lines = [f"backup proxies, {results['date']}, {results['cpus']} CPUs, load average before "
             f"{results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f}",
             f"{'':14}{'empty VM tasks/s':>18}{'data MiB/s':>12}{'data s':>9}  proxies used"]
    for key, name in (("in_process", "in-process"), ("one_proxy", "1 proxy"), ("two_proxies", "2 proxies")):
        empty, data = results[key]["empty"], results[key]["data"]
        lines.append(f"{name:14}{empty['vms'] / empty['seconds']:>18.1f}{data['bytes_read'] / mib / data['seconds']:>12.1f}"
                     f"{data['seconds']:>9.1f}  {', '.join(data['proxies']) or '-'}")
    stops = results["stops"]
    clean = statistics.median(s["stopped_and_clean_seconds"] for s in stops)
    recorded = statistics.median(s["recorded_seconds"] for s in stops)
    statuses = sorted({status for s in stops for status in s["statuses"].values()})
    lines.append(f"immediate stop, {STOP_VMS} VMs in flight on 2 proxies, median of {len(stops)}: "
                 f"{clean:.2f} s to stopped with no snapshot (outside), {recorded:.2f} s recorded; VMs {statuses}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lab", type=Path, default=Path("bench-lab/proxies"))
    args = parser.parse_args(argv)
    try:
        results = run_bench(args.lab.resolve())
    except ServiceUnavailable as exc:
        print(f"bench: backup proxies skipped: {exc}", file=sys.stderr)
        return 0
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
