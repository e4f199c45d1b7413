"""``backupd proxy``: a backup proxy, the process that runs VM tasks for sessions elsewhere.

A proxy is a Celery worker (:mod:`backupd.celery_app`) consuming the queue of one pool, with a
pool of ``--max-tasks`` threads, so it never runs more VM tasks at once (Veeam's "max
concurrent tasks"). Each message names a VM task by ids; the proxy claims the task's row in
the state DB (once: a task its session gave up on, or another proxy claimed, is skipped) and
runs it with the same :class:`backupd.vmtask.VmTask` code a session runs in its own process:
the VM lock in the state DB before the snapshot, the stop request polled from the state DB
every :data:`backupd.engine.POLL_SECONDS` (an immediate stop cancels it between blocks and
removes its snapshot), progress and result written to its row, which the session watches.

The proxy needs the same config as the daemon (providers, repositories, jobs, the state DB)
and write access to the repositories, on a shared file system (docs/scale-out.md).

Its row in the state DB (:mod:`backupd.proxy_registry`) beats every
:data:`~backupd.proxy_registry.HEARTBEAT_SECONDS` with the tasks it runs. A proxy that cannot
reach the state DB stops consuming its queue (and says so on stderr) until it can again; one
that cannot reach the broker says so and is marked ``paused`` while Celery reconnects.

Signals are Celery's: SIGTERM or SIGINT, a warm shutdown (no new task; those running finish);
a second SIGINT or SIGQUIT, a cold one (running tasks are abandoned; the sessions find them
``proxy lost``).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from backupd.celery_app import VM_TASK, celery_app, queue_name
from backupd.enums import TaskStatus
from backupd.errors import ConfigError, StateError
from backupd.proxy_registry import HEARTBEAT_SECONDS, ProxyRegistry
from backupd.state import StateStore, utcnow
from backupd.stop import StopSignal

if TYPE_CHECKING:
    from backupd.config import Config
    from backupd.repository import Repository
    from providers.base import Provider

log = logging.getLogger("backupd.proxy")

#: seconds between two looks at whether the broker can be reached
BROKER_CHECK_SECONDS = 5.0


class Proxy:
    """One backup proxy process (see the module docstring).

    :param config: the validated config; it must have ``[proxies]``.
    :param pool: the pool whose VM tasks it takes.
    :param max_tasks: VM tasks it runs at most at once, 1 or more.
    :param host: its host id (:func:`backupd.proxy_registry.host_id`).
    :raises ConfigError: the config has no ``[proxies]`` table.
    """

    def __init__(self, config: "Config", *, pool: str, max_tasks: int, host: str) -> None:
        if config.proxies is None:
            raise ConfigError(str(config.path), [("proxies", None, "a proxy needs a [proxies] table (broker = ...)")])
        self.config = config
        self.pool = pool
        self.max_tasks = max_tasks
        self.host = host
        self.pid = os.getpid()
        self.store = StateStore(config.state.connect_url())
        self.registry = ProxyRegistry(self.store)
        self.app = celery_app(config.proxies)
        self.app.task(name=VM_TASK, ignore_result=True)(self._run_task)
        self.queue = queue_name(pool)
        self.worker_name = f"backupd-proxy-{pool}@{host}.{self.pid}"
        self.block_pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="proxy-block")
        self._providers: dict[str, "Provider"] = {}
        self._repositories: dict[str, "Repository"] = {}
        self._open_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self._stopped = threading.Event()
        self.name = ""

    # -- life cycle ------------------------------------------------------------------------

    def run(self) -> int:
        """Take VM tasks until a signal ends the worker.

        :returns: the Celery worker's exit code (0 after a warm shutdown).
        :raises StateError: the state DB cannot be used at start.
        """
        self.name = self.registry.register(self.host, self.pid, self.pool, self.max_tasks)
        log.info("proxy %s: pool %s, at most %d VM task(s) at once, broker %s, state DB %s", self.name, self.pool,
                 self.max_tasks, self.config.proxies.safe_url(), self.store.safe_url())  # type: ignore[union-attr]
        beat = threading.Thread(target=self._heartbeat_loop, name="proxy-heartbeat", daemon=True)
        beat.start()
        worker = self.app.Worker(
            hostname=self.worker_name, pool_cls="threads", concurrency=self.max_tasks, queues=[self.queue],
            loglevel="WARNING", without_gossip=True, without_mingle=True, without_heartbeat=True, quiet=True,
            redirect_stdouts=False,
        )
        try:
            worker.start()
        finally:
            self._stopped.set()
            beat.join()
            try:
                self.registry.beat(self.name, running=self.running, peak=self.peak, status="stopped", note="exited")
            except StateError as exc:
                log.error("proxy %s: cannot record its exit: %s", self.name, exc)
            self.block_pool.shutdown(wait=True)
            for provider in self._providers.values():
                provider.close()
            self.store.close()
            log.info("proxy %s stopped", self.name)
        return int(worker.exitcode or 0)

    def _heartbeat_loop(self) -> None:
        """Beat the proxy's row; stop consuming while the state DB cannot be reached, and say
        so; mark the proxy ``paused`` while the broker cannot be reached."""
        db_lost = False
        broker_note: str | None = None
        last_broker_check = 0.0
        clock = 0.0
        while not self._stopped.wait(HEARTBEAT_SECONDS if not db_lost else 1.0):
            clock += HEARTBEAT_SECONDS
            if clock - last_broker_check >= BROKER_CHECK_SECONDS:
                last_broker_check = clock
                broker_note = self._broker_problem()
                if broker_note:
                    log.error("proxy %s: %s; taking no VM task until it is back", self.name, broker_note)
            try:
                self.registry.beat(self.name, running=self.running, peak=self.peak,
                                   status="paused" if broker_note else "up", note=broker_note)
            except StateError as exc:
                if not db_lost:
                    db_lost = True
                    log.error("proxy %s: %s; taking no VM task until the state DB is back", self.name, exc)
                    self._control("cancel_consumer")
                continue
            if db_lost:
                db_lost = False
                log.warning("proxy %s: the state DB is back; taking VM tasks again", self.name)
                self._control("add_consumer")

    def _broker_problem(self) -> str | None:
        """Why the broker cannot be reached now, or None."""
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=3)
        except Exception as exc:  # noqa: BLE001 - kombu raises the transport's own errors
            return f"cannot reach the broker {self.config.proxies.safe_url()}: {exc}"  # type: ignore[union-attr]
        return None

    def _control(self, command: str) -> None:
        """Tell this proxy's own Celery worker, through the broker, to stop or resume
        consuming its queue (Celery's remote control: ``cancel_consumer`` / ``add_consumer``)."""
        try:
            getattr(self.app.control, command)(self.queue, destination=[self.worker_name])
        except Exception as exc:  # noqa: BLE001 - the broker may be gone too; logged
            log.error("proxy %s: %s of %s failed: %s", self.name, command, self.queue, exc)

    # -- one VM task -------------------------------------------------------------------------

    def _run_task(self, session_id: int, task_id: int) -> None:
        """The Celery task: claim the VM task, then run it (never raises: the outcome is on
        the task's row)."""
        try:
            claimed = self.store.claim_task(task_id, host=self.host, pid=self.pid)
        except StateError as exc:
            log.error("proxy %s: VM task %s of session %s not taken: %s", self.name, task_id, session_id, exc)
            return
        if not claimed:
            log.info("proxy %s: VM task %s of session %s is no longer pending (stopped, or given up); skipped",
                     self.name, task_id, session_id)
            return
        with self._counted():
            try:
                self._process(session_id, task_id)
            except StateError as exc:
                log.error("proxy %s: VM task %s of session %s: %s", self.name, task_id, session_id, exc)
            except Exception:  # noqa: BLE001 - a bug; the session sees the task as failed
                log.exception("proxy %s: VM task %s of session %s", self.name, task_id, session_id)
                self.store.update_task(task_id, status=TaskStatus.FAILED, stage=None, ended_at=utcnow(),
                                       error="internal error on the proxy; see its log")

    @contextmanager
    def _counted(self) -> Iterator[None]:
        with self._count_lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            yield
        finally:
            with self._count_lock:
                self.running -= 1

    def _process(self, session_id: int, task_id: int) -> None:
        from backupd.vmtask import VmTask

        session = self.store.session(session_id)
        row = self.store.task(task_id)
        try:
            job = self.config.job(session.job)
            provider = self._provider(job.provider)
            repository = self._repository(job.repository)
        except Exception as exc:  # noqa: BLE001 - a job missing from this proxy's config, a provider that cannot be opened: on the task's row
            text = f"the proxy {self.name} cannot run it: {exc}"
            self.store.update_task(task_id, status=TaskStatus.FAILED, stage=None, ended_at=utcnow(), error=text)
            self.store.log(session_id, f"failed: {text}", level="error", vm=row.vm)
            return
        stop = StopSignal(self.store, session_id)
        done = threading.Event()
        poller = threading.Thread(target=_poll_stop, args=(stop, done), name=f"proxy-stop-{task_id}", daemon=True)
        poller.start()
        try:
            VmTask(self.config, self.store, session, row, stop, provider, repository, self.block_pool).run()
        finally:
            done.set()
            poller.join()

    def _provider(self, name: str) -> "Provider":
        """The provider, opened once per proxy and shared by its VM tasks (as a session's
        VM tasks share one)."""
        from providers import open_provider

        with self._open_lock:
            if name not in self._providers:
                self._providers[name] = open_provider(name, self.config.providers[name])
            return self._providers[name]

    def _repository(self, name: str) -> "Repository":
        with self._open_lock:
            if name not in self._repositories:
                self._repositories[name] = self.config.repositories[name].open(create=True)
            return self._repositories[name]


def _poll_stop(stop: StopSignal, done: threading.Event) -> None:
    """Read the session's stop request every :data:`backupd.engine.POLL_SECONDS` while a VM
    task runs, raising its events (an immediate stop cancels the task between blocks). A
    state DB failure stops the task, as in a session's own process."""
    from backupd.engine import POLL_SECONDS

    while not done.wait(POLL_SECONDS):
        try:
            stop.refresh()
        except StateError as exc:
            stop.lose_state(exc)
            return


def run_proxy(config: "Config", *, pool: str, max_tasks: int, host: str) -> int:
    """``backupd proxy``: run a proxy in the foreground until a signal.

    :returns: the exit code.
    """
    return Proxy(config, pool=pool, max_tasks=max_tasks, host=host).run()


