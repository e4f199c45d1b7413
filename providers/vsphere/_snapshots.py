"""Snapshots: create, remove, list, find by id, and the tasks they run as.

vSphere API: ``VirtualMachine.CreateSnapshot_Task(name, description, memory, quiesce)``,
``VirtualMachineSnapshot.RemoveSnapshot_Task(removeChildren, consolidate)``, the VM's
``snapshot.rootSnapshotList`` tree (``VirtualMachineSnapshotTree``: snapshot moref, name,
description, createTime, quiesced, childSnapshotList).

Tasks are waited by polling ``Task.info`` through the PropertyCollector against a deadline
(:func:`wait_task`), never with ``WaitForUpdates`` without a timeout. A snapshot creation
that fails, times out or is interrupted (any exception, ``KeyboardInterrupt`` included)
leaves no snapshot: the task is cancelled (``CancelTask``), waited for up to the task
timeout, and a snapshot it made anyway (the task's result, or a snapshot of the same name:
backupd's names are unique per job session) is removed. A removal is idempotent: a snapshot
already gone (``ManagedObjectNotFound``) is success.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import timezone
from typing import Any

from pyVmomi import vim, vmodl

from providers.base import OperationCancelled, ProviderError, Snapshot, SnapshotError, TransientProviderError
from providers.vsphere._errors import Kind, Operation, fault_kind, session_expired, translate
from providers.vsphere._inventory import retrieve

log = logging.getLogger("backupd.providers.vsphere")
#: first and longest pause between two polls of a task's state, seconds
_POLL_FIRST, _POLL_MAX = 0.1, 1.0


def wait_task(
    content: vim.ServiceInstanceContent, task: vim.Task, *, timeout: float, operation: Operation,
    cancel: threading.Event | None = None,
) -> Any:
    """Poll ``task.info`` until the task ends, ``timeout`` seconds pass or ``cancel`` is set.

    :returns: the task's ``info.result``.
    :raises OperationCancelled: ``cancel`` was set (the task may still run: the caller
        cancels it).
    :raises TransientProviderError: the deadline passed (the task may still run).
    :raises ProviderError: the task ended in error, its fault translated for ``operation``.
    """
    deadline = time.monotonic() + timeout
    pause = _POLL_FIRST
    while True:
        info = task_info(content, task)
        if info.state == vim.TaskInfo.State.success:
            return info.result
        if info.state == vim.TaskInfo.State.error:
            raise translate(info.error, operation) from info.error
        if time.monotonic() >= deadline:
            raise TransientProviderError(f"{operation.what}: task {task._moId} still {info.state} after {timeout:g} s")
        wait = min(pause, max(0.0, deadline - time.monotonic()))
        if cancel is None:
            time.sleep(wait)
        elif cancel.wait(wait):
            raise OperationCancelled(f"{operation.what}: cancelled")
        pause = min(pause * 1.5, _POLL_MAX)


def task_info(content: vim.ServiceInstanceContent, task: vim.Task) -> vim.TaskInfo:
    """The task's ``info``, read through the PropertyCollector."""
    for _, props in retrieve(content, [task], vim.Task, ["info"]):
        return props["info"]
    raise vmodl.fault.ManagedObjectNotFound(obj=task)


def walk(tree: Any) -> Iterator[Any]:
    """Every node of a ``VirtualMachineSnapshotTree`` list, parents before children."""
    for node in tree or ():
        yield node
        yield from walk(node.childSnapshotList)


def snapshot_of(node: Any, vm_name: str) -> Snapshot:
    """A tree node as a :class:`Snapshot` (id: the snapshot moref's value)."""
    created = node.createTime
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    return Snapshot(
        id=node.snapshot._moId,
        vm_name=vm_name,
        name=node.name,
        description=node.description or "",
        created_at=created.astimezone(timezone.utc),
        quiesced=bool(node.quiesced),
    )


def list_snapshots(content: vim.ServiceInstanceContent, vm: vim.VirtualMachine) -> list[Snapshot]:
    """The VM's snapshots, oldest first (``snapshot`` unset: none)."""
    for _, props in retrieve(content, [vm], vim.VirtualMachine, ["name", "snapshot"]):
        info = props.get("snapshot")
        nodes = list(walk(info.rootSnapshotList)) if info is not None else []
        return sorted((snapshot_of(node, props.get("name", vm._moId)) for node in nodes), key=lambda s: (s.created_at, s.id))
    return []


