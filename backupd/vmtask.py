"""One VM task: snapshot, transfer into a restore point, snapshot removal.

Per VM, in this order (DESIGN.md, "Data flow"):

1. find the VM by its name in the job; take the VM's lock in the state DB, keyed
   ``provider/vm id`` (one session per VM at a time; wait up to ``vm_lock_timeout_seconds``),
   recording the VM's stable id (:attr:`VmInfo.id`) on the task in the same commit;
2. create the snapshot, quiesced if the job asks; a :class:`~providers.base.QuiesceError` falls
   back to a crash-consistent snapshot and the VM ends ``warning``;
3. record the snapshot id in the state DB before anything else, so no snapshot is ever
   created that the state DB does not know of;
4. transfer: per disk, the areas CBT reports changed since the disk's changeId in the VM's
   previous restore point of this job, found by the VM's id, so a renamed VM goes on with
   its chain (incremental), else every in-use area (full); blocks are
   read on this thread and hashed, compressed and written by the session's block pool, at most
   :data:`IN_FLIGHT_BLOCKS` at a time, so memory stays flat whatever the disk size;
5. commit the restore point with the VM's id, its name now and the configuration the
   snapshot captured (its manifest is written last and atomically);
6. remove the snapshot (retried; a removal that still fails is recorded on the task at once;
   a removal that succeeded is recorded with the task's end, see :meth:`VmTask._record_later`);
7. apply retention to the VM's restore points of this job.

A VM task of a VM that did not change makes four state DB commits (docs/performance.md, "The
daemon"): the VM lock with the task's start and VM id, the snapshot id, the restore point with
the plan (nothing to read), the end. A VM with blocks to read also records its plan before it
reads, its progress every :data:`PROGRESS_SECONDS`, and its commit stage.

An immediate stop is checked between blocks: the restore point in progress is aborted (nothing
of it becomes a restore point) and the snapshot is removed. Transient provider errors are
retried per the job's retry settings, and retries end as soon as an immediate stop comes.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Callable, TypeVar

from backupd.enums import TaskStatus, TransferMode
from backupd.errors import BackupdError, RepositoryError, SessionCancelled, StateError
from backupd.recovery import recover_dead_sessions, snapshot_name
from backupd.retry import call_with_retry
from backupd.state import JobSession, StateStore, TaskRecord, VmTask as VmTaskRow, utcnow
from backupd.stop import StopSignal
from providers.base import (
    CbtUnavailable,
    Disk,
    DiskReader,
    Extent,
    Provider,
    ProviderError,
    QuiesceError,
    Snapshot,
    VmInfo,
)

if TYPE_CHECKING:
    from backupd.config import Config
    from backupd.repository import BasePoint, DiskWriter, PointWriter, Repository

log = logging.getLogger(__name__)
T = TypeVar("T")

#: blocks read but not yet written, per VM task (each at most one block, 1 MiB by default)
IN_FLIGHT_BLOCKS = 8
#: seconds between two progress updates of a VM task in the state DB
PROGRESS_SECONDS = 0.5
#: seconds between two attempts to take a VM's lock
LOCK_POLL_SECONDS = 0.5


#: the columns of a VM task's end record (:meth:`VmTask._finish`) when it succeeds
_END = ("bytes_read", "bytes_stored", "ended_at", "mode", "restore_point", "snapshot_removed", "stage", "status",
        "warning")
#: The records a VM task writes on its usual way (an unchanged VM's, and one with blocks to
#: read), in order. The daemon's fork server compiles their statements before it forks
#: (:meth:`StateStore.warm_up`): on PostgreSQL each costs a new session process about 2 ms of
#: CPU to compile. A record not listed here (a failure's, a warning's) is compiled where it
#: is first written; tests/unit/test_session_runner.py checks the usual ways use only these.
TASK_RECORDS = (
    TaskRecord(("stage", "started_at", "status", "vm_id"), lock=True),  # the VM lock, the task's start
    TaskRecord(("snapshot_id", "stage"), 1),  # the snapshot
    TaskRecord(("bytes_total", "mode"), 1),  # the plan, when there are blocks to read
    TaskRecord(("bytes_read", "bytes_stored")),  # progress
    TaskRecord(("stage",)),  # the commit
    TaskRecord(("restore_point", "stage"), 1),  # the restore point
    TaskRecord(("bytes_total", "mode", "restore_point", "stage"), 2),  # the plan and point of an unchanged VM
    TaskRecord(_END, 1, unlock=True),  # the end, with the snapshot's removal
    TaskRecord(_END, 2, unlock=True),  # the end, with retention's line too
)


def vm_lock_key(provider: str, vm_id: str) -> str:
    """The key of a VM's lock in the state DB (``PROVIDER/VM_ID``: a rename keeps it)."""
    return f"{provider}/{vm_id}"


