"""Units of the engine: CBT extents to blocks, the retry policy, stop requests and VM locks."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from backupd.config import RetryConfig
from backupd.enums import SessionResult, SessionState, StopMode, TaskStatus
from backupd.retry import call_with_retry
from backupd.state import StateStore, utcnow
from backupd.vmtask import blocks_of
from providers.base import Extent, SnapshotError, TransientProviderError

MIB = 1 << 20


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("extents", "capacity", "expected"),
    [
        ([], 8 * MIB, []),
        ([Extent(0, MIB)], 8 * MIB, [0]),
        ([Extent(MIB - 1, 2)], 8 * MIB, [0, 1]),  # straddles a block boundary
        ([Extent(5, 10), Extent(100, 3)], 8 * MIB, [0]),  # several extents in one block
        ([Extent(3 * MIB, 2 * MIB), Extent(0, 1)], 8 * MIB, [0, 3, 4]),  # unsorted input
        ([Extent(7 * MIB, 4 * MIB)], 8 * MIB, [7]),  # clipped at the end of the disk
        ([Extent(0, 10 * MIB + 1)], 10 * MIB + 1, list(range(11))),  # short last block
    ],
)
def test_changed_extents_map_to_every_block_they_touch(extents, capacity, expected) -> None:
    assert blocks_of(extents, MIB, capacity) == expected


def flaky(failures: int, error: Exception) -> tuple[list[int], object]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise error
        return "done"

    return calls, fn


def test_transient_errors_are_retried_up_to_the_attempts() -> None:
    calls, fn = flaky(2, TransientProviderError("busy"))
    assert call_with_retry(fn, RetryConfig(attempts=3, wait_seconds=0)) == "done"
    assert len(calls) == 3


def test_the_last_transient_error_is_raised_when_attempts_run_out() -> None:
    calls, fn = flaky(5, TransientProviderError("busy"))
    with pytest.raises(TransientProviderError):
        call_with_retry(fn, RetryConfig(attempts=3, wait_seconds=0))
    assert len(calls) == 3


def test_other_provider_errors_are_not_retried() -> None:
    calls, fn = flaky(1, SnapshotError("no space"))
    with pytest.raises(SnapshotError):
        call_with_retry(fn, RetryConfig(attempts=3, wait_seconds=0))
    assert len(calls) == 1


def test_an_immediate_stop_ends_retrying_and_its_wait_at_once() -> None:
    cancel = threading.Event()
    calls, fn = flaky(10, TransientProviderError("busy"))
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(TransientProviderError):
        call_with_retry(fn, RetryConfig(attempts=10, wait_seconds=30), cancel=cancel)
    assert len(calls) == 1  # woken from the 30 s wait, no further attempt


@pytest.fixture
def store(state_url: str) -> Iterator[StateStore]:
    """A new state DB, SQLite and PostgreSQL in turn."""
    the_store = StateStore(state_url)
    yield the_store
    the_store.close()


def test_both_state_dbs_commit_without_waiting_for_a_disk_flush(store: StateStore) -> None:
    """The same durability on both (docs/design.md): SQLite's WAL with synchronous=NORMAL,
    PostgreSQL's synchronous_commit=off, on every connection of the pool."""
    with store.engine.connect() as connection:
        if store.engine.dialect.name == "sqlite":
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        else:
            assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"


def test_a_task_record_sets_its_columns_adds_its_log_lines_and_releases_its_lock_at_once(store: StateStore) -> None:
    """What a VM task writes at its lock and at its end, on both state DBs (on PostgreSQL one
    statement each, on SQLite one transaction): all of it, or, for a lock another session
    holds, nothing."""
    first = store.create_session("nightly", ["web"], full=False).id
    second = store.create_session("weekly", ["web"], full=False).id
    task, other = store.tasks(first)[0], store.tasks(second)[0]

    assert store.try_lock_vm("lab/web-id", first, task=task.id, vm_id="web-id", stage="snapshot") is None
    assert store.try_lock_vm("lab/web-id", second, task=other.id, vm_id="web-id", stage="snapshot") == first
    assert (store.task(task.id).vm_id, store.task(task.id).stage) == ("web-id", "snapshot")
    assert (store.task(other.id).vm_id, store.task(other.id).stage) == (None, None), "a lock not taken sets nothing"

    store.update_task(task.id, notes=["snapshot 7 removed", "retention removed 1 restore point(s): p"],
                      unlock=("lab/web-id", first), status=TaskStatus.SUCCESS, stage="done")
    assert (store.task(task.id).status, store.task(task.id).stage) == (TaskStatus.SUCCESS, "done")
    assert [(line.vm, line.level, line.text) for line in store.log_lines(first)] == [
        ("web", "info", "snapshot 7 removed"), ("web", "info", "retention removed 1 restore point(s): p")]
    assert store.try_lock_vm("lab/web-id", second, task=other.id, vm_id="web-id", stage="snapshot") is None


