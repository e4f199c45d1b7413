"""Hosting one job session in this process: the one place that runs a session for a
foreground ``job start --wait``, for the detached runner of ``job start``, and for each
session process of the daemon.

A session process hosts exactly one session. The session runs on a thread; the main thread
turns SIGINT (Ctrl-C) and SIGTERM into stop requests through the state DB, the same path
``backupd job stop`` takes: the first a graceful stop, the second an immediate one (the
two-stage shutdown of dramatiq and celery workers). The signal handler only counts signals;
this module's loop acts on them.

Run a created session in a process of its own (what ``job start`` and the daemon spawn)::

    python -m backupd.host --config backupd.toml [--config-on-stdin] SESSION_ID

Its exit code is the session's (0 success, 1 warning, 2 failed).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import setproctitle

from backupd.enums import SessionResult, StopMode

if TYPE_CHECKING:
    from backupd.config import Config
    from backupd.service import Backupd
    from backupd.state import StateStore

#: seconds between two looks at signals and the live view
TICK_SECONDS = 0.5


def host_session(service: "Backupd", session_id: int, *, tick: Callable[[], None] | None = None) -> SessionResult:
    """Run a created session to its end in this process, stopping it in two stages on
    SIGINT/SIGTERM. Call from the main thread (signal handlers live there).

    :param tick: called every :data:`TICK_SECONDS` while the session runs (the live view).
    :returns: the session result.
    :raises StateError: the state DB failed (the session was stopped at once, see
        :meth:`backupd.engine.SessionRunner.run`).
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = service.run_session(session_id)
        except BaseException as exc:  # handed to this thread, which raises it once
            outcome["error"] = exc

    runner = threading.Thread(target=run, name=f"session-{session_id}")
    signals: list[int] = []
    handled = 0
    previous = {sig: signal.signal(sig, lambda signum, _frame: signals.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        runner.start()
        while runner.is_alive():
            while handled < len(signals):
                handled += 1
                _request_stop(service, session_id, StopMode.GRACEFUL if handled == 1 else StopMode.IMMEDIATE)
            if tick is not None:
                tick()
            runner.join(TICK_SECONDS)
        if tick is not None:
            tick()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result", SessionResult.FAILED)


def freeze_start_up_objects() -> None:
    """Call once in a process that hosts one session, right before :func:`host_session`:
    the objects made so far (imported modules, the config, the state DB's engine) live as
    long as the process, and ``gc.freeze()`` moves them out of every later collection
    (Python documentation, ``gc.freeze``). Otherwise each full collection a session
    triggers walks them all again: 35-50 ms each, measured, inside the session's time.
    Not for processes that host many sessions one after another (tests): frozen objects
    are never collected."""
    gc.freeze()


def _request_stop(service: "Backupd", session_id: int, mode: StopMode) -> None:
    outcome, in_force = service.store.request_stop(session_id, mode, None)
    if in_force is not None:
        hint = " (again for an immediate stop)" if in_force is StopMode.GRACEFUL else ""
        print(f"\n{in_force.value} stop requested for session {session_id}{hint}", file=sys.stderr)
    elif outcome == "too_late":
        print(f"\nsession {session_id} is finishing; nothing is left to stop", file=sys.stderr)


def open_session_log(log_path: Path) -> int:
    """Open a session process's log file for appending, its folder made if missing (0700),
    the file 0600 (it may name VMs and paths).

    :returns: the file descriptor (the caller closes it).
    :raises OSError: the folder or the file could not be created.
    """
    log_path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.chmod(log_path, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def spawn_session_process(config: "Config", session_id: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m backupd.host`` for a created session, in a new process session (so a
    Ctrl-C in the caller's terminal does not reach it), output appended to ``log_path``. The
    process runs with ``config`` as it was read (its bytes go through stdin), not with what
    the file holds by then: a session runs under the config it was started with.

    :raises OSError: the process or its log file could not be created.
    """
    out = open_session_log(log_path)
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "backupd.host", "--config", str(config.path), "--config-on-stdin", str(session_id)],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(out)
    assert child.stdin is not None
    try:
        child.stdin.write(config.source)
        child.stdin.close()
    except BrokenPipeError:
        pass  # the process died at once; its exit code tells
    return child


#: the name every session process gives itself (``/proc/PID/comm``, what ``ps -e`` and
#: ``top`` show): a fork server's children share its command line, so this is what marks them
SESSION_PROCESS_NAME = "backupd-session"


def name_session_process(session_id: int) -> None:
    """Call first thing in a session process: its name becomes :data:`SESSION_PROCESS_NAME`,
    written to ``/proc/self/comm`` (Linux, at most 15 bytes; elsewhere nothing happens), and
    its command line (``ps aux``, ``ps -f``) ``backupd-session SESSION_ID``, set with
    setproctitle: a forked child would otherwise show its fork server's."""
    setproctitle.setproctitle(f"{SESSION_PROCESS_NAME} {session_id}")
    try:
        Path("/proc/self/comm").write_text(SESSION_PROCESS_NAME)
    except OSError:
        pass


def is_session_process(pid: int) -> bool:
    """Whether process ``pid`` of this host is a session process: one named
    :data:`SESSION_PROCESS_NAME` (a child of the daemon's fork server, :mod:`backupd.forkserver`,
    or a ``python -m backupd.host``), or one whose command line says ``-m backupd.host`` (a
    session process that has not named itself yet, or one an earlier backupd started), read
    from ``/proc/PID/comm`` and ``/proc/PID/cmdline`` (Linux). False for a foreground ``job
    start --wait``, the fork server itself, a process that has ended, or one that cannot be
    read."""
    proc = Path(f"/proc/{pid}")
    try:
        if (proc / "comm").read_text().strip() == SESSION_PROCESS_NAME:
            return True
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(argv[i:i + 2] == [b"-m", b"backupd.host"] for i in range(len(argv) - 1))


def run_session_process(session_id: int, config: "Callable[[], Config]", store: "StateStore | None" = None) -> int:
    """The body of a session process: get the config, host the session, close.

    :param config: gives the validated config (:func:`backupd.config.load_config`, or the
        fork server's copy); may raise :class:`~backupd.errors.BackupdError`.
    :param store: its state DB, already opened (the fork server's, see
        :meth:`~backupd.state.StateStore.after_fork`); by default opened here.
    :returns: the exit code: the session's (0 success, 1 warning, 2 failed), or a
        :class:`~backupd.errors.BackupdError`'s (the config, the state DB, no such session),
        its message on stderr.
    """
    from backupd.cli import MAX_SESSION_ID, configure_logging
    from backupd.errors import BackupdError, NotFoundError
    from backupd.service import Backupd

    name_session_process(session_id)
    configure_logging()
    try:
        if not 1 <= session_id <= MAX_SESSION_ID:
            raise NotFoundError(f"no session {session_id}")
        # No dead-session pass on opening the state DB: the session's own recovery pass
        # (without a daemon) or the daemon's covers it (see Backupd's recover_dead).
        service = Backupd(config(), store=store, recover_dead=False)
        try:
            freeze_start_up_objects()
            return host_session(service, session_id).exit_code
        finally:
            service.close()
    except BackupdError as exc:
        print(f"backupd: {exc}", file=sys.stderr)
        return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m backupd.host --config PATH SESSION_ID``: host one created session."""
    parser = argparse.ArgumentParser(prog="python -m backupd.host", description=main.__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--config-on-stdin", action="store_true",
                        help="the config file's bytes come on stdin (its path still resolves relative paths)")
    parser.add_argument("session_id", type=int)
    args = parser.parse_args(argv)
    from backupd.config import load_config

    data = sys.stdin.buffer.read() if args.config_on_stdin else None
    return run_session_process(args.session_id, lambda: load_config(args.config, data=data))


if __name__ == "__main__":
    sys.exit(main())
