"""backupd: a backup job runner for virtual machines.

The public Python API, for scripts and tests (the CLI is built on it)::

    from backupd import Backupd, load_config
    service = Backupd(load_config("backupd.toml"))
    session = service.create_session("nightly")
    result = service.run_session(session.id)

Names are imported lazily, so ``import backupd`` (and ``backupd --help``) stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Backupd": "backupd.service",
    "StopOutcome": "backupd.service",
    "Config": "backupd.config",
    "load_config": "backupd.config",
    "SessionState": "backupd.enums",
    "SessionResult": "backupd.enums",
    "TaskStatus": "backupd.enums",
    "StopMode": "backupd.enums",
    "TransferMode": "backupd.enums",
    "BackupdError": "backupd.errors",
    "ConfigError": "backupd.errors",
    "NotFoundError": "backupd.errors",
    "NoRunningSessionError": "backupd.errors",
    "UsageError": "backupd.errors",
    "RepositoryError": "backupd.errors",
    "Repository": "backupd.repository",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'backupd' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