def test_a_new_session_starts_with_pending_tasks_in_config_order(store: StateStore) -> None:
    session = store.create_session("nightly", ["b", "a", "c"], full=False)
    assert session.state is SessionState.STARTING and session.result is None
    assert [(t.position, t.vm, t.status.value) for t in store.tasks(session.id)] == [
        (0, "b", "pending"), (1, "a", "pending"), (2, "c", "pending"),
    ]


def test_an_immediate_stop_escalates_a_graceful_one_and_is_never_weakened(store: StateStore) -> None:
    sid = store.create_session("nightly", ["a"], full=False).id
    assert store.request_stop(sid, StopMode.GRACEFUL, "maintenance") == ("stop_requested", StopMode.GRACEFUL)
    assert store.request_stop(sid, StopMode.IMMEDIATE, None) == ("stop_requested", StopMode.IMMEDIATE)
    assert store.request_stop(sid, StopMode.GRACEFUL, None) == ("stop_requested", StopMode.IMMEDIATE)
    row = store.session(sid)
    assert (row.stop_mode, row.stop_message) == (StopMode.IMMEDIATE, "maintenance")


def test_a_vm_lock_is_exclusive_until_released_or_its_session_ends(store: StateStore) -> None:
    first = store.create_session("a", ["vm"], full=False).id
    second = store.create_session("b", ["vm"], full=False).id
    assert store.try_lock_vm("lab/vm", first) is None
    assert store.try_lock_vm("lab/vm", first) is None  # re-entrant for its holder
    assert store.try_lock_vm("lab/vm", second) == first
    store.release_vm("lab/vm", first)
    assert store.try_lock_vm("lab/vm", second) is None
    store.update_session(second, state=SessionState.STOPPED, result=SessionResult.FAILED)
    assert store.try_lock_vm("lab/vm", first) is None  # taken over from an ended session


def test_a_session_whose_runner_process_ended_is_dead(store: StateStore) -> None:
    import socket
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    sid = store.create_session("nightly", ["a", "b"], full=False).id
    store.update_session(sid, owner_host=socket.gethostname(), owner_pid=child.pid, state=SessionState.WORKING)
    assert [row.id for row in store.dead_sessions()] == [sid]


def test_a_zombie_runner_is_dead_though_its_pid_still_exists(store: StateStore) -> None:
    """A killed runner whose parent has not reaped it (a container's PID 1, a supervisor)."""
    import signal
    import socket
    import subprocess

    from backupd.state import pid_alive

    child = subprocess.Popen(["sleep", "600"])
    try:
        child.send_signal(signal.SIGKILL)
        # not reaped yet: the pid exists as a zombie until child.wait()
        wait_until(lambda: _process_state(child.pid) == "Z")
        os.kill(child.pid, 0)  # the pid still answers a signal check
        assert not pid_alive(child.pid)
        sid = store.create_session("nightly", ["a"], full=False).id
        store.update_session(sid, owner_host=socket.gethostname(), owner_pid=child.pid, heartbeat_at=utcnow())
        assert [row.id for row in store.dead_sessions()] == [sid]
    finally:
        child.wait()


