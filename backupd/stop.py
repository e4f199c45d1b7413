"""The stop signal of a running session: what its runner and its VM tasks have been asked to do.

The state DB is the control plane: ``backupd job stop`` writes a stop request onto the session
row from any process, and whoever runs the session polls it (:meth:`StopSignal.refresh`) and
raises in-process events that VM tasks check between blocks. A VM task shares nothing else with
its runner, so the same signal serves a VM task running anywhere that reaches the state DB.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from backupd.enums import StopMode
from backupd.errors import StateError
from backupd.state import StateStore

log = logging.getLogger(__name__)


class StopSignal:
    """What a session has been asked to do.

    ``no_new_vms`` is set by either kind of stop; ``cancel`` only by an immediate stop (VM
    tasks in flight abandon their work) or by the loss of the state DB. Once immediate, the
    signal never goes back.

    :param store: the state DB.
    :param session_id: the session.
    """

    def __init__(self, store: StateStore, session_id: int) -> None:
        self._store = store
        self._session_id = session_id
        self.no_new_vms = threading.Event()
        self.cancel = threading.Event()
        self.mode: StopMode | None = None
        #: when a graceful stop escalates to immediate, if it has a drain period
        self.drain_deadline: datetime | None = None
        #: the state DB failure that stopped the session, if one did
        self.state_error: StateError | None = None
        self._lock = threading.Lock()

    def refresh(self) -> StopMode | None:
        """Read the stop request from the state DB and raise the events it asks for.

        :returns: the stop mode in force, None when no stop was requested.
        :raises StateError: the state DB cannot be read.
        """
        mode, self.drain_deadline = self._store.stop_request(self._session_id)
        if mode is not None and self.mode is not StopMode.IMMEDIATE:
            self.mode = mode
            self.no_new_vms.set()
            if mode is StopMode.IMMEDIATE:
                self.cancel.set()
        return self.mode

    def lose_state(self, exc: StateError) -> bool:
        """The state DB cannot be used: a session that cannot record what it does or hear a
        stop request stops at once, as an immediate stop would (snapshot removal needs no DB).

        :returns: True for the first failure (the one to report), False afterwards.
        """
        with self._lock:
            first = self.state_error is None
            if first:
                self.state_error = exc
        self.no_new_vms.set()
        self.cancel.set()
        if first:
            log.error("session %s: %s; stopping the session now and removing its snapshots", self._session_id, exc)
        return first

    @property
    def requested(self) -> bool:
        return self.no_new_vms.is_set()