def create(
    content: vim.ServiceInstanceContent,
    vm: vim.VirtualMachine,
    *,
    vm_name: str,
    name: str,
    description: str,
    quiesce: bool,
    timeout: float,
    pending: list[str],
    cancel: threading.Event | None = None,
) -> Snapshot:
    """Take a snapshot without memory; on any failure or interruption leave none behind.

    :param pending: shared by the attempts of one creation (:meth:`Connection.call` repeats
        this after a relogin): when the session expires while the task runs, its id is kept
        there and the next attempt waits for that task instead of starting a second one.
    :param cancel: set by the caller (an immediate stop): the task is cancelled and whatever
        it made removed, as for any interrupted creation.
    :raises OperationCancelled: ``cancel`` was set (no snapshot left).
    :raises QuiesceError: quiescing failed (no snapshot left).
    :raises SnapshotError: the snapshot could not be created.
    :raises TransientProviderError: a retry may succeed (a timeout among them).
    """
    operation = Operation(f"creating snapshot {name!r} of VM {vm_name!r}", failed=SnapshotError)
    if pending:
        task = vim.Task(pending.pop(), content.rootFolder._stub)
    else:
        task = vm.CreateSnapshot_Task(name=name, description=description, memory=False, quiesce=quiesce)
    try:
        moref = wait_task(content, task, timeout=timeout, operation=operation, cancel=cancel)
    except BaseException as exc:
        if session_expired(exc):  # the task runs on; the attempt after the relogin waits for it
            pending.append(task._moId)
            raise
        _leave_nothing(content, vm, task, name=name, timeout=timeout, interrupted=not isinstance(exc, ProviderError))
        raise
    for snapshot in list_snapshots(content, vm):
        if snapshot.id == moref._moId:
            return snapshot
    raise SnapshotError(f"{operation.what}: the task succeeded but snapshot {moref._moId} is not in the VM's tree")


def _leave_nothing(content: vim.ServiceInstanceContent, vm: vim.VirtualMachine, task: vim.Task, *, name: str, timeout: float, interrupted: bool) -> None:
    """After a failed, timed-out or interrupted creation: cancel the task, wait for it to end,
    remove what it made. Errors here are logged: the creation's own error propagates."""
    try:
        info = task_info(content, task)
        if info.state in (vim.TaskInfo.State.queued, vim.TaskInfo.State.running):
            if info.cancelable:
                try:
                    task.CancelTask()
                except Exception as exc:  # noqa: BLE001 - it may have just ended
                    log.info("cancelling snapshot task %s: %s", task._moId, exc)
            deadline = time.monotonic() + timeout
            while info.state in (vim.TaskInfo.State.queued, vim.TaskInfo.State.running) and time.monotonic() < deadline:
                time.sleep(_POLL_MAX)
                info = task_info(content, task)
        made = [info.result._moId] if info.state == vim.TaskInfo.State.success and info.result is not None else []
        made += [s.id for s in list_snapshots(content, vm) if s.name == name and s.id not in made]
        for snapshot_id in made:
            remove(content, snapshot_id, what=f"removing snapshot {name!r} left by a failed creation", timeout=timeout)
        if info.state in (vim.TaskInfo.State.queued, vim.TaskInfo.State.running):
            log.error("snapshot %r: its creation task %s still runs; the snapshot hunter removes it later", name, task._moId)
    except BaseException as exc:  # noqa: BLE001 - a second interrupt, a lost connection
        log.error(
            "snapshot %r may be left behind (%s: %s); the snapshot hunter removes it later%s",
            name, type(exc).__name__, exc, " (interrupted)" if interrupted else "",
        )
        if isinstance(exc, KeyboardInterrupt):
            raise


def snapshot_ref(content: vim.ServiceInstanceContent, snapshot_id: str) -> vim.vm.Snapshot:
    """The snapshot moref of an id (its value, e.g. ``snapshot-42``)."""
    return vim.vm.Snapshot(snapshot_id, content.rootFolder._stub)


def remove(content: vim.ServiceInstanceContent, snapshot_id: str, *, what: str, timeout: float) -> None:
    """Remove a snapshot (``RemoveSnapshot_Task(removeChildren=False, consolidate=True)``);
    already gone is success.

    :raises SnapshotError: it exists and could not be removed.
    :raises TransientProviderError: a retry may succeed (a timeout among them).
    """
    operation = Operation(what, failed=SnapshotError)
    try:
        task = snapshot_ref(content, snapshot_id).RemoveSnapshot_Task(removeChildren=False, consolidate=True)
        wait_task(content, task, timeout=timeout, operation=operation)
    except ProviderError as exc:
        if _gone(exc):
            return
        raise
    except vmodl.MethodFault as exc:
        if fault_kind(type(exc))[0] is Kind.GONE:
            return
        raise


def _gone(exc: ProviderError) -> bool:
    """Whether a translated task error was "the snapshot does not exist"."""
    cause = exc.__cause__
    return isinstance(cause, vmodl.MethodFault) and fault_kind(type(cause))[0] is Kind.GONE