def test_a_runner_whose_heartbeat_stopped_is_dead_even_if_its_pid_lives(store: StateStore) -> None:
    """A runner on another host is dead after three heartbeat intervals without one (its pid
    means nothing here); one on this host whose process lives only after the longer local
    limit (a hung runner, or a pid reused by another process), so a heartbeat that a loaded
    machine delays is not taken for a death."""
    import socket

    from backupd.state import HEARTBEAT_SECONDS, STALE_HEARTBEAT_SECONDS, STALE_LOCAL_HEARTBEAT_SECONDS

    assert STALE_HEARTBEAT_SECONDS == 3 * HEARTBEAT_SECONDS
    here, pid = socket.gethostname(), os.getpid()
    jobs = ["fresh", "late-here", "hung", "fresh-elsewhere", "late-elsewhere"]
    ids = {job: store.create_session(job, ["a"], full=False).id for job in jobs}
    between = utcnow() - timedelta(seconds=STALE_HEARTBEAT_SECONDS + 2)
    assert STALE_HEARTBEAT_SECONDS + 2 < STALE_LOCAL_HEARTBEAT_SECONDS
    local_old = utcnow() - timedelta(seconds=STALE_LOCAL_HEARTBEAT_SECONDS + 1)
    store.update_session(ids["fresh"], owner_host=here, owner_pid=pid, heartbeat_at=utcnow())
    store.update_session(ids["late-here"], owner_host=here, owner_pid=pid, heartbeat_at=between)
    store.update_session(ids["hung"], owner_host=here, owner_pid=pid, heartbeat_at=local_old)
    store.update_session(ids["fresh-elsewhere"], owner_host="proxy-7", owner_pid=1, heartbeat_at=utcnow())
    store.update_session(ids["late-elsewhere"], owner_host="proxy-7", owner_pid=1, heartbeat_at=between)
    assert [row.id for row in store.dead_sessions()] == [ids["hung"], ids["late-elsewhere"]]


def test_a_stop_request_for_an_ended_session_changes_nothing(store: StateStore) -> None:
    sid = store.create_session("nightly", ["a"], full=False).id
    store.end_session(sid, SessionResult.SUCCESS, None, unfinished=TaskStatus.NOT_PROCESSED)
    assert store.request_stop(sid, StopMode.IMMEDIATE, "too late") == ("ended", None)
    row = store.session(sid)
    assert (row.stop_mode, row.stop_message) == (None, None)


def test_a_stop_after_every_vm_finished_is_too_late_and_changes_nothing(store: StateStore) -> None:
    sid = store.create_session("nightly", ["a", "b"], full=False).id
    for task in store.tasks(sid):
        store.update_task(task.id, status=TaskStatus.SUCCESS)
    assert store.request_stop(sid, StopMode.IMMEDIATE, "now") == ("too_late", None)
    assert store.session(sid).stop_mode is None


def test_a_session_ends_only_if_the_stop_mode_is_still_the_one_its_result_saw(store: StateStore) -> None:
    sid = store.create_session("nightly", ["a"], full=False).id
    store.request_stop(sid, StopMode.IMMEDIATE, None)
    assert not store.end_session(sid, SessionResult.SUCCESS, None, unfinished=TaskStatus.NOT_PROCESSED,
                                 if_stop_mode=None)
    assert store.session(sid).state is SessionState.STARTING
    assert store.end_session(sid, SessionResult.FAILED, "stopped", unfinished=TaskStatus.NOT_PROCESSED,
                             if_stop_mode=StopMode.IMMEDIATE)
    assert not store.end_session(sid, SessionResult.SUCCESS, None, unfinished=TaskStatus.NOT_PROCESSED)
    assert store.session(sid).result is SessionResult.FAILED


def test_working_never_overwrites_a_stopping_written_meanwhile(store: StateStore) -> None:
    sid = store.create_session("nightly", ["a"], full=False).id
    assert store.advance_session(sid, from_state=SessionState.STARTING, to_state=SessionState.STOPPING)
    assert not store.advance_session(sid, from_state=SessionState.STARTING, to_state=SessionState.WORKING)
    assert store.session(sid).state is SessionState.STOPPING


def test_ending_a_session_marks_only_its_unfinished_tasks(store: StateStore) -> None:
    sid = store.create_session("nightly", ["a", "b"], full=False).id
    first = store.tasks(sid)[0]
    store.update_task(first.id, status=TaskStatus.SUCCESS)
    store.end_session(sid, SessionResult.WARNING, "stopped", unfinished=TaskStatus.NOT_PROCESSED)
    assert [t.status for t in store.tasks(sid)] == [TaskStatus.SUCCESS, TaskStatus.NOT_PROCESSED]
    row = store.session(sid)
    assert (row.state, row.result, row.message) == (SessionState.STOPPED, SessionResult.WARNING, "stopped")


