"""Faults on demand: failures armed by an administrator or a test, seen by every process.

Each VM has ``faults.json`` (``{op: {"permanent": bool, "remaining": int | null}}``) and
``faults.gen``, which is both the lock of ``faults.json`` and an 8-byte counter bumped on every
change of it. A transient fault fails the next ``remaining`` calls of its op with
:class:`TransientProviderError` (the engine retries those); a permanent one fails every call,
with the op's own non-transient error, until cleared. Disk readers check for ``read`` faults
on every read by reading the counter alone (one ``pread``), and ``faults.json`` only when the
counter moved.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from providers.base import (
    DiskReadError,
    ProviderError,
    QuiesceError,
    SnapshotError,
    TransientProviderError,
)
from providers.simulated._errors import InvalidArgument
from providers.simulated._layout import (
    VmPaths,
    locked,
    open_file,
    read_counter,
    read_json,
    write_counter,
    write_json,
)

#: the operation each fault op fails, and the error a permanent fault raises
PERMANENT_ERRORS: dict[str, type[ProviderError]] = {
    "create_snapshot": SnapshotError,
    "quiesce": QuiesceError,
    "remove_snapshot": SnapshotError,
    "read": DiskReadError,
}
#: the ops faults can be armed for
FAULT_OPS = tuple(PERMANENT_ERRORS)


class FaultStore:
    """The armed faults of one VM.

    :param vm_name: the VM, for messages.
    :param paths: the VM's folder.
    """

    def __init__(self, vm_name: str, paths: VmPaths) -> None:
        self.vm_name = vm_name
        self._json = paths.faults
        self._lock = paths.faults_generation

    def arm(self, op: str, *, times: int, permanent: bool) -> None:
        """Arm a fault for ``op``, replacing any armed for it.

        :param op: one of :data:`FAULT_OPS`.
        :param times: calls that fail with :class:`TransientProviderError`, >= 1; ignored
            when ``permanent``.
        :param permanent: fail every call, with the op's own error, until cleared.
        :raises InvalidArgument: unknown op, or ``times < 1`` for a transient fault.
        """
        if op not in PERMANENT_ERRORS:
            raise InvalidArgument(f"unknown fault op {op!r}; known: {', '.join(FAULT_OPS)}", argument="op")
        if not permanent and times < 1:
            raise InvalidArgument(f"a transient fault needs times >= 1, got {times}", argument="times")
        fault = {"permanent": permanent, "remaining": None if permanent else times}
        self._update(lambda faults: {**faults, op: fault})

    def clear(self) -> None:
        """Disarm every fault of the VM."""
        self._update(lambda faults: {})

    def armed(self) -> dict[str, dict[str, Any]]:
        """What is armed: ``{op: {"permanent": bool, "remaining": int | None}}``."""
        return read_json(self._json) or {}

    def fire(self, op: str) -> None:
        """Count one call of ``op`` against its armed fault, if any, and raise that fault.

        :raises TransientProviderError: a transient fault was armed (now one fewer).
        :raises ProviderError: the op's subclass from :data:`PERMANENT_ERRORS`, while a
            permanent fault is armed.
        """
        if op not in self.armed():  # cheap, lock-free: nothing armed is the common case
            return
        error: ProviderError | None = None

        def consume(faults: dict[str, Any]) -> dict[str, Any]:
            nonlocal error
            fault = faults.get(op)
            if fault is None:  # consumed meanwhile by another caller
                return faults
            if fault["permanent"]:
                error = PERMANENT_ERRORS[op](self._message(op, "permanent, until cleared"))
                return faults
            left = fault["remaining"] - 1
            error = TransientProviderError(self._message(op, f"transient, {left} more armed"))
            rest = {name: value for name, value in faults.items() if name != op}
            return {**rest, op: {"permanent": False, "remaining": left}} if left else rest

        self._update(consume)
        if error is not None:
            raise error

    def _message(self, op: str, kind: str) -> str:
        return f"injected fault: {op} failed on VM {self.vm_name!r} ({kind})"

    def _update(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        with locked(self._lock, exclusive=True) as fd:
            before = read_json(self._json) or {}
            after = change(before)
            if after != before:
                write_json(self._json, after)
                write_counter(fd, read_counter(fd) + 1)


class ReadFaultProbe:
    """Checks for ``read`` faults from a disk reader's hot path.

    :param store: the VM's faults.
    :param paths: the VM's folder.
    """

    def __init__(self, store: FaultStore, paths: VmPaths) -> None:
        self._store = store
        self._fd = open_file(paths.faults_generation, os.O_RDONLY | os.O_CREAT)
        self._seen = -1
        self._armed = False

    def check(self) -> None:
        """Fire the VM's ``read`` fault if one is armed (see :meth:`FaultStore.fire`)."""
        generation = read_counter(self._fd)
        if generation != self._seen:
            self._seen = generation
            self._armed = "read" in self._store.armed()
        if self._armed:
            self._store.fire("read")

    def close(self) -> None:
        """Release the counter file. Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
