"""The metrics endpoint: figures read from the state DB at scrape time, over real HTTP."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backupd.enums import SessionResult, SessionState, TaskStatus
from backupd.metrics import parse_listen, serve_metrics
from backupd.recovery import ORPHAN_REMOVED
from backupd.state import StateStore

T0 = datetime(2025, 3, 1, 22, 0, tzinfo=timezone.utc)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[Samples, set[str]]:
    """The endpoint's samples, keyed by (sample name, labels), and the family names."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples, families


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def ended_session(
    store: StateStore, job: str, result: SessionResult, *, start_minute: int, seconds: float,
    tasks: list[tuple[TaskStatus, int, int]],
) -> int:
    """A session that ran ``seconds`` from T0 + ``start_minute``; its VM tasks have the given
    (status, bytes read, bytes stored)."""
    session = store.create_session(job, [f"vm-{i}" for i in range(len(tasks))], full=False).id
    for task, (status, read, stored) in zip(store.tasks(session), tasks):
        store.update_task(task.id, status=status, bytes_read=read, bytes_stored=stored)
    store.end_session(session, result, None, unfinished=TaskStatus.FAILED)
    started = T0 + timedelta(minutes=start_minute)
    store.update_session(session, started_at=started, ended_at=started + timedelta(seconds=seconds))
    return session


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    """Two jobs: nightly with a success, then a failure that left a snapshot and whose
    session removed two orphaned snapshots; weekly with a warning and a running session."""
    store = StateStore(f"sqlite:///{tmp_path}/state.db")
    ended_session(store, "nightly", SessionResult.SUCCESS, start_minute=0, seconds=600,
                  tasks=[(TaskStatus.SUCCESS, 1000, 100), (TaskStatus.SUCCESS, 2000, 200)])
    failed = ended_session(store, "nightly", SessionResult.FAILED, start_minute=60, seconds=90.5,
                           tasks=[(TaskStatus.FAILED, 300, 0), (TaskStatus.NOT_PROCESSED, 0, 0)])
    store.update_task(store.tasks(failed)[0].id, snapshot_id="snap-9", snapshot_error="host not responding")
    store.log(failed, f"{ORPHAN_REMOVED} snap-1 left by session 1", vm="vm-0")
    store.log(failed, f"{ORPHAN_REMOVED} snap-2 (backupd-nightly-1) that session 1 created but never recorded")
    store.log(failed, "orphaned snapshot snap-3 of session 1 could not be removed: timeout", level="warning")
    ended_session(store, "weekly", SessionResult.WARNING, start_minute=0, seconds=42,
                  tasks=[(TaskStatus.WARNING, 5000, 700)])
    running = store.create_session("weekly", ["vm-0"], full=False).id
    store.update_session(running, state=SessionState.WORKING)
    store.update_task(store.tasks(running)[0].id, status=TaskStatus.RUNNING, bytes_read=250)
    return store


@pytest.fixture
def port(store: StateStore) -> Iterator[int]:
    server = serve_metrics(store, "127.0.0.1:0")
    yield server.port
    server.shutdown()


def test_a_scrape_reports_sessions_tasks_bytes_and_times_of_every_job(store: StateStore, port: int) -> None:
    """Given two jobs' sessions in the state DB, when Prometheus scrapes, then every figure
    is the state DB's, per job, with zeros for what has not happened yet."""
    samples, _ = scrape(port)

    assert value(samples, "backupd_sessions_total", job="nightly", result="success") == 1
    assert value(samples, "backupd_sessions_total", job="nightly", result="failed") == 1
    assert value(samples, "backupd_sessions_total", job="nightly", result="warning") == 0
    assert value(samples, "backupd_sessions_total", job="weekly", result="warning") == 1
    assert value(samples, "backupd_sessions_running", job="weekly") == 1
    assert value(samples, "backupd_sessions_running", job="nightly") == 0

    assert value(samples, "backupd_vm_tasks_total", job="nightly", status="success") == 2
    assert value(samples, "backupd_vm_tasks_total", job="nightly", status="failed") == 1
    assert value(samples, "backupd_vm_tasks_total", job="nightly", status="not_processed") == 1
    assert value(samples, "backupd_vm_tasks_total", job="nightly", status="cancelled") == 0
    assert value(samples, "backupd_vm_tasks_total", job="weekly", status="warning") == 1
    assert not [key for key in samples if key[0] == "backupd_vm_tasks_total" and ("status", "running") in key[1]]

    assert value(samples, "backupd_read_bytes_total", job="nightly") == 3300
    assert value(samples, "backupd_read_bytes_total", job="weekly") == 5250  # the running task's bytes so far
    assert value(samples, "backupd_stored_bytes_total", job="nightly") == 300
    assert value(samples, "backupd_stored_bytes_total", job="weekly") == 700

    assert value(samples, "backupd_session_duration_seconds", job="nightly") == 90.5  # the last one ended
    assert value(samples, "backupd_session_duration_seconds", job="weekly") == 42
    assert value(samples, "backupd_last_success_timestamp_seconds", job="nightly") == (
        (T0 + timedelta(seconds=600)).timestamp()
    )
    assert ("backupd_last_success_timestamp_seconds", frozenset({("job", "weekly")})) not in samples

    assert value(samples, "backupd_snapshot_removals_failed", job="nightly") == 1
    assert value(samples, "backupd_snapshot_removals_failed", job="weekly") == 0
    assert value(samples, "backupd_orphaned_snapshots_removed_total", job="nightly") == 2
    assert value(samples, "backupd_orphaned_snapshots_removed_total", job="weekly") == 0
    assert value(samples, "backupd_state_db_up") == 1