def test_a_session_whose_creator_died_before_any_runner_started_is_ended(state_url: str) -> None:
    """``job start`` killed between creating the session and starting its runner."""
    import subprocess
    import sys

    code = f"from backupd.state import StateStore; StateStore({state_url!r}).create_session('nightly', ['a'], full=False)"
    subprocess.run([sys.executable, "-c", code], check=True)
    store = StateStore(state_url)
    (session,) = store.sessions()
    assert [row.id for row in store.dead_sessions()] == [session.id]


def test_states_are_stored_in_the_vocabulary_words(store: StateStore) -> None:
    sid = store.create_session("nightly", ["a"], full=False).id
    store.request_stop(sid, StopMode.GRACEFUL, None)
    with store.engine.connect() as connection:
        from sqlalchemy import text

        row = connection.execute(text("select state, stop_mode from job_session")).one()
        status = connection.execute(text("select status from vm_task")).scalar_one()
    assert (tuple(row), status) == (("starting", "graceful"), "pending")


def test_a_state_db_password_never_appears_in_an_error(postgresql_url: str) -> None:
    """Given a server URL with a password (as ``password_env`` fills it in), when the DB
    cannot be opened, then the error names the DB but neither it nor its causes show the
    password."""
    import traceback

    from sqlalchemy.engine import make_url

    from backupd.errors import StateError

    url = make_url(postgresql_url).set(password="s3cret-pw", database="backupd_no_such_db")
    with pytest.raises(StateError) as caught:
        StateStore(url.render_as_string(hide_password=False))
    assert "backupd_no_such_db" in str(caught.value)
    assert "s3cret-pw" not in "".join(traceback.format_exception(caught.value))


def _process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as file:
        stat = file.read()
    return stat[stat.rfind(")") + 2]


def _rows(store: StateStore) -> dict[str, list[tuple]]:
    from sqlalchemy import text

    with store.engine.connect() as connection:
        return {table: sorted(map(tuple, connection.execute(text(f"select * from {table}"))))
                for table in ("job_session", "vm_task", "session_log", "vm_lock")}


def test_warming_up_changes_nothing_and_compiles_what_a_session_records_of_itself(
        store: StateStore, caplog: pytest.LogCaptureFixture) -> None:
    """What the daemon's fork server runs before it forks session processes: every row stays
    as it was, and a child's session records (claim, start, log lines, end) and its VM tasks'
    records find their statements compiled (SQLAlchemy logs "[cached since ...]" instead of
    "[generated in ...]", its documented cache statistics)."""
    from backupd.vmtask import TASK_RECORDS

    first = store.create_session("nightly", ["web", "db"], full=False).id
    store.try_lock_vm("lab/web-id", first)
    store.update_task(store.tasks(first)[0].id, notes=["snapshot 7 created"], stage="transfer")
    store.end_session(store.create_session("weekly", ["web"], full=False).id, SessionResult.FAILED, "x",
                      unfinished=TaskStatus.FAILED)
    before = _rows(store)

    store.warm_up(TASK_RECORDS)
    assert _rows(store) == before

    caplog.set_level("INFO", logger="sqlalchemy.engine.Engine")
    second = store.create_session("nightly", ["db"], full=False).id
    task = store.tasks(second)[0].id
    caplog.clear()
    store.claim_session(second)
    store.advance_session(second, from_state=SessionState.STARTING, to_state=SessionState.WORKING)
    store.log(second, "session started: job nightly, 1 VMs")
    assert store.try_lock_vm("lab/db-id", second, task=task, stage="snapshot", started_at=utcnow(),
                             status=TaskStatus.RUNNING, vm_id="db-id") is None
    store.update_task(task, notes=["snapshot 8 created"], snapshot_id="8", stage="transfer")
    store.update_task(task, notes=["snapshot 8 removed"], unlock=("lab/db-id", second), bytes_read=0,
                      bytes_stored=0, ended_at=utcnow(), mode="incremental", restore_point="p", snapshot_removed=True,
                      stage="done", status=TaskStatus.SUCCESS, warning=None)
    assert store.end_session(second, SessionResult.SUCCESS, None, unfinished=TaskStatus.NOT_PROCESSED, if_stop_mode=None)
    statistics = [record.getMessage() for record in caplog.records if record.getMessage().startswith("[")]
    assert len(statistics) >= 8, statistics
    assert [line for line in statistics if "generated in" in line and "UPDATE vm_task SET" not in line] == []
