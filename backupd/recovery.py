"""Recovery after a crash: sessions whose runner is gone, and snapshots no live session owns.

:func:`recover` is the one entry point for a whole pass. Dead sessions alone are also ended
whenever a command opens the state DB, so no listing ever shows a dead session as
running; that part needs no provider and costs one query when nothing is dead.

The crash row of the stop contract (docs/design.md): on restart, sessions whose runner is gone
end ``failed``; snapshots recorded but not removed are removed; unfinished repository writes
are discarded (the repository does that itself on open); and the snapshot hunter removes
snapshots with backupd's name prefix that no live session owns.

- :func:`recover_dead_sessions` runs whenever a CLI command opens the state DB (a session
  process leaves it to its session's recovery pass, or to the daemon's) and finds sessions
  whose runner is gone (:meth:`StateStore.dead_sessions`: a dead or zombie process on this
  host, or a heartbeat that stopped). It makes the state DB agree with the repository: a VM
  whose restore point was committed before the crash gets it recorded (``warning`` when its
  snapshot removal did not complete, else ``success``); a VM that never started is
  ``not_processed``; any other unfinished VM is ``failed`` with the reason. The session ends
  ``failed``.
- :func:`remove_orphaned_snapshots` runs at the start of every session, for the VMs of its
  job: it removes snapshots that ended sessions recorded but did not remove, and hunts
  snapshots named ``backupd-<job>-<session>`` whose session has ended: a runner killed between
  the snapshot's creation on the hypervisor and the recording of its id leaves one that no
  row names.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from backupd.enums import SessionResult, SessionState, TaskStatus
from backupd.errors import BackupdError
from backupd.retry import call_with_retry
from backupd.state import JobSession, StateStore, VmTask, as_utc

if TYPE_CHECKING:
    from backupd.config import Config, JobConfig
    from providers.base import Provider, VmInfo

log = logging.getLogger(__name__)

#: the message of a session recovery ended (its VMs and log say more)
RUNNER_DIED = "runner process died"
#: every snapshot backupd creates is named ``backupd-<job>-<session id>``
SNAPSHOT_PREFIX = "backupd-"
_SNAPSHOT_NAME = re.compile(rf"^{SNAPSHOT_PREFIX}(?P<job>.+)-(?P<session>[1-9][0-9]{{0,17}})$")
#: how every session log line about a removed orphaned snapshot begins; backupd.metrics
#: counts these lines (``backupd_orphaned_snapshots_removed_total``)
ORPHAN_REMOVED = "removed orphaned snapshot"
#: a snapshot older than its session by more than this (clock differences between hosts) was
#: not made by it: another installation's session that happens to have the same id
_CLOCK_SLACK = timedelta(minutes=5)


def snapshot_name(job: str, session_id: int) -> str:
    """The name of the snapshots a session creates, which the snapshot hunter recognises."""
    return f"{SNAPSHOT_PREFIX}{job}-{session_id}"


def recover(config: "Config", store: StateStore, *, hunt_jobs: set[str] | None = None) -> list[tuple[str, str]]:
    """The whole crash row of the stop contract, in one pass (the daemon runs it at start,
    every minute and when a session process dies; a session runs it at its start when no
    daemon runs): sessions whose runner is gone end ``failed`` and free their VM locks;
    snapshots ended sessions recorded and did not remove are removed, every job's; the
    snapshot hunter removes those never recorded, found by name; repository staging of dead
    writers is discarded.

    :param hunt_jobs: look for unrecorded snapshots on these jobs' VMs only (a session without
        a daemon: its own job, as listing every VM of a large config costs seconds); None:
        every job's.
    :returns: ``(level, text)`` per action, for a log: ``warning`` for what could not be
        done, ``info`` otherwise.
    :raises StateError: the state DB cannot be used.
    """
    actions = [("info", f"session {sid} ended failed: {RUNNER_DIED}") for sid in recover_dead_sessions(config, store)]
    actions += [(orphan.level, orphan.describe()) for orphan in hunt(config, store, by_name=hunt_jobs)]
    for name, repository in sorted(config.repositories.items()):
        if repository.path.is_dir():
            try:
                repository.open(create=False)  # discards dead writers' staging
            except BackupdError as exc:
                actions.append(("warning", f"repository {name}: cannot check for unfinished writes: {exc}"))
    return actions


# -- sessions whose runner is gone --------------------------------------------------------------


def recover_dead_sessions(config: "Config", store: StateStore) -> list[int]:
    """End every session whose runner is gone, reconciled with the repository.

    :returns: the ids of the sessions ended.
    :raises StateError: the state DB cannot be used.
    """
    ended = []
    for session in store.dead_sessions():
        _recover(config, store, session)
        ended.append(session.id)  # type: ignore[arg-type]
    return ended


def _recover(config: "Config", store: StateStore, session: JobSession) -> None:
    session_id = session.id
    assert session_id is not None
    runner = f"its runner (pid {session.owner_pid} on {session.owner_host})"
    beat = as_utc(session.heartbeat_at)
    reason = f"{runner} ended unexpectedly" + (f"; last heartbeat {beat:%Y-%m-%d %H:%M:%S} UTC" if beat else "")
    committed = _committed_points(config, session)
    for task in store.tasks(session_id):
        if task.status.is_final:
            continue
        fields: dict[str, object] = {"stage": None, "ended_at": as_utc(session.heartbeat_at) or session.created_at}
        point = committed.get(task.vm_id) or committed.get(task.vm)
        if point is not None:
            fields["restore_point"] = point
            if task.snapshot_removed or task.snapshot_id is None:
                fields["status"] = TaskStatus.SUCCESS
            else:
                fields["status"] = TaskStatus.WARNING
                fields["warning"] = (f"the restore point was committed, then {reason} before the snapshot was "
                                     f"removed; the next session of the job removes it")
        elif task.status is TaskStatus.PENDING or task.stage == "waiting":  # never reached its snapshot
            fields["status"] = TaskStatus.NOT_PROCESSED
            fields["error"] = f"not started: the session's {reason.removeprefix('its ')}"
        else:
            stage = f" (stage {task.stage})" if task.stage else ""
            fields["status"] = TaskStatus.FAILED
            fields["error"] = f"the session's {reason.removeprefix('its ')}{stage}; no restore point was made"
        store.update_task(task.id, **fields)  # type: ignore[arg-type]
    store.end_session(session_id, SessionResult.FAILED, RUNNER_DIED, unfinished=TaskStatus.FAILED)
    store.release_locks(session_id)
    store.log(session_id, f"recovered: {reason}; the session is recorded failed", level="error")
    log.warning("session %s: %s; recorded failed", session_id, reason)


def _committed_points(config: "Config", session: JobSession) -> dict[str, str]:
    """VM id and VM name → restore point the session committed, read from the job's
    repository (the source of truth for restore points; a task that found its VM recorded its
    id, which decides). Empty when the job or repository is gone."""
    job = config.jobs.get(session.job)
    if job is None:
        return {}
    repository_config = config.repositories.get(job.repository)
    if repository_config is None or not repository_config.path.exists():
        return {}
    try:
        points = repository_config.open(create=False).points(job=session.job)
    except BackupdError as exc:
        log.warning("session %s: cannot read its repository to recover it: %s", session.id, exc)
        return {}
    committed = {}
    for point in points:
        if point.session == str(session.id):
            committed[point.vm] = point.id
            if point.vm_id is not None:
                committed[point.vm_id] = point.id
    return committed


# -- snapshots nobody owns ---------------------------------------------------------------------


@dataclass(frozen=True)
class OrphanedSnapshot:
    """A snapshot of an ended session found on a VM, and what was done with it.

    :ivar action: ``removed``, ``already gone`` (recorded, not on the VM any more), ``would
        remove`` (a dry run) or ``failed: <reason>`` (left for the next pass).
    :ivar recorded: whether a VM task row named it (else it was found by its name).
    """

    provider: str
    vm: str
    snapshot: str
    name: str
    created_at: datetime | None
    session: int
    action: str
    recorded: bool

    @property
    def level(self) -> str:
        """The log level of :meth:`describe`'s line: ``warning`` when the removal failed."""
        return "warning" if self.action.startswith("failed") else "info"

    def describe(self) -> str:
        """One line for a session log or the daemon's log."""
        how = "left by" if self.recorded else "created but never recorded by"
        what = f"orphaned snapshot {self.snapshot} ({self.name}) {how} session {self.session}"
        if self.action.startswith("failed"):
            return f"{what} could not be removed: {self.action.removeprefix('failed: ')}"
        if self.action == "removed":
            return f"{ORPHAN_REMOVED} {what.removeprefix('orphaned snapshot ')}"  # metrics count these lines
        return f"{self.action} {what}" if self.action != "already gone" else f"{what}: it was already gone"


