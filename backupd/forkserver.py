"""Starting the daemon's session processes: a fork server, with ``python -m backupd.host``
as the fallback.

A session process spends about half a second of CPU before it does any work: Python starts and
imports SQLAlchemy, SQLModel, pydantic, the repository's compressors and the provider. A daemon
that starts a hundred sessions in a minute spends most of a core on that, among the sessions
already running. So the daemon starts ``python -m backupd.forkserver`` once; it imports all of
it, and for each session forks a child that hosts the session — what a prefork server does
(PostgreSQL's postmaster, gunicorn's arbiter). A child is a session process in everything that
matters (:mod:`backupd.host`): a process session of its own (no terminal signal reaches it),
stdin from ``/dev/null``, output appended to ``logs/session-ID.log``, the config as the daemon
sent it (parsed and validated in the fork server once per config the daemon sends, not in every
child: 0.1 s of CPU for a config of 100 jobs), its name ``backupd-session`` (how a restarted
daemon finds it to adopt), and its exit code the session's. The state DB's engine is the fork
server's too: opened once per state DB URL, each statement a session runs run once so that
nothing changes (:meth:`~backupd.state.StateStore.warm_up` with
:data:`backupd.vmtask.TASK_RECORDS`: SQLAlchemy compiles a statement once per engine), its
connections closed before any fork; a child starts with an empty connection pool of its own.
The fork server holds no state DB connection and no thread when it forks: a child starts from
clean state, as it would after exec.

Protocol, one JSON object per line. The daemon writes requests on the fork server's stdin::

    {"session": 12, "config_path": "/etc/backupd/backupd.toml", "config": "<base64>", "log": "/…/session-12.log"}

and reads on its stdout, in order: ``{"ready": PID}`` once its imports are done; per request
``{"session": 12, "pid": 4711}``, or ``{"session": 12, "error": "..."}`` when the log file
could not be opened or the fork failed; and ``{"pid": 4711, "exit": CODE}`` when a child ended
(as ``subprocess.Popen.returncode``: negative for a signal). At EOF on its stdin (the daemon
exited, or was killed) the fork server exits; children still running go on, adopted by the next
daemon like any session process.

The daemon's side (:class:`SessionStarter`) restarts a fork server that died, and starts a
session with ``python -m backupd.host`` when it cannot have one. A child whose fork server died
before it ended has lost its exit code: :meth:`ForkedProcess.poll` raises :class:`ProcessLost`,
and the daemon watches it by pid from then on, as it watches an adopted process.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

if TYPE_CHECKING:
    from backupd.config import Config
    from backupd.state import StateStore

log = logging.getLogger("backupd.daemon")

#: seconds the daemon waits for a new fork server's imports, and for the answer to a request
#: (normally well under one); after that the fork server counts as failed
ANSWER_SECONDS = 30.0
#: failed fork servers in a row after which the daemon starts sessions with
#: ``python -m backupd.host`` only (each failure is logged)
MAX_FAILURES = 3
#: the exit code of a child that failed before it could host its session (EX_SOFTWARE)
_EXIT_CHILD_BROKE = 70


class SessionProcess(Protocol):
    """A running session process as the daemon supervises it (``subprocess.Popen`` is one)."""

    pid: int

    def poll(self) -> int | None:
        """The exit code once the process has ended, else None."""


class ForkServerError(Exception):
    """The fork server could not be started, died, or did not answer in time."""


class ProcessLost(Exception):
    """The fork server that started a process ended before it: the process's exit code cannot
    be known, and whether it runs only by its pid."""


# -- the daemon's side ---------------------------------------------------------------------------


class ForkServer:
    """One running ``python -m backupd.forkserver``, as the daemon sees it.

    :param argv: the command that runs the fork server.
    :raises OSError: the process could not be created.
    """

    def __init__(self, argv: Sequence[str]) -> None:
        self.process = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        start_new_session=True, close_fds=True)
        self._lock = threading.Condition()
        self._ready = False
        self._gone = False
        self._answers: dict[int, dict[str, Any]] = {}
        self._exits: dict[int, int] = {}
        threading.Thread(target=self._read, name="forkserver-reader", daemon=True).start()

    @property
    def gone(self) -> bool:
        """Whether the fork server has ended (its stdout reached EOF)."""
        return self._gone

    def spawn(self, config: "Config", session_id: int, log_path: Path) -> "ForkedProcess":
        """Fork a session process for a created session.

        :raises OSError: its log file could not be opened, or the fork failed.
        :raises ForkServerError: the fork server died or did not answer in
            :data:`ANSWER_SECONDS` (it is killed then).
        """
        request = {"session": session_id, "config_path": str(config.path),
                   "config": base64.b64encode(config.source).decode(), "log": str(log_path)}
        with self._lock:
            self._wait(lambda: self._ready, "get ready")
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
        except OSError as exc:
            raise ForkServerError(f"the fork server does not take requests: {exc}") from exc
        with self._lock:
            answer = self._wait(lambda: self._answers.pop(session_id, None), f"answer for session {session_id}")
        if "error" in answer:
            raise OSError(answer["error"])
        return ForkedProcess(self, int(answer["pid"]))

    def exit_code(self, pid: int) -> int | None:
        """The exit code of child ``pid`` once the fork server reported it (given once: the
        pid may be reused), else None.

        :raises ProcessLost: the fork server ended and had not reported it.
        """
        gone = self._gone  # read before the exits: the reader records every exit before EOF
        code = self._exits.pop(pid, None)
        if code is None and gone:
            raise ProcessLost(f"fork server pid {self.process.pid} ended before process {pid}")
        return code

    def close(self) -> None:
        """Close its stdin, so it exits (its children, if any, run on), and reap it."""
        try:
            assert self.process.stdin is not None
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(ANSWER_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def _wait(self, found: Any, what: str) -> Any:
        """Wait, holding the lock, until ``found()`` gives a value, and return that value.

        :raises ForkServerError: the fork server ended, or gave nothing in :data:`ANSWER_SECONDS`
            (it is killed then).
        """
        seen: list[Any] = []

        def check() -> bool:
            value = found()
            if value:
                seen.append(value)
            return bool(value) or self._gone

        self._lock.wait_for(check, ANSWER_SECONDS)
        if seen:
            return seen[0]
        if self._gone:
            raise ForkServerError(f"the fork server ended (exit {self.process.wait()}) before its {what}")
        self.kill()
        raise ForkServerError(f"the fork server gave no {what} in {ANSWER_SECONDS:g} s; it was killed")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if "ready" in message:
                    self._ready = True
                elif "exit" in message:
                    self._exits[int(message["pid"])] = int(message["exit"])
                elif "session" in message:
                    self._answers[int(message["session"])] = message
                self._lock.notify_all()
        with self._lock:
            self._gone = True
            self._lock.notify_all()


class ForkedProcess:
    """A session process a :class:`ForkServer` forked; a :class:`SessionProcess`."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server = server
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code once the process has ended, else None.

        :raises ProcessLost: its fork server ended first.
        """
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid)
        return self.returncode


class SessionStarter:
    """How the daemon starts session processes: through a fork server, started at once and
    restarted when it has died; with ``python -m backupd.host``
    (:func:`backupd.host.spawn_session_process`) for a session the fork server failed, and for
    every session once :data:`MAX_FAILURES` fork servers in a row have failed.

    :param config_path: the daemon's config; the fork server imports what its jobs need
        (their providers, the state DB's driver).
    :param argv: the fork server's command (tests give a broken one).
    """

    def __init__(self, config_path: Path, argv: Sequence[str] | None = None) -> None:
        self.argv = list(argv) if argv is not None else [
            sys.executable, "-m", "backupd.forkserver", "--config", str(config_path)]
        self.server: ForkServer | None = None
        self.failures = 0
        self._start_server()

    def spawn(self, config: "Config", session_id: int, log_path: Path) -> SessionProcess:
        """Start a session process for a created session.

        :raises OSError: its log file could not be opened, or no process could be created.
        """
        from backupd.host import spawn_session_process

        if self.server is not None and self.server.gone:
            log.warning("the fork server (pid %d) ended with exit %s; starting a new one",
                        self.server.process.pid, self.server.process.wait())
            self._failed()
            self._start_server()
        if self.server is not None:
            try:
                process = self.server.spawn(config, session_id, log_path)
            except ForkServerError as exc:
                log.error("session %s: %s; it starts with a process of its own", session_id, exc)
                self._failed()
                self._start_server()
            else:
                self.failures = 0  # "in a row": a fork server that served is no failure streak
                return process
        return spawn_session_process(config, session_id, log_path)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def _failed(self) -> None:
        self.failures += 1
        self.server = None
        if self.failures == MAX_FAILURES:
            log.error("%d fork servers in a row failed; sessions start with a process of their own "
                      "(python -m backupd.host) from now on", MAX_FAILURES)

    def _start_server(self) -> None:
        if self.failures >= MAX_FAILURES:
            return
        try:
            self.server = ForkServer(self.argv)
        except OSError as exc:
            log.error("the fork server could not be started: %s", exc)
            self._failed()


# -- the fork server -------------------------------------------------------------------------------


def import_for_sessions(config_path: Path | None) -> None:
    """Import what a session process imports, so each child finds it done: the engine and
    everything it pulls in, the providers of the config's jobs and its state DB's driver
    (best effort: a config that no longer loads leaves the child to import them, and to report
    the error)."""
    import backupd.cli  # noqa: F401  (the session process's logging setup)
    import backupd.dispatch  # noqa: F401
    import backupd.engine  # noqa: F401
    import backupd.host  # noqa: F401
    import backupd.recovery  # noqa: F401
    import backupd.service  # noqa: F401
    import backupd.vmtask  # noqa: F401

    if config_path is None:
        return
    from sqlalchemy import create_engine
    from sqlalchemy.orm import configure_mappers

    from backupd.config import load_config
    from backupd.errors import BackupdError
    from providers import provider_type

    try:
        config = load_config(config_path)
    except BackupdError:
        return
    for section in config.providers.values():
        provider_type(section)
    create_engine(config.state.connect_url()).dispose()  # imports the dialect and its driver; connects nothing
    configure_mappers()  # SQLAlchemy's ORM set-up, else done lazily at the first query of every child


def serve(config_path: Path | None) -> int:
    """The fork server's loop (see the module docstring): answer requests on stdin until EOF,
    report children's exits as they happen. :returns: 0."""
    import_for_sessions(config_path)
    import gc

    gc.collect()
    gc.freeze()  # the imported modules stay untouched by children's collections: their pages stay shared
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)  # a handler, so SIGCHLD wakes select
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon's stop is the daemon's, not this process's
    _reply({"ready": os.getpid()})
    pending = b""
    configs = _Configs()
    while True:
        readable, _, _ = select.select([0, wake_read], [], [])
        if wake_read in readable:
            while _drain(wake_read):
                pass
        _reap()
        if 0 not in readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            return 0
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                _fork(json.loads(line), configs, inherited=(wake_read, wake_write))


