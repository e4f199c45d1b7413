"""The lab for integration tests: a config, a simulated hypervisor, a repository and a state DB in
``tmp_path``, driven only through the public CLI in subprocesses, the way an external scheduler or
an administrator would (``python -m backupd -c CONFIG ...``, ``--json`` output, exit codes).

The lab also keeps its own model of every VM's live disk: every guest write a test makes goes
through :meth:`Lab.write_disk` (``backupd sim write --file --offset``) and is mirrored into a
byte array, so a restored image can be compared with the disk as it really was.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from state_urls import BACKENDS

MiB = 1024 * 1024
#: the exit codes of the CLI contract (issue section 7)
EXIT_SUCCESS, EXIT_WARNING, EXIT_FAILED, EXIT_NO_SESSION, EXIT_NOT_FOUND = 0, 1, 2, 3, 4
EXIT_USAGE, EXIT_CONFIG = 64, 78

#: how long one CLI call may take before the test gives up on it (seconds)
CLI_TIMEOUT = 120.0
#: runs a test once with each state DB backend (the ``lab`` fixture's parameter)
on_every_state_db = pytest.mark.parametrize("lab", BACKENDS, indirect=True)

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# a tiny TOML writer (the venv has tomllib to read, nothing to write)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_table(header: str, values: dict[str, Any]) -> str:
    """``[header]`` and one ``key = value`` line per item (values as :func:`_toml_value` writes them)."""
    lines = [f"[{header}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _parse_mib(size: str) -> int:
    number, unit = size.split()
    assert unit == "MiB", "the lab models disks given in MiB only"
    return int(number) * MiB


def payload(size: int, seed: int) -> bytes:
    """``size`` bytes of reproducible, incompressible data."""
    return random.Random(seed).randbytes(size)


# --------------------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that.

    :raises AssertionError: after ``timeout`` seconds, with the last value seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last: {last!r}")
        time.sleep(interval)


class Lab:
    """One backupd installation in a folder: config, simulated VMs, repository, state DB.

    :param state_url: the ``[state] url`` of the config: SQLite ``state.db`` in the site
        folder by default, or a PostgreSQL database.
    """

    def __init__(self, tmp_path: Path, state_url: str = "sqlite:///state.db") -> None:
        #: the folder of the config file; everything backupd creates lands here
        self.site = tmp_path / "site"
        self.site.mkdir()
        self.config = self.site / "backupd.toml"
        #: test-side files (payloads to write into VMs, restored images) live outside ``site``
        self.scratch = tmp_path / "scratch"
        self.scratch.mkdir()
        self.repo = self.site / "repo"
        self.state_url = state_url
        #: the SQLite state DB file (unused with PostgreSQL)
        self.state_db = self.site / "state.db"
        self.settings: dict[str, Any] = {
            "vms": {},
            "jobs": {},
            "read_mib_per_s": 0,
            "snapshot_create_seconds": 0.0,
            "snapshot_remove_seconds": 0.0,
        }
        #: the live disk of each VM as the guest wrote it (single-disk VMs)
        self.disks: dict[str, bytearray] = {}
        self._procs: list[subprocess.Popen[str]] = []
        #: whether a session may still run when the test ends (a detached or background start)
        self._may_leave_sessions = False
        #: VMs with a pause armed by :meth:`pause` and not lifted: a paused call ignores an
        #: immediate stop, so teardown lifts them before stopping what a failed test left
        self._paused: set[str] = set()
        self._counter = 0

    # ---- config ---------------------------------------------------------------------------

    def configure(self, **changes: Any) -> None:
        """(Re)write the config. Keys: ``vms`` ({name: "N MiB" or a disk image Path}), ``jobs`` ({name: {key: value}}),
        ``read_mib_per_s``, ``snapshot_create_seconds``, ``snapshot_remove_seconds``. Keys not
        given keep their previous value, so a test can change a throttle between sessions.

        Jobs default to provider ``lab``, repository ``local`` and retries without waiting.
        """
        self.settings.update(changes)
        s = self.settings
        parts = [
            toml_table("state", {"url": self.state_url}),
            toml_table("repositories.local", {"path": "repo"}),
            toml_table(
                "providers.lab",
                {
                    "type": "simulated",
                    "state_dir": "lab",
                    "read_mib_per_s": s["read_mib_per_s"],
                    "snapshot_create_seconds": s["snapshot_create_seconds"],
                    "snapshot_remove_seconds": s["snapshot_remove_seconds"],
                },
            ),
        ]
        for name, size in s["vms"].items():
            parts.append(f"[[providers.lab.vms]]\nname = {_toml_value(name)}\ndisks = [{_toml_value(str(size))}]\n")
            if not isinstance(size, Path):  # a disk image's bytes are the test's own business
                self.disks.setdefault(name, bytearray(_parse_mib(size)))
        for name, job in s["jobs"].items():
            values = {"provider": "lab", "repository": "local", "retry": {"attempts": 3, "wait_seconds": 0}}
            values.update(job)
            parts.append(toml_table(f"jobs.{name}", values))
        if s.get("daemon"):
            parts.append(toml_table("daemon", s["daemon"]))
        if s.get("proxies"):
            parts.append(toml_table("proxies", s["proxies"]))
        self.config.write_text("\n".join(parts))

    def write_raw_config(self, text: str) -> None:
        self.config.write_text(text)

    # ---- running the CLI ------------------------------------------------------------------

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "backupd", "-c", str(self.config), *map(str, args)]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("BACKUPD_CONFIG", None)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def run(self, *args: Any, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run one CLI command to its end (cwd: the config's folder)."""
        return subprocess.run(
            self.argv(*args), cwd=self.site, env=self._env(), capture_output=True, text=True, timeout=timeout
        )

    def run_json(self, *args: Any, rc: int = 0, timeout: float = CLI_TIMEOUT) -> Any:
        """Run a command with ``--json``, check its exit code, return the one JSON document."""
        proc = self.run(*args, "--json", timeout=timeout)
        assert proc.returncode == rc, describe(proc, f"expected exit {rc}")
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(describe(proc, f"stdout is not one JSON document ({exc})")) from None

    def popen(self, *args: Any) -> "Background":
        """Start a CLI command in the background (e.g. ``job start JOB --wait``)."""
        self._counter += 1
        out = self.scratch / f"bg{self._counter}.out"
        err = self.scratch / f"bg{self._counter}.err"
        with out.open("w") as fout, err.open("w") as ferr:
            proc = subprocess.Popen(self.argv(*args), cwd=self.site, env=self._env(), stdout=fout, stderr=ferr, text=True)
        self._procs.append(proc)
        self._may_leave_sessions = True
        return Background(proc, out, err)

    # ---- sessions -------------------------------------------------------------------------

    def may_leave_sessions(self) -> None:
        """For a test that starts sessions other than through the CLI (in-process, or through
        a fork server): sessions a failed test leaves running are stopped at teardown."""
        self._may_leave_sessions = True

    def start(self, job: str, *extra: str) -> Any:
        """``job start JOB`` without ``--wait`` (detached runner); returns the session id."""
        self._may_leave_sessions = True
        doc = self.run_json("job", "start", job, *extra)
        assert doc["job"] == job and doc.get("detached") is True, doc
        return doc["session"]

    def start_wait(self, job: str, *extra: str, rc: int = 0) -> dict[str, Any]:
        """``job start JOB --wait --json``; checks the exit code, returns the session document."""
        return self.run_json("job", "start", job, "--wait", *extra, rc=rc)

    def session(self, session_id: Any) -> dict[str, Any]:
        return self.run_json("session", "show", session_id)

    def sessions(self, job: str | None = None) -> list[dict[str, Any]]:
        return self.run_json("session", "list", *(["--job", job] if job else []))

    def wait_for_new_session(self, job: str, known: set[Any] = frozenset(), timeout: float = 30.0) -> Any:
        """The id of the first session of ``job`` not in ``known`` (a ``--wait`` start prints its
        id only at the end, so a second process finds it through ``session list``)."""

        def find() -> Any:
            fresh = [s["id"] for s in self.sessions(job) if s["id"] not in known]
            return fresh[0] if fresh else None

        return wait_until(find, timeout, what=f"a new session of {job}")

    def wait_for_session(
        self, session_id: Any, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0, what: str = ""
    ) -> dict[str, Any]:
        """Poll ``session show --json`` until ``predicate(doc)`` holds; return that document."""
        seen: list[dict[str, Any]] = []

        def check() -> dict[str, Any] | None:
            doc = self.session(session_id)
            seen[:] = [doc]
            return doc if predicate(doc) else None

        try:
            return wait_until(check, timeout, interval=0.05, what=what or f"session {session_id}")
        except AssertionError:
            raise AssertionError(f"timed out waiting for {what}; last session show: {seen[:1]}") from None

    def wait_for_vms_in_flight(self, session_id: Any, names: list[str], timeout: float = 30.0) -> dict[str, Any]:
        """Wait until each named VM is ``running`` with its snapshot taken (so it is transferring)."""

        def in_flight(doc: dict[str, Any]) -> bool:
            vms = {vm["name"]: vm for vm in doc["vms"]}
            return all(vms[n]["status"] == "running" and vms[n]["snapshot"] is not None for n in names)

        return self.wait_for_session(session_id, in_flight, timeout, what=f"{names} in flight")

    def wait_stopped(self, session_id: Any, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait_for_session(session_id, lambda d: d["state"] == "stopped", timeout, what="state stopped")

    # ---- the simulated hypervisor -----------------------------------------------------------

    def write_disk(self, vm: str, data: bytes, offset: int) -> None:
        """A guest write through the simulated hypervisor (``sim write --file --offset``)."""
        self._counter += 1
        src = self.scratch / f"write{self._counter}.bin"
        src.write_bytes(data)
        proc = self.run("sim", "write", vm, "--file", src, "--offset", offset)
        assert proc.returncode == 0, describe(proc, "sim write failed")
        self.disks[vm][offset : offset + len(data)] = data

    def fill(self, vm: str, seed: int = 0, size: int | None = None) -> bytes:
        """Fill the first ``size`` bytes (default: the whole disk) with incompressible data."""
        data = payload(size if size is not None else len(self.disks[vm]), seed)
        self.write_disk(vm, data, 0)
        return data

    def sim(self, *args: Any) -> None:
        proc = self.run("sim", *args)
        assert proc.returncode == 0, describe(proc, "sim command failed")

    def pause(self, vm: str, op: str) -> int:
        """Arm a pause of ``op`` (``read`` or ``create_snapshot``) on ``vm`` through ``sim fault
        --pause`` (arming it again changes nothing) and return how many calls it blocks now, in
        any process; ``sim fault VM --resume`` lifts it. A test holds a VM task at a known
        point with it, however slow the machine, instead of betting on a read throttle."""
        self._paused.add(vm)
        return self.run_json("sim", "fault", vm, "--op", op, "--pause")["paused"].get(op, 0)

    def resume(self, vm: str) -> None:
        """Lift the pauses of ``vm`` (:meth:`pause`); calls they blocked go on."""
        self.sim("fault", vm, "--resume")
        self._paused.discard(vm)

    def snapshots(self) -> dict[str, list[dict[str, Any]]]:
        """Current snapshots of every VM, from ``vm list --json``."""
        return {vm["name"]: vm["snapshots"] for vm in self.run_json("vm", "list")}

    def backupd_snapshots(self) -> dict[str, list[str]]:
        """Names of the snapshots backupd created (prefix ``backupd-``), per VM that has any."""
        found = {name: [s["name"] for s in snaps if s["name"].startswith("backupd-")] for name, snaps in self.snapshots().items()}
        return {name: snaps for name, snaps in found.items() if snaps}

    # ---- repository -----------------------------------------------------------------------

    def points(self, vm: str | None = None, job: str | None = None) -> list[dict[str, Any]]:
        args = ["restore-point", "list"]
        if vm:
            args += ["--vm", vm]
        if job:
            args += ["--job", job]
        return self.run_json(*args)

    def restore(self, vm: str, point: Any = None) -> tuple[Any, bytes]:
        """Restore ``vm`` (its newest point unless ``point``) into a fresh folder; returns the
        point restored and the bytes of its one disk image."""
        self._counter += 1
        target = self.scratch / f"restore{self._counter}"
        args = ["restore", vm, "--to", target] + (["--point", point] if point is not None else [])
        doc = self.run_json(*args)
        assert len(doc["images"]) == 1, doc
        image = Path(doc["images"][0])
        assert image.parent.resolve() == target.resolve(), doc
        return doc["point"], image.read_bytes()

    def block_files(self) -> set[str]:
        """The block files of the repository, as paths relative to ``repo/blocks``."""
        root = self.repo / "blocks"
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    # ---- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Lift the pauses a failed test left armed and stop whatever sessions it left running
        (a call held by a pause would keep its session process waiting for ever), then reap
        our own processes."""
        for vm in sorted(self._paused):
            try:
                self.run("sim", "fault", vm, "--resume", timeout=30)
            except Exception:  # noqa: BLE001 - best effort; the test itself reports what failed
                pass
        has_state_db = self.state_db.exists() or not self.state_url.startswith("sqlite")
        if self._may_leave_sessions and self.config.exists() and has_state_db:
            try:
                listed = self.run("session", "list", "--json", timeout=30)
                running = {s["job"] for s in json.loads(listed.stdout) if s["state"] != "stopped"}
                if running:
                    self.run("job", "stop", *sorted(running), "--immediate", "--wait", timeout=60)
            except Exception:  # noqa: BLE001 - best effort; the test itself reports what failed
                pass
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


class Background:
    """A CLI command running in another process."""

    def __init__(self, proc: subprocess.Popen[str], out: Path, err: Path) -> None:
        self.proc = proc
        self._out = out
        self._err = err

    def finish(self, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Wait for the command to end; its exit code, stdout and stderr."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.proc.args} still running after {timeout}s; stderr so far:\n{self._err.read_text()[-3000:]}"
            ) from None
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self._out.read_text(), self._err.read_text())

    def finish_json(self, rc: int, timeout: float = 60.0) -> dict[str, Any]:
        done = self.finish(timeout)
        assert done.returncode == rc, describe(done, f"expected exit {rc}")
        return json.loads(done.stdout)


class Daemon:
    """A ``backupd daemon`` process of the lab, up once ``daemon status`` names it."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.bg: Background = lab.popen("daemon")
        self.pid = self.bg.proc.pid
        wait_until(lambda: lab.run_json("daemon", "status")["pid"] == self.pid, what="the daemon to be up")

    def log(self) -> str:
        return self.bg._err.read_text()

    def wait_log(self, words: str, timeout: float = 60.0) -> str:
        return wait_until(lambda: words in self.log() and self.log(), timeout, what=f"daemon log line {words!r}")

    def stop(self, rc: int = 0) -> str:
        if self.bg.proc.poll() is None:
            self.bg.proc.send_signal(signal.SIGTERM)
        done = self.bg.finish(timeout=120)
        assert done.returncode == rc, describe(done, f"the daemon exits {rc}")
        return done.stderr

    def kill(self) -> None:
        """``kill -9`` of the daemon (its session processes are processes of their own)."""
        self.bg.proc.send_signal(signal.SIGKILL)
        self.bg.proc.wait()


def describe(proc: subprocess.CompletedProcess[str], why: str) -> str:
    args = " ".join(map(str, proc.args[5:])) if isinstance(proc.args, list) else proc.args
    return (
        f"{why}: `backupd {args}` exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    )


def vms_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {vm["name"]: vm for vm in doc["vms"]}
