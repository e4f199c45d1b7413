"""``backupd daemon``: runs jobs on their schedules, for months, and cleans up after any crash.

One process, in the foreground (systemd, a container or a terminal runs it), logging one line
per event on stderr. Its loop, every :data:`TICK_SECONDS`:

- creates the sessions whose scheduled time has come (``cron`` and ``every`` triggers from
  :mod:`backupd.schedule`; APScheduler gives the times, the state DB records what ran), the
  chained jobs (``after``) of sessions that ended and automatic retries that are due, and
  starts them — with the sessions ``job start`` handed over — at most ``[daemon]
  max_sessions`` at once, the others waiting their turn in state ``starting``;
- stops sessions whose job's backup window has ended (graceful, with the drain period);
- notices sessions that ended (any process) and acts: chains, automatic retry, notifications;
- every :data:`RECOVERY_SECONDS` (and at start and exit) runs recovery: sessions whose runner
  is gone end ``failed``, and the snapshot hunter removes what ended sessions left.

**A process per session.** Each session runs in a session process of its own
(:mod:`backupd.host`), supervised by the daemon: a session that crashes — an exception in a
provider, a segfault in a C extension, ``kill -9`` — takes down nothing but itself; the daemon
sees the process gone and recovers the session. Threads in one process would share every such
fate, and a stuck provider call could not be killed. The daemon's fork server
(:mod:`backupd.forkserver`) starts them: it imports everything once and forks a child per
session, so a session does not pay for a Python start (~0.5 s of CPU). Session processes also
outlive the daemon: one killed or crashed leaves them running (and their
VM tasks, in them or on backup proxies), and the next daemon adopts them at its start
(:meth:`Daemon._adopt`): it supervises them as its own children from then on.

**Signals.** SIGTERM or SIGINT: start nothing more; graceful stop of every session the daemon
runs, each with its job's drain period; a second signal: immediate. The daemon exits 0 once
every session has ended and the snapshot hunter has run. SIGHUP: reload the config; an invalid
one is refused with the same messages as at start and the old one stays.

**One daemon per state DB.** A lock held for the daemon's life (SQLite: ``flock`` on
``<db>.daemon-lock``; PostgreSQL: a session-level advisory lock); a second daemon exits at once
with :data:`EXIT_ANOTHER_DAEMON`, naming the running one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backupd.config import Config, load_config
from backupd.enums import SessionResult, SessionState, StopMode, TaskStatus
from backupd.errors import BackupdError, ConfigError, StateError
from backupd.forkserver import ProcessLost, SessionProcess, SessionStarter
from backupd.schedule import build_trigger
from backupd.state import HEARTBEAT_SECONDS, DaemonRegistry, JobSession, StateStore, as_utc, utcnow

if TYPE_CHECKING:
    from backupd.schedule import CronSchedule, Every
    from backupd.service import Backupd

log = logging.getLogger("backupd.daemon")

#: seconds between two turns of the daemon's loop (sessions handed over start within one)
TICK_SECONDS = 0.5
#: seconds between two recovery passes (dead sessions, the snapshot hunter)
RECOVERY_SECONDS = 60.0
#: exit code of a second daemon on a state DB that has one
EXIT_ANOTHER_DAEMON = 5
#: how far back each look for ended sessions reaches (an end committed late is still seen)
_END_LAG = timedelta(seconds=30)


# -- one daemon per state DB ----------------------------------------------------------------


class DaemonLock:
    """Held for the daemon's life; the kernel (SQLite) or the server (PostgreSQL) drops it
    when the process dies, so a crashed daemon never blocks the next."""

    def __init__(self, release: Callable[[], None]) -> None:
        self.release = release

    @classmethod
    def take(cls, store: StateStore) -> "DaemonLock | None":
        """:returns: the lock, or None when another daemon holds it."""
        from sqlalchemy import text
        from sqlalchemy.engine import make_url

        url = make_url(store.url)
        if url.get_backend_name() == "sqlite":
            fd = os.open(f"{url.database}.daemon-lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            return cls(lambda: os.close(fd))
        connection = store.engine.connect()  # kept open: the advisory lock lives with it
        taken = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": _ADVISORY_KEY}).scalar()
        connection.commit()
        if not taken:
            connection.close()
            return None
        return cls(connection.close)


#: the PostgreSQL advisory lock key of the daemon (any constant; "bkupd" in ASCII)
_ADVISORY_KEY = 0x626B757064


# -- what is due when -------------------------------------------------------------------------


class Planner:
    """The next run of every ``cron`` and ``every`` job.

    :param config: the config whose schedules to follow.
    :param anchors: per job, where an ``every`` interval counts from (its last scheduled
        session, else the daemon's start).
    :param now: the current time.
    """

    def __init__(self, config: Config, anchors: dict[str, datetime], now: datetime) -> None:
        self.triggers: dict[str, CronSchedule | Every] = {}
        self.next: dict[str, datetime | None] = {}
        for name, job in config.jobs.items():
            if job.schedule is None:
                continue
            trigger = build_trigger(job.schedule, anchors.get(name, now))
            if trigger is not None:
                self.triggers[name] = trigger
                self.next[name] = trigger.next_after(now)

    def due(self, now: datetime) -> list[tuple[str, datetime]]:
        """The runs whose time has come, each job's next run moved past ``now`` (runs missed
        by a busy loop are coalesced into the one returned)."""
        runs = []
        for name, at in self.next.items():
            if at is not None and at <= now:
                runs.append((name, at))
                self.next[name] = self.triggers[name].next_after(now)
        return runs

    def missed(self, since: datetime, now: datetime) -> dict[str, list[datetime]]:
        """Per job, the runs whose time fell in ``(since, now]`` (the daemon was down)."""
        from backupd.schedule import fire_times

        found = {name: fire_times(trigger, since, now) for name, trigger in self.triggers.items()}
        return {name: times for name, times in found.items() if times}


# -- the daemon --------------------------------------------------------------------------------


@dataclass
class _Child:
    """A session process the daemon supervises: one it spawned (``process``), or one a
    previous daemon spawned and this one adopted (``process`` None: not its child, so it is
    watched by pid, without an exit code)."""

    session: int
    job: str
    process: SessionProcess | None
    pid: int

    def exit_code(self) -> int | None:
        """The process's exit code once it has ended, else None; an adopted process that has
        ended gives -1 (its exit code went to its new parent), and so does one whose fork
        server ended before it (watched by pid from then on)."""
        from backupd.host import is_session_process
        from backupd.state import pid_alive

        if self.process is not None:
            try:
                return self.process.poll()
            except ProcessLost as exc:
                log.warning("session %s: %s; its process is watched by pid from now on", self.session, exc)
                self.process = None
        return None if pid_alive(self.pid) and is_session_process(self.pid) else -1  # a reused pid is not it


@dataclass
class _State:
    children: dict[int, _Child] = field(default_factory=dict)
    retries: list[tuple[datetime, str]] = field(default_factory=list)
    handled_ends: dict[int, datetime | None] = field(default_factory=dict)
    signals: list[int] = field(default_factory=list)
    reload: bool = False


class Daemon:
    """The scheduler and supervisor of sessions (see the module docstring).

    :param config: the validated config.
    :param clock: the current time, timezone-aware UTC (tests inject one).
    """

    def __init__(self, config: Config, *, clock: Callable[[], datetime] = utcnow) -> None:
        from backupd.service import Backupd

        self.config = config
        self.clock = clock
        self.service: Backupd = Backupd(config)
        self.store: StateStore = self.service.store
        self.registry = DaemonRegistry(self.store)
        self._state = _State()
        self._planner: Planner | None = None
        self._stopping = 0  # 0 running, 1 graceful shutdown, 2 immediate
        self._owner = (socket.gethostname(), os.getpid())
        #: why each session created by this daemon and not yet started was created, for its log line
        self._why: dict[int, str] = {}

    # -- life cycle ---------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT and every session has ended.

        :returns: 0, or :data:`EXIT_ANOTHER_DAEMON` when another daemon runs on the state DB.
        """
        lock = DaemonLock.take(self.store)
        if lock is None:
            other = self.registry.current()
            who = f"pid {other.pid} on {other.host}, since {as_utc(other.started_at):%Y-%m-%d %H:%M:%S} UTC" \
                if other else "its record is not written yet"
            log.error("another daemon runs on the state DB %s (%s); this one exits", self.store.safe_url(), who)
            return EXIT_ANOTHER_DAEMON
        previous = self.registry.current()
        last_seen = as_utc(previous.heartbeat_at) if previous is not None else None
        self.registry.register(str(self.config.path))
        handlers = self._install_signal_handlers()
        metrics = self._serve_metrics()
        self._starter = SessionStarter(self.config.path)
        try:
            now = self.clock()
            log.info("daemon started: pid %d, config %s, %d scheduled job(s)", os.getpid(), self.config.path,
                     sum(1 for job in self.config.jobs.values() if job.schedule is not None))
            self._recover()
            self._guarded(self._adopt)
            self._planner = Planner(self.config, self._anchors(now), now)
            if last_seen is not None:
                self._start_missed(last_seen, now)
            self._guarded(lambda: self._resume_retries(now))
            self._publish_schedules()
            self._loop()
            self._recover()
            log.info("daemon stopped: every session has ended")
            return 0
        finally:
            self._starter.close()
            if metrics is not None:
                metrics.shutdown()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.registry.unregister()
            lock.release()

    def _serve_metrics(self) -> Any:
        """The Prometheus endpoint (``[daemon] metrics_listen``), or None when off or when it
        cannot listen (logged: the daemon runs on without it)."""
        listen = self.config.daemon.metrics_listen
        if listen is None:
            return None
        from backupd.metrics import serve_metrics

        try:
            server = serve_metrics(self.store, listen)
        except OSError as exc:
            log.error("metrics: cannot listen on %s: %s; the daemon runs without metrics", listen, exc)
            return None
        log.info("metrics: serving on http://%s:%d/metrics", server.host, server.port)
        return server

    def _install_signal_handlers(self) -> dict[int, Any]:
        def on_stop(signum: int, _frame: Any) -> None:
            self._state.signals.append(signum)

        def on_hup(_signum: int, _frame: Any) -> None:
            self._state.reload = True

        handlers = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
        return handlers

    def _loop(self) -> None:
        import time

        last_recovery = last_beat = time.monotonic()
        # ends while down (or before this daemon started) start nothing
        self._watermark = self._floor = self.clock() - timedelta(seconds=TICK_SECONDS)
        while not (self._stopping and not self._state.children):
            self._handle_signals()
            self._reap_children()
            self._handle_ended_sessions()
            if not self._stopping:
                self._start_due()
                self._start_queued()
                self._close_windows()
            if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
                last_beat = time.monotonic()
                self._guarded(self.registry.beat)
            if time.monotonic() - last_recovery >= RECOVERY_SECONDS:
                last_recovery = time.monotonic()
                self._recover()
            time.sleep(TICK_SECONDS)

    def _guarded(self, action: Callable[[], object]) -> None:
        """A state DB failure is logged and the loop goes on (the DB may come back)."""
        try:
            action()
        except StateError as exc:
            log.error("%s", exc)

    # -- signals ------------------------------------------------------------------------------

    def _handle_signals(self) -> None:
        if self._state.reload:
            self._state.reload = False
            self._reload()
        while self._state.signals:
            self._state.signals.pop(0)
            self._stopping = min(self._stopping + 1, 2)
            mode = StopMode.GRACEFUL if self._stopping == 1 else StopMode.IMMEDIATE
            log.info("%s: %s stop of %d running session(s)",
                     "shutting down" if self._stopping == 1 else "second signal", mode.value, len(self._state.children))
            for child in list(self._state.children.values()):
                drain = self.service.drain_period(child.job)
                self._guarded(lambda child=child, drain=drain: self.store.request_stop(
                    child.session, mode, "the daemon is shutting down", drain_seconds=drain, reason="shutdown"))
            self._guarded(self._end_unstarted)

    def _end_unstarted(self) -> None:
        """Sessions handed over but not started yet will not start: end them now rather than
        leave them to recovery."""
        for session in self.store.running():
            if (session.state is SessionState.STARTING and (session.owner_host, session.owner_pid) == self._owner
                    and session.id not in self._state.children):
                self.store.end_session(session.id, SessionResult.FAILED,  # type: ignore[arg-type]
                                       "not started: the daemon was shutting down", unfinished=TaskStatus.NOT_PROCESSED)
                log.warning("session %s of job %s not started: the daemon is shutting down", session.id, session.job)

    def _reload(self) -> None:
        try:
            config = load_config(self.config.path)
        except ConfigError as exc:
            log.error("SIGHUP: the config was not reloaded; the daemon keeps the one it has: %s", exc)
            return
        self.config = config
        self.service.config = config
        now = self.clock()
        self._planner = Planner(config, self._anchors(now), now)
        self._publish_schedules()
        log.info("SIGHUP: config %s reloaded, %d scheduled job(s)", config.path,
                 sum(1 for job in config.jobs.values() if job.schedule is not None))

    # -- starting sessions ----------------------------------------------------------------------

    def _start_due(self) -> None:
        assert self._planner is not None
        now = self.clock()
        due = self._planner.due(now)
        for job, at in due:
            self._start(job, "schedule", why=f"scheduled for {at.isoformat()}")
        if due:
            self._publish_schedules()
        for when, job in [r for r in self._state.retries if r[0] <= now]:
            self._state.retries.remove((when, job))
            self._start(job, "auto_retry", why="automatic retry")

    def _start_missed(self, last_seen: datetime, now: datetime) -> None:
        """Runs whose time passed while the daemon was down: the newest starts once if it is
        within ``misfire_grace_seconds``; the others are logged as missed (never a burst)."""
        assert self._planner is not None
        grace = timedelta(seconds=self.config.daemon.misfire_grace_seconds)
        for job, times in sorted(self._planner.missed(last_seen, now).items()):
            newest = times[-1]
            late = [t for t in times if t is not newest or now - t > grace]
            for at in late:
                log.warning("job %s: run of %s was missed while the daemon was down", job, at.isoformat())
            if now - newest <= grace:
                self._start(job, "schedule", why=f"missed run of {newest.isoformat()}, started late")

    def _start(self, job: str, trigger: str, *, why: str, triggered_by: int | None = None) -> int | None:
        """Create and spawn a session, unless one of the job runs or its window is closed."""
        settings = self.config.jobs.get(job)
        if settings is None:
            return None
        try:
            running = self.store.running_sessions(job)
            if running:
                log.warning("job %s: %s skipped: session %s is still running", job, why, running[0].id)
                return None
            window = settings.backup_window
            if window is not None and settings.schedule is not None \
                    and not window.contains(self.clock(), settings.schedule.zone()):
                log.warning("job %s: %s skipped: outside its backup window %s", job, why, window.describe())
                return None
            if trigger == "auto_retry":
                session = self.service.create_retry_session(job, automatic=True, owner=self._owner)
            else:
                session = self.service.create_session(job, trigger=trigger, triggered_by=triggered_by, owner=self._owner)
        except BackupdError as exc:
            log.error("job %s: %s: the session could not be created: %s", job, why, exc)
            return None
        self._why[session.id] = why  # type: ignore[index]
        self._start_queued()
        return session.id

    def _start_queued(self) -> None:
        """Start the sessions created for this daemon (by a trigger, or handed over by ``job
        start``) that wait for a process, oldest first, while fewer than ``max_sessions`` run."""
        def pick() -> None:
            free = self.config.daemon.max_sessions - len(self._state.children)
            for session in self.store.running():
                if free <= 0:
                    return
                if (session.state is SessionState.STARTING and (session.owner_host, session.owner_pid) == self._owner
                        and session.id not in self._state.children):
                    self._spawn(session)
                    free -= 1
                    why = self._why.pop(session.id, "handed over by job start")  # type: ignore[arg-type]
                    log.info("session %s of job %s started (%s)", session.id, session.job, why)

        self._guarded(pick)

    def _spawn(self, session: JobSession) -> None:
        assert session.id is not None
        log_path = self.config.path.parent / "logs" / f"session-{session.id}.log"
        try:
            process = self._starter.spawn(self.config, session.id, log_path)
        except OSError as exc:
            self.store.end_session(session.id, SessionResult.FAILED, f"could not start the session's process: {exc}",
                                   unfinished=TaskStatus.NOT_PROCESSED)
            log.error("session %s: could not start its process: %s", session.id, exc)
            return
        self._state.children[session.id] = _Child(session.id, session.job, process, process.pid)

    def _adopt(self) -> None:
        """Supervise the session processes a previous daemon left running on this host (it
        was killed or crashed; they are processes of their own and went on): each counts
        against ``max_sessions``, is stopped on shutdown and recovered if it dies, and its
        end is acted on (chains, retries, notifications) as if this daemon had spawned it.
        A detached ``job start`` session (no daemon ran) is adopted the same way; a
        foreground ``job start --wait`` is not."""
        from backupd.host import is_session_process
        from backupd.state import pid_alive

        host = socket.gethostname()
        for session in self.store.running():
            pid = session.owner_pid
            if (session.owner_host != host or pid is None or session.id in self._state.children
                    or not pid_alive(pid) or not is_session_process(pid)):
                continue
            self._state.children[session.id] = _Child(session.id, session.job, None, pid)  # type: ignore[index, arg-type]
            log.info("session %s of job %s adopted (its process pid %d runs on)", session.id, session.job, pid)

    # -- sessions that ended ------------------------------------------------------------------------

    def _reap_children(self) -> None:
        for child in list(self._state.children.values()):
            code = child.exit_code()
            if code is None:
                continue
            del self._state.children[child.session]
            session = self.store.session(child.session)
            if child.process is None:
                if session.state is not SessionState.STOPPED:  # it died before ending its session
                    log.error("session %s: its process pid %d is gone; recovering", child.session, child.pid)
                    self._recover()
                continue
            if session.state is SessionState.STARTING and (session.owner_host, session.owner_pid) == self._owner:
                # it ended before claiming the session: never restart it in a loop
                text = f"the session's process could not start (exit {code}; see logs/session-{child.session}.log)"
                self.store.end_session(child.session, SessionResult.FAILED, text, unfinished=TaskStatus.NOT_PROCESSED)
                log.error("session %s: %s", child.session, text)
            elif code not in (0, 1, 2):  # not a session's exit code: killed, or the runner broke
                log.error("session %s: its process ended abnormally (exit %s); recovering", child.session, code)
                self._recover()

    def _handle_ended_sessions(self) -> None:
        """Act once on every session that ended since the last look. The look reaches back
        :data:`_END_LAG` so an end committed late (a busy DB) is still seen, but never
        before this daemon's start (a restarted daemon would chain, retry and notify again
        the sessions its predecessor handled); ids already handled are remembered that long."""
        def scan() -> None:
            since = self._watermark
            self._watermark = max(self._floor, self.clock() - _END_LAG)
            handled = self._state.handled_ends
            for session in self.store.ended_since(since):
                if session.id not in handled:
                    handled[session.id] = as_utc(session.ended_at)  # type: ignore[index, assignment]
                    self._session_ended(session)
            for old in [sid for sid, ended in handled.items() if ended is None or ended < since]:
                del handled[old]

        self._guarded(scan)

    def _session_ended(self, session: JobSession) -> None:
        tasks = self.store.tasks(session.id)  # type: ignore[arg-type]
        result = session.result.value if session.result else "?"
        log.info("session %s of job %s ended: %s%s", session.id, session.job, result,
                 f" ({session.message})" if session.message else "")
        for task in tasks:
            detail = task.error or task.warning
            log.info("  VM %s: %s%s", task.vm, task.status.value, f" ({detail})" if detail else "")
        self._notify(session, tasks)
        if self._stopping:
            return
        self._start_chained(session)
        self._schedule_retry(session, tasks)

    def _start_chained(self, session: JobSession) -> None:
        for name, job in sorted(self.config.jobs.items()):
            if job.schedule is None or job.schedule.after != session.job:
                continue
            if session.stop_recursive:
                log.info("job %s: not started after session %s: that session was stopped recursively", name, session.id)
                continue
            self._start(name, "chain", why=f"after session {session.id} of job {session.job}", triggered_by=session.id)

    def _schedule_retry(self, session: JobSession, tasks: list, *, missed_before: datetime | None = None) -> None:
        """Plan the automatic retry a failed session is owed (``auto_retry``), at its end +
        ``wait_seconds``: the time follows from the session's record, so a daemon started
        later plans the same time (:meth:`_resume_retries`).

        :param missed_before: a retry due before this is not started but logged as missed.
        """
        settings = self.config.jobs.get(session.job)
        if settings is None or settings.auto_retry is None or session.result is not SessionResult.FAILED:
            return
        if session.stop_reason is not None:
            return  # stopped by a user, a window or a shutdown: never retried automatically
        if not any(t.status in (TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.NOT_PROCESSED) for t in tasks):
            return
        done = self._retries_made(session)
        if done >= settings.auto_retry.times:
            log.warning("job %s: session %s failed; its %d automatic retries are used up", session.job, session.id, done)
            return
        when = (as_utc(session.ended_at) or self.clock()) + timedelta(seconds=settings.auto_retry.wait_seconds)
        if missed_before is not None and when < missed_before:
            log.warning("job %s: automatic retry %d of %d of session %s, due at %s, missed while no daemon ran",
                        session.job, done + 1, settings.auto_retry.times, session.id, when.isoformat())
            return
        if (when, session.job) in self._state.retries:
            return  # seen at this daemon's start and again as it ended
        self._state.retries.append((when, session.job))
        log.info("job %s: automatic retry %d of %d of session %s at %s", session.job, done + 1,
                 settings.auto_retry.times, session.id, when.isoformat())

    def _resume_retries(self, now: datetime) -> None:
        """The automatic retries owed when this daemon starts, worked out from the state DB
        (a stopped or killed daemon's planned retries were only in its memory): each job's
        newest session, if it ended as :meth:`_schedule_retry` retries, gets its retry at its
        end + ``wait_seconds``, at once if that time has passed, unless by more than
        ``[daemon] misfire_grace_seconds`` (then it is logged as missed, like a missed run)."""
        grace = timedelta(seconds=self.config.daemon.misfire_grace_seconds)
        for job, session in sorted(self.store.last_results().items()):
            if session.state is SessionState.STOPPED and job in self.config.jobs:
                self._schedule_retry(session, self.store.tasks(session.id), missed_before=now - grace)  # type: ignore[arg-type]

    def _retries_made(self, session: JobSession) -> int:
        count = 0
        while session.trigger == "auto_retry" and session.retry_of is not None:
            count += 1
            session = self.store.session(session.retry_of)
        return count

    def _notify(self, session: JobSession, tasks: list) -> None:
        settings = self.config.jobs.get(session.job)
        urls = [*self.config.daemon.notify, *(settings.notify if settings else [])]
        if not urls:
            return
        from backupd.notify import notify
        from backupd.render import session_document

        for problem in notify(urls, session_document(session, tasks)):
            log.warning("session %s: notification failed: %s", session.id, problem)

    # -- windows ------------------------------------------------------------------------------------

    def _close_windows(self) -> None:
        """Scheduled sessions still running when their job's backup window ends are stopped
        gracefully, with the drain period; a manual one (``job start``) ignores the window."""
        now = self.clock()

        def close() -> None:
            for session in self.store.running():
                settings = self.config.jobs.get(session.job)
                if (settings is None or settings.backup_window is None or settings.schedule is None
                        or session.trigger in (None, "manual", "retry") or session.stop_mode is not None):
                    continue
                window = settings.backup_window
                if not window.contains(now, settings.schedule.zone()):
                    text = f"the backup window {window.describe()} of job {session.job} ended"
                    self.store.request_stop(session.id, StopMode.GRACEFUL, text,  # type: ignore[arg-type]
                                            drain_seconds=settings.drain_period_seconds, reason="window")
                    log.warning("session %s: %s; graceful stop with a drain period of %g s", session.id, text,
                                settings.drain_period_seconds)

        self._guarded(close)

    # -- recovery and bookkeeping -----------------------------------------------------------------

    def _recover(self) -> None:
        from backupd.recovery import recover

        def run() -> None:
            for level, action in recover(self.config, self.store):
                log.log(logging.WARNING if level == "warning" else logging.INFO, "recovery: %s", action)

        self._guarded(run)

    def _anchors(self, now: datetime) -> dict[str, datetime]:
        """Where ``every`` intervals count from: each job's last scheduled session."""
        anchors = {}
        for name, job in self.config.jobs.items():
            if job.schedule is not None and job.schedule.every is not None:
                last = next((s for s in self.store.sessions(name, limit=20) if s.trigger == "schedule"), None)
                anchors[name] = as_utc(last.created_at) if last is not None else now  # type: ignore[assignment]
        return anchors

    def _publish_schedules(self) -> None:
        assert self._planner is not None
        runs = {name: (self._planner.next.get(name), job.schedule.describe())
                for name, job in self.config.jobs.items() if job.schedule is not None}
        self._guarded(lambda: self.registry.set_schedules(runs))


def run_daemon(config_path: Path) -> int:
    """``backupd daemon``: load the config and run the daemon until it is stopped.

    :raises ConfigError: the config is invalid (nothing is started).
    """
    config = load_config(config_path)
    return Daemon(config).run()