class _NotStarted(Exception):
    """A stop came before this VM's snapshot creation began: the VM ends ``not_processed``."""


def blocks_of(extents: list[Extent], block_size: int, capacity: int) -> list[int]:
    """The numbers of the fixed-size blocks that the extents touch, sorted, each once.

    :param extents: byte ranges (any alignment).
    :param block_size: bytes per block.
    :param capacity: disk size in bytes; blocks past it are not returned.
    """
    last = (capacity - 1) // block_size if capacity > 0 else -1
    numbers: set[int] = set()
    for extent in extents:
        if extent.length <= 0:
            continue
        first = extent.offset // block_size
        end = min((extent.end - 1) // block_size, last)
        numbers.update(range(first, end + 1))
    return sorted(numbers)


class _DiskPlan:
    """What to read of one disk, decided before the transfer starts."""

    def __init__(self, disk: Disk, blocks: list[int], base_point: str | None) -> None:
        self.disk = disk
        self.blocks = blocks
        #: the restore point whose block map this disk starts from (incremental), or None
        self.base_point = base_point


class VmTask:
    """Processes one VM of a session; :meth:`run` never raises.

    A VM task shares nothing with the runner that started it but the state DB and the
    session's :class:`~backupd.stop.StopSignal`, so it can run wherever those reach.

    :param config: the validated config (the job's settings, and recovery of a VM lock's dead
        holder).
    :param store: the state DB.
    :param session: the session's row.
    :param row: the VM task's row in the state DB.
    :param stop: the session's stop signal.
    :param provider: the job's provider.
    :param repository: the job's repository.
    :param block_pool: the pool hashing, compressing and writing blocks.
    """

    def __init__(
        self,
        config: "Config",
        store: StateStore,
        session: JobSession,
        row: VmTaskRow,
        stop: StopSignal,
        provider: Provider,
        repository: "Repository",
        block_pool: Executor,
    ) -> None:
        self.config = config
        self.row = row
        self.provider = provider
        self.repository = repository
        self.block_pool = block_pool
        self.store = store
        self.job_name = session.job
        self.job = config.job(session.job)
        self.session_id: int = session.id  # type: ignore[assignment]
        self.full = session.full
        self.stop = stop
        self.vm_name = row.vm
        self.warnings: list[str] = []
        self._bytes_read = 0
        self._bytes_stored = 0
        self._last_progress = 0.0
        #: the key of the VM lock this task holds, released with the task's end record
        self._lock_key: str | None = None
        #: columns and log lines written with the task's next record (:meth:`_record_later`)
        self._later: dict[str, object] = {}
        self._later_notes: list[str] = []

    # -- outcome ----------------------------------------------------------------------------

    def run(self) -> None:
        """Process the VM to its end. A state DB failure (:class:`StateError`) stops the
        whole session at once (:meth:`StopSignal.lose_state`): without its state DB a session
        cannot record what it does. The snapshot is removed either way."""
        try:
            self._run()
        except StateError as exc:
            self.stop.lose_state(exc)

    def _run(self) -> None:
        # recorded with the VM lock (or with the line saying the task waits for it)
        self._record_later(status=TaskStatus.RUNNING, stage="waiting", started_at=utcnow())
        try:
            vm = self._retry(lambda: self.provider.find_vm(self.vm_name))
            self._wait_for_vm_lock(vm_lock_key(self.job.provider, vm.id), vm.id)
            point_id, mode = self._process(vm)
        except _NotStarted:
            self._finish(TaskStatus.NOT_PROCESSED, stage=None)
            return
        except StateError:
            raise
        except Exception as exc:  # every failure ends this VM only; the session goes on
            self._fail(exc)
            return
        status = TaskStatus.WARNING if self.warnings else TaskStatus.SUCCESS
        self._finish(status, restore_point=point_id, mode=mode.value, warning="; ".join(self.warnings) or None)

    def _fail(self, exc: Exception) -> None:
        if self.stop.cancel.is_set():
            self._log("cancelled by an immediate stop", level="warning")
            self._finish(TaskStatus.CANCELLED, error="cancelled by an immediate stop")
            return
        if isinstance(exc, (ProviderError, BackupdError)):
            text = str(exc)
        else:
            log.exception("VM task %s of session %s", self.vm_name, self.session_id)
            text = f"internal error: {type(exc).__name__}: {exc}"
        self._log(f"failed: {text}", level="error")
        self._finish(TaskStatus.FAILED, error=text)

    def _finish(self, status: TaskStatus, **fields: object) -> None:
        """Record the task's end and release its VM lock, in one commit. (If the state DB
        fails first, the lock goes with the session: recovery releases a dead session's
        locks, and :meth:`StateStore.try_lock_vm` takes over those of an ended one.)"""
        fields.setdefault("stage", "done")
        self._update(unlock=(self._lock_key, self.session_id) if self._lock_key else None,
                     status=status, ended_at=utcnow(), bytes_read=self._bytes_read,
                     bytes_stored=self._bytes_stored, **fields)

    # -- the steps --------------------------------------------------------------------------

    def _wait_for_vm_lock(self, key: str, vm_id: str) -> None:
        """Take the VM's lock; its commit records the VM id, the next stage and what
        :meth:`_record_later` kept (the task's start)."""
        deadline = time.monotonic() + self.job.vm_lock_timeout_seconds
        announced = False
        while True:
            holder = self.store.try_lock_vm(key, self.session_id, task=self.row.id,
                                            **{**self._later, "vm_id": vm_id, "stage": "snapshot"})
            if holder is None:
                self._lock_key = key
                self._later = {}
                return
            if any(dead.id == holder for dead in self.store.dead_sessions()):
                recover_dead_sessions(self.config, self.store)  # frees the lock of a dead runner
                continue
            if not announced:
                self._log(f"waiting for session {holder}, which is processing this VM")
                announced = True
            if time.monotonic() >= deadline:
                raise BackupdError(
                    f"VM {self.vm_name!r} is being processed by session {holder}; it was not "
                    f"released within {self.job.vm_lock_timeout_seconds:g} s"
                )
            if self.stop.requested:
                raise _NotStarted
            self.stop.cancel.wait(LOCK_POLL_SECONDS)

    def _process(self, vm: VmInfo) -> tuple[str, TransferMode]:
        # The last moment a graceful stop keeps this VM from starting: read it from the DB now,
        # not at the next poll, so "stop before the first VM" is exact.
        if self.stop.refresh() is not None:
            raise _NotStarted
        if self.job.enable_cbt:
            self._enable_cbt(vm)
        snapshot = self._create_snapshot(vm)
        try:
            # Recorded before anything else, and inside the try: whatever fails from here on
            # (the state DB included), the snapshot is removed.
            self._update(snapshot_id=snapshot.id, stage="transfer",
                         note=f"snapshot {snapshot.id} created" + (" (quiesced)" if snapshot.quiesced else ""))
            self._check_cancel()
            point_id, mode = self._transfer(vm, snapshot)
        except BaseException:
            self._remove_snapshot(snapshot)
            raise
        self._remove_snapshot(snapshot, committed=True)
        self._apply_retention(vm)
        return point_id, mode

    def _apply_retention(self, vm: VmInfo) -> None:
        """Keep the job's number of restore points of this VM. A failure here leaves this
        session's restore point in place and ends the VM ``warning``."""
        try:
            removed = self.repository.apply_retention(vm_id=vm.id, vm=vm.name, job=self.job_name,
                                                      keep=self.job.retention)
        except RepositoryError as exc:
            self.warnings.append(f"retention failed: {exc}")
            self._log(self.warnings[-1], level="warning")
            return
        if removed:
            self._record_later(note=f"retention removed {len(removed)} restore point(s): {', '.join(removed)}")

    def _enable_cbt(self, vm: VmInfo) -> None:
        """The job's ``enable_cbt``: switch CBT on where it is off. A failure is a warning, not
        the VM's end: the backup goes on with full reads."""
        try:
            switched_on = self._retry(lambda: self.provider.enable_cbt(vm))
        except ProviderError as exc:
            self.warnings.append(f"CBT could not be switched on, disks are read in full: {exc}")
            self._log(self.warnings[-1], level="warning")
            return
        if switched_on:
            self._log("CBT switched on; it takes effect at this snapshot, so this transfer is full")

    def _create_snapshot(self, vm: VmInfo) -> Snapshot:
        def create(quiesce: bool) -> Callable[[], Snapshot]:
            return lambda: self.provider.create_snapshot(
                vm,
                name=snapshot_name(self.job_name, self.session_id),
                description=f"Created by backupd for job {self.job_name}, session {self.session_id}",
                quiesce=quiesce,
                cancel=self.stop.cancel,
            )

        if not self.job.quiesce:
            return self._retry(create(False))
        try:
            return self._retry(create(True))
        except QuiesceError as exc:
            self.warnings.append(f"quiesce failed, took a crash-consistent snapshot instead: {exc}")
            self._log(self.warnings[-1], level="warning")
            return self._retry(create(False))

    def _remove_snapshot(self, snapshot: Snapshot, *, committed: bool = False) -> None:
        """Remove the snapshot, retrying transient errors even during an immediate stop (the
        contract: every snapshot the session created is removed).

        A removal that fails is recorded at once; one that succeeded goes with the task's
        end record (:meth:`_record_later`).

        :param committed: the restore point is committed (its record already set the stage
            ``remove_snapshot``).
        """
        if not committed:
            self._best_effort(self._update, stage="remove_snapshot")
        try:
            call_with_retry(
                lambda: self.provider.remove_snapshot(snapshot), self.job.retry,
                before_retry=lambda attempt, exc: self._best_effort(self._note_retry, attempt, exc),
            )
        except ProviderError as exc:
            text = f"snapshot {snapshot.id} could not be removed: {exc}"
            self.warnings.append(text)
            self._update(snapshot_error=str(exc))
            self._log(text, level="error")
            return
        self._record_later(snapshot_removed=True, note=f"snapshot {snapshot.id} removed")

    def _best_effort(self, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Progress bookkeeping that must not keep a snapshot from being removed. A state DB
        failure is logged in one line (the session's own handling of it reports it too);
        anything else is a bug and is logged with its traceback."""
        try:
            fn(*args, **kwargs)
        except StateError as exc:
            log.error("VM task %s of session %s: state DB update failed: %s", self.vm_name, self.session_id, exc)
        except Exception:  # noqa: BLE001 - logged; the removal itself matters more
            log.exception("VM task %s of session %s: state DB update failed", self.vm_name, self.session_id)

    def _transfer(self, vm: VmInfo, snapshot: Snapshot) -> tuple[str, TransferMode]:
        plans, base = self._plan(vm, snapshot)
        vm_config = self._retry(lambda: self.provider.vm_config(snapshot))
        mode = TransferMode.INCREMENTAL if all(p.base_point for p in plans) else TransferMode.FULL
        block_size = self.repository.block_size
        writer: PointWriter
        with self.repository.new_point(
            vm=vm.name, vm_id=vm.id, vm_config=vm_config, job=self.job_name, session=str(self.session_id),
            mode=mode.value, base=base,
        ) as writer:
            disk_writers = [self._add_disk(writer, plan) for plan in plans]
            total = sum(
                min(block_size, plan.disk.capacity_bytes - number * block_size)
                for plan in plans
                for number in plan.blocks
            )
            # A transfer with blocks to read records its plan before it reads, and its commit
            # stage, for the progress view. One with nothing to read (a VM that did not change,
            # under CBT) is over in a moment: its plan goes with its restore point's record.
            record = self._update if total else self._record_later
            record(mode=mode.value, bytes_total=total,
                   note=f"{mode.value} transfer of {len(plans)} disk(s), {total} bytes to read")
            self._last_progress = time.monotonic()  # progress records every PROGRESS_SECONDS from here
            for plan, disk_writer in zip(plans, disk_writers, strict=True):
                reader = self._retry(lambda plan=plan: self.provider.open_disk(snapshot, plan.disk))
                with reader:
                    self._copy_blocks(reader, disk_writer, plan)
            self._check_cancel()
            if total:
                self._update(stage="commit")
            info = writer.commit()
        # While blocks are staged, two VM tasks may both count a block they share; the
        # repository settles which point added it at commit.
        self._bytes_stored = info.stored_bytes
        # Recorded at once: whatever happens to this process from here on, the state DB
        # names the restore point the repository now holds.
        self._update(restore_point=info.id, stage="remove_snapshot",
                     note=f"restore point {info.id} committed ({mode.value}, "
                     f"{self._bytes_read} bytes read, {self._bytes_stored} stored)")
        return info.id, mode

    def _add_disk(self, writer: "PointWriter", plan: _DiskPlan) -> "DiskWriter":
        """Start the disk in the new restore point; blocks its base point references but the
        repository no longer holds intact (quarantined or missing) join the plan, so they
        are read from the snapshot again (docs/repository-format.md, "Damage")."""
        disk_writer = writer.add_disk(
            key=plan.disk.key,
            label=plan.disk.label,
            capacity_bytes=plan.disk.capacity_bytes,
            change_id=plan.disk.change_id,
            base_point=plan.base_point,
        )
        if disk_writer.missing:
            self._log(
                f"{plan.disk.label}: base restore point {plan.base_point} references {len(disk_writer.missing)} "
                f"damaged or missing block(s); reading them from the snapshot again", level="warning",
            )
            plan.blocks = sorted(set(plan.blocks) | disk_writer.missing)
        return disk_writer

    def _plan(self, vm: VmInfo, snapshot: Snapshot) -> tuple[list[_DiskPlan], "BasePoint | None"]:
        """What to read of each disk, and the restore point the incremental ones build on."""
        base = None
        if not self.full:
            base, passed_over = self.repository.base_point(vm_id=vm.id, vm=vm.name, job=self.job_name)
            for damaged in passed_over:
                self._log(f"restore point {damaged.id} is damaged and is not used as a base: {damaged.problem}",
                          level="warning")
        base_disks = {disk.key: disk for disk in base.info.disks} if base else {}
        block_size = self.repository.block_size
        plans = []
        for disk in self._retry(lambda: self.provider.disks(snapshot)):
            base_disk = base_disks.get(disk.key)
            extents: list[Extent] | None = None
            if base is not None and base_disk is not None and base_disk.change_id and disk.change_id \
                    and base_disk.capacity_bytes == disk.capacity_bytes:
                try:
                    extents = self._retry(lambda disk=disk, since=base_disk.change_id: self.provider.changed_areas(snapshot, disk, since))
                except CbtUnavailable as exc:
                    self._log(f"{disk.label}: changed block tracking unavailable ({exc}); reading the whole disk", level="warning")
            if extents is not None:
                plans.append(_DiskPlan(disk, blocks_of(extents, block_size, disk.capacity_bytes), base.info.id))  # type: ignore[union-attr]
                continue
            try:
                extents = self._retry(lambda disk=disk: self.provider.changed_areas(snapshot, disk, "*"))
            except CbtUnavailable:
                extents = [Extent(0, disk.capacity_bytes)]
            plans.append(_DiskPlan(disk, blocks_of(extents, block_size, disk.capacity_bytes), None))
        return plans, base

    def _copy_blocks(self, reader: DiskReader, disk_writer: "DiskWriter", plan: _DiskPlan) -> None:
        """Read the plan's blocks in order; hash, compress and store them on the block pool.

        :raises SessionCancelled: an immediate stop came (checked between blocks).
        """
        block_size = self.repository.block_size
        capacity = plan.disk.capacity_bytes
        in_flight = threading.BoundedSemaphore(IN_FLIGHT_BLOCKS)
        errors: list[BaseException] = []
        pending: set[Future[int]] = set()
        guard = threading.Lock()

        def stored(future: Future[int]) -> None:
            in_flight.release()
            with guard:
                pending.discard(future)
                if future.exception() is not None:
                    errors.append(future.exception())  # type: ignore[arg-type]
                else:
                    self._bytes_stored += future.result()

        try:
            for number in plan.blocks:
                self._check_cancel()
                if errors:
                    break
                offset = number * block_size
                length = min(block_size, capacity - offset)
                data = self._retry(lambda offset=offset, length=length: reader.read(offset, length))
                while not in_flight.acquire(timeout=0.1):
                    self._check_cancel()
                future = self.block_pool.submit(disk_writer.put_block, number, data)
                with guard:
                    pending.add(future)
                future.add_done_callback(stored)
                self._bytes_read += len(data)
                self._progress()
        finally:
            # Blocks handed to the pool finish before the restore point is committed or
            # aborted (at most IN_FLIGHT_BLOCKS of them).
            while True:
                with guard:
                    waiting = list(pending)
                if not waiting:
                    break
                waiting[0].exception()  # waits; the callback collects errors
        if errors:
            raise errors[0]
        self._check_cancel()

    # -- helpers ----------------------------------------------------------------------------

    def _retry(self, fn: Callable[[], T]) -> T:
        return call_with_retry(fn, self.job.retry, cancel=self.stop.cancel, before_retry=self._note_retry)

    def _note_retry(self, attempt: int, exc: BaseException) -> None:
        self._log(f"attempt {attempt} failed, retrying in {self.job.retry.wait_seconds:g} s: {exc}", level="warning")

    def _check_cancel(self) -> None:
        if self.stop.cancel.is_set():
            raise SessionCancelled("cancelled by an immediate stop")

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_SECONDS:
            self._last_progress = now
            self._update(bytes_read=self._bytes_read, bytes_stored=self._bytes_stored)

    def _update(self, *, note: str | None = None, **fields: object) -> None:
        """Change this task's row; ``note``: a session log line written in the same commit
        (after those :meth:`_record_later` kept)."""
        notes = [*self._later_notes, *([note] if note else [])]
        fields = {**self._later, **fields}
        self.store.update_task(self.row.id, notes=notes, **fields)  # type: ignore[arg-type]
        self._later, self._later_notes = {}, []

    def _record_later(self, *, note: str | None = None, **fields: object) -> None:
        """Write these columns and this log line with the task's next record (at the latest
        its end) instead of in a commit of their own: for facts a crash may lose without
        harm. A snapshot recorded as not removed is removed again by recovery, and removing
        one that is gone succeeds (:meth:`providers.base.Provider.remove_snapshot`)."""
        self._later.update(fields)
        if note:
            self._later_notes.append(note)

    def _log(self, text: str, *, level: str = "info") -> None:
        if self._later or self._later_notes:  # the session log stays in order
            self._update()
        self.store.log(self.session_id, text, level=level, vm=self.vm_name)
