"""Where a session's VM tasks run: in the session's process, or on backup proxies.

:class:`backupd.engine.SessionRunner` decides the order and how many VM tasks are in flight
(job order, at most ``max_parallel_vms``); a dispatcher starts each and tells when it is over,
as a :class:`~concurrent.futures.Future` that is done when the VM task's row is final.
:func:`open_dispatcher` picks one:

- :class:`LocalDispatcher` (no ``[proxies]`` table, the embedded default): a thread per VM
  task and one block pool, in this process.
- :class:`ProxyDispatcher` (``[proxies]``): each VM task goes to the broker queue of the job's
  ``proxy_pool``; a proxy (:mod:`backupd.proxy`) claims and runs it; this process watches the
  rows in the state DB every :data:`WATCH_SECONDS`:

  - a stop request: tasks no proxy has claimed yet end ``not_processed`` (proxies skip
    them); claimed ones hear the stop from the state DB themselves;
  - no live proxy in the pool: the session waits and logs it; after ``proxy_wait_seconds``
    the VM tasks waiting for one end ``failed``;
  - a proxy of the pool lost while a VM task it may have taken is still unclaimed: the task's
    message is sent again. Delivery is acknowledged when a proxy starts the task, and claiming
    the row is the task's first step, so a proxy that dies between the two loses the message;
    claiming is one conditional ``UPDATE``, so a copy that finds the row claimed is skipped;
  - a proxy lost (its heartbeat older than :data:`backupd.proxy_registry.STALE_SECONDS`, or it
    exited) while it held a VM task: the task ends ``failed`` ("proxy lost"), its snapshot is
    removed through the provider, its VM lock released; a restore point it had already
    committed is kept and recorded (``warning``). The session goes on with its other VMs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING

from backupd.enums import TaskStatus
from backupd.errors import BackupdError, StateError
from backupd.state import JobSession, StateStore, VmTask as VmTaskRow, as_utc, utcnow
from backupd.stop import StopSignal
from backupd.vmtask import VmTask

if TYPE_CHECKING:
    from backupd.config import Config
    from backupd.repository import Repository
    from backupd.state import Proxy
    from providers.base import Provider

log = logging.getLogger(__name__)

#: seconds between two looks at the rows of VM tasks on proxies
WATCH_SECONDS = 0.2
#: seconds between two looks for a live proxy while none is
PROXY_POLL_SECONDS = 0.5
#: how a VM task's error begins when its proxy was lost
PROXY_LOST = "proxy lost"


class Dispatcher:
    """Starts a session's VM tasks; a context manager whose exit waits for none of them (the
    runner waits on the futures)."""

    def submit(self, row: VmTaskRow) -> "Future[None]":
        """Start the VM task of ``row`` (pending).

        :returns: a future done when the task's row is final.
        """
        raise NotImplementedError

    def __enter__(self) -> "Dispatcher":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        return None


def open_dispatcher(config: "Config", store: StateStore, session: JobSession, stop: StopSignal,
                    provider: "Provider", repository: "Repository") -> Dispatcher:
    """The dispatcher of a session: :class:`ProxyDispatcher` when the config has
    ``[proxies]``, else :class:`LocalDispatcher`."""
    if config.proxies is not None:
        return ProxyDispatcher(config, store, session, stop, provider, repository)
    return LocalDispatcher(config, store, session, stop, provider, repository)


class LocalDispatcher(Dispatcher):
    """VM tasks on threads of this process (at most ``max_parallel_vms``), blocks hashed,
    compressed and written by one pool of ``cpu_count`` workers shared by the session."""

    def __init__(self, config: "Config", store: StateStore, session: JobSession, stop: StopSignal,
                 provider: "Provider", repository: "Repository") -> None:
        self._args = (config, store, session)
        self._stop = stop
        self._provider = provider
        self._repository = repository
        job = config.job(session.job)
        self._block_pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix=f"session-{session.id}-block")
        self._vm_pool = ThreadPoolExecutor(job.max_parallel_vms, thread_name_prefix=f"session-{session.id}-vm")

    def submit(self, row: VmTaskRow) -> "Future[None]":
        task = VmTask(*self._args, row, self._stop, self._provider, self._repository, self._block_pool)
        return self._vm_pool.submit(task.run)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._vm_pool.shutdown(wait=True)
        self._block_pool.shutdown(wait=True)


class ProxyDispatcher(Dispatcher):
    """VM tasks on the backup proxies of the job's pool, through the broker (see the module
    docstring)."""

    def __init__(self, config: "Config", store: StateStore, session: JobSession, stop: StopSignal,
                 provider: "Provider", repository: "Repository") -> None:
        from backupd.celery_app import celery_app, queue_name
        from backupd.proxy_registry import ProxyRegistry

        assert config.proxies is not None
        self.config = config
        self.store = store
        self.session = session
        self.session_id: int = session.id  # type: ignore[assignment]
        self.job = config.job(session.job)
        self.stop = stop
        self.provider = provider
        self.repository = repository
        self.pool = self.job.proxy_pool
        self.wait_seconds = config.proxies.proxy_wait_seconds
        self.registry = ProxyRegistry(store)
        self.app = celery_app(config.proxies)
        self.queue = queue_name(self.pool)
        self._futures: dict[int, Future[None]] = {}
        #: for each unclaimed VM task, the live proxies of the pool when its message was last
        #: sent, (host, pid): those that may have taken it (:meth:`_send_again`)
        self._takers: dict[int, set[tuple[str, int]]] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        #: since when no proxy of the pool has been alive (monotonic seconds), None while one is
        self._no_proxy_since: float | None = None
        self._announced = False
        self._watcher = threading.Thread(target=self._watch, name=f"session-{self.session_id}-proxies", daemon=True)
        self._watcher.start()

    # -- dispatch ---------------------------------------------------------------------------

    def submit(self, row: VmTaskRow) -> "Future[None]":
        future: Future[None] = Future()
        task_id: int = row.id  # type: ignore[assignment]
        if not self._wait_for_live_proxy():
            if not self.stop.requested:
                self._give_up(task_id, row.vm)
            else:
                self.store.end_pending_task(task_id, TaskStatus.NOT_PROCESSED, None)
            future.set_result(None)
            return future
        with self._lock:
            self._futures[task_id] = future
        self.store.update_task(task_id, dispatched_at=utcnow())
        self._send(task_id, row.vm)
        return future

    def _send(self, task_id: int, vm: str) -> None:
        """Put the VM task's message on the pool's queue; a broker that refuses it fails the
        VM task (if no proxy has claimed it meanwhile)."""
        from backupd.celery_app import VM_TASK

        self._takers[task_id] = {(p.host, p.pid) for p in self._live_proxies()}
        try:
            self.app.send_task(VM_TASK, args=[self.session_id, task_id], queue=self.queue)
        except Exception as exc:  # noqa: BLE001 - kombu raises the transport's own errors
            text = f"cannot hand the VM task to the broker {self.config.proxies.safe_url()}: {exc}"  # type: ignore[union-attr]
            if self.store.end_pending_task(task_id, TaskStatus.FAILED, text):
                self.store.log(self.session_id, f"failed: {text}", level="error", vm=vm)

    def _send_again(self, row: VmTaskRow, pool_proxies: list["Proxy"]) -> None:
        """Send an unclaimed VM task's message again when a proxy that was alive when it was
        sent is gone since (it may have taken the message and died before claiming the row)."""
        from backupd.proxy_registry import is_gone

        takers = self._takers.get(row.id, set())  # type: ignore[arg-type]
        known = {(p.host, p.pid): p for p in pool_proxies}
        lost = sorted(taker for taker in takers if is_gone(known.get(taker)))
        if lost:
            host, pid = lost[0]
            self.store.log(self.session_id, f"VM task sent again: proxy pid {pid} on {host}, which may have taken it,"
                           " was lost before any proxy claimed it", level="warning", vm=row.vm)
            self._send(row.id, row.vm)  # type: ignore[arg-type]

    def _wait_for_live_proxy(self) -> bool:
        """Wait until the pool has a live proxy, at most until ``proxy_wait_seconds`` have
        passed since none was; False when that time is up or a stop came first."""
        while not self.stop.requested:
            if self._live_proxies():
                return True
            if time.monotonic() - self._no_proxy_since >= self.wait_seconds:  # type: ignore[operator]
                return False
            self.stop.cancel.wait(PROXY_POLL_SECONDS)
        return False

    def _live_proxies(self) -> list["Proxy"]:
        """The live proxies of the pool; notes (and logs, once) when there is none."""
        from backupd.proxy_registry import is_alive

        live = [p for p in self.registry.proxies(pool=self.pool) if is_alive(p)]
        if live:
            if self._announced:
                self.store.log(self.session_id, f"proxy pool {self.pool}: {len(live)} live proxy(ies) again")
            self._no_proxy_since = None
            self._announced = False
        elif self._no_proxy_since is None:
            self._no_proxy_since = time.monotonic()
        if not live and not self._announced:
            self._announced = True
            text = (f"proxy pool {self.pool}: no live backup proxy; waiting up to {self.wait_seconds:g} s for one "
                    f"(`backupd proxy --pool {self.pool}`)")
            self.store.log(self.session_id, text, level="warning")
            log.warning("session %s: %s", self.session_id, text)
        return live

    def _give_up(self, task_id: int, vm: str) -> None:
        text = f"no live backup proxy in pool {self.pool} for {self.wait_seconds:g} s (proxy_wait_seconds)"
        if self.store.end_pending_task(task_id, TaskStatus.FAILED, text):
            self.store.log(self.session_id, f"failed: {text}", level="error", vm=vm)

    # -- watching the rows ------------------------------------------------------------------------

    def _watch(self) -> None:
        """Complete the futures of final rows; act on stops, lost proxies and a pool without
        a live proxy (see the module docstring). A state DB failure stops the session
        (:meth:`StopSignal.lose_state`) and releases the runner."""
        while not self._done.wait(WATCH_SECONDS):
            with self._lock:
                waiting = dict(self._futures)
            if not waiting:
                continue
            try:
                self._look(waiting)
            except StateError as exc:
                self.stop.lose_state(exc)
                self._release_all()
                return

    def _look(self, waiting: dict[int, "Future[None]"]) -> None:
        from backupd.proxy_registry import is_gone

        rows = {row.id: row for row in self.store.tasks(self.session_id) if row.id in waiting}
        proxies = None
        pool_proxies: list[Proxy] | None = None
        timed_out: bool | None = None
        for task_id, row in rows.items():
            if row.status is TaskStatus.PENDING:
                if self.stop.requested:
                    self.store.end_pending_task(task_id, TaskStatus.NOT_PROCESSED, None)
                    continue
                if timed_out is None:
                    timed_out = not self._live_proxies() and self._no_proxy_since is not None \
                        and time.monotonic() - self._no_proxy_since >= self.wait_seconds
                if timed_out:
                    self._give_up(task_id, row.vm)
                    continue
                if pool_proxies is None:
                    pool_proxies = self.registry.proxies(pool=self.pool)
                self._send_again(row, pool_proxies)
                continue
            self._takers.pop(task_id, None)
            if row.status is TaskStatus.RUNNING:
                if proxies is None:
                    proxies = {(p.host, p.pid): p for p in self.registry.proxies()}
                proxy = proxies.get((row.proxy_host, row.proxy_pid))  # type: ignore[arg-type]
                if is_gone(proxy):
                    self._proxy_lost(row, proxy)
                continue
            self._finished(task_id)

    def _finished(self, task_id: int) -> None:
        with self._lock:
            future = self._futures.pop(task_id, None)
        if future is not None and not future.done():
            future.set_result(None)

    def _release_all(self) -> None:
        with self._lock:
            futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_result(None)

    # -- a lost proxy ------------------------------------------------------------------------

    def _proxy_lost(self, row: VmTaskRow, proxy: "Proxy | None") -> None:
        """End a VM task whose proxy is gone: its snapshot removed through the provider, its
        VM lock released, a restore point it committed recorded, else ``failed``."""
        from backupd.vmtask import vm_lock_key

        beat = as_utc(proxy.heartbeat_at) if proxy is not None else None
        who = f"proxy pid {row.proxy_pid} on {row.proxy_host}"
        why = "exited" if proxy is not None and proxy.status == "stopped" else \
            f"stopped beating (last heartbeat {beat:%Y-%m-%d %H:%M:%S} UTC)" if beat else "is unknown"
        reason = f"{PROXY_LOST}: {who} {why}"
        snapshot_note = self._remove_snapshots(row)
        point = self._committed_point(row)
        fields: dict[str, object] = {"stage": None, "ended_at": utcnow()}
        if point is not None:
            fields.update(status=TaskStatus.WARNING, restore_point=point,
                          warning=f"{reason} after the restore point was committed" + snapshot_note)
        else:
            fields.update(status=TaskStatus.FAILED, error=f"{reason} (stage {row.stage}); no restore point was made"
                          + snapshot_note)
        self.store.update_task(row.id, **fields)  # type: ignore[arg-type]
        if row.vm_id is not None:  # the lock is taken after the VM's id is recorded
            self.store.release_vm(vm_lock_key(self.job.provider, row.vm_id), self.session_id)
        self.store.log(self.session_id, str(fields.get("error") or fields.get("warning")), level="error", vm=row.vm)
        log.warning("session %s, VM %s: %s", self.session_id, row.vm, reason)
        self._finished(row.id)  # type: ignore[arg-type]

    def _remove_snapshots(self, row: VmTaskRow) -> str:
        """Remove the snapshots this session made of the VM (the recorded one, and any named
        ``backupd-JOB-SESSION``: the proxy may have died before recording it), retried.

        :returns: a note for the task's message, empty when all went.
        """
        from backupd.recovery import snapshot_name
        from backupd.retry import call_with_retry
        from providers.base import ProviderError

        name = snapshot_name(self.session.job, self.session_id)
        try:
            vm = self.provider.find_vm(row.vm)
            mine = [s for s in self.provider.list_snapshots(vm) if s.id == row.snapshot_id or s.name == name]
            for snapshot in mine:
                call_with_retry(lambda snapshot=snapshot: self.provider.remove_snapshot(snapshot), self.job.retry)
                self.store.log(self.session_id, f"snapshot {snapshot.id} of the lost proxy removed", vm=row.vm)
        except ProviderError as exc:
            self.store.update_task(row.id, snapshot_error=str(exc))  # type: ignore[arg-type]
            return f"; its snapshot could not be removed: {exc}"
        if row.snapshot_id is not None:
            self.store.update_task(row.id, snapshot_removed=True)  # type: ignore[arg-type]
        return ""

    def _committed_point(self, row: VmTaskRow) -> str | None:
        """The restore point this session committed for the VM, if any (the repository is
        the source of truth); opening the repository also discards dead writers' staging."""
        try:
            settings = self.config.repositories[self.job.repository]
            points = settings.open(create=False).points(vm_id=row.vm_id, job=self.session.job) if row.vm_id \
                else []  # no id recorded: the proxy died before it looked the VM up, so nothing was committed
        except BackupdError as exc:
            log.warning("session %s: cannot read the repository for VM %s: %s", self.session_id, row.vm, exc)
            return None
        return next((p.id for p in points if p.session == str(self.session_id)), None)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._done.set()
        self._watcher.join()
        self._release_all()


