"""Faults on demand: failures and pauses armed by an administrator or a test, seen by every
process.

Each VM has ``faults.json`` (``{op: {"permanent": bool, "remaining": int | null}}``),
``pauses.json`` (the paused ops, a sorted list) and ``faults.gen``, which is both the lock of
the two documents and an 8-byte counter bumped on every change of either. A transient fault
fails the next ``remaining`` calls of its op with :class:`TransientProviderError` (the engine
retries those); a permanent one fails every call, with the op's own non-transient error,
until cleared. Disk readers check for ``read`` faults and pauses on every read by reading the
counter alone (one ``pread``), and the documents only when the counter moved.

A pause makes every call of its op block, without failing, until the pause is lifted (then
an armed fault of the op fires as usual): a barrier a test holds a VM task at. A blocked call
looks at the counter every :data:`PAUSE_POLL_SECONDS`, and shows itself while it waits as a
file in ``paused/`` holding an exclusive ``flock``, so any process can count the calls blocked
right now (:meth:`FaultStore.blocked`), and a waiter killed meanwhile is not counted (its lock
went with it).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
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
    make_dir,
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
#: the ops a pause can hold
PAUSE_OPS = ("create_snapshot", "read")
#: seconds between two looks at the faults counter by a call held by a pause
PAUSE_POLL_SECONDS = 0.05


class FaultStore:
    """The armed faults and the pauses of one VM.

    :param vm_name: the VM, for messages.
    :param paths: the VM's folder.
    """

    def __init__(self, vm_name: str, paths: VmPaths) -> None:
        self.vm_name = vm_name
        self._json = paths.faults
        self._pauses = paths.pauses
        self._waiters = paths.paused_calls
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
        self._update(faults=lambda faults: {**faults, op: fault})

    def clear(self) -> None:
        """Disarm every fault and lift every pause of the VM."""
        self._update(faults=lambda faults: {}, pauses=lambda ops: [])

    def armed(self) -> dict[str, dict[str, Any]]:
        """What is armed: ``{op: {"permanent": bool, "remaining": int | None}}``."""
        return read_json(self._json) or {}

    def pause(self, op: str) -> None:
        """Make every call of ``op`` block until the pause is lifted (:meth:`resume`,
        :meth:`clear`). Pausing an op already paused changes nothing.

        :param op: one of :data:`PAUSE_OPS`.
        :raises InvalidArgument: ``op`` cannot be paused.
        """
        if op not in PAUSE_OPS:
            raise InvalidArgument(f"op {op!r} cannot be paused; pausable: {', '.join(PAUSE_OPS)}", argument="op")
        self._update(pauses=lambda ops: sorted({*ops, op}))

    def resume(self, op: str | None = None) -> None:
        """Lift the pause of ``op`` (None: of every op); armed faults stay armed.

        :raises InvalidArgument: ``op`` cannot be paused.
        """
        if op is not None and op not in PAUSE_OPS:
            raise InvalidArgument(f"op {op!r} cannot be paused; pausable: {', '.join(PAUSE_OPS)}", argument="op")
        self._update(pauses=lambda ops: [] if op is None else [name for name in ops if name != op])

    def paused(self) -> list[str]:
        """The paused ops, sorted."""
        return read_json(self._pauses) or []

    def hold(self, op: str) -> None:
        """Block while ``op`` is paused, looking at the faults counter every
        :data:`PAUSE_POLL_SECONDS`; return at once when it is not. While blocked, the call is
        counted by :meth:`blocked`.
        """
        if op not in self.paused():  # cheap, lock-free: nothing paused is the common case
            return
        with self._waiting(op):
            fd = open_file(self._lock, os.O_RDONLY | os.O_CREAT)
            try:
                seen = read_counter(fd)
                while op in self.paused():
                    while read_counter(fd) == seen:
                        time.sleep(PAUSE_POLL_SECONDS)
                    seen = read_counter(fd)
            finally:
                os.close(fd)

    def blocked(self) -> dict[str, int]:
        """How many calls of each op are blocked by a pause right now, in every process:
        ``{op: calls}``, ops with none left out."""
        try:
            names = os.listdir(self._waiters)
        except FileNotFoundError:
            return {}
        counts: dict[str, int] = {}
        for name in names:
            if name.startswith("."):  # a waiter still taking its lock
                continue
            if _waiter_alive(self._waiters / name):
                op = name.rpartition(".")[0]
                counts[op] = counts.get(op, 0) + 1
        return counts

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

        self._update(faults=consume)
        if error is not None:
            raise error

    def _message(self, op: str, kind: str) -> str:
        return f"injected fault: {op} failed on VM {self.vm_name!r} ({kind})"

    def _update(
        self,
        *,
        faults: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        pauses: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        """Change ``faults.json`` and ``pauses.json`` under their lock; the counter is bumped
        once when either changed."""
        with locked(self._lock, exclusive=True) as fd:
            moved = False
            if faults is not None:
                moved |= _rewrite(self._json, faults, {})
            if pauses is not None:
                moved |= _rewrite(self._pauses, pauses, [])
            if moved:
                write_counter(fd, read_counter(fd) + 1)

    @contextmanager
    def _waiting(self, op: str) -> Iterator[None]:
        """Show a call of ``op`` as blocked for the ``with`` block: a file ``paused/<op>.<id>``
        whose exclusive ``flock`` this call holds. The file is locked under a hidden name
        first, so no counter ever sees it unlocked."""
        make_dir(self._waiters)
        fd, hidden = tempfile.mkstemp(dir=self._waiters, prefix=f".{op}.")
        shown = self._waiters / f"{op}.{Path(hidden).name.rpartition('.')[2]}"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(hidden, shown)
        except BaseException:
            os.close(fd)
            Path(hidden).unlink(missing_ok=True)
            raise
        try:
            yield
        finally:
            shown.unlink(missing_ok=True)
            os.close(fd)


def _rewrite(path: Path, change: Callable[[Any], Any], empty: Any) -> bool:
    """Apply ``change`` to the JSON document ``path`` (``empty`` when missing) and write it
    back if it changed; the caller holds the lock. :returns: whether it changed."""
    before = read_json(path) or empty
    after = change(before)
    if after == before:
        return False
    write_json(path, after)
    return True


def _waiter_alive(path: Path) -> bool:
    """Whether the waiter file ``path`` is locked by a blocked call; the file of a waiter
    that died is deleted."""
    try:
        fd = open_file(path, os.O_RDONLY)
    except FileNotFoundError:  # its call just went on
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        path.unlink(missing_ok=True)
        return False
    finally:
        os.close(fd)


class ReadFaultProbe:
    """Checks for ``read`` faults and pauses from a disk reader's hot path.

    :param store: the VM's faults.
    :param paths: the VM's folder.
    """

    def __init__(self, store: FaultStore, paths: VmPaths) -> None:
        self._store = store
        self._fd = open_file(paths.faults_generation, os.O_RDONLY | os.O_CREAT)
        self._seen = -1
        self._armed = False
        self._paused = False

    def check(self) -> None:
        """Block while ``read`` is paused (:meth:`FaultStore.hold`), then fire the VM's
        ``read`` fault if one is armed (see :meth:`FaultStore.fire`).

        :raises TransientProviderError: a transient ``read`` fault is armed.
        :raises DiskReadError: a permanent ``read`` fault is armed.
        """
        self._refresh()
        if self._paused:
            self._store.hold("read")
            self._refresh()
        if self._armed:
            self._store.fire("read")

    def _refresh(self) -> None:
        generation = read_counter(self._fd)
        if generation != self._seen:
            self._seen = generation
            self._armed = "read" in self._store.armed()
            self._paused = "read" in self._store.paused()

    def close(self) -> None:
        """Release the counter file. Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
