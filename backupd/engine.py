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
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from backupd.config import Config
from backupd.enums import SessionResult, SessionState, StopMode, TaskStatus
from backupd.retry import call_with_retry
from backupd.state import JobSession, StateStore, utcnow

if TYPE_CHECKING:
    from providers.base import Provider

log = logging.getLogger(__name__)

#: seconds between two polls of the state DB for a stop request (the design says ≤ 250 ms)
POLL_SECONDS = 0.2
#: seconds between two heartbeats of a running session
HEARTBEAT_SECONDS = 5.0
#: the session message of a graceful stop that came before any VM started (a documented
#: behaviour of the stop contract, worded as backup administrators know it)
CANCELED_BY_USER = "Operation was canceled by user"


class StopSignal:
    """What a session has been asked to do, as seen by its runner and its VM tasks.

    ``no_new_vms`` is set by either kind of stop; ``cancel`` only by an immediate stop (VM
    tasks in flight abandon their work). Once immediate, the signal never goes back.
    """

    def __init__(self, store: StateStore, session_id: int) -> None:
        self._store = store
        self._session_id = session_id
        self.no_new_vms = threading.Event()
        self.cancel = threading.Event()
        self.mode: StopMode | None = None

    def refresh(self) -> StopMode | None:
        """Read the stop request from the state DB and raise the events it asks for.

        :returns: the stop mode in force, None when no stop was requested.
        """
        mode = self._store.stop_request(self._session_id)
        if mode is not None and self.mode is not StopMode.IMMEDIATE:
            self.mode = mode
            self.no_new_vms.set()
            if mode is StopMode.IMMEDIATE:
                self.cancel.set()
        return self.mode

    @property
    def requested(self) -> bool:
        return self.no_new_vms.is_set()


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
        #: set as soon as a VM task begins creating its snapshot
        self.first_snapshot_begun = threading.Event()
        self._done = threading.Event()

    def run(self) -> SessionResult:
        """Process the session to its end; never raises for a VM's failure.

        :returns: the session result, also written to the state DB.
        """
        session_id = self.session.id
        assert session_id is not None
        self.store.claim_session(session_id)
        control = threading.Thread(target=self._control_loop, name=f"session-{session_id}-control", daemon=True)
        control.start()
        try:
            result, message = self._process()
        except Exception as exc:  # the runner itself broke: the session must still end
            log.exception("session %s failed", session_id)
            self.store.log(session_id, f"session failed: {exc}", level="error")
            result, message = SessionResult.FAILED, f"session failed: {exc}"
        finally:
            self._done.set()
            control.join()
        # VM tasks always finish before _process returns or raises; only VMs never started
        # can be left, e.g. when the repository could not be opened.
        self.store.end_session(session_id, result, message, unfinished=TaskStatus.NOT_PROCESSED)
        self.store.log(session_id, f"session ended: {result.value}" + (f" ({message})" if message else ""))
        return result

    # -- the work -----------------------------------------------------------------------------

    def _process(self) -> tuple[SessionResult, str | None]:
        from backupd.vmtask import VmTask
        from providers import open_provider

        session_id = self.session.id
        assert session_id is not None
        repository = self.config.repositories[self.job.repository].open(create=True)
        provider = open_provider(self.job.provider, self.config.providers[self.job.provider])
        self._remove_orphaned_snapshots(provider)
        self.store.advance_session(session_id, from_state=SessionState.STARTING, to_state=SessionState.WORKING)
        self.store.log(session_id, f"session started: job {self.session.job}, {len(self.job.vms)} VMs")

        slots = threading.Semaphore(self.job.max_parallel_vms)
        workers = max(2, os.cpu_count() or 2)
        futures: list[Future[None]] = []
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix=f"session-{session_id}-block") as block_pool, \
                    ThreadPoolExecutor(self.job.max_parallel_vms, thread_name_prefix=f"session-{session_id}-vm") as vm_pool:
                for row in self.store.tasks(session_id):
                    if not self._wait_for_vm_slot(slots):
                        self.store.update_task(row.id, status=TaskStatus.NOT_PROCESSED, stage=None)  # type: ignore[arg-type]
                        continue
                    task = VmTask(self, row, provider, repository, block_pool)
                    future = vm_pool.submit(task.run)
                    future.add_done_callback(lambda _f: slots.release())
                    futures.append(future)
                for future in futures:
                    future.result()
            if self.stop.mode is None:
                repository.collect_garbage()
        finally:
            provider.close()
        return self._result()

    def _remove_orphaned_snapshots(self, provider: "Provider") -> None:
        """Remove the snapshots earlier sessions of this job recorded but did not remove (the
        crash row of the stop contract, for the sessions of this job): a runner killed with
        SIGKILL, a host crash, a removal that kept failing. A failure is logged and left for
        the next session; it does not fail this one."""
        from providers.base import ProviderError

        session_id = self.session.id
        assert session_id is not None
        for task in self.store.unremoved_snapshots(self.session.job):
            try:
                vm = provider.find_vm(task.vm)
                snapshot = next((s for s in provider.list_snapshots(vm) if s.id == task.snapshot_id), None)
                if snapshot is not None:
                    call_with_retry(lambda: provider.remove_snapshot(snapshot), self.job.retry)
            except ProviderError as exc:
                self.store.update_task(task.id, snapshot_error=str(exc))  # type: ignore[arg-type]
                self.store.log(session_id, f"orphaned snapshot {task.snapshot_id} of session {task.session_id} "
                               f"could not be removed: {exc}", level="warning", vm=task.vm)
                continue
            self.store.update_task(task.id, snapshot_removed=True, snapshot_error=None)  # type: ignore[arg-type]
            self.store.log(session_id, f"removed orphaned snapshot {task.snapshot_id} left by session "
                           f"{task.session_id}" + ("" if snapshot else " (it was already gone)"), vm=task.vm)

    def _wait_for_vm_slot(self, slots: threading.Semaphore) -> bool:
        """Wait for a free VM slot; False when a stop means no further VM may start."""
        while True:
            if self.stop.requested or self.stop.refresh() is not None:
                return False
            if slots.acquire(timeout=POLL_SECONDS):
                if self.stop.refresh() is None:
                    return True
                slots.release()
                return False

    def _result(self) -> tuple[SessionResult, str | None]:
        tasks = self.store.tasks(self.session.id)  # type: ignore[arg-type]
        statuses = [task.status for task in tasks]
        count = _Counter(statuses)
        if self.stop.mode is StopMode.IMMEDIATE:
            return SessionResult.FAILED, f"stopped immediately by user: {count.describe()}"
        if self.stop.mode is StopMode.GRACEFUL and not self.first_snapshot_begun.is_set():
            return SessionResult.FAILED, CANCELED_BY_USER
        if count[TaskStatus.FAILED] or count[TaskStatus.CANCELLED]:
            return SessionResult.FAILED, count.describe()
        if count[TaskStatus.WARNING] or count[TaskStatus.NOT_PROCESSED]:
            prefix = "stopped gracefully by user: " if self.stop.mode else ""
            return SessionResult.WARNING, prefix + count.describe()
        return SessionResult.SUCCESS, None

    # -- control ------------------------------------------------------------------------------

    def _control_loop(self) -> None:
        """Poll for stop requests and beat the heartbeat until the session is done."""
        session_id = self.session.id
        beat = 0.0
        seen: StopMode | None = None
        while not self._done.wait(POLL_SECONDS):
            try:
                mode = self.stop.refresh()
                if mode is not seen:
                    if seen is None:
                        for current in (SessionState.STARTING, SessionState.WORKING):
                            self.store.advance_session(session_id, from_state=current, to_state=SessionState.STOPPING)  # type: ignore[arg-type]
                    self.store.log(session_id, f"{mode.value} stop requested")  # type: ignore[arg-type, union-attr]
                    seen = mode
                beat += POLL_SECONDS
                if beat >= HEARTBEAT_SECONDS:
                    beat = 0.0
                    self.store.update_session(session_id, heartbeat_at=utcnow())  # type: ignore[arg-type]
            except Exception:  # a busy DB must not kill the control loop
                log.exception("control loop of session %s", session_id)


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

