"""The session runner: runs one job session to its end and carries out stop requests.

The runner processes the job's VMs in config order, at most ``max_parallel_vms`` at once, each
as a :class:`backupd.vmtask.VmTask` on its own thread; block hashing and compression run on one
worker pool shared by the session. A control thread polls the state DB (every
:data:`POLL_SECONDS`) for a stop request written by ``backupd job stop`` from any process, and
keeps the session's heartbeat.

The stop contract (docs/design.md):

- immediate: VM tasks in flight are cancelled between blocks and end ``cancelled`` with no
  restore point; every snapshot this session created is removed (with retries); VMs not
  started end ``not_processed``; the result is ``failed``.
- graceful: no VM starts any more (``not_processed``); VMs in flight finish; the result follows
  from the VM results, ``warning`` at least when a VM was left unprocessed. A graceful stop
  before the first VM's snapshot creation has begun ends the session ``failed`` with the
  message "Operation was canceled by user".
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import timedelta
from concurrent.futures import Future
from typing import Callable

from backupd.config import Config
from backupd.dispatch import open_dispatcher
from backupd.enums import SessionResult, SessionState, StopMode, TaskStatus
from backupd.errors import RepositoryError, StateError
from backupd.recovery import recover
# Imported with this module, not at the repository's first open: the import (zstd, BLAKE3,
# ~0.1-0.3 s) is the process's start-up, done before it claims the session, not the session's work.
from backupd.repository import Repository
from backupd.state import HEARTBEAT_SECONDS, DaemonRegistry, JobSession, StateStore, utcnow
from backupd.stop import StopSignal
from providers import provider_type

log = logging.getLogger(__name__)

#: seconds between two polls of the state DB for a stop request (the design says ≤ 250 ms)
POLL_SECONDS = 0.2
#: the session message of a graceful stop that came before any VM started (a documented
#: behaviour of the stop contract, worded as backup administrators know it)
CANCELED_BY_USER = "Operation was canceled by user"


class SessionRunner:
    """Runs one job session that :meth:`StateStore.create_session` created.

    :param config: the validated config.
    :param store: the state DB.
    :param session_id: the session to run; it must be in state ``starting``.
    """

    def __init__(self, config: Config, store: StateStore, session_id: int) -> None:
        self.config = config
        self.store = store
        self.session: JobSession = store.session(session_id)
        self.job = config.job(self.session.job)
        self.stop = StopSignal(store, session_id)
        self._done = threading.Event()
        # imported now, before the session is claimed: start-up, not the session's time
        self._provider_type = provider_type(config.providers[self.job.provider])

    def run(self) -> SessionResult:
        """Process the session to its end; never raises for a VM's failure.

        :returns: the session result, also written to the state DB.
        :raises StateError: the state DB could not be written: the session was stopped at
            once (VMs in flight cancelled, their snapshots removed) and is recorded
            ``failed`` by recovery once the state DB is writable again.
        """
        session_id = self.session.id
        assert session_id is not None
        try:
            self.store.claim_session(session_id)
        except StateError as exc:
            self.lose_state(exc)
            raise self._state_lost_error() from exc
        control = threading.Thread(target=self._control_loop, name=f"session-{session_id}-control", daemon=True)
        control.start()
        outcome: Callable[[], tuple[SessionResult, str | None]] = self._result
        try:
            self._process()
        except StateError as exc:
            self.lose_state(exc)
        except Exception as exc:  # the runner itself broke: the session must still end
            log.error("session %s failed: %s", session_id, exc, exc_info=_debug())
            self._log_quietly(f"session failed: {exc}", level="error")
            failure = (SessionResult.FAILED, f"session failed: {exc}")
            outcome = lambda: failure  # noqa: E731
        finally:
            self._done.set()
            control.join()
        result = SessionResult.FAILED
        if self.state_lost is None:
            try:
                result = self._end(outcome)
            except StateError as exc:
                self.lose_state(exc)
        if self.state_lost is not None:
            raise self._state_lost_error() from self.state_lost
        return result

    def _end(self, outcome: Callable[[], tuple[SessionResult, str | None]]) -> SessionResult:
        """Record the session's end. A stop request that lands while the result is worked
        out is never lost: the end is written only if the stop mode is still the one the
        result was computed with, else it is computed again."""
        session_id = self.session.id
        assert session_id is not None
        while True:
            seen = self.stop.refresh()
            result, message = outcome()
            # VM tasks always finish before _process returns or raises; only VMs never
            # started can be left, e.g. when the repository could not be opened.
            if self.store.end_session(session_id, result, message, unfinished=TaskStatus.NOT_PROCESSED,
                                      if_stop_mode=seen):
                break
            ended = self.store.session(session_id)
            if ended.state is SessionState.STOPPED:  # recovery took this runner for dead
                log.warning("session %s was ended meanwhile by recovery (%s)", session_id, ended.message)
                return ended.result or SessionResult.FAILED
        self.store.log(session_id, f"session ended: {result.value}" + (f" ({message})" if message else ""))
        return result

    def lose_state(self, exc: StateError) -> None:
        """The state DB cannot be written: stop the session at once (see
        :meth:`StopSignal.lose_state`)."""
        self.stop.lose_state(exc)

    @property
    def state_lost(self) -> StateError | None:
        return self.stop.state_error

    def _state_lost_error(self) -> StateError:
        return StateError(
            f"session {self.session.id} stopped: {self.state_lost}. Its snapshots were removed; it is "
            f"recorded failed when the state DB can be written again (any backupd command does it)"
        )

    def _log_quietly(self, text: str, *, level: str) -> None:
        try:
            self.store.log(self.session.id, text, level=level)  # type: ignore[arg-type]
        except StateError as exc:
            self.lose_state(exc)

    # -- the work -----------------------------------------------------------------------------

    def _process(self) -> None:
        session_id = self.session.id
        assert session_id is not None
        repository = self.config.repositories[self.job.repository].open(create=True)
        provider = self._provider_type(self.job.provider, self.config.providers[self.job.provider])  # type: ignore[call-arg]
        if DaemonRegistry(self.store).alive() is None:  # a running daemon does it every minute
            for level, action in recover(self.config, self.store, hunt_jobs={self.session.job}):
                self.store.log(session_id, f"recovery: {action}", level=level)
        self.store.advance_session(session_id, from_state=SessionState.STARTING, to_state=SessionState.WORKING)
        self.store.log(session_id, f"session started: job {self.session.job}, {len(self.job.vms)} VMs")
        for notice in provider.notices():
            self.store.log(session_id, f"provider {provider.name}: {notice}", level="warning")

        slots = threading.Semaphore(self.job.max_parallel_vms)
        futures: list[Future[None]] = []
        try:
            # VM tasks run on threads here, or on backup proxies ([proxies]): backupd.dispatch
            with open_dispatcher(self.config, self.store, self.session, self.stop, provider, repository) as dispatcher:
                for row in self.store.tasks(session_id):
                    if not self._wait_for_vm_slot(slots):
                        self.store.update_task(row.id, status=TaskStatus.NOT_PROCESSED, stage=None)  # type: ignore[arg-type]
                        continue
                    future = dispatcher.submit(row)
                    future.add_done_callback(lambda _f: slots.release())
                    futures.append(future)
                for future in futures:
                    future.result()
            if self.stop.mode is None and self.state_lost is None:
                self._collect_garbage(repository)
        finally:
            provider.close()

    def _collect_garbage(self, repository: Repository) -> None:
        """Free blocks no restore point references, when the repository's
        ``gc_interval_seconds`` has passed since its last collection (:meth:`Repository.last_collection`):
        once per session, for the points retention deleted in its VM tasks and in the sessions
        before it. A collection reads every manifest of the repository, so its cost grows with
        the repository, not with the session. A problem is a warning in the session log,
        never the session's failure (its restore points are committed)."""
        if not repository.garbage_pending():
            return
        interval = self.config.repositories[self.job.repository].gc_interval_seconds
        last = repository.last_collection()
        if last is not None and utcnow() - last < timedelta(seconds=interval):
            due = last + timedelta(seconds=interval)
            self.store.log(self.session.id,  # type: ignore[arg-type]
                           f"garbage collection not due: blocks only deleted restore points used are freed by "
                           f"the first session to end after {due:%Y-%m-%d %H:%M:%S} UTC (gc_interval_seconds "
                           f"{interval:g} after the last collection), or now by `backupd repository gc "
                           f"{self.job.repository}`")
            return
        try:
            gc = repository.collect_garbage()
        except RepositoryError as exc:
            self.store.log(self.session.id, f"garbage collection failed: {exc}", level="warning")  # type: ignore[arg-type]
            return
        if gc.damaged_points:
            ids = " ".join(gc.damaged_points)
            self.store.log(
                self.session.id,  # type: ignore[arg-type]
                f"garbage collection deleted nothing: restore point(s) {ids} have a damaged manifest, "
                f"which may reference any block; check with `backupd restore-point verify {ids}` and delete "
                f"them with `backupd restore-point delete {ids}`",
                level="warning",
            )

    def _wait_for_vm_slot(self, slots: threading.Semaphore) -> bool:
        """Wait for a free VM slot; False when a stop the control loop has seen means no
        further VM may start. A stop newer than its last poll is caught by the VM task,
        which reads the state DB right before it creates its snapshot."""
        while True:
            if self.stop.requested:
                return False
            if slots.acquire(timeout=POLL_SECONDS):
                if not self.stop.requested:
                    return True
                slots.release()
                return False

    def _result(self) -> tuple[SessionResult, str | None]:
        """The session result from its VM tasks and the stop in force.

        A stop that changed nothing (none was cancelled or left unprocessed: an immediate
        stop that came when every VM had finished its transfer, a graceful one when every VM
        had started) does not make the result: the VMs do, and the message says the stop
        came too late.
        """
        tasks = self.store.tasks(self.session.id)  # type: ignore[arg-type]
        statuses = [task.status for task in tasks]
        count = _Counter(statuses)
        took_effect = bool(count[TaskStatus.CANCELLED] or count[TaskStatus.NOT_PROCESSED])
        row = self.store.session(self.session.id) if self.stop.mode is not None else self.session  # type: ignore[arg-type]
        by_user = row.stop_reason in (None, "user")
        who = "by user" if by_user else f"because {row.stop_message}"
        if self.stop.mode is StopMode.IMMEDIATE and took_effect:
            return SessionResult.FAILED, f"stopped immediately {who}: {count.describe()}"
        if self.stop.mode is StopMode.GRACEFUL and count[TaskStatus.NOT_PROCESSED] == len(statuses):
            return SessionResult.FAILED, CANCELED_BY_USER if by_user else f"stopped {who} before any VM started"
        late = None
        if self.stop.mode is not None and not took_effect:
            done = "finished" if self.stop.mode is StopMode.IMMEDIATE else "started"
            late = f"{self.stop.mode.value} stop came after every VM had {done}; nothing was stopped"
        if count[TaskStatus.FAILED] or count[TaskStatus.CANCELLED]:
            return SessionResult.FAILED, _join(count.describe(), late)
        if count[TaskStatus.WARNING] or count[TaskStatus.NOT_PROCESSED]:
            prefix = f"stopped gracefully {who}: " if took_effect else ""
            return SessionResult.WARNING, _join(prefix + count.describe(), late)
        return SessionResult.SUCCESS, late

    # -- control ------------------------------------------------------------------------------

    def _control_loop(self) -> None:
        """Poll for stop requests and beat the heartbeat until the session is done. A state
        DB failure stops the session (:meth:`lose_state`) and ends the loop."""
        session_id = self.session.id
        beat = 0.0
        seen: StopMode | None = None
        while not self._done.wait(POLL_SECONDS) and self.state_lost is None:
            try:
                mode = self.stop.refresh()
                if mode is not seen:
                    if seen is None:
                        for current in (SessionState.STARTING, SessionState.WORKING):
                            self.store.advance_session(session_id, from_state=current, to_state=SessionState.STOPPING)  # type: ignore[arg-type]
                    self.store.log(session_id, f"{mode.value} stop requested")  # type: ignore[arg-type, union-attr]
                    seen = mode
                if mode is StopMode.GRACEFUL and self.stop.drain_deadline and utcnow() >= self.stop.drain_deadline:
                    self.store.log(session_id, "the drain period ended with VMs still in flight; escalating "  # type: ignore[arg-type]
                                   "to an immediate stop", level="warning")
                    self.store.request_stop(session_id, StopMode.IMMEDIATE, None)  # type: ignore[arg-type]
                beat += POLL_SECONDS
                if beat >= HEARTBEAT_SECONDS:
                    beat = 0.0
                    self.store.update_session(session_id, heartbeat_at=utcnow())  # type: ignore[arg-type]
            except StateError as exc:
                self.lose_state(exc)


def _join(*parts: str | None) -> str | None:
    return "; ".join(part for part in parts if part) or None


def _debug() -> bool:
    """Tracebacks in logs only when asked for (``BACKUPD_DEBUG=1``)."""
    return bool(os.environ.get("BACKUPD_DEBUG"))


class _Counter(dict):
    """VM task statuses counted, worded for a session message."""

    def __init__(self, statuses: list[TaskStatus]) -> None:
        super().__init__()
        for status in statuses:
            self[status] = self.get(status, 0) + 1

    def __missing__(self, key: TaskStatus) -> int:
        return 0

    def describe(self) -> str:
        order = [
            TaskStatus.SUCCESS, TaskStatus.WARNING, TaskStatus.FAILED,
            TaskStatus.CANCELLED, TaskStatus.NOT_PROCESSED,
        ]
        return ", ".join(f"{self[s]} {s.value}" for s in order if self[s])

