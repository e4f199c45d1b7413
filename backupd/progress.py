"""A session run by this process (``job start --wait``, and the detached runner): live
progress, and Ctrl-C / SIGTERM.

The session runs on a thread; the main thread draws the progress view (per VM: status, stage,
bytes, rate) from the state DB and turns Ctrl-C or SIGTERM into stop requests through the same
path ``backupd job stop`` uses: the first a graceful stop, the second an immediate one (the
two-stage shutdown of dramatiq and celery workers).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from backupd.enums import SessionResult, StopMode

if TYPE_CHECKING:
    from backupd.service import Backupd

#: seconds between two redraws of the live view
REFRESH_SECONDS = 0.5


def run_in_foreground(service: "Backupd", session_id: int, *, live: bool) -> SessionResult:
    """Run the session on a thread until it ends; Ctrl-C or SIGTERM stop it in two stages.

    The signal handler only counts signals (STYLE: stopping signals, the loop acts); this
    thread's loop turns them into stop requests in the state DB: the first a graceful stop,
    the second an immediate one.

    :param live: draw the progress view on stderr (a terminal).
    :returns: the session result.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = service.run_session(session_id)
        except BaseException as exc:  # handed to the main thread, which reports it once
            outcome["error"] = exc

    runner = threading.Thread(target=run, name=f"session-{session_id}")
    signals: list[int] = []
    handled = 0

    def on_signal(signum: int, _frame: Any) -> None:
        signals.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        runner.start()
        view = _LiveView(service, session_id) if live else None
        with view if view is not None else contextlib.nullcontext():
            while runner.is_alive():
                while handled < len(signals):
                    handled += 1
                    _request_stop(service, session_id, StopMode.GRACEFUL if handled == 1 else StopMode.IMMEDIATE)
                if view is not None:
                    view.draw()
                runner.join(REFRESH_SECONDS)
            if view is not None:
                view.draw()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result", SessionResult.FAILED)


def _request_stop(service: "Backupd", session_id: int, mode: StopMode) -> None:
    import sys

    outcome, in_force = service.store.request_stop(session_id, mode, None)
    if in_force is not None:
        hint = " (Ctrl-C again for an immediate stop)" if in_force is StopMode.GRACEFUL else ""
        print(f"\n{in_force.value} stop requested for session {session_id}{hint}", file=sys.stderr)


class _LiveView:
    """The progress table, redrawn in place on stderr."""

    def __init__(self, service: "Backupd", session_id: int) -> None:
        from rich.console import Console
        from rich.live import Live

        self._service = service
        self._session_id = session_id
        self._rates = _Rates()
        self._live = Live(console=Console(stderr=True), refresh_per_second=4, transient=False)

    def __enter__(self) -> "_LiveView":
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(*exc)  # type: ignore[arg-type]

    def draw(self) -> None:
        self._live.update(_view(self._service, self._session_id, self._rates))


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


@contextlib.contextmanager
def progress_bar(description: str, *, unit_bytes: bool, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr for long work (restore, verify), fed by the repository's
    ``progress(done, total)`` callbacks; yields None (no bar) when not ``enabled`` (not a
    terminal, or ``--json``).

    :param unit_bytes: the units are bytes (shown as sizes and a rate) rather than blocks.
    """
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TimeRemainingColumn, TransferSpeedColumn,
    )

    columns = [BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn()] if unit_bytes \
        else [BarColumn(), MofNCompleteColumn()]
    with Progress("{task.description}", *columns, TimeRemainingColumn(), console=Console(stderr=True),
                  transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
