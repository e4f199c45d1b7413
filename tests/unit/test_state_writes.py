"""Writes to a SQLite state DB from many threads of one process (a session's VM tasks and its
control thread) take turns in the process instead of in SQLite's busy handler, whose sleeps
(1, 2, 5, 10 ms and more) were a large part of a VM task's overhead."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import event

from backupd.enums import TaskStatus
from backupd.state import StateStore

THREADS = 8
WRITES = 25


def _store_that_never_waits_in_sqlite(tmp_path: Path) -> StateStore:
    """A SQLite store whose connections have no busy timeout: two writers that meet in SQLite
    fail at once with "database is locked" instead of sleeping."""
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")

    @event.listens_for(store.engine, "connect")
    def no_busy_timeout(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=0")
        cursor.close()

    store.engine.dispose()  # connections made before the listener had the timeout
    return store


def _run_threads(target) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(number: int) -> None:
        try:
            target(number)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)  # a deadlock guard, not a speed bound
        assert not thread.is_alive(), "a writer thread hung"
    return errors


def test_writes_of_many_threads_never_meet_in_sqlite(tmp_path):
    store = _store_that_never_waits_in_sqlite(tmp_path)
    session = store.create_session("nightly", [f"vm-{n}" for n in range(THREADS)], full=False)
    tasks = store.tasks(session.id)

    def work(number: int) -> None:
        task = tasks[number]
        for step in range(WRITES):
            store.update_task(task.id, notes=[f"step {step}"], bytes_read=step)
            store.log(session.id, f"line {step}", vm=task.vm)
        store.update_task(task.id, status=TaskStatus.SUCCESS)

    assert _run_threads(work) == []
    assert {task.status for task in store.tasks(session.id)} == {TaskStatus.SUCCESS}
    assert {task.bytes_read for task in store.tasks(session.id)} == {WRITES - 1}
    lines = store.log_lines(session.id)
    assert len(lines) == THREADS * WRITES * 2
    assert {(line.vm, line.level) for line in lines if line.text.startswith("step ")} == {
        (task.vm, "info") for task in tasks}, "a note goes under its task's VM"


def test_threads_racing_for_one_vm_lock_give_it_to_exactly_one(tmp_path):
    store = _store_that_never_waits_in_sqlite(tmp_path)
    sessions = [store.create_session(f"job-{n}", ["vm"], full=False).id for n in range(THREADS)]
    answers: dict[int, int | None] = {}

    def take(number: int) -> None:
        answers[sessions[number]] = store.try_lock_vm("sim/vm-id", sessions[number])

    assert _run_threads(take) == []
    winners = [session for session, holder in answers.items() if holder is None]
    assert len(winners) == 1
    assert all(holder == winners[0] for holder in answers.values() if holder is not None)
