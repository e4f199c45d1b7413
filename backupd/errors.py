"""The exceptions backupd raises, each knowing the CLI exit code it maps to.

::

    BackupdError                      exit 2 unless a subclass says otherwise
     ├── UsageError                   64  a command line that makes no sense
     ├── ConfigError                  78  the config file is invalid; nothing was run or changed
     ├── NotFoundError                4   no such job, VM, session or restore point
     ├── NoRunningSessionError        3   ``job stop`` for a job with no running session
     ├── StateError                   2   the state DB is unreachable or inconsistent
     ├── RepositoryError              2   the repository is unusable
     │    └── RepositoryCorruptError  2   a block or manifest does not match its hash
     └── SessionCancelled             2   internal: a VM task was cancelled by an immediate stop

Provider failures are a separate tree rooted at :class:`providers.base.ProviderError`, so the
providers package does not depend on this one; the engine maps them into VM task results.
The exit codes follow ``sysexits.h`` where it has one (64 ``EX_USAGE``, 78 ``EX_CONFIG``).
"""

from __future__ import annotations


class BackupdError(Exception):
    """Base of every error backupd raises on purpose.

    :ivar exit_code: the process exit code the CLI uses when this error ends a command.
    """

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(BackupdError):
    """The command line is wrong (``EX_USAGE``)."""

    exit_code = 64


class ConfigError(BackupdError):
    """The config file is invalid (``EX_CONFIG``).

    :param path: the config file.
    :param problems: one entry per problem: ``(key path such as "jobs.nightly.vms", line or None,
        text)``.
    """

    exit_code = 78

    def __init__(self, path: str, problems: list[tuple[str, int | None, str]]) -> None:
        self.path = path
        self.problems = problems
        lines = []
        for key, line, text in problems:
            where = f"{path}:{line}" if line else path
            lines.append(f"{where}: {key}: {text}" if key else f"{where}: {text}")
        super().__init__("invalid config\n" + "\n".join(lines))


class NotFoundError(BackupdError):
    """A job, VM, session or restore point named by the user does not exist."""

    exit_code = 4


class NoRunningSessionError(BackupdError):
    """``job stop`` named a job that has no running session."""

    exit_code = 3


class StateError(BackupdError):
    """The state DB cannot be used."""


class RepositoryError(BackupdError):
    """The repository cannot be opened, read or written."""


class RepositoryCorruptError(RepositoryError):
    """Stored data does not match the hash that names it."""


class SessionCancelled(BackupdError):
    """Raised inside a VM task when an immediate stop cancels it; never leaves the engine."""
