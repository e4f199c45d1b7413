"""Progress on a terminal: the live view of a session run in the foreground (``job start
--wait``, drawn from the state DB: per VM status, stage, bytes, rate) and progress bars for
long work (restore, verify). Session hosting itself (signals, stops) is in
:mod:`backupd.host`.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from backupd.service import Backupd


class LiveView:
    """The progress table, redrawn in place on stderr."""

    def __init__(self, service: "Backupd", session_id: int) -> None:
        from rich.console import Console
        from rich.live import Live

        self._service = service
        self._session_id = session_id
        self._rates = _Rates()
        self._live = Live(console=Console(stderr=True), refresh_per_second=4, transient=False)

    def __enter__(self) -> "LiveView":
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(*exc)  # type: ignore[arg-type]

    def draw(self) -> None:
        """Redraw from the state DB; a moment the DB cannot be read is skipped."""
        from backupd.errors import StateError

        try:
            self._live.update(_view(self._service, self._session_id, self._rates))
        except StateError:
            pass


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
