"""The daemon's fork server (:mod:`backupd.forkserver`): the session processes it forks are
session processes in every way the daemon relies on (name, own process session, log file,
exit code, adoption), and when it cannot be had, or dies, sessions still start and end."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import pytest

from backupd.config import load_config
from backupd.forkserver import MAX_FAILURES, ForkedProcess, ForkServer, ProcessLost, SessionStarter
from backupd.host import SESSION_PROCESS_NAME, is_session_process
from backupd.service import Backupd
from labkit import Lab, wait_until

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc/PID (Linux)")

#: a fork server that exits at once, before it is ready
BROKEN = [sys.executable, "-c", "raise SystemExit(3)"]


def _proc(pid: int, name: str) -> str:
    return Path(f"/proc/{pid}/{name}").read_text()


def _parent(pid: int) -> int:
    stat = _proc(pid, "stat")
    return int(stat[stat.rfind(")") + 2:].split()[1])


def _exit_code(process: ForkedProcess) -> int:
    return wait_until(lambda: (code := process.poll()) is not None and (code,), what="the session process to end")[0]


@pytest.fixture
def service(lab: Lab):  # noqa: ANN201
    lab.configure(vms={"web": "4 MiB"}, jobs={"nightly": {"vms": ["web"]}})
    lab.fill("web")
    lab.may_leave_sessions()
    backupd = Backupd(load_config(lab.config))
    yield backupd
    backupd.close()


def test_a_forked_session_process_hosts_its_session_like_one_of_its_own(lab: Lab, service: Backupd) -> None:
    session = service.create_session("nightly").id
    server = ForkServer([sys.executable, "-m", "backupd.forkserver", "--config", str(lab.config)])
    try:
        assert lab.pause("web", "read") == 0
        process = server.spawn(service.config, session, lab.site / "logs" / f"session-{session}.log")
        lab.wait_for_vms_in_flight(session, ["web"])
        assert _proc(process.pid, "comm").strip() == SESSION_PROCESS_NAME
        assert _proc(process.pid, "cmdline").split("\0")[0] == f"{SESSION_PROCESS_NAME} {session}", \
            "ps aux shows the session, not the fork server's command line"
        assert is_session_process(process.pid), "a restarted daemon can adopt it"
        assert not is_session_process(server.process.pid), "the fork server is not a session process"
        assert os.getsid(process.pid) == process.pid, "a process session of its own: no terminal signal reaches it"
        assert _parent(process.pid) == server.process.pid
        assert lab.session(session)["runner"]["pid"] == process.pid
        if lab.state_url.startswith("sqlite"):
            # it opened the state DB to warm up the engine its children inherit, and closed it
            # before forking: a connection shared across a fork is SQLite's documented hazard
            held = {os.path.realpath(f"/proc/{server.process.pid}/fd/{fd}")
                    for fd in os.listdir(f"/proc/{server.process.pid}/fd")}
            assert not {path for path in held if path.startswith(str(lab.state_db))}
        assert process.poll() is None
        lab.resume("web")
        assert _exit_code(process) == 0
    finally:
        server.close()
    assert lab.session(session)["result"] == "success"
    assert (lab.site / "logs" / f"session-{session}.log").stat().st_mode & 0o777 == 0o600


def test_a_session_killed_by_a_signal_reports_it_and_a_log_that_cannot_be_opened_is_an_oserror(
        lab: Lab, service: Backupd) -> None:
    server = ForkServer([sys.executable, "-m", "backupd.forkserver"])
    try:
        (lab.site / "not-a-folder").write_text("")
        with pytest.raises(OSError, match="not-a-folder"):
            server.spawn(service.config, 1, lab.site / "not-a-folder" / "session-1.log")
        session = service.create_session("nightly").id
        lab.pause("web", "read")
        process = server.spawn(service.config, session, lab.site / "logs" / f"session-{session}.log")
        lab.wait_for_vms_in_flight(session, ["web"])
        os.kill(process.pid, signal.SIGKILL)
        assert _exit_code(process) == -signal.SIGKILL, "as subprocess.Popen.returncode says it"
    finally:
        lab.resume("web")
        server.close()


def test_a_config_that_does_not_validate_fails_the_process_as_its_own_load_would(lab: Lab, service: Backupd) -> None:
    """The fork server validates the config once for all its children; an invalid one is
    each child's error: the config exit code (78), the message in its log."""
    session = service.create_session("nightly").id
    broken = service.config.model_copy(update={"source": b"[jobs.nightly]\nvms = 3\n"})
    server = ForkServer([sys.executable, "-m", "backupd.forkserver"])
    try:
        process = server.spawn(broken, session, lab.site / "logs" / f"session-{session}.log")
        assert _exit_code(process) == 78
        good = server.spawn(service.config, session, lab.site / "logs" / f"session-{session}.log")
        assert _exit_code(good) == 0, "the next config is validated anew"
    finally:
        server.close()
    assert "backupd.toml:2: jobs.nightly.vms" in (lab.site / "logs" / f"session-{session}.log").read_text()
    assert lab.session(session)["result"] == "success"