class _Configs:
    """The config of the latest request, parsed and validated once (the daemon sends the same
    one until a SIGHUP reload changes it), or the error its validation raised; and its state
    DB, opened and warmed up once per URL (:meth:`~backupd.state.StateStore.warm_up`) for
    the children to inherit, or None when that failed (each child then opens its own and
    reports what fails, as a session process of its own would)."""

    def __init__(self) -> None:
        self.key: tuple[str, str] | None = None
        self.value: "Config | Exception | None" = None
        self._store: "StateStore | None" = None
        self._store_url: str | None = None

    def get(self, request: dict[str, Any]) -> "tuple[Config | Exception, StateStore | None]":
        from backupd.config import load_config

        key = (request["config_path"], request["config"])
        if key != self.key:
            try:
                self.value = load_config(Path(key[0]), data=base64.b64decode(key[1]))
            except Exception as exc:  # the child reports it as its own load would have
                self.value = exc
            self.key = key
        assert self.value is not None
        if isinstance(self.value, Exception):
            return self.value, None
        self._open_store(self.value.state.connect_url())
        return self.value, self._store

    def _open_store(self, url: str) -> None:
        from backupd.state import StateStore
        from backupd.vmtask import TASK_RECORDS

        if url == self._store_url:
            return
        if self._store is not None:
            self._store.close()
            self._store = None
        self._store_url = url
        store = None
        try:
            store = StateStore(url)
            store.warm_up(TASK_RECORDS)
        except Exception as exc:  # noqa: BLE001 - best effort: children open the state DB themselves
            print(f"backupd fork server: the state DB could not be prepared for the session processes, "
                  f"each opens it itself: {exc}", file=sys.stderr)
            if store is not None:
                store.close()
            return
        self._store = store


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 4096))
    except BlockingIOError:
        return False


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _reply({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


def _reply(message: dict[str, Any]) -> None:
    data = json.dumps(message).encode() + b"\n"
    while data:
        data = data[os.write(1, data):]


def _fork(request: dict[str, Any], configs: _Configs, inherited: tuple[int, ...]) -> None:
    from backupd.host import open_session_log

    session_id = int(request["session"])
    config, store = configs.get(request)
    log_path = Path(request["log"])
    try:
        log_fd = open_session_log(log_path)
    except OSError as exc:
        _reply({"session": session_id, "error": f"{log_path}: {exc.strerror or exc}"})
        return
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(log_fd)
        _reply({"session": session_id, "error": f"fork: {exc.strerror or exc}"})
        return
    if pid == 0:
        _child(session_id, config, store, log_fd, inherited)
    os.close(log_fd)
    _reply({"session": session_id, "pid": pid})


def _child(session_id: int, config: "Config | Exception", store: "StateStore | None", log_fd: int,
           inherited: tuple[int, ...]) -> NoReturn:
    """In the forked child: become a session process, host the session, exit with its code."""
    code = _EXIT_CHILD_BROKE
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        for fd in inherited:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        from backupd.host import run_session_process

        def loaded() -> "Config":
            if isinstance(config, Exception):
                raise config
            return config

        if store is not None:
            store.after_fork()
        code = run_session_process(session_id, loaded, store)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else _EXIT_CHILD_BROKE
    except BaseException:  # the log file says why; the exit code says it broke
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        logging.shutdown()
        # not sys.exit: the fork server's own exit handlers are not this process's to run
        os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m backupd.forkserver [--config PATH]``: serve the daemon (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m backupd.forkserver", description=main.__doc__)
    parser.add_argument("--config", type=Path, help="the config whose providers and state DB to import for")
    args = parser.parse_args(argv)
    try:
        return serve(args.config)
    except OSError as exc:
        if exc.errno == errno.EPIPE:  # the daemon is gone
            return 0
        raise


if __name__ == "__main__":
    sys.exit(main())
