"""The state DB: job sessions, VM tasks, session log lines, VM locks, the daemon and its job
schedules (SQLModel).

The state DB is the control plane. A runner writes its session's progress here as it happens;
``backupd job stop`` writes a stop request onto the session row from any process, and the
runner that owns the session polls for it. SQLite (WAL mode, so readers never block the runner)
is the embedded default; PostgreSQL (psycopg 3) is the multi-daemon option. The schema is
brought to the newest revision of :mod:`backupd.migrations` whenever the DB is opened.

Restore points are not mirrored here: the repository's manifests are their single source of
truth (see docs/design.md); a VM task records the id of the restore point it committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import socket
import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from sqlalchemy import Column, Enum, bindparam, case, delete, event, false, func, insert, literal, union_all, update
from sqlalchemy.sql import Executable
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError
from sqlmodel import Field, Session, SQLModel, create_engine, select

from backupd import migrations
from backupd.enums import SessionResult, SessionState, SessionTrigger, StopMode, StopReason, TaskStatus
from backupd.errors import NotFoundError, StateError


def _stored_as_value(enum: type, *, nullable: bool) -> Any:
    """A column storing an enum's lower-case value (``"stopped"``), not its Python name, so
    the DB reads in the vocabulary's words for anyone querying it directly."""
    return Field(
        sa_column=Column(
            Enum(enum, values_callable=lambda members: [m.value for m in members], native_enum=False, length=16),
            nullable=nullable,
        )
    )


#: seconds between two heartbeats of a session's runner, and of the daemon
HEARTBEAT_SECONDS = 5.0
#: a runner (or daemon) on another host is gone once its heartbeat is older than three
#: heartbeat intervals: its process cannot be looked at from here
STALE_HEARTBEAT_SECONDS = 3 * HEARTBEAT_SECONDS
#: a runner (or daemon) on this host is gone once its process has ended; one whose process
#: lives is taken for hung (or its pid for reused) only when its heartbeat is older than
#: this: on a machine loaded with sessions a heartbeat can be late by many seconds, and
#: taking a working runner for dead would fail its session
STALE_LOCAL_HEARTBEAT_SECONDS = 60.0
#: the default of :meth:`StateStore.end_session`'s ``if_stop_mode``: end whatever the stop mode
ANY_STOP_MODE = object()


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """A datetime read from the state DB, timezone-aware UTC: a naive one (as SQLModel before
    0.0.45 returned them from SQLite) was stored as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class JobSession(SQLModel, table=True):
    """One run of a job."""

    __tablename__ = "job_session"

    id: int | None = Field(default=None, primary_key=True)
    job: str = Field(index=True)
    state: SessionState = _stored_as_value(SessionState, nullable=False)
    result: SessionResult | None = _stored_as_value(SessionResult, nullable=True)
    #: why the session ended as it did, e.g. "Operation was canceled by user"
    message: str | None = None
    #: every VM transferred in full, whatever CBT allows (``job start --full``)
    full: bool = False
    stop_mode: StopMode | None = _stored_as_value(StopMode, nullable=True)
    stop_message: str | None = None
    stop_requested_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    ended_at: datetime | None = None
    #: the runner process owning the session, so a dead runner can be told from a live one
    owner_host: str | None = None
    owner_pid: int | None = None
    heartbeat_at: datetime | None = None
    #: what started the session; None (a session older than the daemon) means manual
    trigger: SessionTrigger | None = _stored_as_value(SessionTrigger, nullable=True)
    #: the session whose end started this one (a chained job)
    triggered_by: int | None = None
    #: the session whose failed VMs this one processes again
    retry_of: int | None = None
    #: when a graceful stop escalates to immediate (the end of its drain period)
    drain_deadline: datetime | None = None
    #: the stop also stops the sessions this one's chain started, and keeps chained jobs not
    #: yet started from starting
    stop_recursive: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    stop_reason: StopReason | None = _stored_as_value(StopReason, nullable=True)


class VmTask(SQLModel, table=True):
    """The processing of one VM inside a session."""

    __tablename__ = "vm_task"

    id: int | None = Field(default=None, primary_key=True)
    session_id: int = Field(foreign_key="job_session.id", index=True)
    #: index in the job's VM list (processing order)
    position: int
    #: the VM's name in the job (what the task looks it up by)
    vm: str
    #: the VM's stable id (:attr:`providers.base.VmInfo.id`) once the task found the VM
    vm_id: str | None = None
    status: TaskStatus = _stored_as_value(TaskStatus, nullable=False)
    #: what the task is doing now: waiting, snapshot, transfer, commit, remove_snapshot, done
    stage: str | None = None
    mode: str | None = None
    #: bytes read from the provider so far / to read in all
    bytes_read: int = 0
    bytes_total: int = 0
    #: compressed bytes this task newly added to the repository
    bytes_stored: int = 0
    restore_point: str | None = None
    snapshot_id: str | None = None
    snapshot_removed: bool = False
    snapshot_error: str | None = None
    error: str | None = None
    warning: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    #: when the task was handed to the broker for a backup proxy (None: it ran in the session's process)
    dispatched_at: datetime | None = None
    #: the backup proxy that processed it: its host id and process id
    proxy_host: str | None = None
    proxy_pid: int | None = None


class SessionLog(SQLModel, table=True):
    """A line of a session's log, shown by ``session show``."""

    __tablename__ = "session_log"

    id: int | None = Field(default=None, primary_key=True)
    session_id: int = Field(foreign_key="job_session.id", index=True)
    at: datetime = Field(default_factory=utcnow)
    level: str = "info"
    vm: str | None = None
    text: str


class VmLock(SQLModel, table=True):
    """A VM being processed: one row per (provider, VM id), keyed ``provider/vm id``, so two
    sessions never process the same VM at once, whatever it is called in each job."""

    __tablename__ = "vm_lock"

    key: str = Field(primary_key=True)
    session_id: int
    acquired_at: datetime = Field(default_factory=utcnow)


class Daemon(SQLModel, table=True):
    """The daemon that runs the schedules: one row (``name`` "main"), with its process and
    heartbeat, so a second daemon can tell a live one from a dead one as recovery does a
    session's runner (:meth:`StateStore.dead_sessions`)."""

    __tablename__ = "daemon"

    name: str = Field(primary_key=True)
    host: str
    pid: int
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow)
    #: the config file the daemon runs with
    config_path: str