def test_a_process_whose_fork_server_died_runs_on_and_its_exit_code_is_lost(lab: Lab, service: Backupd) -> None:
    session = service.create_session("nightly").id
    server = ForkServer([sys.executable, "-m", "backupd.forkserver"])
    lab.pause("web", "read")
    process = server.spawn(service.config, session, lab.site / "logs" / f"session-{session}.log")
    lab.wait_for_vms_in_flight(session, ["web"])
    server.kill()
    wait_until(lambda: server.gone, what="the fork server's end to be seen")
    with pytest.raises(ProcessLost):
        process.poll()
    assert is_session_process(process.pid)
    lab.resume("web")
    assert lab.wait_stopped(session)["result"] == "success"


def test_without_a_fork_server_sessions_start_with_a_process_of_their_own(
        lab: Lab, service: Backupd, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backupd.daemon")
    starter = SessionStarter(lab.config, argv=BROKEN)
    try:
        for _ in range(MAX_FAILURES + 1):
            session = service.create_session("nightly").id
            process = starter.spawn(service.config, session, lab.site / "logs" / f"session-{session}.log")
            assert not isinstance(process, ForkedProcess)
            assert wait_until(lambda: (code := process.poll()) is not None and (code,))[0] == 0
            assert lab.session(session)["result"] == "success"
    finally:
        starter.close()
    assert starter.server is None and starter.failures == MAX_FAILURES, "no fork server is tried after that"
    assert f"{MAX_FAILURES} fork servers in a row failed" in caplog.text


def test_fork_server_failures_count_in_a_row_only(lab: Lab, service: Backupd) -> None:
    """Failures of fork servers weeks apart never add up to giving the fork server up: a
    session a fork server started clears the count."""
    starter = SessionStarter(lab.config)
    try:
        starter.failures = MAX_FAILURES - 1
        session = service.create_session("nightly").id
        process = starter.spawn(service.config, session, lab.site / "logs" / f"session-{session}.log")
        assert isinstance(process, ForkedProcess)
        assert _exit_code(process) == 0
        assert starter.failures == 0
    finally:
        starter.close()


def test_the_daemon_starts_a_new_fork_server_when_its_fork_server_died(lab: Lab, daemons) -> None:  # noqa: ANN001
    lab.configure(vms={"web": "4 MiB"}, jobs={"nightly": {"vms": ["web"]}})
    lab.fill("web")
    daemon = daemons()
    lab.pause("web", "read")
    first = lab.run_json("job", "start", "nightly")["session"]
    runner = lab.wait_for_vms_in_flight(first, ["web"])["runner"]["pid"]
    server = _parent(runner)
    assert b"backupd.forkserver" in Path(f"/proc/{server}/cmdline").read_bytes()
    os.kill(server, signal.SIGKILL)
    lab.resume("web")
    assert lab.wait_stopped(first)["result"] == "success", "the session outlives the fork server"
    daemon.wait_log(f"session {first}: fork server pid {server} ended before process {runner}")
    daemon.wait_log(f"session {first} of job nightly ended: success")

    second = lab.run_json("job", "start", "nightly")["session"]
    assert lab.wait_stopped(second)["result"] == "success"
    log = daemon.stop()
    assert f"the fork server (pid {server}) ended with exit -9; starting a new one" in log
    assert "recovering" not in log
