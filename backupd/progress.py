"""A session run in the foreground (``job start --wait``): live progress and Ctrl-C.

The session runs on a thread of this process; the main thread draws the progress view (per
VM: status, stage, bytes, rate) from the state DB and turns Ctrl-C into stop requests through
the same path ``backupd job stop`` uses: the first a graceful stop, the second an immediate one
(the two-stage shutdown of dramatiq and celery workers).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from backupd.enums import SessionResult, StopMode

if TYPE_CHECKING:
    from backupd.service import Backupd

#: seconds between two redraws of the live view
REFRESH_SECONDS = 0.5


def run_in_foreground(service: "Backupd", session_id: int, *, live: bool) -> SessionResult:
    """Run the session on a thread until it ends; Ctrl-C stops it in two stages.

    :param live: draw the progress view on stderr (a terminal).
    :returns: the session result.
    """
    outcome: dict[str, SessionResult] = {}
    runner = threading.Thread(
        target=lambda: outcome.setdefault("result", service.run_session(session_id)),
        name=f"session-{session_id}",
    )
    interrupts = 0

    def on_interrupt(_signum: int, _frame: Any) -> None:
        nonlocal interrupts
        interrupts += 1
        mode = StopMode.GRACEFUL if interrupts == 1 else StopMode.IMMEDIATE
        service.store.request_stop(session_id, mode, None)
        import sys

        hint = " (Ctrl-C again for an immediate stop)" if mode is StopMode.GRACEFUL else ""
        print(f"\n{mode.value} stop requested for session {session_id}{hint}", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        runner.start()
        if live:
            _draw_until_done(service, session_id, runner)
        while runner.is_alive():
            runner.join(REFRESH_SECONDS)
    finally:
        signal.signal(signal.SIGINT, previous)
    return outcome.get("result", SessionResult.FAILED)


def _draw_until_done(service: "Backupd", session_id: int, runner: threading.Thread) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=True)
    rates = _Rates()
    with Live(console=console, refresh_per_second=4, transient=False) as view:
        while runner.is_alive():
            view.update(_view(service, session_id, rates))
            runner.join(REFRESH_SECONDS)
        view.update(_view(service, session_id, rates))


class _Rates:
    """Bytes per second per VM, from successive readings of ``bytes_read``."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}
        self._rate: dict[str, float] = {}

    def update(self, vm: str, bytes_read: int) -> float:
        now = time.monotonic()
        then, before = self._last.get(vm, (now, bytes_read))
        if now - then >= 1.0 or vm not in self._last:
            if now > then:
                self._rate[vm] = (bytes_read - before) / (now - then)
            self._last[vm] = (now, bytes_read)
        return self._rate.get(vm, 0.0)


def _view(service: "Backupd", session_id: int, rates: _Rates) -> Any:
    from rich.table import Table

    from backupd.render import size

    session = service.store.session(session_id)
    title = f"session {session_id} · job {session.job} · {session.state.value}"
    if session.stop_mode:
        title += f" · {session.stop_mode.value} stop requested"
    grid = Table(title=title, title_justify="left", expand=False)
    for header in ("VM", "status", "stage", "mode", "read", "of", "rate"):
        grid.add_column(header)
    for task in service.store.tasks(session_id):
        rate = rates.update(task.vm, task.bytes_read)
        grid.add_row(
            task.vm, task.status.value, task.stage or "", task.mode or "",
            size(task.bytes_read), size(task.bytes_total) if task.bytes_total else "",
            f"{size(int(rate))}/s" if task.status.value == "running" and rate else "",
        )
    return grid