class JobSchedule(SQLModel, table=True):
    """When the daemon next starts a job, as worked out from the job's schedule."""

    __tablename__ = "job_schedule"

    job: str = Field(primary_key=True)
    #: the next start, timezone-aware UTC; None while the job has no next start
    next_run: datetime | None = None
    #: the schedule in words, e.g. "cron 30 22 * * 1-5 Europe/Berlin"
    schedule: str | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class Proxy(SQLModel, table=True):
    """A backup proxy (``backupd proxy``): one row per proxy process, beating every few
    seconds, read by ``proxy list`` and by sessions looking for live proxies of a pool."""

    __tablename__ = "proxy"

    #: ``HOST/PID``
    name: str = Field(primary_key=True)
    host: str
    pid: int
    pool: str = Field(index=True)
    #: VM tasks it runs at most at once (``--max-tasks``)
    capacity: int
    #: VM tasks running now, and the most it ever ran at once
    running: int = 0
    peak_running: int = 0
    #: ``up``; ``paused`` (it cannot reach the broker or took no work for another reason, see
    #: ``note``); ``stopped`` (it exited)
    status: str = "up"
    note: str | None = None
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow)


# -- the statements every VM task runs many times ---------------------------------------------
# Built once as Core statements with bound parameters, so a call costs the execution only:
# building an ORM update and its cache key per call was most of a VM task's state DB time
# (0.12 against 0.04 ms per update on SQLite, 0.26 against 0.07 with a log line).

_TASKS = VmTask.__table__  # type: ignore[attr-defined]
_LOG = SessionLog.__table__  # type: ignore[attr-defined]
_LOCKS = VmLock.__table__  # type: ignore[attr-defined]
_SESSIONS = JobSession.__table__  # type: ignore[attr-defined]

#: a line in a VM task's session log under its VM, at level info (the task row gives both)
_TASK_NOTE = insert(_LOG).from_select(
    ["session_id", "at", "level", "vm", "text"],
    select(_TASKS.c.session_id, bindparam("note_at", type_=_LOG.c.at.type), literal("info"), _TASKS.c.vm,
           bindparam("note_text", type_=_LOG.c.text.type))
    .where(_TASKS.c.id == bindparam("task")),
)
_LOG_LINE = insert(_LOG)
_UNLOCK = delete(_LOCKS).where(_LOCKS.c.key == bindparam("lock_key"),
                               _LOCKS.c.session_id == bindparam("lock_session"))
_LOCK_TAKE = insert(_LOCKS).values(key=bindparam("lock_key"), session_id=bindparam("lock_session"),
                                   acquired_at=bindparam("lock_at"))
#: the session holding a VM lock, and its state (None: the session row is gone)
_LOCK_HOLDER = (
    select(_LOCKS.c.session_id, _SESSIONS.c.state)
    .select_from(_LOCKS.outerjoin(_SESSIONS, _SESSIONS.c.id == _LOCKS.c.session_id))
    .where(_LOCKS.c.key == bindparam("lock_key"))
)
_LOCK_TAKE_OVER = (
    update(_LOCKS).where(_LOCKS.c.key == bindparam("lock_key"), _LOCKS.c.session_id == bindparam("from_session"))
    .values(session_id=bindparam("lock_session"), acquired_at=bindparam("lock_at"))
)
_STOP_REQUEST = select(_SESSIONS.c.stop_mode, _SESSIONS.c.state, _SESSIONS.c.drain_deadline).where(
    _SESSIONS.c.id == bindparam("session"))


@functools.lru_cache(maxsize=128)
def _task_update(columns: tuple[str, ...]) -> Executable:
    """``UPDATE vm_task SET <columns> WHERE id = :task``, one statement per set of columns
    (a VM task uses about a dozen sets)."""
    return update(_TASKS).where(_TASKS.c.id == bindparam("task")).values({name: bindparam(name) for name in columns})


@functools.lru_cache(maxsize=128)
def _task_record(columns: tuple[str, ...], notes: int, unlock: bool, lock: bool) -> Executable:
    """PostgreSQL: a VM task's record as one statement, so one round trip in autocommit mode
    instead of BEGIN, two to four statements and COMMIT. Data-modifying ``WITH`` clauses all
    run, in one snapshot, as one atomic statement (PostgreSQL documentation, "Data-Modifying
    Statements in WITH"); SQLite has none, and there the steps are one transaction.

    The task's ``columns`` are set as :func:`_task_update` does, with parameters of the same
    names; ``notes`` log lines (``note_0`` ...; ``note_at``) go under the task's session and
    VM, taken from the updated row; ``unlock`` deletes a VM lock (``lock_key``,
    ``lock_session``) and ``lock`` inserts one (``lock_key``, ``lock_session``, ``lock_at``:
    a taken key fails the whole statement, as the separate ``INSERT`` would).
    """
    task = _task_update(columns)
    statement: Any
    if notes:
        updated = task.returning(_TASKS.c.session_id, _TASKS.c.vm).cte("updated")
        lines = union_all(*(
            select(updated.c.session_id, bindparam("note_at", type_=_LOG.c.at.type), literal("info"), updated.c.vm,
                   bindparam(f"note_{n}", type_=_LOG.c.text.type))
            for n in range(notes)))
        statement = insert(_LOG).from_select(["session_id", "at", "level", "vm", "text"], lines)
    else:
        statement = task
    if unlock:
        statement = statement.add_cte(_UNLOCK.cte("unlocked"))
    if lock:
        statement = statement.add_cte(_LOCK_TAKE.cte("locked"))
    return statement