def remove_orphaned_snapshots(
    store: StateStore, provider: "Provider", job_name: str, job: "JobConfig", *, dry_run: bool = False,
    by_name: bool = True, unremoved: list[VmTask] | None = None,
) -> list[OrphanedSnapshot]:
    """Remove the snapshots of ended sessions on the job's VMs: those recorded but not
    removed (a killed runner, a removal that kept failing) and, by name, those never recorded
    (a runner killed between creating a snapshot and recording its id). A snapshot whose name
    lacks backupd's prefix, or whose session is unknown to this state DB or still runs, is
    never touched.

    A failure is returned (``failed: ...``) and left for the next pass; it never raises.

    Each removal (or failure) is also written to the log of the session that left the
    snapshot, where an administrator looks for it and where the metrics count it.

    :param dry_run: find them, remove nothing (``would remove``).
    :param by_name: also list the job's VMs' snapshots to find those never recorded.
    :param unremoved: the job's :meth:`StateStore.unremoved_snapshots`, when the caller read
        them already (None: read here).
    """
    if unremoved is None:
        unremoved = store.unremoved_snapshots(job_name)
    found = _find_orphaned_snapshots(store, provider, job_name, job, unremoved, dry_run=dry_run, by_name=by_name)
    if not dry_run:
        for orphan in found:
            store.log(orphan.session, orphan.describe(), level=orphan.level, vm=orphan.vm)
    return found


