"""How a restarted daemon recognises the session processes it adopts
(:func:`backupd.host.is_session_process`), and sees an adopted one end
(:class:`backupd.daemon._Child` without a ``Popen``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backupd.daemon import _Child
from backupd.host import is_session_process

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc/PID/cmdline (Linux)")


def _lookalike() -> subprocess.Popen[bytes]:
    """A process whose command line holds ``-m backupd.host`` as a session process's does
    (its ``-c`` code ignores them and waits on stdin), once the kernel shows it: just after
    exec, ``/proc/PID/cmdline`` can read empty for a moment."""
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "-m", "backupd.host", "7"],
                               stdin=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not Path(f"/proc/{process.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the child's command line never showed"
        time.sleep(0.01)
    return process


def test_a_session_process_is_recognised_by_its_command_line_and_no_other_is() -> None:
    process = _lookalike()
    try:
        assert is_session_process(process.pid)
        assert not is_session_process(os.getpid()), "pytest is not a session process"
    finally:
        process.communicate(b"")
    assert not is_session_process(process.pid), "an ended (reaped) process is not"


def test_an_adopted_process_has_no_exit_code_while_it_runs_and_minus_one_once_it_ended() -> None:
    process = _lookalike()
    adopted = _Child(session=7, job="nightly", process=None, pid=process.pid)
    try:
        assert adopted.exit_code() is None
    finally:
        process.stdin.close()  # type: ignore[union-attr]
        process.wait()
    assert adopted.exit_code() == -1
