"""Schema migrations of the state DB: whatever DB backupd opens (new, made before migrations,
already up to date, or upgraded by a newer backupd) ends at the newest revision with its rows
intact, or is refused; on SQLite and PostgreSQL alike."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, create_engine, inspect
from sqlalchemy.engine import Connection
from sqlmodel import Session, SQLModel

from backupd import migrations
from backupd.enums import SessionResult, SessionState, SessionTrigger, StopReason, TaskStatus
from backupd.errors import StateError
from backupd.state import Daemon, JobSchedule, StateStore, utcnow

DATA = Path(__file__).parent / "data"
AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _revision(store: StateStore) -> str:
    with store.engine.connect() as connection:
        return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()


def _create_tables_before_migrations(connection: Connection) -> None:
    """The tables as backupd made them before it had migrations (the DDL it ran, frozen in
    tests/unit/data), without ``alembic_version``."""
    ddl = (DATA / f"state_db_before_migrations.{connection.dialect.name}.sql").read_text()
    for statement in ddl.split(";\n"):
        if statement.strip():
            connection.exec_driver_sql(statement)


def _schema(connection: Connection) -> dict[str, Any]:
    """Every table's columns (type, nullability), primary key, foreign keys and indexes."""
    inspector = inspect(connection)
    return {
        table: {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "foreign_keys": [(fk["constrained_columns"], fk["referred_table"], fk["referred_columns"])
                             for fk in inspector.get_foreign_keys(table)],
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table)),
        }
        for table in sorted(inspector.get_table_names())
        if table != "alembic_version"
    }


def test_the_revisions_list_every_migration_in_order() -> None:
    scripts = ScriptDirectory(os.path.dirname(migrations.__file__))
    assert tuple(reversed([script.revision for script in scripts.walk_revisions()])) == migrations.REVISIONS
    assert scripts.get_current_head() == migrations.HEAD


def test_revision_0001_builds_the_tables_backupd_made_before_migrations(state_url: str) -> None:
    engine = create_engine(state_url)
    with engine.begin() as connection:
        _create_tables_before_migrations(connection)
        before = _schema(connection)
        made_then = MetaData()
        made_then.reflect(connection)
        made_then.drop_all(connection)
        command.upgrade(migrations.alembic_config(connection), "0001")
        assert _schema(connection) == before
    engine.dispose()


def test_a_new_state_db_is_at_the_newest_revision_with_the_tables_of_the_code(state_url: str) -> None:
    store = StateStore(state_url)
    assert _revision(store) == migrations.HEAD
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert differences == [], "backupd/state.py and backupd/migrations disagree"
    store.close()


def test_a_state_db_made_before_migrations_is_upgraded_with_its_rows_intact(state_url: str) -> None:
    """Given a state DB made before migrations holding an ended session with two VM tasks, when
    backupd opens it, then it is at the newest revision, the session and its tasks read as
    before, and the daemon's new columns and tables are usable."""
    engine = create_engine(state_url)
    with engine.begin() as connection:
        _create_tables_before_migrations(connection)
        tables = MetaData()
        tables.reflect(connection)
        connection.execute(tables.tables["job_session"].insert(), {
            "job": "nightly", "state": "stopped", "result": "warning", "message": "1 of 2 VMs failed",
            "full": False, "created_at": AT, "started_at": AT, "ended_at": AT + timedelta(minutes=5),
        })
        connection.execute(tables.tables["vm_task"].insert(), [
            {"session_id": 1, "position": 0, "vm": "web", "status": "success", "bytes_read": 10, "bytes_total": 10,
             "bytes_stored": 4, "restore_point": "p-web", "snapshot_id": "s-1", "snapshot_removed": True, "error": None},
            {"session_id": 1, "position": 1, "vm": "db", "status": "failed", "bytes_read": 0, "bytes_total": 20,
             "bytes_stored": 0, "restore_point": None, "snapshot_id": None, "snapshot_removed": False, "error": "disk gone"},
        ])
    engine.dispose()

    store = StateStore(state_url)

    assert _revision(store) == migrations.HEAD
    (session,) = store.sessions()
    assert (session.job, session.state, session.result, session.message) == (
        "nightly", SessionState.STOPPED, SessionResult.WARNING, "1 of 2 VMs failed")
    assert (session.created_at, session.ended_at) == (AT, AT + timedelta(minutes=5))
    assert (session.trigger, session.triggered_by, session.retry_of, session.stop_recursive) == (None, None, None, False)
    assert [(t.vm, t.status, t.restore_point, t.snapshot_removed, t.error) for t in store.tasks(session.id)] == [
        ("web", TaskStatus.SUCCESS, "p-web", True, None),
        ("db", TaskStatus.FAILED, None, False, "disk gone"),
    ]

    retry = store.create_session("nightly", ["db"], full=False)
    deadline = utcnow() + timedelta(minutes=10)
    store.update_session(retry.id, trigger=SessionTrigger.RETRY, retry_of=session.id, drain_deadline=deadline,
                         stop_recursive=True, stop_reason=StopReason.WINDOW)
    row = store.session(retry.id)
    assert (row.trigger, row.retry_of, row.drain_deadline, row.stop_recursive, row.stop_reason) == (
        SessionTrigger.RETRY, session.id, deadline, True, StopReason.WINDOW)
    with Session(store.engine) as db:
        db.add(Daemon(name="main", host="backup-1", pid=4242, config_path="/etc/backupd.toml"))
        db.add(JobSchedule(job="nightly", next_run=deadline, schedule="cron 30 22 * * 1-5 Europe/Berlin"))
        db.commit()
        assert db.get(JobSchedule, "nightly").next_run == deadline
        assert db.get(Daemon, "main").pid == 4242
    store.close()


