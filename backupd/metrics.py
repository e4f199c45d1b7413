"""Prometheus metrics, read from the state DB at scrape time.

Every session runs in a process of its own (one per session, supervised by the daemon), so
counters kept in the daemon's memory would miss what the sessions do. The state DB already
records all of it; :class:`StateCollector` turns it into metrics whenever Prometheus scrapes,
with a few aggregate queries (``GROUP BY``, never a row per session in Python). The figures
survive daemon restarts, and every daemon sharing a state DB exports the same numbers.

Metrics (``job`` is the job's name; every job with a session in the state DB has its series,
zeros included, so that ``increase()`` sees a job's first failure):

- ``backupd_sessions_total{job,result}`` counter: ended sessions.
- ``backupd_sessions_running{job}`` gauge: sessions not yet ``stopped``.
- ``backupd_vm_tasks_total{job,status}`` counter: VM tasks with a final status (a pending or
  running task would make a counter go down when it finishes).
- ``backupd_read_bytes_total{job}``, ``backupd_stored_bytes_total{job}`` counters: bytes read
  from the provider (running tasks included, so ``rate()`` is the throughput) and compressed
  bytes added to the repository.
- ``backupd_session_duration_seconds{job}`` gauge: the last ended session's duration.
- ``backupd_last_success_timestamp_seconds{job}`` gauge: when the job's last session with
  result ``success`` ended (``warning`` does not count), Unix time.
- ``backupd_snapshot_removals_failed{job}`` gauge: snapshots that ended sessions recorded and
  did not remove (the removal failed, or the runner died), still on the hypervisor as far as
  the state DB knows.
- ``backupd_orphaned_snapshots_removed_total{job}`` counter: snapshots of ended sessions that
  a later session removed. Only the session log records these (a snapshot found by name has no
  row at all), so the lines :func:`backupd.recovery.remove_orphaned_snapshots` writes, which
  begin with :data:`backupd.recovery.ORPHAN_REMOVED`, are counted.
- ``backupd_state_db_up`` gauge: 1, or 0 when some figure could not be read this scrape.

The session duration is a gauge of the last ended session rather than a summary over every
session: it answers "how long did the last backup of this job take" directly (and can be
alerted on as it is), and it needs no date arithmetic in SQL, which SQLite and PostgreSQL
spell differently. A job's sessions last minutes to hours, so two ending between two scrapes
(and one going unseen) is rare. Like ``session show --json``'s ``duration_seconds`` it runs
from ``started_at`` to ``ended_at``; a session that ended before a runner claimed it has none,
and its job has no duration series until its next session ends.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backupd.enums import SessionResult, SessionState, TaskStatus
from backupd.errors import StateError
from backupd.recovery import ORPHAN_REMOVED
from backupd.state import StateStore

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_FINAL_STATUSES = [status for status in TaskStatus if status.is_final]
_PORT = re.compile(r"[0-9]{1,5}")


class StateCollector(Collector):
    """The metrics of one state DB, queried on every :meth:`collect` (every scrape).

    Each figure is its own query: when one fails with :class:`StateError` (a lost server, a
    missing table, a file that is not a database), the others are still exported,
    ``backupd_state_db_up`` is 0 and the failure is logged once (and its end once), so the
    endpoint keeps answering while the state DB cannot be read.
    """

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._failing = False

    def collect(self) -> Iterator[Metric]:
        problems: list[str] = []

        def read(query: Callable[[], _T]) -> _T | None:
            try:
                return query()
            except StateError as exc:
                problems.append(str(exc))
                return None

        sessions = read(self.store.session_counts)
        jobs = sorted({job for job, _, _, _ in sessions or []})
        if sessions is not None:
            yield from _session_families(jobs, sessions)

        tasks = read(self.store.task_counts)
        if tasks is not None:
            yield from _task_families(jobs, tasks)

        last = read(self.store.last_ended)
        if last is not None:
            duration = GaugeMetricFamily(
                "backupd_session_duration_seconds",
                "Duration of the job's last ended session, from its start to its end, in seconds",
                labels=["job"],
            )
            for job, (started, ended) in sorted(last.items()):
                if started is not None:
                    duration.add_metric([job], (ended - started).total_seconds())
            yield duration

        success = read(lambda: self.store.last_ended(SessionResult.SUCCESS))
        if success is not None:
            timestamp = GaugeMetricFamily(
                "backupd_last_success_timestamp_seconds",
                "When the job's last session with result success ended, in seconds since the Unix epoch",
                labels=["job"],
            )
            for job, (_, ended) in sorted(success.items()):
                timestamp.add_metric([job], ended.timestamp())
            yield timestamp

        unremoved = read(self.store.unremoved_snapshot_counts)
        if unremoved is not None:
            snapshots = GaugeMetricFamily(
                "backupd_snapshot_removals_failed",
                "Snapshots that ended sessions of the job created and did not remove (the removal failed or "
                "the runner died); the job's next session tries again",
                labels=["job"],
            )
            for job in sorted(set(jobs) | set(unremoved)):
                snapshots.add_metric([job], unremoved.get(job, 0))
            yield snapshots

        orphans = read(lambda: self.store.log_line_counts(ORPHAN_REMOVED))
        if orphans is not None:
            removed = CounterMetricFamily(
                "backupd_orphaned_snapshots_removed",
                "Snapshots that ended sessions of the job left and recovery removed later (a new session or "
                "the daemon), counted from the log of the session that left each",
                labels=["job"],
            )
            for job in sorted(set(jobs) | set(orphans)):
                removed.add_metric([job], orphans.get(job, 0))
            yield removed

        up = GaugeMetricFamily(
            "backupd_state_db_up",
            "1 when every figure of this scrape was read from the state DB; 0 when some could not be "
            "(they are missing from this scrape)",
        )
        up.add_metric([], 0 if problems else 1)
        yield up
        self._report(problems)

    def _report(self, problems: list[str]) -> None:
        if problems and not self._failing:
            log.warning("metrics: cannot read the state DB: %s", problems[0])
        elif not problems and self._failing:
            log.warning("metrics: the state DB can be read again")
        self._failing = bool(problems)


def _session_families(
    jobs: list[str], rows: list[tuple[str, SessionState, SessionResult | None, int]]
) -> Iterator[Metric]:
    ended = {(job, result): 0 for job in jobs for result in SessionResult}
    running = dict.fromkeys(jobs, 0)
    for job, state, result, count in rows:
        if state is SessionState.STOPPED and result is not None:
            ended[job, result] += count
        elif state is not SessionState.STOPPED:
            running[job] += count
    total = CounterMetricFamily("backupd_sessions", "Ended sessions of the job, by result", labels=["job", "result"])
    for (job, result), count in ended.items():
        total.add_metric([job, result.value], count)
    yield total
    gauge = GaugeMetricFamily(
        "backupd_sessions_running",
        "Sessions of the job not yet stopped (starting, working or stopping; a session whose runner died "
        "counts until recovery ends it)",
        labels=["job"],
    )
    for job, count in running.items():
        gauge.add_metric([job], count)
    yield gauge


def _task_families(jobs: list[str], rows: list[tuple[str, TaskStatus, int, int, int]]) -> Iterator[Metric]:
    final = {(job, status): 0 for job in jobs for status in _FINAL_STATUSES}
    read = dict.fromkeys(jobs, 0)
    stored = dict.fromkeys(jobs, 0)
    for job, status, count, bytes_read, bytes_stored in rows:
        if status.is_final:
            final[job, status] = final.get((job, status), 0) + count
        read[job] = read.get(job, 0) + bytes_read
        stored[job] = stored.get(job, 0) + bytes_stored
    tasks = CounterMetricFamily(
        "backupd_vm_tasks", "VM tasks of the job's sessions that have finished, by final status", labels=["job", "status"]
    )
    for (job, status), count in final.items():
        tasks.add_metric([job, status.value], count)
    yield tasks
    read_family = CounterMetricFamily(
        "backupd_read_bytes", "Bytes the job's VM tasks read from the provider (running ones: so far)", labels=["job"]
    )
    for job, count in read.items():
        read_family.add_metric([job], count)
    yield read_family
    stored_family = CounterMetricFamily(
        "backupd_stored_bytes",
        "Compressed bytes the job's VM tasks added to the repository (as recorded on each task; what "
        "retention later frees is not subtracted)",
        labels=["job"],
    )
    for job, count in stored.items():
        stored_family.add_metric([job], count)
    yield stored_family


def parse_listen(listen: str) -> tuple[str, int]:
    """The address and port of ``[daemon] metrics_listen``.

    Accepted: ``127.0.0.1:9188``, ``0.0.0.0:9188`` (every IPv4 interface), ``[::1]:9188``,
    ``localhost:9188`` (a host name), or a bare port ``9188``, which means 127.0.0.1: the
    endpoint is reachable from other machines only when an address says so. Port 0 asks the
    system for a free port.

    :returns: ``(host, port)``, an IPv6 host without its brackets.
    :raises ValueError: naming what is wrong (no port, a port outside 0–65535, an IPv6
        address without brackets).
    """
    if _PORT.fullmatch(listen):
        host, port = "127.0.0.1", listen
    else:
        host, sep, port = listen.rpartition(":")
        if not sep or not host:
            raise ValueError(f"metrics_listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9188 or [::1]:9188")
        if host.startswith("[") or host.endswith("]"):
            address = host[1:-1] if host.startswith("[") and host.endswith("]") else ""
            try:
                ipaddress.IPv6Address(address)
            except ValueError:
                raise ValueError(f"metrics_listen {listen!r}: {host} is not an IPv6 address in brackets") from None
            host = address
        elif ":" in host:
            raise ValueError(f"metrics_listen {listen!r}: an IPv6 address goes in brackets, e.g. [::1]:9188")
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise ValueError(f"metrics_listen {listen!r}: the port {port!r} is not a number from 0 to 65535")
    return host, int(port)


class MetricsServer:
    """A running metrics endpoint (``GET /metrics``, any path answers) on a daemon thread."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        #: the address and port it listens on (the real port when 0 was asked for)
        self.host: str = str(server.server_address[0])
        self.port: int = server.server_port

    def shutdown(self) -> None:
        """Stop answering, close the listening socket and wait for the server thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve_metrics(store: StateStore, listen: str) -> MetricsServer:
    """Serve the state DB's metrics in Prometheus' text format on ``listen``.

    The collector is registered on a registry of its own, so nothing else a process
    registers on prometheus_client's global one is exported, and each scrape queries
    ``store`` (see :class:`StateCollector`).

    :param listen: ``HOST:PORT`` as :func:`parse_listen` accepts it, e.g. ``"127.0.0.1:9188"``.
    :returns: the running server; call :meth:`MetricsServer.shutdown` to stop it.
    :raises ValueError: ``listen`` is not an address and port.
    :raises OSError: the address cannot be bound (in use, not an address of this host).
    """
    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(store))
    server, thread = start_http_server(port, host, registry=registry)
    log.info("metrics: serving on %s", listen)
    return MetricsServer(server, thread)
