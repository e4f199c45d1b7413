"""Backup proxies as the state DB knows them: one ``proxy`` row per ``backupd proxy``
process, its heartbeat, and which proxies are alive.

A proxy writes its row every :data:`HEARTBEAT_SECONDS`; one whose heartbeat is older than
:data:`STALE_SECONDS` is gone (killed, its host lost, or cut off from the state DB), and so are
the VM tasks it was running (:mod:`backupd.dispatch` ends them ``failed``, ``proxy lost``).
``proxy list`` shows the proxies seen in the last :data:`LISTED_SECONDS`.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from sqlalchemy import update
from sqlmodel import select

from backupd.state import Proxy, StateStore, as_utc, utcnow

#: seconds between two heartbeats of a proxy
HEARTBEAT_SECONDS = 2.0
#: seconds without a heartbeat after which a proxy counts as gone (the issue: VM tasks of a
#: killed proxy end within 60 s)
STALE_SECONDS = 20.0
#: ``proxy list`` shows proxies whose last heartbeat is at most this old (seconds)
LISTED_SECONDS = 60.0
#: the environment variable naming this machine for proxies, by default its hostname
HOST_ID_ENV = "BACKUPD_HOST_ID"


def host_id() -> str:
    """This machine's name as a proxy records it: ``$BACKUPD_HOST_ID``, else the hostname
    (several proxies on one machine, each with its own, look like several hosts)."""
    return os.environ.get(HOST_ID_ENV) or socket.gethostname()


class ProxyRegistry:
    """The ``proxy`` rows.

    :param store: the state DB.
    """

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def register(self, host: str, pid: int, pool: str, capacity: int) -> str:
        """Record a proxy that starts taking work.

        :returns: its name, ``HOST/PID``.
        :raises StateError: the state DB cannot be used.
        """
        name = f"{host}/{pid}"
        now = utcnow()
        with self._store._session(write=True) as db:
            db.merge(Proxy(name=name, host=host, pid=pid, pool=pool, capacity=capacity, running=0, peak_running=0,
                           status="up", note=None, started_at=now, heartbeat_at=now))
            db.commit()
        return name

    def beat(self, name: str, *, running: int, peak: int, status: str = "up", note: str | None = None) -> None:
        """The proxy's heartbeat, with the VM tasks it runs now and its peak.

        :raises StateError: the state DB cannot be used.
        """
        with self._store._session(write=True) as db:
            db.exec(update(Proxy).where(Proxy.name == name).values(  # type: ignore[call-overload]
                heartbeat_at=utcnow(), running=running, peak_running=peak, status=status, note=note))
            db.commit()

    def proxies(self, *, seen_within: float | None = None, pool: str | None = None) -> list[Proxy]:
        """Proxy rows, by pool and name; only those whose heartbeat is at most ``seen_within``
        seconds old, if given.

        :raises StateError: the state DB cannot be used.
        """
        query = select(Proxy).order_by(Proxy.pool, Proxy.name)  # type: ignore[arg-type]
        if seen_within is not None:
            query = query.where(Proxy.heartbeat_at >= utcnow() - timedelta(seconds=seen_within))
        if pool is not None:
            query = query.where(Proxy.pool == pool)
        with self._store._session() as db:
            return list(db.exec(query))


def is_alive(proxy: Proxy) -> bool:
    """Whether a proxy takes work: status ``up`` and a heartbeat newer than
    :data:`STALE_SECONDS`."""
    beat = as_utc(proxy.heartbeat_at)
    return proxy.status == "up" and beat is not None and beat >= utcnow() - timedelta(seconds=STALE_SECONDS)


def is_gone(proxy: Proxy | None) -> bool:
    """Whether a proxy that held a VM task no longer runs it: no row, exited (``stopped``),
    or a heartbeat older than :data:`STALE_SECONDS`. A ``paused`` proxy (broker lost) still
    runs the tasks it has."""
    if proxy is None or proxy.status == "stopped":
        return True
    beat = as_utc(proxy.heartbeat_at)
    return beat is None or beat < utcnow() - timedelta(seconds=STALE_SECONDS)