def test_a_state_db_of_an_older_revision_is_upgraded_when_opened(state_url: str) -> None:
    store = StateStore(state_url)
    sid = store.create_session("nightly", ["a"], full=False).id
    with store.engine.begin() as connection:
        command.downgrade(migrations.alembic_config(connection), "0001")
    store.close()

    store = StateStore(state_url)
    assert _revision(store) == migrations.HEAD
    assert store.session(sid).stop_recursive is False
    store.close()


def test_an_upgrade_that_fails_half_way_leaves_the_state_db_as_it_was(state_url: str) -> None:
    """Given a DB at 0001 where 0002's ``daemon`` table cannot be created (a table of that name
    is in the way), when backupd opens it, then the open fails and none of 0002 is applied:
    the columns 0002 adds before that table are rolled back with it; once the obstacle is gone,
    the next open upgrades."""
    engine = create_engine(state_url)
    with engine.begin() as connection:
        command.upgrade(migrations.alembic_config(connection), "0001")
        connection.exec_driver_sql("CREATE TABLE daemon (name VARCHAR PRIMARY KEY)")
    with pytest.raises(StateError, match="cannot open the state DB"):
        StateStore(state_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one() == "0001"
        assert "trigger" not in {c["name"] for c in inspect(connection).get_columns("job_session")}
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE daemon")
    engine.dispose()

    store = StateStore(state_url)
    assert _revision(store) == migrations.HEAD
    store.close()


def test_a_state_db_upgraded_by_a_newer_backupd_is_refused(state_url: str) -> None:
    StateStore(state_url).close()
    engine = create_engine(state_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    engine.dispose()

    with pytest.raises(StateError, match=r"upgraded by a newer backupd \(revision 0099\); upgrade backupd"):
        StateStore(state_url)


def test_opening_an_up_to_date_state_db_does_not_load_alembic(state_url: str) -> None:
    """Every CLI command opens the state DB: once it is up to date, Alembic stays unloaded."""
    code = (
        "import sys; from backupd.state import StateStore; StateStore(sys.argv[1]).sessions(); "
        "print('alembic' in sys.modules)"
    )

    def loads_alembic() -> str:
        return subprocess.run([sys.executable, "-c", code, state_url], check=True, capture_output=True, text=True).stdout.strip()

    assert loads_alembic() == "True", "a new DB is migrated"
    assert loads_alembic() == "False", "an up-to-date DB is only checked"


def test_processes_opening_a_new_state_db_at_once_all_succeed(state_url: str, tmp_path: Path) -> None:
    """Given a new state DB, when six processes open it at the same moment (cron starting six
    jobs), then each of them creates its session, and the DB is at the newest revision."""
    gate = tmp_path / "gate"
    code = (
        "import os, sys, time\n"
        "from backupd.state import StateStore\n"
        "open(f'{sys.argv[2]}.{sys.argv[3]}.ready', 'w').close()\n"
        "while not os.path.exists(sys.argv[2]):\n"
        "    time.sleep(0.005)\n"
        "StateStore(sys.argv[1]).create_session(sys.argv[3], ['a'], full=False)\n"
    )
    jobs = [f"job-{n}" for n in range(6)]
    procs = [
        subprocess.Popen([sys.executable, "-c", code, state_url, str(gate), job], stderr=subprocess.PIPE, text=True)
        for job in jobs
    ]
    # the gate opens once every process has imported backupd, so they open the DB together
    deadline = time.monotonic() + 120
    while not all(Path(f"{gate}.{job}.ready").exists() for job in jobs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process did not get ready"
        time.sleep(0.01)
    gate.touch()
    failures = [(job, proc.wait(timeout=120), proc.stderr.read()) for job, proc in zip(jobs, procs)]
    assert [f for f in failures if f[1] != 0] == []
    store = StateStore(state_url)
    assert sorted(s.job for s in store.sessions()) == jobs
    assert _revision(store) == migrations.HEAD
    store.close()


def test_a_new_sqlite_state_db_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    StateStore(f"sqlite:///{tmp_path}/state.db").close()
    assert oct(os.stat(tmp_path / "state.db").st_mode & 0o777) == oct(0o600)
    with create_engine(f"sqlite:///{tmp_path}/state.db").connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_revision_0003_gives_vm_tasks_a_vm_id_and_keeps_older_tasks(state_url: str) -> None:
    """Given a DB at 0002 holding a VM task (tasks then knew their VM by name only), when
    backupd opens it, then the task reads as before with no VM id, and new tasks record one."""
    store = StateStore(state_url)
    old = store.create_session("nightly", ["web"], full=False)
    with store.engine.begin() as connection:
        command.downgrade(migrations.alembic_config(connection), "0002")
        assert "vm_id" not in {c["name"] for c in inspect(connection).get_columns("vm_task")}
    store.close()

    store = StateStore(state_url)
    assert _revision(store) == migrations.HEAD
    [task] = store.tasks(old.id)
    assert (task.vm, task.vm_id) == ("web", None)
    store.update_task(task.id, vm_id="4211c0de-5b39-8a0e-77f3-0123456789ab")
    assert store.tasks(old.id)[0].vm_id == "4211c0de-5b39-8a0e-77f3-0123456789ab"
    store.close()
