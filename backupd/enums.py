"""Enumerations shared by the engine, the state DB and the CLI.

Values are the lower-case words of the design's vocabulary; they are what ``--json`` prints
and what the state DB stores. Compare members with ``is``.
"""

from __future__ import annotations

from enum import Enum


class SessionState(str, Enum):
    """Life cycle of a job session."""

    #: created, its runner not yet processing VMs
    STARTING = "starting"
    #: processing VMs
    WORKING = "working"
    #: a stop was requested and is being carried out
    STOPPING = "stopping"
    #: finished; ``result`` is set
    STOPPED = "stopped"


class SessionResult(str, Enum):
    """Outcome of a finished job session."""

    SUCCESS = "success"
    WARNING = "warning"
    FAILED = "failed"

    @property
    def exit_code(self) -> int:
        """CLI exit code for a session that ended with this result (0, 1, 2)."""
        return {"success": 0, "warning": 1, "failed": 2}[self.value]


class TaskStatus(str, Enum):
    """Status of one VM task inside a session."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    WARNING = "warning"
    FAILED = "failed"
    #: in flight when an immediate stop came; no restore point was kept
    CANCELLED = "cancelled"
    #: never started because the session was stopped first
    NOT_PROCESSED = "not_processed"

    @property
    def is_final(self) -> bool:
        return self not in (TaskStatus.PENDING, TaskStatus.RUNNING)


class StopMode(str, Enum):
    """How a stop request ends a session (see the stop contract in docs/design.md)."""

    #: start no new VM; VMs in flight finish their restore points
    GRACEFUL = "graceful"
    #: cancel VMs in flight, remove this session's snapshots, result failed
    IMMEDIATE = "immediate"


class TransferMode(str, Enum):
    """How a VM task read its disks."""

    #: every in-use area of every disk was read
    FULL = "full"
    #: only the areas CBT reported changed since the previous restore point were read
    INCREMENTAL = "incremental"


class SessionTrigger(str, Enum):
    """What started a job session (stored on the session; NULL in rows older than the
    daemon means ``manual``)."""

    #: ``job start`` from an administrator or an external scheduler
    MANUAL = "manual"
    #: the daemon, at a time of the job's schedule
    SCHEDULE = "schedule"
    #: the end of another job's session (``triggered_by``), a chained job
    CHAIN = "chain"
    #: ``job retry``: the failed VMs of an earlier session (``retry_of``) once more
    RETRY = "retry"
    #: the daemon retrying the failed VMs of an earlier session by itself (``retry_of``)
    AUTO_RETRY = "auto_retry"


class StopReason(str, Enum):
    """Why a session was asked to stop."""

    #: ``job stop`` from an administrator or a script
    USER = "user"
    #: the job's backup window closed
    WINDOW = "window"
    #: the daemon is shutting down
    SHUTDOWN = "shutdown"
