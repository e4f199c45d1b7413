"""The operations an administrator or a script performs, as a Python API.

The CLI (:mod:`backupd.cli`) is a thin shell over this class; integration tests and, later, the
daemon call the same methods. Every method validates its input against the config and raises
a :class:`~backupd.errors.BackupdError` that knows its exit code.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from backupd.config import MAX_STOP_MESSAGE, Config
from backupd.enums import SessionResult, SessionState, StopMode, TaskStatus
from backupd.errors import NoRunningSessionError, NotFoundError, StateError, UsageError
from backupd.state import JobSession, StateStore

#: a progress callback: (units done, units in all)
Progress = Callable[[int, int], None]

if TYPE_CHECKING:
    from backupd.repository import DamagedPoint, GcResult, PointInfo, Repository, VerifyResult
    from providers.base import Provider, VmInfo
    from providers.simulated import SimulatedProvider


@dataclass(frozen=True)
class StopOutcome:
    """What a stop request did for one job.

    :ivar outcome: ``stop_requested``; ``too_late`` when the session's VMs had all finished
        (the stop would change nothing; with ``--wait`` also when it changed nothing by the
        time the session ended); or ``no_running_session``.
    :ivar session: the session the request was written to (or found too late), if any.
    :ivar mode: the stop mode now in force on that session.
    """

    job: str
    outcome: str
    session: int | None
    mode: StopMode | None


class Backupd:
    """Operations on one config.

    :param config: the validated config.
    :param store: the state DB of ``config``, already opened (a session process forked by the
        daemon's fork server gets the fork server's, :meth:`StateStore.warm_up`); by default
        it is opened on first use.
    :param recover_dead: end sessions whose runner is gone when the state DB is first used
        (:func:`backupd.recovery.recover_dead_sessions`), so no command shows a dead session
        as running. A session process passes False: the recovery pass its session runs
        when no daemon does, or the daemon's every minute, covers it, and the query read
        every unfinished session (a hundred, under a daemon's busy minute) for each session.
    """

    def __init__(self, config: Config, *, store: StateStore | None = None, recover_dead: bool = True) -> None:
        self.config = config
        self._store: StateStore | None = None
        self._opened = store
        self._recover_dead = recover_dead

    @property
    def store(self) -> StateStore:
        """The state DB, opened on first use; sessions whose runner is gone are recovered
        then (:func:`backupd.recovery.recover_dead_sessions`), unless ``recover_dead`` is
        False."""
        if self._store is None:
            self._store = self._opened or StateStore(self.config.state.connect_url())
            if self._recover_dead and self._store.dead_sessions():
                from backupd.recovery import recover_dead_sessions

                recover_dead_sessions(self.config, self._store)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    # -- sessions ---------------------------------------------------------------------------

    def create_session(
        self,
        job: str,
        *,
        full: bool = False,
        trigger: str = "manual",
        triggered_by: int | None = None,
        owner: tuple[str, int] | None = None,
    ) -> JobSession:
        """Create a session of ``job`` in state ``starting``, all its VMs in job order.

        :param trigger: what starts it: manual, schedule, chain.
        :param triggered_by: the session whose end started it (chained jobs).
        :param owner: ``(host, pid)`` of the process that will run it (default: this one).
        :raises NotFoundError: no such job.
        """
        job_config = self.config.job(job)
        return self.store.create_session(job, job_config.vms, full=full, trigger=trigger,
                                         triggered_by=triggered_by, owner=owner)

    def create_retry_session(self, job: str, *, automatic: bool = False,
                             owner: tuple[str, int] | None = None) -> JobSession:
        """Create a retry session of the job's last session: in job order, only the VMs
        that got no restore point there (failed, cancelled, not_processed); finished VMs
        stay finished.

        :param automatic: started by the daemon's automatic retry (trigger ``auto_retry``).
        :raises NotFoundError: no such job, it has no session, or every VM of its last session
            got a restore point.
        :raises UsageError: the last session still runs.
        """
        self.config.job(job)
        sessions = self.store.sessions(job, limit=1)
        if not sessions:
            raise NotFoundError(f"job {job!r} has no session to retry")
        last = sessions[0]
        if last.state is not SessionState.STOPPED:
            raise UsageError(f"session {last.id} of job {job!r} is still running; retry it when it has ended")
        vms = [task.vm for task in self.store.tasks(last.id)  # type: ignore[arg-type]
               if task.status in (TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.NOT_PROCESSED)]
        if not vms:
            raise NotFoundError(f"every VM of session {last.id} (job {job!r}) got a restore point; nothing to retry")
        return self.store.create_session(job, vms, full=last.full, trigger="auto_retry" if automatic else "retry",
                                         retry_of=last.id, owner=owner)

    def daemon_owner(self) -> tuple[str, int] | None:
        """``(host, pid)`` of the daemon running on this state DB, if one runs."""
        from backupd.state import DaemonRegistry

        row = DaemonRegistry(self.store).alive()
        return (row.host, row.pid) if row is not None else None

    def run_session(self, session_id: int) -> SessionResult:
        """Run a created session in this process until it ends (blocking)."""
        from backupd.engine import SessionRunner

        return SessionRunner(self.config, self.store, session_id).run()

    def start_detached(self, session_id: int) -> int:
        """Run a created session in a detached background process that outlives this one
        (:func:`backupd.host.spawn_session_process`).

        Its output goes to ``logs/session-ID.log`` beside the config file.

        :returns: the process id of the runner.
        :raises StateError: the runner could not be started; the session was ended ``failed``.
        """
        from backupd.host import spawn_session_process

        log_path = self.config.path.parent / "logs" / f"session-{session_id}.log"
        try:
            child = spawn_session_process(self.config, session_id, log_path)
        except OSError as exc:
            text = f"could not start the session's runner process ({log_path}): {exc.strerror or exc}"
            self.store.end_session(session_id, SessionResult.FAILED, text, unfinished=TaskStatus.NOT_PROCESSED)
            raise StateError(text) from exc
        # Owner recorded at once, so a runner that dies before it starts is seen as dead.
        self.store.update_session(session_id, owner_host=socket.gethostname(), owner_pid=child.pid)
        return child.pid

    def stop_jobs(
        self,
        jobs: list[str],
        mode: StopMode,
        message: str | None,
        *,
        drain_seconds: float | None = None,
        recursive: bool = False,
        reason: str = "user",
    ) -> list[StopOutcome]:
        """Write a stop request onto every running session of each job.

        One job without a running session does not undo the others' stops.

        :param drain_seconds: a graceful stop escalates to immediate after this long; default
            each job's ``drain_period_seconds``.
        :param recursive: also stop, the same way, every session the stopped sessions' chain
            started (``after`` jobs), and start no further chained job from them.
        :param reason: who stops: user, window, shutdown (automatic retry follows none).
        :raises NotFoundError: a job is not in the config (nothing is stopped).
        :raises UsageError: the message is longer than 320 characters.
        """
        if message is not None and len(message) > MAX_STOP_MESSAGE:
            raise UsageError(f"--message is {len(message)} characters long; at most {MAX_STOP_MESSAGE} are allowed")
        for job in jobs:
            self.config.job(job)
        outcomes = []
        for job in dict.fromkeys(jobs):
            found = []
            for session in self.store.running_sessions(job):
                chain = self.store.chain_started_by(session.id) if recursive else []  # type: ignore[arg-type]
                for target in [session, *chain]:
                    drain = drain_seconds if drain_seconds is not None else self.drain_period(target.job)
                    outcome, in_force = self.store.request_stop(
                        target.id, mode, message, drain_seconds=drain, reason=reason, recursive=recursive,  # type: ignore[arg-type]
                    )
                    if outcome != "ended":  # it ended between the query and the request
                        found.append(StopOutcome(target.job, outcome, target.id, in_force))
            outcomes.extend(found or [StopOutcome(job, "no_running_session", None, None)])
        return outcomes

    def drain_period(self, job: str) -> float | None:
        """Seconds a graceful stop of the job's sessions waits before it turns immediate
        (``drain_period_seconds``); None for a job no longer in the config."""
        settings = self.config.jobs.get(job)
        return settings.drain_period_seconds if settings is not None else None

    def settle_stops(self, outcomes: list[StopOutcome]) -> list[StopOutcome]:
        """After the stopped sessions ended: a stop that changed nothing (no VM was cancelled
        or left unprocessed, because every VM had finished first) becomes ``too_late``."""
        settled = []
        for outcome in outcomes:
            if outcome.outcome == "stop_requested" and outcome.session is not None:
                statuses = {task.status for task in self.store.tasks(outcome.session)}
                if not statuses & {TaskStatus.CANCELLED, TaskStatus.NOT_PROCESSED}:
                    outcome = StopOutcome(outcome.job, "too_late", outcome.session, outcome.mode)
            settled.append(outcome)
        return settled

    def wait_stopped(self, session_ids: list[int], *, timeout: float | None = None, poll: float = 0.2) -> set[int]:
        """Block until every session is ``stopped`` or ``timeout`` seconds pass.

        :returns: the ids of the sessions still running (empty when all stopped).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        remaining = set(session_ids)
        while remaining:
            remaining = {sid for sid in remaining if self.store.session(sid).state is not SessionState.STOPPED}
            if not remaining or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(poll)
        return remaining

    @staticmethod
    def no_session_error(outcomes: list[StopOutcome]) -> NoRunningSessionError | None:
        """The error to exit with when some jobs had nothing to stop, naming them: no running
        session, or one whose VMs had all finished (too late)."""
        idle = [o.job for o in outcomes if o.outcome == "no_running_session"]
        late = [f"{o.job!r} (session {o.session})" for o in outcomes if o.outcome == "too_late"]
        parts = []
        if idle:
            parts.append("no running session for job " + ", ".join(repr(j) for j in idle))
        if late:
            parts.append("too late to stop job " + ", ".join(late) + ": the stop changed nothing (no VM was left to "
                         "start or to cancel)")
        return NoRunningSessionError("; ".join(parts)) if parts else None

    # -- repositories -----------------------------------------------------------------------

    def _repositories(self, job: str | None) -> list[tuple[str, "Repository"]]:
        """The job's repository, or every configured one, that exists: reading never
        creates a repository (one no session has written to yet holds no restore point)."""
        names = [self.config.job(job).repository] if job is not None else sorted(self.config.repositories)
        return [
            (name, self.config.repositories[name].open(create=False))
            for name in names
            if self.config.repositories[name].path.exists()
        ]

    def restore_points(self, *, vm: str | None = None, job: str | None = None) -> list[tuple[str, "PointInfo"]]:
        """``(repository name, point)`` pairs, newest first; with ``vm``, the points of the
        VM that name means (:meth:`vm_filter`)."""
        found = []
        for name, repository in self._repositories(job):
            found.extend((name, point) for point in repository.points(job=job))
        found.sort(key=lambda pair: (pair[1].created_at, pair[1].id), reverse=True)
        if vm is not None:
            belongs = self.vm_filter(vm, [point for _, point in found] if job is None else None)
            found = [(name, point) for name, point in found if belongs(point)]
        return found

    def vm_filter(self, vm: str, points: list["PointInfo"] | None = None) -> Callable[["PointInfo"], bool]:
        """Which restore points belong to the VM ``vm`` names: names are shown, ids decide.

        ``vm`` is resolved through the newest restore point made under that name (in any
        configured repository): the points of that point's VM id, under whatever name they
        were made, plus the points written before backupd recorded ids (repository format
        1) under any of those names. A name no point has is tried as a VM id. The provider is
        not asked: a VM that was deleted, or whose provider is unreachable, resolves alike.

        :param points: every restore point, newest first, if the caller has them already.
        """
        every = points if points is not None else [point for _, point in self.restore_points()]
        newest = next((point for point in every if point.vm == vm), None)
        vm_id = newest.vm_id if newest is not None else vm if any(p.vm_id == vm for p in every) else None
        if vm_id is None:
            return lambda point: point.vm_id is None and point.vm == vm
        names = {point.vm for point in every if point.vm_id == vm_id}
        return lambda point: point.vm_id == vm_id if point.vm_id is not None else point.vm in names

    def damaged_points(self, *, vm: str | None = None, job: str | None = None) -> list[tuple[str, "DamagedPoint"]]:
        """``(repository name, damaged point)`` pairs, newest first: restore points whose
        manifest is unreadable or truncated (with ``vm``: those of that VM, and those whose
        header is unreadable, as their VM is unknown)."""
        found = []
        for name, repository in self._repositories(job):
            found.extend((name, point) for point in repository.damaged_points(job=job))
        found.sort(key=lambda pair: pair[1].id, reverse=True)
        if vm is not None:
            belongs = self.vm_filter(vm)
            found = [(name, point) for name, point in found if point.info is None or belongs(point.info)]
        return found

    def repository_of(self, point_id: str) -> str:
        """The name of the configured repository holding a restore point, sound or damaged.

        :raises NotFoundError: no configured repository holds it.
        """
        for name, repository in self._repositories(None):
            if repository.holds(point_id):
                return name
        raise NotFoundError(f"no restore point {point_id!r} in any configured repository")

    def delete_points(self, point_ids: list[str]) -> list[str]:
        """Delete restore points (sound or damaged) by id, then collect garbage.

        :raises NotFoundError: an id is in no repository (nothing is deleted).
        """
        by_repo: dict[str, list[str]] = {}
        for point_id in point_ids:
            by_repo.setdefault(self.repository_of(point_id), []).append(point_id)
        deleted = []
        for name, ids in by_repo.items():
            deleted.extend(self.config.repositories[name].open(create=False).delete_points(ids))
        return deleted

    def collect_garbage(self, names: list[str] | None = None) -> list[tuple[str, "GcResult"]]:
        """Collect garbage now in the named repositories (default: every configured one that
        exists), whatever their ``gc_interval_seconds``.

        :returns: ``(repository name, what the collection did)`` per repository, in order.
        :raises NotFoundError: a name is not a repository of the config.
        :raises RepositoryError: a named repository does not exist yet, or cannot be read or
            changed.
        """
        if names is None:
            return [(name, repository.collect_garbage()) for name, repository in self._repositories(None)]
        results = []
        for name in names:
            if name not in self.config.repositories:
                known = ", ".join(sorted(self.config.repositories)) or "none"
                raise NotFoundError(f"no repository {name!r} in {self.config.path} (repositories: {known})")
            results.append((name, self.config.repositories[name].open(create=False).collect_garbage()))
        return results

    def find_point(self, point_id: str) -> tuple[str, "PointInfo"]:
        """:raises NotFoundError: no configured repository holds that restore point."""
        for name, repository in self._repositories(None):
            try:
                return name, repository.point(point_id)
            except NotFoundError:
                continue
        raise NotFoundError(f"no restore point {point_id!r} in any configured repository")

    def verify(self, point_ids: list[str] | None, *, progress: "Progress | None" = None) -> dict[str, Any]:
        """Re-read and re-hash every block of the given points (None: every point).

        :param progress: called as ``progress(blocks checked, blocks to check)`` per repository.

        :returns: ``{"ok", "damaged_points", "checked_points", "checked_blocks",
            "damaged_blocks"}`` summed over the repositories involved.
        :raises NotFoundError: an id is in no repository.
        """
        repositories = dict(self._repositories(None))
        by_repo: dict[str, list[str] | None] = {}
        if point_ids is None:
            by_repo = {name: None for name in repositories}
        else:
            for point_id in point_ids:
                by_repo.setdefault(self.repository_of(point_id), []).append(point_id)  # type: ignore[union-attr]
        total = {"ok": True, "damaged_points": [], "checked_points": 0, "checked_blocks": 0, "damaged_blocks": 0}
        for name, ids in by_repo.items():
            repository = repositories[name]
            result: VerifyResult = repository.verify(ids, progress=progress)
            total["ok"] = total["ok"] and result.ok
            total["damaged_points"].extend(result.damaged_points)  # type: ignore[union-attr]
            total["checked_points"] += len(ids) if ids is not None else len(repository.points())  # type: ignore[operator]
            total["checked_blocks"] += result.checked_blocks  # type: ignore[operator]
            total["damaged_blocks"] += result.damaged_blocks  # type: ignore[operator]
        return total

    def restore(
        self, vm: str, to_dir: Path, *, point_id: str | None = None, progress: "Progress | None" = None
    ) -> tuple[str, list[Path]]:
        """Write one raw image per disk of a restore point of ``vm`` into ``to_dir``.

        :param vm: a VM name (resolved as :meth:`vm_filter` says) or id.
        :param point_id: the restore point; by default the VM's newest in any repository.
        :param progress: called as ``progress(bytes written, bytes of all disks)``.
        :returns: (point id, image paths in disk order).
        :raises NotFoundError: no such point, or no point of that VM.
        """
        name, point = self.point_of_vm(vm, point_id)
        repository = self.config.repositories[name].open(create=False)
        return point.id, repository.restore(point.id, to_dir, progress=progress)

    def point_of_vm(self, vm: str, point_id: str | None) -> tuple[str, "PointInfo"]:
        """``(repository name, point)``: the restore point ``point_id``, checked to belong to
        ``vm`` (:meth:`vm_filter`), or, without an id, the VM's newest.

        :raises NotFoundError: no such point, it is another VM's, or the VM has none.
        """
        if point_id is None:
            points = self.restore_points(vm=vm)
            if not points:
                raise NotFoundError(f"no restore point of VM {vm!r}")
            return points[0]
        name, point = self.find_point(point_id)
        if not self.vm_filter(vm)(point):
            raise NotFoundError(f"restore point {point_id!r} belongs to VM {point.vm!r} (id {point.vm_id}), "
                                f"not {vm!r}")
        return name, point

    def restore_vm(
        self, vm: str, provider_name: str, new_name: str, *, point_id: str | None = None,
        datastore: str | None = None,
    ) -> tuple[str, "VmInfo"]:
        """Full-VM restore: create a new, powered-off VM ``new_name`` on ``provider_name``
        from the configuration a restore point of ``vm`` captured, its disks streamed from
        the repository (every block checked against its hash) into
        :meth:`~providers.base.Provider.create_vm`, which leaves nothing behind when it fails
        or is interrupted (Ctrl-C).

        :returns: (point id, the new VM).
        :raises NotFoundError: no such point, VM or provider.
        :raises UsageError: the point has no captured configuration (made before backupd
            captured them: restore its disks with ``--to DIR``).
        :raises VmExists: the provider has a VM ``new_name``; nothing was created.
        :raises RepositoryCorruptError: a block is damaged; nothing was created.
        :raises ProviderError: the VM could not be created; nothing was left behind.
        """
        name, point = self.point_of_vm(vm, point_id)
        if point.vm_config is None:
            raise UsageError(f"restore point {point.id} was made before backupd captured VM configurations; "
                             f"restore its disks with --to DIR")
        provider = self.provider(provider_name)
        try:
            repository = self.config.repositories[name].open(create=False)
            with repository.open_point(point.id) as reader:
                streams = {disk.key: reader.disk(disk.key) for disk in point.vm_config.disks}
                created = provider.create_vm(point.vm_config, name=new_name, datastore=datastore, disks=streams)
        finally:
            provider.close()
        return point.id, created

    # -- providers --------------------------------------------------------------------------

    def provider(self, name: str) -> "Provider":
        """:raises NotFoundError: no provider of that name in the config."""
        from providers import open_provider

        if name not in self.config.providers:
            raise NotFoundError(f"no provider {name!r} in {self.config.path}")
        return open_provider(name, self.config.providers[name])

    def simulated_provider(self, vm: str, name: str | None) -> "SimulatedProvider":
        """The simulated provider holding ``vm`` (``name`` picks one when several could): one
        whose config declares it, or whose state folder holds it (a VM made by a full-VM
        restore, or renamed).

        :raises NotFoundError: no simulated provider has that VM.
        :raises UsageError: ``name`` is not a simulated provider, or several have the VM.
        """
        from providers.base import VmNotFound

        candidates = [name] if name else [n for n, c in self.config.providers.items() if getattr(c, "type", None) == "simulated"]
        if name and getattr(self.config.providers.get(name), "type", None) != "simulated":
            if name not in self.config.providers:
                raise NotFoundError(f"no provider {name!r} in {self.config.path}")
            raise UsageError(f"provider {name!r} is not a simulated provider")
        having = []
        for candidate in candidates:
            provider: SimulatedProvider = self.provider(candidate)  # type: ignore[assignment]
            try:
                provider.find_vm(vm)
            except VmNotFound:
                provider.close()
                continue
            having.append(provider)
        if not having:
            raise NotFoundError(f"no simulated provider has a VM {vm!r}")
        if len(having) > 1:
            raise UsageError(f"VM {vm!r} exists on providers {', '.join(p.name for p in having)}; choose one with --provider")
        return having[0]