def test_each_scrape_reads_what_other_processes_wrote_since(store: StateStore, port: int) -> None:
    """Sessions run in processes of their own: a session that ends between two scrapes
    shows in the second, and a snapshot a later session removed stops counting."""
    scrape(port)
    running = store.running_sessions("weekly")[0].id
    task = store.tasks(running)[0]
    store.update_task(task.id, status=TaskStatus.SUCCESS, snapshot_id="snap-5", snapshot_removed=True)
    store.end_session(running, SessionResult.SUCCESS, None, unfinished=TaskStatus.FAILED)
    nightly_snapshot = store.unremoved_snapshots("nightly")[0]
    store.update_task(nightly_snapshot.id, snapshot_removed=True)

    samples, _ = scrape(port)

    assert value(samples, "backupd_sessions_running", job="weekly") == 0
    assert value(samples, "backupd_sessions_total", job="weekly", result="success") == 1
    assert value(samples, "backupd_vm_tasks_total", job="weekly", status="success") == 1
    assert value(samples, "backupd_last_success_timestamp_seconds", job="weekly") > 0
    assert value(samples, "backupd_snapshot_removals_failed", job="nightly") == 0


def test_a_figure_that_cannot_be_read_is_left_out_and_the_rest_exported(
    store: StateStore, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a state DB whose session log table is gone, a scrape still answers: the other
    figures, ``backupd_state_db_up`` 0, and one warning however many scrapes fail."""
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE session_log")

    with caplog.at_level(logging.WARNING, logger="backupd.metrics"):
        samples, families = scrape(port)
        scrape(port)

    assert value(samples, "backupd_state_db_up") == 0
    assert "backupd_orphaned_snapshots_removed" not in families
    assert value(samples, "backupd_sessions_total", job="nightly", result="success") == 1
    [warning] = [r.getMessage() for r in caplog.records if r.name == "backupd.metrics"]
    assert warning.startswith("metrics: cannot read the state DB") and "no such table: session_log" in warning


def test_an_unreadable_state_db_gives_an_error_gauge_not_a_failed_scrape(tmp_path: Path) -> None:
    """Given a state DB file that is no database any more, a scrape answers 200 with
    ``backupd_state_db_up`` 0 and nothing else."""
    database = tmp_path / "state.db"
    store = StateStore(f"sqlite:///{database}")
    store.engine.dispose()
    for leftover in tmp_path.glob("state.db-*"):
        leftover.unlink()
    database.write_bytes(b"this is not a database " * 200)
    server = serve_metrics(store, "127.0.0.1:0")
    try:
        samples, families = scrape(server.port)
    finally:
        server.shutdown()

    assert families == {"backupd_state_db_up"}
    assert value(samples, "backupd_state_db_up") == 0


def test_shutdown_frees_the_port(store: StateStore) -> None:
    server = serve_metrics(store, "127.0.0.1:0")
    port = server.port
    server.shutdown()

    again = serve_metrics(store, f"127.0.0.1:{port}")
    again.shutdown()


@pytest.mark.parametrize(
    "listen, expected",
    [
        ("127.0.0.1:9188", ("127.0.0.1", 9188)),
        ("0.0.0.0:9188", ("0.0.0.0", 9188)),
        ("[::1]:9188", ("::1", 9188)),
        ("[::]:0", ("::", 0)),
        ("localhost:9188", ("localhost", 9188)),
        ("9188", ("127.0.0.1", 9188)),  # a bare port listens on this host only
    ],
)
def test_listen_addresses(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    "listen, problem",
    [
        ("127.0.0.1", "expected HOST:PORT"),
        (":9188", "expected HOST:PORT"),
        ("127.0.0.1:http", "the port 'http' is not a number from 0 to 65535"),
        ("127.0.0.1:65536", "the port '65536' is not a number from 0 to 65535"),
        ("::1:9188", "an IPv6 address goes in brackets"),
        ("[::1:9188", "is not an IPv6 address in brackets"),
        ("[web-01]:9188", "is not an IPv6 address in brackets"),
    ],
)
def test_listen_mistakes_are_named(listen: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as raised:
        parse_listen(listen)
    assert repr(listen) in str(raised.value)