def _find_orphaned_snapshots(
    store: StateStore, provider: "Provider", job_name: str, job: "JobConfig", unremoved: list[VmTask], *,
    dry_run: bool, by_name: bool,
) -> list[OrphanedSnapshot]:
    from providers.base import ProviderError, VmNotFound

    found: list[OrphanedSnapshot] = []
    tried: set[str] = set()
    by_id: dict[str, "VmInfo"] = {}

    def vm_of(task: VmTask) -> "VmInfo":
        """The task's VM by its id (a VM renamed since keeps it), else by its recorded name."""
        if task.vm_id is None:
            return provider.find_vm(task.vm)
        if task.vm_id not in by_id:
            by_id.update((vm.id, vm) for vm in provider.list_vms())
        if task.vm_id not in by_id:
            raise VmNotFound(f"no VM with id {task.vm_id} (called {task.vm!r} at the session) on provider {provider.name!r}")
        return by_id[task.vm_id]

    for task in unremoved:
        tried.add(task.snapshot_id)  # type: ignore[arg-type]
        try:
            vm = vm_of(task)
            snapshot = next((s for s in provider.list_snapshots(vm) if s.id == task.snapshot_id), None)
            action = "already gone" if snapshot is None else "would remove" if dry_run else "removed"
            if snapshot is not None and not dry_run:
                call_with_retry(lambda: provider.remove_snapshot(snapshot), job.retry)
        except ProviderError as exc:
            action = f"failed: {exc}"
            snapshot = None
            if not dry_run:
                store.update_task(task.id, snapshot_error=str(exc))  # type: ignore[arg-type]
        if not dry_run and not action.startswith("failed"):
            store.update_task(task.id, snapshot_removed=True, snapshot_error=None)  # type: ignore[arg-type]
        found.append(OrphanedSnapshot(provider.name, task.vm, task.snapshot_id or "", snapshot.name if snapshot else "",  # type: ignore[arg-type]
                                      snapshot.created_at if snapshot else None, task.session_id, action, True))

    for vm_name in job.vms if by_name else ():
        try:
            vm = provider.find_vm(vm_name)
            snapshots = provider.list_snapshots(vm)
        except VmNotFound:
            continue  # the VM task reports it
        except ProviderError as exc:
            log.warning("VM %s: cannot look for orphaned snapshots: %s", vm_name, exc)
            continue
        for snapshot in snapshots:
            owner = None if snapshot.id in tried else _ended_owner(store, snapshot.name, snapshot.created_at)
            if owner is None:
                continue
            action = "would remove" if dry_run else "removed"
            if not dry_run:
                try:
                    call_with_retry(lambda snapshot=snapshot: provider.remove_snapshot(snapshot), job.retry)
                except ProviderError as exc:
                    action = f"failed: {exc}"
            found.append(OrphanedSnapshot(provider.name, vm_name, snapshot.id, snapshot.name, snapshot.created_at,
                                          owner, action, False))
    return found