class TaskRecord(NamedTuple):
    """The shape of a VM task's record, which decides its statements (one per shape, compiled
    once per engine): :meth:`StateStore.update_task` with these ``columns`` (sorted), that many
    ``notes`` and a lock released (``unlock``), or :meth:`StateStore.try_lock_vm` with
    ``task`` and these columns (``lock``)."""

    columns: tuple[str, ...]
    notes: int = 0
    unlock: bool = False
    lock: bool = False

    def steps(self, task: int, fields: dict[str, Any], notes: Sequence[str], at: datetime,
              lock: dict[str, Any] | None = None, *, one_statement: bool) -> list[tuple[Executable, dict[str, Any]]]:
        """The statements and parameters of this record.

        :param task: the VM task's id.
        :param fields: a value for each of :attr:`columns`.
        :param notes: :attr:`notes` log lines, written at ``at``.
        :param lock: ``lock_key`` and ``lock_session`` of the lock released (``unlock``) or
            taken (``lock``, with ``lock_at``).
        :param one_statement: PostgreSQL: one statement (:func:`_task_record`); SQLite: a
            statement per step, run as one transaction.
        """
        if self.columns and one_statement:
            parameters = {"task": task, **fields, **(lock or {})}
            if self.notes:
                parameters.update(note_at=at, **{f"note_{n}": note for n, note in enumerate(notes)})
            return [(_task_record(self.columns, self.notes, self.unlock, self.lock), parameters)]
        steps: list[tuple[Executable, dict[str, Any]]] = []
        if self.lock:
            steps.append((_LOCK_TAKE, dict(lock or {})))
        if self.columns:
            steps.append((_task_update(self.columns), {"task": task, **fields}))
        steps += [(_TASK_NOTE, {"task": task, "note_at": at, "note_text": note}) for note in notes]
        if self.unlock:
            steps.append((_UNLOCK, dict(lock or {})))
        return steps


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Per connection: wait up to 30 s for another writer; WAL makes NORMAL sync durable
    at each checkpoint and crash-safe at every commit (SQLite's documented WAL behaviour)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


#: libpq options of every PostgreSQL connection, sent in its start-up packet (no round trip):
#: ``synchronous_commit = off``, the durability SQLite's WAL with ``synchronous=NORMAL`` gives
#: (:func:`_sqlite_pragmas`). A commit survives any crash of backupd's own processes at once;
#: a crash of the database server or its machine may lose the commits of its last fraction
#: of a second (at most three ``wal_writer_delay``, 600 ms by default), never the database's
#: consistency (PostgreSQL documentation, "Asynchronous Commit"). backupd's recovery already
#: copes with a record that is behind: snapshots are found by their name prefix, restore
#: points are listed from the repository. What it saves is a WAL flush per commit, about
#: 0.25 ms of each of the four commits of an unchanged VM's task.
_POSTGRESQL_OPTIONS = "-c synchronous_commit=off"


def runner_gone(host: str | None, pid: int | None, heartbeat_at: datetime | None) -> bool:
    """Whether the process ``pid`` on ``host`` whose last heartbeat was ``heartbeat_at`` (a
    session's runner, or the daemon) is gone: on this host, its process has ended or its
    heartbeat is older than :data:`STALE_LOCAL_HEARTBEAT_SECONDS`; on another host, its
    heartbeat is older than :data:`STALE_HEARTBEAT_SECONDS` (three heartbeat intervals)."""
    if host == socket.gethostname():
        if pid is not None and not pid_alive(pid):
            return True
        stale = STALE_LOCAL_HEARTBEAT_SECONDS
    else:
        stale = STALE_HEARTBEAT_SECONDS
    return heartbeat_at is None or heartbeat_at < utcnow() - timedelta(seconds=stale)


class StateStore:
    """Access to the state DB; safe to share between threads.

    Every method is one short transaction. Once the DB is open, a failure of the DB itself
    (disk full, a lock held past SQLite's 30 s busy timeout, a lost server) raises
    :class:`StateError` (exit code 2), naming the DB and the reason.

    Opening the DB brings its schema to the newest revision (:mod:`backupd.migrations`), under
    a lock, so processes opening a new DB at once never race; a DB already there costs one
    query.

    :param url: a SQLAlchemy URL: ``sqlite:///path``, or ``postgresql+psycopg://user@host/db``
        (a plain ``postgresql://`` also means psycopg 3, the PostgreSQL driver backupd ships).
    :raises StateError: the database cannot be opened or upgraded, a newer backupd upgraded
        it, its driver is not installed, or a SQLite database's folder cannot be made.
    """

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self.url = url
        parsed = make_url(url)
        sqlite = parsed.get_backend_name() == "sqlite"
        #: held by this process's writing DB sessions on SQLite (see :meth:`_session`);
        #: re-entrant: a write may nest another (:meth:`try_lock_vm`)
        self._sqlite_writer: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if sqlite else contextlib.nullcontext())
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            self.engine = create_engine(
                parsed,
                connect_args={"check_same_thread": False, "timeout": 30} if sqlite
                else {"options": " ".join(filter(None, [parsed.query.get("options"), _POSTGRESQL_OPTIONS]))},
            )
            #: the same pool, each statement its own transaction (:meth:`_execute`)
            self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
            #: PostgreSQL: a task's record is one statement (:func:`_task_record`)
            self._one_statement = not sqlite
            if sqlite:
                event.listen(self.engine, "connect", _sqlite_pragmas)
                with self._sqlite_setup_lock(url):
                    self._set_up(wal=True)
            else:
                self._set_up(wal=False)
        except DBAPIError as exc:
            raise StateError(f"cannot open the state DB {self._safe_url()}: {_reason(exc)}") from exc
        except ImportError as exc:  # the URL names a driver whose package is not installed
            raise StateError(
                f"cannot open the state DB {self._safe_url()}: its database driver is not installed"
                f" (no Python module {exc.name!r})"
            ) from exc
        except OSError as exc:  # the SQLite database's folder or setup lock
            raise StateError(f"cannot open the state DB {self._safe_url()}: {exc.strerror}: {exc.filename}") from exc

    def _set_up(self, *, wal: bool) -> None:
        """Bring the schema to :data:`backupd.migrations.HEAD`; a DB already there costs one
        query and never loads Alembic (every CLI command opens the state DB).

        An upgrade is one transaction, serialised between processes (see
        :func:`backupd.migrations.upgrade`). A SQLite DB being upgraded is switched to WAL
        first, a setting kept in the file.

        :raises StateError: a newer backupd upgraded the DB.
        """
        revision = self._revision()
        if revision == migrations.HEAD:
            return
        migrations.refuse_unknown(revision)
        with self.engine.begin() as connection:
            if wal:
                connection.exec_driver_sql("PRAGMA journal_mode=WAL")
            migrations.upgrade(connection)

    def _revision(self) -> str | None:
        """The schema revision the DB records; None when it records none (a new DB, one made
        before migrations, or one that cannot be read: the upgrade then reports why)."""
        try:
            with self.engine.connect() as connection:
                return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        except (OperationalError, ProgrammingError):
            return None

    def safe_url(self) -> str:
        """The state DB's URL with its password hidden, for messages."""
        return self._safe_url()

    def _safe_url(self) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    @staticmethod
    @contextlib.contextmanager
    def _sqlite_setup_lock(url: str) -> Iterator[None]:
        """Create the database's folder (0700) and file (0600), and hold an exclusive lock
        on ``<database>.setup-lock`` while the database is set up.

        Several processes opening a new database at once would otherwise race to switch it
        to WAL, and SQLite answers that race with an immediate "database is locked", without
        waiting out the busy timeout. The database file itself is never opened by us once it
        exists: closing any descriptor of it would drop the POSIX locks SQLite holds on it in
        this process. SQLite gives its -wal and -shm files the database's permissions.
        """
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        if not database or database == ":memory:":
            yield
            return
        os.makedirs(os.path.dirname(os.path.abspath(database)), mode=0o700, exist_ok=True)
        lock = os.open(f"{database}.setup-lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(database):
                os.close(os.open(database, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            yield
        finally:
            os.close(lock)  # releases the flock

    def close(self) -> None:
        self.engine.dispose()

    def warm_up(self, task_records: Iterable[TaskRecord] = ()) -> None:
        """Run once each statement a job session runs, so that nothing changes, then close
        every connection: its reads; its own records (claim, start, end) on session 0, which
        does not exist; and, in one transaction rolled back, a session log line and the VM
        task records ``task_records`` (:data:`backupd.vmtask.TASK_RECORDS`) on VM task 0. A
        process forked after this inherits the engine with those statements compiled:
        SQLAlchemy compiles a statement once per engine and keeps it (SQLAlchemy
        documentation, "SQL Compilation Caching"). In a new session process each first use
        cost 1-5 ms of CPU (measured; an ORM statement, or a PostgreSQL task record of
        several ``WITH`` clauses, the most). The daemon's fork server calls it
        (:mod:`backupd.forkserver`); a forked child calls :meth:`after_fork` first.

        :raises StateError: the state DB cannot be used.
        """
        try:
            self.session(0)
        except NotFoundError:
            pass
        self.tasks(0)
        self.stop_request(0)
        self.dead_sessions()
        self.unremoved_snapshots_by_job()
        DaemonRegistry(self).current()
        self.claim_session(0)
        self.advance_session(0, from_state=SessionState.STARTING, to_state=SessionState.WORKING)
        self.end_session(0, SessionResult.SUCCESS, None, unfinished=TaskStatus.NOT_PROCESSED, if_stop_mode=None)
        self._warm_up_task_records(task_records)
        self.engine.dispose()

    def _warm_up_task_records(self, records: Iterable[TaskRecord]) -> None:
        """:meth:`warm_up`'s rolled-back transaction. The log line goes under the newest
        session, if there is one (its row must exist); each record's statements run with
        the parameters :meth:`update_task` and :meth:`try_lock_vm` give them (the parameter
        names are part of a compiled statement's cache key), on VM task 0; a record without
        columns (log lines and a lock's release alone) first, its statements fixed."""
        now = utcnow()
        with self._guarded(True), self.engine.connect() as connection, connection.begin() as transaction:
            newest = connection.execute(select(func.max(_SESSIONS.c.id))).scalar()
            if newest is not None:
                connection.execute(_LOG_LINE, {"session_id": newest, "level": "info", "vm": None,
                                               "text": "warm-up", "at": now})
            for record in (TaskRecord((), 1, unlock=True), *records):
                fields = dict.fromkeys(record.columns)
                lock = None
                if record.lock or record.unlock:
                    lock = {"lock_key": "warm-up", "lock_session": 0, **({"lock_at": now} if record.lock else {})}
                for statement, parameters in record.steps(0, fields, ["warm-up"] * record.notes, now, lock,
                                                          one_statement=self._one_statement):
                    connection.execute(statement, parameters)
            transaction.rollback()

    def after_fork(self) -> None:
        """Call first in a process forked from one that opened this store: its connection pool
        starts empty, and a connection the parent holds stays the parent's, never closed or
        used here (SQLAlchemy documentation, "Using Connection Pools with Multiprocessing or
        os.fork()")."""
        self.engine.dispose(close=False)

    @contextlib.contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        """A DB session (ORM) whose failures (disk full, a lock held past the busy timeout, a
        lost server) surface as one :class:`StateError` naming the DB, without its password.

        ``write``: the session writes. On SQLite, writing sessions of this process's threads
        then take turns on :attr:`_sqlite_writer` instead of meeting in SQLite's busy handler,
        which answers a writer held up by another with sleeps of 1, 2, 5, 10 ms and more
        (``sqlite3_busy_timeout``): about a hundred of them per session of 10 VMs, 4 at once.
        Readers never wait (WAL). Other processes still meet in the busy handler.

        Without ``write`` the session runs in autocommit mode: every read here is a single
        statement, consistent in itself, and on PostgreSQL it is one round trip instead of
        three (BEGIN, the query, ROLLBACK). A session that writes must say ``write``."""
        with self._guarded(write):
            with Session(self.engine if write else self._autocommit, expire_on_commit=False) as db:
                yield db

    def _execute(self, steps: list[tuple[Executable, dict[str, Any]]], *, write: bool = True) -> Any:
        """Run statements with their parameters on a plain connection, for what every VM
        task runs many times (:meth:`update_task`, :meth:`log`, :meth:`stop_request`):
        several as one transaction; a single one in autocommit mode, which on PostgreSQL
        is one round trip instead of three (BEGIN, the statement, COMMIT).

        :returns: the rows of the last statement, read in full before its connection goes
            back to the pool (a SQLite statement still open would hold a read snapshot that
            the connection's next user cannot write from: "database is locked" at once), or
            its row count when it returns no rows.
        Failures and ``write`` as :meth:`_session`.
        """
        with self._guarded(write):
            return self._run(steps)

    def _run(self, steps: list[tuple[Executable, dict[str, Any]]]) -> list[Any] | int:
        """:meth:`_execute` without the guard: DB errors are raised as they are."""
        with self._autocommit.connect() if len(steps) == 1 else self.engine.begin() as connection:
            for statement, parameters in steps:
                result = connection.execute(statement, parameters)
            return result.all() if result.returns_rows else result.rowcount

    @contextlib.contextmanager
    def _guarded(self, write: bool) -> Iterator[None]:
        """:attr:`_sqlite_writer` when ``write``; DB failures raised as :class:`StateError`."""
        with self._sqlite_writer if write else contextlib.nullcontext():
            try:
                yield
            except DBAPIError as exc:
                raise StateError(f"the state DB {self._safe_url()} cannot be used: {_reason(exc)}") from exc

    # -- sessions ---------------------------------------------------------------------------

    def create_session(
        self,
        job: str,
        vms: list[str],
        *,
        full: bool,
        trigger: str = "manual",
        triggered_by: int | None = None,
        retry_of: int | None = None,
        owner: tuple[str, int] | None = None,
    ) -> JobSession:
        """Insert a session in state ``starting`` with one pending VM task per VM, in order.

        :param trigger: what started it: manual, schedule, chain, retry, auto_retry.
        :param triggered_by: the session whose end started it (a chained job).
        :param retry_of: the session it retries.
        :param owner: ``(host, pid)`` of the process that will run it (the daemon, when
            ``job start`` hands the session over); by default this process.
        """
        host, pid = owner or (socket.gethostname(), os.getpid())
        with self._session(write=True) as db:
            # The creating process (or the daemon it hands the session to) owns the session
            # until a runner claims it, so a session whose owner died before any runner
            # started is seen as dead, not running.
            row = JobSession(
                job=job, full=full, state=SessionState.STARTING, owner_host=host, owner_pid=pid,
                trigger=SessionTrigger(trigger), triggered_by=triggered_by, retry_of=retry_of,
            )
            db.add(row)
            db.flush()
            for position, vm in enumerate(vms):
                db.add(VmTask(session_id=row.id, position=position, vm=vm, status=TaskStatus.PENDING))
            db.commit()
            return row

    def session(self, session_id: int) -> JobSession:
        """:raises NotFoundError: no session with that id."""
        with self._session() as db:
            row = db.get(JobSession, session_id)
        if row is None:
            raise NotFoundError(f"no session {session_id}")
        return row

    def sessions(self, job: str | None = None, *, limit: int | None = None) -> list[JobSession]:
        """Sessions, newest first."""
        with self._session() as db:
            query = select(JobSession).order_by(JobSession.id.desc())  # type: ignore[union-attr]
            if job is not None:
                query = query.where(JobSession.job == job)
            if limit:
                query = query.limit(limit)
            return list(db.exec(query))

    def running_sessions(self, job: str) -> list[JobSession]:
        """The job's sessions not yet ``stopped``, oldest first."""
        with self._session() as db:
            query = (
                select(JobSession)
                .where(JobSession.job == job, JobSession.state != SessionState.STOPPED)
                .order_by(JobSession.id)  # type: ignore[arg-type]
            )
            return list(db.exec(query))

    def update_session(self, session_id: int, **fields: Any) -> None:
        with self._session(write=True) as db:
            db.exec(update(JobSession).where(JobSession.id == session_id).values(**fields))  # type: ignore[call-overload]
            db.commit()

    def claim_session(self, session_id: int) -> None:
        """Record this process as the session's runner."""
        self.update_session(
            session_id,
            owner_host=socket.gethostname(),
            owner_pid=os.getpid(),
            heartbeat_at=utcnow(),
            started_at=utcnow(),
        )

    def request_stop(
        self,
        session_id: int,
        mode: StopMode,
        message: str | None,
        *,
        drain_seconds: float | None = None,
        reason: str = "user",
        recursive: bool = False,
    ) -> tuple[str, StopMode | None]:
        """Write a stop request onto a session that still has VMs to process; its runner
        acts on it.

        One conditional UPDATE, so concurrent requests cannot lose an immediate stop: a
        graceful request never weakens an immediate one already made; an immediate request
        escalates a graceful one (and restarts ``stop_requested_at``). Repeating a request is
        harmless. A session that has ended, or whose VMs have all finished (it is only
        wrapping up), is left as it is: the stop would change nothing.

        A graceful stop's drain period starts with its first request: ``drain_deadline`` is
        set then (``now + drain_seconds``) and kept by repeats; the runner escalates to
        immediate when it passes.

        :param drain_seconds: a graceful stop's drain period; None: no deadline.
        :param reason: who stops it: user, window, shutdown (the first request's stays).
        :param recursive: also stop what this session's chain started, and start no more.
        :returns: ``("stop_requested", mode now in force)``, ``("too_late", None)`` when
            every VM of the session had already finished, or ``("ended", None)``.
        :raises NotFoundError: no session with that id.
        """
        column = JobSession.__table__.c.stop_mode  # type: ignore[attr-defined]
        reason_column = JobSession.__table__.c.stop_reason  # type: ignore[attr-defined]
        now = utcnow()
        if mode is StopMode.IMMEDIATE:
            new_mode: Any = literal(StopMode.IMMEDIATE, column.type)
            requested_at = case((column.is_distinct_from(StopMode.IMMEDIATE), now), else_=JobSession.stop_requested_at)
        else:
            new_mode = case((column.is_(None), literal(StopMode.GRACEFUL, column.type)), else_=column)
            requested_at = case((column.is_(None), now), else_=JobSession.stop_requested_at)
        first = column.is_(None)
        fields: dict[str, Any] = {
            "stop_mode": new_mode,
            "stop_requested_at": requested_at,
            "stop_reason": case((first, literal(StopReason(reason), reason_column.type)), else_=reason_column),
        }
        if mode is StopMode.GRACEFUL and drain_seconds is not None:
            deadline = now + timedelta(seconds=drain_seconds)
            fields["drain_deadline"] = case((first, deadline), else_=JobSession.drain_deadline)
        if message is not None:
            fields["stop_message"] = message
        unfinished = (
            select(VmTask.id)
            .where(VmTask.session_id == session_id, VmTask.status.in_([TaskStatus.PENDING, TaskStatus.RUNNING]))  # type: ignore[attr-defined]
            .exists()
        )
        with self._session(write=True) as db:
            if recursive:  # even too late to stop its VMs, the chain must start nothing more
                db.exec(
                    update(JobSession)  # type: ignore[call-overload]
                    .where(JobSession.id == session_id, JobSession.state != SessionState.STOPPED)
                    .values(stop_recursive=True)
                )
            applied = db.exec(
                update(JobSession)  # type: ignore[call-overload]
                .where(JobSession.id == session_id, JobSession.state != SessionState.STOPPED, unfinished)
                .values(**fields)
            ).rowcount
            db.commit()
        session = self.session(session_id)  # NotFoundError for an unknown id
        if applied:
            return "stop_requested", session.stop_mode
        return ("ended" if session.state is SessionState.STOPPED else "too_late"), None

    def running(self) -> list[JobSession]:
        """Every session not yet ``stopped``, oldest first."""
        with self._session() as db:
            query = select(JobSession).where(JobSession.state != SessionState.STOPPED).order_by(JobSession.id)  # type: ignore[arg-type]
            return list(db.exec(query))

    def ended_since(self, moment: datetime) -> list[JobSession]:
        """Sessions that ended at or after ``moment``, oldest end first."""
        with self._session() as db:
            query = (
                select(JobSession)
                .where(JobSession.state == SessionState.STOPPED, JobSession.ended_at >= moment)  # type: ignore[operator]
                .order_by(JobSession.ended_at, JobSession.id)  # type: ignore[arg-type]
            )
            return list(db.exec(query))

    def chain_started_by(self, session_id: int) -> list[JobSession]:
        """The running sessions this session's chain started: its children (``triggered_by``),
        their children, and so on."""
        running = self.running()
        found: list[JobSession] = []
        parents = {session_id}
        while True:
            children = [row for row in running if row.triggered_by in parents and row not in found]
            if not children:
                return found
            found.extend(children)
            parents = {row.id for row in children}  # type: ignore[misc]

    def advance_session(self, session_id: int, *, from_state: SessionState, to_state: SessionState) -> bool:
        """Move a session from one state to the next only if it is still in the first (so a
        runner's ``working`` never overwrites a ``stopping`` written meanwhile).

        :returns: whether the session was moved.
        """
        with self._session(write=True) as db:
            moved = db.exec(
                update(JobSession)  # type: ignore[call-overload]
                .where(JobSession.id == session_id, JobSession.state == from_state)
                .values(state=to_state)
            ).rowcount
            db.commit()
        return bool(moved)

    def stop_request(self, session_id: int) -> tuple[StopMode | None, datetime | None]:
        """The stop mode requested for the session, if any, and a graceful stop's drain
        deadline (polled by the runner).

        A session already ``stopped`` (recovery ended it, taking its runner for dead) answers
        immediate: a runner that finds its session ended must stop at once.
        """
        rows = self._execute([(_STOP_REQUEST, {"session": session_id})], write=False)
        if not rows:
            return None, None
        mode, state, deadline = rows[0]
        return (StopMode.IMMEDIATE if state is SessionState.STOPPED else mode), as_utc(deadline)

    # -- VM tasks ---------------------------------------------------------------------------

    def tasks(self, session_id: int) -> list[VmTask]:
        """The session's VM tasks in processing order."""
        with self._session() as db:
            query = select(VmTask).where(VmTask.session_id == session_id).order_by(VmTask.position)  # type: ignore[arg-type]
            return list(db.exec(query))

    def task(self, task_id: int) -> VmTask:
        """:raises NotFoundError: no VM task with that id."""
        with self._session() as db:
            row = db.get(VmTask, task_id)
        if row is None:
            raise NotFoundError(f"no VM task {task_id}")
        return row

    def claim_task(self, task_id: int, *, host: str, pid: int) -> bool:
        """Take a dispatched VM task for a backup proxy: one conditional ``UPDATE``, so a task
        is claimed once, and never after its session gave up on it (a stop, no live proxy).

        :returns: whether this proxy now runs it (False: it is no longer pending, or its
            session has ended).
        """
        live = select(JobSession.id).where(JobSession.id == VmTask.session_id,
                                           JobSession.state != SessionState.STOPPED).exists()
        with self._session(write=True) as db:
            claimed = db.exec(
                update(VmTask)  # type: ignore[call-overload]
                .where(VmTask.id == task_id, VmTask.status == TaskStatus.PENDING, live)
                .values(status=TaskStatus.RUNNING, stage="waiting", started_at=utcnow(), proxy_host=host, proxy_pid=pid)
            ).rowcount
            db.commit()
        return bool(claimed)

    def end_pending_task(self, task_id: int, status: TaskStatus, error: str | None) -> bool:
        """End a VM task no proxy has claimed yet (conditional on ``pending``).

        :returns: whether it was still pending and is now ended.
        """
        with self._session(write=True) as db:
            ended = db.exec(
                update(VmTask)  # type: ignore[call-overload]
                .where(VmTask.id == task_id, VmTask.status == TaskStatus.PENDING)
                .values(status=status, error=error, stage=None, ended_at=utcnow())
            ).rowcount
            db.commit()
        return bool(ended)

    def unremoved_snapshots(self, job: str) -> list[VmTask]:
        """VM tasks of the job's ended sessions whose snapshot was recorded but not removed
        (a runner killed mid-session, or a removal that kept failing), oldest first."""
        return self.unremoved_snapshots_by_job().get(job, [])

    def unremoved_snapshots_by_job(self) -> dict[str, list[VmTask]]:
        """:meth:`unremoved_snapshots` of every job, in one query: ``{job: tasks}``, only jobs
        that have some (a recovery pass over a hundred jobs asks once, not a hundred times)."""
        with self._session() as db:
            query = (
                select(JobSession.job, VmTask)
                .join(JobSession, VmTask.session_id == JobSession.id)  # type: ignore[arg-type]
                .where(
                    JobSession.state == SessionState.STOPPED,
                    VmTask.snapshot_id.is_not(None),  # type: ignore[union-attr]
                    VmTask.snapshot_removed == False,  # noqa: E712 - SQL, not Python
                )
                .order_by(VmTask.id)  # type: ignore[arg-type]
            )
            by_job: dict[str, list[VmTask]] = {}
            for job, task in db.exec(query):
                by_job.setdefault(job, []).append(task)
            return by_job

    def update_task(self, task_id: int, *, notes: Sequence[str] = (),
                    unlock: tuple[str, int] | None = None, **fields: Any) -> None:
        """Change a VM task's columns (``fields``: column names and values) and, in the same
        transaction, add lines to its session's log under its VM at level info (``notes``)
        and release a VM lock (``unlock``: key and holding session, as :meth:`release_vm`):
        one commit where a VM task's progress would otherwise cost two or three."""
        record = TaskRecord(tuple(sorted(fields)), len(notes), unlock is not None)
        lock = None if unlock is None else {"lock_key": unlock[0], "lock_session": unlock[1]}
        steps = record.steps(task_id, fields, notes, utcnow(), lock, one_statement=self._one_statement)
        if steps:
            self._execute(steps)

    def last_results(self) -> dict[str, JobSession]:
        """The newest session of every job."""
        latest: dict[str, JobSession] = {}
        for row in self.sessions():
            latest.setdefault(row.job, row)
        return latest

    # -- log --------------------------------------------------------------------------------

    def log(self, session_id: int, text: str, *, level: str = "info", vm: str | None = None) -> None:
        self._execute([(_LOG_LINE, {"session_id": session_id, "level": level, "vm": vm, "text": text,
                                    "at": utcnow()})])

    def log_lines(self, session_id: int) -> list[SessionLog]:
        with self._session() as db:
            query = select(SessionLog).where(SessionLog.session_id == session_id).order_by(SessionLog.id)  # type: ignore[arg-type]
            return list(db.exec(query))

    # -- VM locks ---------------------------------------------------------------------------

    def try_lock_vm(self, key: str, session_id: int, *, task: int | None = None, **fields: Any) -> int | None:
        """Take the lock of one VM for a session.

        :param task: a VM task whose columns ``fields`` are set in the same transaction when
            the lock is taken (as :meth:`update_task`): the task's VM id and next stage cost
            no commit of their own.
        :returns: None when taken (or already held by this session), else the id of the
            session holding it. A lock held by a session that has ended is taken over.
        """
        with_task = task is not None and bool(fields)
        record = TaskRecord(tuple(sorted(fields)) if with_task else (), lock=True)
        later = [] if not with_task else [(_task_update(record.columns), {"task": task, **fields})]
        with self._guarded(True):
            while True:
                take = {"lock_key": key, "lock_session": session_id, "lock_at": utcnow()}
                try:
                    self._run(record.steps(task or 0, fields, (), take["lock_at"], take, one_statement=self._one_statement))
                    return None
                except IntegrityError:
                    pass  # held: by whom, and is that session still there?
                with self.engine.begin() as connection:
                    row = connection.execute(_LOCK_HOLDER, {"lock_key": key}).first()
                    if row is None:
                        continue  # released meanwhile
                    holder, state = row
                    if holder == session_id:
                        taken = True
                    elif state is not None and state is not SessionState.STOPPED:
                        return holder
                    else:
                        taken = connection.execute(_LOCK_TAKE_OVER, {
                            "lock_key": key, "from_session": holder, "lock_session": session_id,
                            "lock_at": utcnow()}).rowcount == 1
                    if taken:
                        for statement, parameters in later:
                            connection.execute(statement, parameters)
                        return None

    def release_locks(self, session_id: int) -> None:
        """Release every VM lock a session holds (recovery of a dead session)."""
        with self._session(write=True) as db:
            db.exec(delete(VmLock).where(VmLock.session_id == session_id))  # type: ignore[call-overload]
            db.commit()

    def release_vm(self, key: str, session_id: int) -> None:
        with self._session(write=True) as db:
            lock = db.get(VmLock, key)
            if lock is not None and lock.session_id == session_id:
                db.delete(lock)
                db.commit()

    # -- dead runners -----------------------------------------------------------------------

    def dead_sessions(self) -> list[JobSession]:
        """Sessions not yet ``stopped`` whose runner is gone, oldest first.

        A runner on another host is gone when its heartbeat (every
        :data:`HEARTBEAT_SECONDS`) is older than three intervals,
        :data:`STALE_HEARTBEAT_SECONDS`. A runner on this host is gone when its process has
        ended, a zombie included (it runs no code; its parent has just not reaped it), or
        when its heartbeat is older than :data:`STALE_LOCAL_HEARTBEAT_SECONDS` (hung, or its
        process id was reused).
        """
        with self._session() as db:
            query = select(JobSession).where(JobSession.state != SessionState.STOPPED).order_by(JobSession.id)  # type: ignore[arg-type]
            running = list(db.exec(query))
        return [row for row in running
                if runner_gone(row.owner_host, row.owner_pid, as_utc(row.heartbeat_at or row.created_at))]

    def end_session(
        self,
        session_id: int,
        result: SessionResult,
        message: str | None,
        *,
        unfinished: TaskStatus,
        if_stop_mode: StopMode | None | object = ANY_STOP_MODE,
    ) -> bool:
        """Mark a session ``stopped`` with its result, and every VM task not yet final with
        ``unfinished`` (``not_processed`` for tasks that never started, ``failed`` when the
        runner broke or died), in one transaction.

        :param if_stop_mode: end the session only if its stop mode is still this one (None:
            no stop requested), so a stop request that lands while the runner works out
            the result is not lost; by default, whatever it is.
        :returns: whether the session was ended (False: the stop mode changed meanwhile, or
            it had already ended, e.g. by recovery).
        """
        now = utcnow()
        condition = [JobSession.id == session_id, JobSession.state != SessionState.STOPPED]
        if if_stop_mode is None:
            condition.append(JobSession.stop_mode.is_(None))  # type: ignore[union-attr]
        elif if_stop_mode is not ANY_STOP_MODE:
            condition.append(JobSession.stop_mode == if_stop_mode)
        with self._session(write=True) as db:
            ended = db.exec(
                update(JobSession)  # type: ignore[call-overload]
                .where(*condition)
                .values(state=SessionState.STOPPED, result=result, message=message, ended_at=now)
            ).rowcount
            if not ended:
                db.rollback()
                return False
            db.exec(
                update(VmTask)  # type: ignore[call-overload]
                .where(VmTask.session_id == session_id, VmTask.status.in_([TaskStatus.PENDING, TaskStatus.RUNNING]))  # type: ignore[attr-defined]
                .values(status=unfinished, ended_at=now, stage=None)
            )
            db.commit()
        return True

    # -- figures for metrics (aggregates, read at scrape time by backupd.metrics) --------------
    #
    # Each is one GROUP BY query: a state DB holds years of sessions, and a scrape must not
    # load them into Python. Rows are plain tuples; enum columns come back as members.

    def session_counts(self) -> list[tuple[str, SessionState, SessionResult | None, int]]:
        """How many sessions each job has, per state and result.

        :returns: ``(job, state, result, sessions)`` rows; result is None for sessions not
            yet ``stopped``.
        :raises StateError: the state DB cannot be used.
        """
        query = select(JobSession.job, JobSession.state, JobSession.result, func.count()).group_by(
            JobSession.job, JobSession.state, JobSession.result
        )
        with self._session() as db:
            return [tuple(row) for row in db.exec(query)]  # type: ignore[misc]

    def task_counts(self) -> list[tuple[str, TaskStatus, int, int, int]]:
        """VM tasks of each job per status, with the bytes they read and stored.

        :returns: ``(job, status, VM tasks, bytes read, bytes stored)`` rows; bytes read
            from the provider (running tasks: so far), bytes stored compressed in the
            repository as recorded on the tasks.
        :raises StateError: the state DB cannot be used.
        """
        query = (
            select(
                JobSession.job, VmTask.status, func.count(),
                func.coalesce(func.sum(VmTask.bytes_read), 0), func.coalesce(func.sum(VmTask.bytes_stored), 0),
            )
            .join(JobSession, VmTask.session_id == JobSession.id)  # type: ignore[arg-type]
            .group_by(JobSession.job, VmTask.status)
        )
        with self._session() as db:
            return [tuple(row) for row in db.exec(query)]  # type: ignore[misc]

    def last_ended(self, result: SessionResult | None = None) -> dict[str, tuple[datetime | None, datetime]]:
        """Per job, the session that ended last (of those with ``result``, if given).

        :returns: job → ``(started_at, ended_at)`` of that session, UTC; started_at is None
            for a session that ended before a runner claimed it.
        :raises StateError: the state DB cannot be used.
        """
        ended = [JobSession.state == SessionState.STOPPED, JobSession.ended_at.is_not(None)]  # type: ignore[union-attr]
        if result is not None:
            ended.append(JobSession.result == result)
        latest = select(JobSession.job, func.max(JobSession.ended_at).label("ended_at")).where(*ended).group_by(JobSession.job).subquery()
        query = (
            select(JobSession.job, JobSession.started_at, JobSession.ended_at)
            .join(latest, (JobSession.job == latest.c.job) & (JobSession.ended_at == latest.c.ended_at))
            .where(*ended)
            .order_by(JobSession.id)  # type: ignore[arg-type]
        )
        with self._session() as db:
            # Two sessions of a job ending in the same microsecond: the newer one counts.
            return {job: (as_utc(started), as_utc(end)) for job, started, end in db.exec(query)}  # type: ignore[misc]

    def unremoved_snapshot_counts(self) -> dict[str, int]:
        """Per job, how many VM tasks :meth:`unremoved_snapshots` would return (snapshots
        that ended sessions recorded but did not remove); jobs with none are absent.

        :raises StateError: the state DB cannot be used.
        """
        query = (
            select(JobSession.job, func.count())
            .select_from(VmTask)
            .join(JobSession, VmTask.session_id == JobSession.id)  # type: ignore[arg-type]
            .where(
                JobSession.state == SessionState.STOPPED,
                VmTask.snapshot_id.is_not(None),  # type: ignore[union-attr]
                VmTask.snapshot_removed == False,  # noqa: E712 - SQL, not Python
            )
            .group_by(JobSession.job)
        )
        with self._session() as db:
            return dict(db.exec(query).all())  # type: ignore[arg-type]

    def log_line_counts(self, prefix: str) -> dict[str, int]:
        """Per job, how many session log lines start with ``prefix`` (case-sensitive); jobs
        with none are absent.

        The lines are counted per session first, then joined to their sessions: a scan of the
        log table, rather than an index lookup per session (four times slower on SQLite with
        a million lines).

        :raises StateError: the state DB cannot be used.
        """
        per_session = (
            select(SessionLog.session_id, func.count().label("lines"))
            .where(func.substr(SessionLog.text, 1, len(prefix)) == prefix)
            .group_by(SessionLog.session_id)
            .subquery()
        )
        query = (
            select(JobSession.job, func.sum(per_session.c.lines))
            .join(per_session, per_session.c.session_id == JobSession.id)
            .group_by(JobSession.job)
        )
        with self._session() as db:
            return {job: int(lines) for job, lines in db.exec(query)}  # type: ignore[misc]

class DaemonRegistry:
    """The daemon's own rows: who runs (``daemon``), and each job's next run
    (``job_schedule``), read by ``daemon status``, ``job list`` and ``job start``."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def register(self, config_path: str) -> None:
        """Record this process as the running daemon (after it took the daemon lock)."""
        now = utcnow()
        with self._store._session(write=True) as db:
            db.merge(Daemon(name="main", host=socket.gethostname(), pid=os.getpid(), started_at=now,
                            heartbeat_at=now, config_path=config_path))
            db.commit()

    def beat(self) -> None:
        """The daemon's heartbeat, which is also that of the sessions waiting in it for a
        process (state ``starting``, owned by the daemon): they are alive while it is."""
        now = utcnow()
        with self._store._session(write=True) as db:
            db.exec(update(Daemon).where(Daemon.name == "main").values(heartbeat_at=now))  # type: ignore[call-overload]
            db.exec(
                update(JobSession)  # type: ignore[call-overload]
                .where(JobSession.state == SessionState.STARTING, JobSession.owner_host == socket.gethostname(),
                       JobSession.owner_pid == os.getpid())
                .values(heartbeat_at=now)
            )
            db.commit()

    def unregister(self) -> None:
        """The daemon is stopping: no next runs any more; its row stays, its heartbeat the
        moment it was last up (the next daemon starts runs missed since then)."""
        with self._store._session(write=True) as db:
            db.exec(update(Daemon).where(Daemon.name == "main").values(heartbeat_at=utcnow()))  # type: ignore[call-overload]
            db.exec(delete(JobSchedule))  # type: ignore[call-overload]
            db.commit()

    def current(self) -> Daemon | None:
        """The daemon row, alive or left by one that died (see :meth:`alive`)."""
        with self._store._session() as db:
            return db.get(Daemon, "main")

    def alive(self) -> Daemon | None:
        """The running daemon: its row, if its process lives (this host) and its heartbeat is
        fresh; None otherwise."""
        row = self.current()
        if row is None or runner_gone(row.host, row.pid, as_utc(row.heartbeat_at)):
            return None
        return row

    def set_schedules(self, runs: dict[str, tuple[datetime | None, str]]) -> None:
        """Replace every job's next run: ``{job: (next run or None, description)}``."""
        now = utcnow()
        with self._store._session(write=True) as db:
            db.exec(delete(JobSchedule))  # type: ignore[call-overload]
            for job, (next_run, description) in runs.items():
                db.add(JobSchedule(job=job, next_run=next_run, schedule=description, updated_at=now))
            db.commit()

    def schedules(self) -> dict[str, JobSchedule]:
        with self._store._session() as db:
            return {row.job: row for row in db.exec(select(JobSchedule))}


def _reason(exc: DBAPIError) -> str:
    """The driver's own words for a DB failure (e.g. "database or disk is full")."""
    return str(exc.orig).strip() or type(exc.orig).__name__


def pid_alive(pid: int) -> bool:
    """Whether a process of this host is running. A zombie (dead, not yet reaped by its
    parent: a container's PID 1, a supervisor) is not: it runs no code any more. Zombie
    detection reads ``/proc/PID/stat`` (Linux); elsewhere only existence is checked."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # /proc present: the process just went
    except OSError:
        return True
    # "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ')'
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")