def hunt(config: "Config", store: StateStore, *, provider_name: str | None = None,
         dry_run: bool = False, by_name: set[str] | None = None) -> list[OrphanedSnapshot]:
    """The snapshot hunter over every job (of one provider, if given): what
    :func:`remove_orphaned_snapshots` finds on each job's VMs. A provider is opened only when
    one of its jobs has something to look at.

    :param by_name: the jobs whose VMs are listed for unrecorded snapshots (None: all).
    :raises NotFoundError: ``provider_name`` is not in the config.
    """
    from backupd.errors import NotFoundError
    from providers import open_provider
    from providers.base import ProviderError

    if provider_name is not None and provider_name not in config.providers:
        raise NotFoundError(f"no provider {provider_name!r} in {config.path}")
    found: list[OrphanedSnapshot] = []
    unremoved = store.unremoved_snapshots_by_job()
    for name in sorted(config.providers):
        if provider_name not in (None, name):
            continue
        jobs = [(job_name, job, by_name is None or job_name in by_name)
                for job_name, job in sorted(config.jobs.items()) if job.provider == name]
        if not any(listed or job_name in unremoved for job_name, _job, listed in jobs):
            continue
        try:
            provider = open_provider(name, config.providers[name])
        except ProviderError as exc:
            log.warning("provider %s: cannot look for orphaned snapshots: %s", name, exc)
            continue
        try:
            for job_name, job, listed in jobs:
                found.extend(remove_orphaned_snapshots(store, provider, job_name, job, dry_run=dry_run, by_name=listed,
                                                       unremoved=unremoved.get(job_name, [])))
        finally:
            provider.close()
    return found


def _ended_owner(store: StateStore, name: str, created_at: object) -> int | None:
    """The id of the ended session of this state DB that created a snapshot of this name,
    or None when the name is not backupd's, or its session is unknown here or still runs."""
    match = _SNAPSHOT_NAME.match(name)
    if match is None:
        return None
    session_id = int(match["session"])
    if session_id >= 1 << 63:
        return None
    try:
        session = store.session(session_id)
    except BackupdError:
        return None
    created = as_utc(session.created_at)
    if session.job != match["job"] or session.state is not SessionState.STOPPED:
        return None
    if created is not None and created_at < created - _CLOCK_SLACK:  # type: ignore[operator]
        return None
    return session_id
