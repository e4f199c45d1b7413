"""The session runner and its VM tasks in this process, driven by the simulated hypervisor's
pauses and faults instead of read throttles and sleeps.

Each test writes a config into ``tmp_path`` (simulated provider, repository and SQLite state DB
there too), creates a session through :class:`backupd.service.Backupd` and runs
:class:`backupd.engine.SessionRunner` on a thread. A VM paused in ``read`` is held inside its
first block read with its snapshot taken: "in flight", for as long as the test wants. Stop
requests are written with :meth:`StateStore.request_stop`, exactly as ``backupd job stop``
writes them. Tests synchronise only on observed state: the provider's count of blocked calls,
the VM task rows and the session log in the state DB.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from backupd.config import Config, load_config
from backupd.engine import CANCELED_BY_USER, SessionRunner
from backupd.enums import SessionResult, SessionState, StopMode, TaskStatus
from backupd.errors import StateError
from backupd.service import Backupd
from backupd.state import StateStore, VmTask
from providers.simulated import SimulatedProvider

MiB = 1 << 20
#: each VM's one disk, filled with incompressible data so every block is read
DISK_BYTES = 2 * MiB
VMS = ["vm-a", "vm-b", "vm-c"]
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Poll ``predicate`` every 10 ms until it returns something truthy, and return that.

    :raises AssertionError: after ``timeout`` seconds (a hang guard, not a performance bound).
    """
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, numbers, booleans and lists of them are valid TOML too


class RunningSession:
    """A session runner on its own thread.

    :param runner: the runner, not yet started.
    """

    def __init__(self, runner: SessionRunner) -> None:
        self.runner = runner
        self.id: int = runner.session.id  # type: ignore[assignment]
        self._result: SessionResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"test-session-{self.id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self.runner.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self._error = exc

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def outcome(self) -> SessionResult:
        """The session result once the runner returns.

        :raises BaseException: what the runner raised.
        """
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), f"session {self.id}'s runner did not return"
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class Site:
    """A backupd installation in ``tmp_path``: three VMs of one filled 2 MiB disk each, a job
    ``nightly`` over them (two at a time, transient errors retried without waiting)."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "backupd.toml"
        self._sessions: list[RunningSession] = []
        self._write()
        self._load()
        self.provider = SimulatedProvider("lab", self.config.providers["lab"])  # type: ignore[arg-type]
        for seed, vm in enumerate(VMS):
            self.provider.write_random_blocks(vm, blocks=DISK_BYTES // MiB, seed=seed)

    def configure(self, **job: Any) -> None:
        """Rewrite and reload the config; ``job`` overrides settings of job ``nightly``."""
        self.service.close()
        self._write(**job)
        self._load()

    def _write(self, **job: Any) -> None:
        settings = {"provider": "lab", "repository": "local", "vms": VMS, "max_parallel_vms": 2,
                    "retry": {"attempts": 3, "wait_seconds": 0}, **job}
        lines = [
            "[state]", 'url = "sqlite:///state.db"',
            "[providers.lab]", 'type = "simulated"', 'state_dir = "lab"',
            *(f'[[providers.lab.vms]]\nname = "{vm}"\ndisks = ["{DISK_BYTES // MiB} MiB"]' for vm in VMS),
            "[repositories.local]", 'path = "repo"',
            "[jobs.nightly]", *(f"{key} = {_toml(value)}" for key, value in settings.items()),
        ]
        self.path.write_text("\n".join(lines) + "\n")

    def _load(self) -> None:
        self.config: Config = load_config(self.path)
        self.service = Backupd(self.config)
        self.store: StateStore = self.service.store

    def start(self, *, full: bool = False, store: StateStore | None = None) -> RunningSession:
        """Create a session of ``nightly`` and run it on a thread.

        :param store: the state DB the runner uses (default: the test's).
        """
        session = self.service.create_session("nightly", full=full)
        running = RunningSession(SessionRunner(self.config, store or self.store, session.id))  # type: ignore[arg-type]
        self._sessions.append(running)
        return running

    def run(self, *, full: bool = False) -> tuple[int, SessionResult]:
        """Run a session of ``nightly`` to its end."""
        running = self.start(full=full)
        return running.id, running.outcome()

    def tasks(self, session_id: int) -> dict[str, VmTask]:
        return {task.vm: task for task in self.store.tasks(session_id)}

    def statuses(self, session_id: int) -> dict[str, TaskStatus]:
        return {vm: task.status for vm, task in self.tasks(session_id).items()}

    def log(self, session_id: int) -> list[str]:
        return [line.text for line in self.store.log_lines(session_id)]

    def wait_paused(self, op: str, vms: list[str]) -> None:
        """Wait until a call of ``op`` of each VM is blocked by its pause."""
        for vm in vms:
            wait_until(lambda vm=vm: self.provider.paused(vm).get(op) == 1, f"{vm}'s {op} to be held")

    def wait_log(self, session_id: int, text: str) -> None:
        wait_until(lambda: any(text in line for line in self.log(session_id)), f"log line {text!r}")

    def backupd_snapshots(self) -> dict[str, list[str]]:
        """Every VM's snapshots, by name, VMs without any left out."""
        found = {vm: [s.name for s in self.provider.list_snapshots(self.provider.find_vm(vm))] for vm in VMS}
        return {vm: names for vm, names in found.items() if names}

    def points(self) -> dict[str, str]:
        """Restore point id → the session that made it."""
        return {point.id: point.session for _repo, point in self.service.restore_points()}

    def tear_down(self) -> None:
        """Let no runner outlive its test: lift every pause, stop every session at once."""
        for vm in VMS:
            self.provider.clear_faults(vm)
        for running in self._sessions:
            if running.running:
                self.store.request_stop(running.id, StopMode.IMMEDIATE, None)
                try:
                    running.outcome()
                except Exception:  # noqa: BLE001 - the test's own assertions said what failed
                    pass
        self.service.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    lab = Site(tmp_path)
    yield lab
    lab.tear_down()


def in_flight(site: Site, session_id: int, vms: list[str]) -> None:
    """Wait until each VM of ``vms`` is held in its first block read (snapshot taken and
    recorded, nothing of its disk read yet)."""
    site.wait_paused("read", vms)
    tasks = site.tasks(session_id)
    for vm in vms:
        assert (tasks[vm].status, tasks[vm].stage, tasks[vm].bytes_read) == (TaskStatus.RUNNING, "transfer", 0)
        assert tasks[vm].snapshot_id is not None


def stop_seen(site: Site, session_id: int, mode: StopMode) -> None:
    """Wait until the runner has acted on a stop of ``mode`` (its log line comes after it
    raised the stop signal's events)."""
    site.wait_log(session_id, f"{mode.value} stop requested")


# -- the stop contract ------------------------------------------------------------------------


def test_immediate_stop_cancels_vms_in_flight_removes_their_snapshots_and_fails_the_session(
    site: Site,
) -> None:
    """Given restore points of an earlier session and a full session with vm-a and vm-b held
    inside a read and vm-c waiting for a slot, when an immediate stop is requested, then the
    VMs in flight end ``cancelled`` at their next block boundary with no restore point and
    their snapshots removed, vm-c ends ``not_processed`` with no snapshot, the session
    ``failed``; the earlier restore points are untouched and still verify."""
    _, first = site.run()
    assert first is SessionResult.SUCCESS
    earlier = site.points()
    for vm in ("vm-a", "vm-b"):
        site.provider.pause(vm, "read")
    session = site.start(full=True)
    in_flight(site, session.id, ["vm-a", "vm-b"])
    assert site.statuses(session.id)["vm-c"] is TaskStatus.PENDING
    assert site.backupd_snapshots() == {"vm-a": [f"backupd-nightly-{session.id}"], "vm-b": [f"backupd-nightly-{session.id}"]}

    assert site.store.request_stop(session.id, StopMode.IMMEDIATE, None) == ("stop_requested", StopMode.IMMEDIATE)
    stop_seen(site, session.id, StopMode.IMMEDIATE)
    for vm in ("vm-a", "vm-b"):
        site.provider.resume(vm)

    assert session.outcome() is SessionResult.FAILED
    tasks = site.tasks(session.id)
    assert {vm: task.status for vm, task in tasks.items()} == {
        "vm-a": TaskStatus.CANCELLED, "vm-b": TaskStatus.CANCELLED, "vm-c": TaskStatus.NOT_PROCESSED,
    }
    for vm in ("vm-a", "vm-b"):
        assert tasks[vm].restore_point is None and tasks[vm].snapshot_removed is True
        assert tasks[vm].bytes_read < DISK_BYTES, "an immediate stop acts between blocks, not after the disk"
    assert tasks["vm-c"].snapshot_id is None
    assert site.backupd_snapshots() == {}, "every snapshot the session created is removed"
    row = site.store.session(session.id)
    assert (row.state, row.message) == (SessionState.STOPPED, "stopped immediately by user: 2 cancelled, 1 not_processed")
    assert site.points() == earlier, "partial data never becomes a restore point; earlier ones stay"
    assert site.service.verify(None)["ok"] is True


def test_immediate_stop_during_snapshot_creation_removes_the_snapshot_created_after_it(site: Site) -> None:
    """Given vm-a held inside its snapshot creation, when an immediate stop comes, then the
    snapshot that creation still makes is recorded and removed, and vm-a ends ``cancelled``."""
    site.configure(max_parallel_vms=1)
    site.provider.pause("vm-a", "create_snapshot")
    session = site.start()
    site.wait_paused("create_snapshot", ["vm-a"])

    site.store.request_stop(session.id, StopMode.IMMEDIATE, None)
    stop_seen(site, session.id, StopMode.IMMEDIATE)
    site.provider.resume("vm-a")

    assert session.outcome() is SessionResult.FAILED
    vm_a = site.tasks(session.id)["vm-a"]
    assert (vm_a.status, vm_a.snapshot_removed, vm_a.restore_point) == (TaskStatus.CANCELLED, True, None)
    assert vm_a.snapshot_id is not None
    assert site.backupd_snapshots() == {}


def test_immediate_stop_cancels_a_snapshot_creation_under_way(site: Site) -> None:
    """Given vm-a's snapshot creation under way on a hypervisor whose creations take an hour,
    when an immediate stop comes, then the creation is abandoned (the provider's cancel event)
    instead of waited for: vm-a ends ``cancelled`` with no snapshot made, the session
    ``failed``."""
    site.configure(max_parallel_vms=1)
    lab = site.config.providers["lab"]
    site.config.providers["lab"] = lab.model_copy(update={"snapshot_create_seconds": 3600})
    session = site.start()
    wait_until(lambda: site.tasks(session.id)["vm-a"].stage == "snapshot", "vm-a's snapshot creation")

    site.store.request_stop(session.id, StopMode.IMMEDIATE, None)

    assert session.outcome() is SessionResult.FAILED
    vm_a = site.tasks(session.id)["vm-a"]
    assert (vm_a.status, vm_a.snapshot_id, vm_a.restore_point) == (TaskStatus.CANCELLED, None, None)
    assert site.backupd_snapshots() == {}


def test_graceful_stop_lets_vms_in_flight_finish_and_leaves_the_rest_unprocessed(site: Site) -> None:
    """Given vm-a and vm-b held inside a read and vm-c waiting, when a graceful stop is
    requested, then vm-a and vm-b go on and complete their restore points and snapshot
    removal once resumed, vm-c ends ``not_processed``, and the session ends ``warning``."""
    for vm in ("vm-a", "vm-b"):
        site.provider.pause(vm, "read")
    session = site.start()
    in_flight(site, session.id, ["vm-a", "vm-b"])

    site.store.request_stop(session.id, StopMode.GRACEFUL, None)
    stop_seen(site, session.id, StopMode.GRACEFUL)
    assert site.store.session(session.id).state is SessionState.STOPPING
    wait_until(lambda: site.statuses(session.id)["vm-c"] is TaskStatus.NOT_PROCESSED, "vm-c given up")
    assert site.statuses(session.id) == {
        "vm-a": TaskStatus.RUNNING, "vm-b": TaskStatus.RUNNING, "vm-c": TaskStatus.NOT_PROCESSED,
    }, "VMs in flight go on"
    for vm in ("vm-a", "vm-b"):
        site.provider.resume(vm)

    assert session.outcome() is SessionResult.WARNING
    tasks = site.tasks(session.id)
    assert {vm: task.status for vm, task in tasks.items()} == {
        "vm-a": TaskStatus.SUCCESS, "vm-b": TaskStatus.SUCCESS, "vm-c": TaskStatus.NOT_PROCESSED,
    }
    for vm in ("vm-a", "vm-b"):
        assert tasks[vm].snapshot_removed is True and tasks[vm].bytes_read == DISK_BYTES
    assert sorted(site.points().values()) == [str(session.id)] * 2
    assert {tasks[vm].restore_point for vm in ("vm-a", "vm-b")} == set(site.points())
    assert tasks["vm-c"].snapshot_id is None and site.backupd_snapshots() == {}
    assert site.store.session(session.id).message == "stopped gracefully by user: 2 success, 1 not_processed"


def test_graceful_stop_before_the_first_vm_starts_fails_the_session_as_canceled_by_user(site: Site) -> None:
    """Given a session whose first VM waits for its VM lock, held by another running session
    (so its snapshot creation has not begun), when it is stopped gracefully, then it ends
    ``failed`` with "Operation was canceled by user", every VM ``not_processed``, no snapshot
    taken, and the other session's lock untouched."""
    site.configure(max_parallel_vms=1)
    holder = site.store.create_session("other", ["vm-a"], full=False)
    lock_key = f"lab/{site.provider.find_vm('vm-a').id}"  # VM locks are keyed by provider and VM id
    assert site.store.try_lock_vm(lock_key, holder.id) is None  # type: ignore[arg-type]
    session = site.start()
    site.wait_log(session.id, f"waiting for session {holder.id}, which is processing this VM")
    vm_a = site.tasks(session.id)["vm-a"]
    assert (vm_a.status, vm_a.stage) == (TaskStatus.RUNNING, "waiting")

    site.store.request_stop(session.id, StopMode.GRACEFUL, None)

    assert session.outcome() is SessionResult.FAILED
    assert site.store.session(session.id).message == CANCELED_BY_USER
    assert set(site.statuses(session.id).values()) == {TaskStatus.NOT_PROCESSED}
    assert all(task.snapshot_id is None for task in site.tasks(session.id).values())
    assert site.backupd_snapshots() == {}
    assert site.store.try_lock_vm(lock_key, session.id) == holder.id


def test_graceful_stop_once_the_first_snapshot_creation_has_begun_lets_that_vm_finish(site: Site) -> None:
    """The other side of the previous row: given vm-a held inside its snapshot creation,
    when a graceful stop comes, then vm-a is in flight and finishes its restore point, the
    VMs after it end ``not_processed`` and the session ends ``warning``, not "canceled"."""
    site.configure(max_parallel_vms=1)
    site.provider.pause("vm-a", "create_snapshot")
    session = site.start()
    site.wait_paused("create_snapshot", ["vm-a"])

    site.store.request_stop(session.id, StopMode.GRACEFUL, None)
    stop_seen(site, session.id, StopMode.GRACEFUL)
    site.provider.resume("vm-a")

    assert session.outcome() is SessionResult.WARNING
    assert site.statuses(session.id) == {
        "vm-a": TaskStatus.SUCCESS, "vm-b": TaskStatus.NOT_PROCESSED, "vm-c": TaskStatus.NOT_PROCESSED,
    }
    assert site.backupd_snapshots() == {}


def test_a_graceful_stop_whose_drain_period_ends_escalates_to_immediate(site: Site) -> None:
    """Given vm-a held inside a read, when a graceful stop with a 0.5 s drain period comes,
    then the runner escalates it to immediate once the period ends (session log: "the drain
    period ended"), and vm-a ends ``cancelled`` at its next block boundary once resumed; its
    snapshot is removed and the session ends ``failed``."""
    site.configure(max_parallel_vms=1)
    site.provider.pause("vm-a", "read")
    session = site.start()
    in_flight(site, session.id, ["vm-a"])

    site.store.request_stop(session.id, StopMode.GRACEFUL, None, drain_seconds=0.5)
    site.wait_log(session.id, "the drain period ended")
    stop_seen(site, session.id, StopMode.IMMEDIATE)
    assert site.store.session(session.id).stop_mode is StopMode.IMMEDIATE
    site.provider.resume("vm-a")

    assert session.outcome() is SessionResult.FAILED
    vm_a = site.tasks(session.id)["vm-a"]
    assert (vm_a.status, vm_a.restore_point, vm_a.snapshot_removed) == (TaskStatus.CANCELLED, None, True)
    assert site.statuses(session.id)["vm-c"] is TaskStatus.NOT_PROCESSED
    assert site.backupd_snapshots() == {} and site.points() == {}


def test_a_stop_that_comes_once_every_vm_is_done_transferring_changes_nothing(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given a one-VM session, when an immediate stop is written the moment its restore point
    is recorded (the transfer is over, only snapshot removal and retention are left), then the
    VM ends ``success`` with its restore point, the session's result comes from the VMs, and
    its message says the stop came too late."""
    site.configure(vms=["vm-a"])
    runner_store = StateStore(site.config.state.connect_url())
    update_task = runner_store.update_task

    answers: list[tuple[str, StopMode | None]] = []

    def stop_once_the_point_is_recorded(task_id: int, **fields: Any) -> None:
        update_task(task_id, **fields)
        if fields.get("restore_point") and not answers:  # recorded, then again at the VM's end
            (running,) = runner_store.running_sessions("nightly")
            answers.append(runner_store.request_stop(running.id, StopMode.IMMEDIATE, None))  # type: ignore[arg-type]

    monkeypatch.setattr(runner_store, "update_task", stop_once_the_point_is_recorded)
    session = site.start(store=runner_store)

    assert session.outcome() is SessionResult.SUCCESS
    assert answers == [("stop_requested", StopMode.IMMEDIATE)]
    row = site.store.session(session.id)
    assert row.stop_mode is StopMode.IMMEDIATE
    assert row.message == "immediate stop came after every VM had finished; nothing was stopped"
    vm_a = site.tasks(session.id)["vm-a"]
    assert (vm_a.status, vm_a.snapshot_removed) == (TaskStatus.SUCCESS, True)
    assert site.points() == {vm_a.restore_point: str(session.id)}


def test_a_graceful_stop_once_every_vm_has_started_changes_nothing(site: Site) -> None:
    """Given a one-VM session whose VM is held inside a read, when a graceful stop comes,
    then the VM finishes its restore point, the result comes from it (``success``), and the
    message says the stop came after every VM had started, not that they had finished."""
    site.configure(vms=["vm-a"])
    site.provider.pause("vm-a", "read")
    session = site.start()
    in_flight(site, session.id, ["vm-a"])

    site.store.request_stop(session.id, StopMode.GRACEFUL, None)
    stop_seen(site, session.id, StopMode.GRACEFUL)
    site.provider.resume("vm-a")

    assert session.outcome() is SessionResult.SUCCESS
    assert site.store.session(session.id).message == "graceful stop came after every VM had started; nothing was stopped"
    assert site.statuses(session.id) == {"vm-a": TaskStatus.SUCCESS}


# -- failures -----------------------------------------------------------------------------------


def test_a_state_db_failing_mid_session_stops_it_and_removes_every_snapshot(
    site: Site, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given vm-a and vm-b in flight (snapshots recorded) and vm-c waiting, when every VM task
    update of the runner's state DB fails from then on, then the runner raises one
    :class:`StateError` saying the session was stopped, every snapshot it created is
    removed, no restore point is kept, and no traceback is logged."""
    broken = threading.Event()
    runner_store = StateStore(site.config.state.connect_url())
    update_task = runner_store.update_task

    def failing_update_task(task_id: int, **fields: Any) -> None:
        if broken.is_set():
            raise StateError("state DB: disk I/O error (injected)")
        update_task(task_id, **fields)

    monkeypatch.setattr(runner_store, "update_task", failing_update_task)
    for vm in ("vm-a", "vm-b"):
        site.provider.pause(vm, "read")
    session = site.start(store=runner_store)
    in_flight(site, session.id, ["vm-a", "vm-b"])

    broken.set()
    caplog.clear()
    for vm in ("vm-a", "vm-b"):
        site.provider.resume(vm)

    with pytest.raises(StateError, match=r"stopped: state DB: disk I/O error \(injected\)\. Its snapshots were removed"):
        session.outcome()
    assert site.backupd_snapshots() == {}
    assert site.points() == {}
    assert [r.getMessage() for r in caplog.records if r.exc_info] == [], "no traceback for a lost state DB"
    assert sum("stopping the session now" in r.getMessage() for r in caplog.records) == 1


def test_a_transient_read_fault_is_retried_and_a_permanent_one_fails_only_its_vm(site: Site) -> None:
    """Given vm-a armed with two transient read faults and vm-b with a permanent one, when the
    session runs (three attempts per call), then vm-a succeeds after two logged retries,
    vm-b fails with the injected error and its snapshot removed, vm-c is not disturbed, and
    the session ends ``failed``."""
    site.provider.set_fault("vm-a", "read", times=2)
    site.provider.set_fault("vm-b", "read", permanent=True)

    session_id, result = site.run()

    assert result is SessionResult.FAILED
    tasks = site.tasks(session_id)
    assert {vm: task.status for vm, task in tasks.items()} == {
        "vm-a": TaskStatus.SUCCESS, "vm-b": TaskStatus.FAILED, "vm-c": TaskStatus.SUCCESS,
    }
    retries = [line.text for line in site.store.log_lines(session_id) if line.vm == "vm-a" and "retrying" in line.text]
    assert [text.split(" failed")[0] for text in retries] == ["attempt 1", "attempt 2"]
    assert site.provider.faults("vm-a") == {}, "both transient faults were consumed"
    assert "injected fault: read failed on VM 'vm-b' (permanent" in (tasks["vm-b"].error or "")
    assert tasks["vm-b"].snapshot_removed is True and tasks["vm-b"].restore_point is None
    assert site.backupd_snapshots() == {}
    assert sorted(point_session for point_session in site.points().values()) == [str(session_id)] * 2


def test_enable_cbt_is_asked_per_vm_and_a_refusal_only_warns(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """Given a job with ``enable_cbt`` (the default), when the provider switches CBT on for one VM
    and refuses for another (a missing privilege), then the first VM's log says so, the second
    ends ``warning`` naming the reason with its restore point made, and the third is untouched."""
    from providers.base import ProviderError

    asked: list[str] = []

    def enable_cbt(self: SimulatedProvider, vm: Any) -> bool:
        asked.append(vm.name)
        if vm.name == "vm-b":
            raise ProviderError("permission to perform this operation was denied")
        return vm.name == "vm-a"

    monkeypatch.setattr(SimulatedProvider, "enable_cbt", enable_cbt)
    session_id, result = site.run()

    assert sorted(asked) == VMS
    tasks = site.tasks(session_id)
    assert result == SessionResult.WARNING
    assert tasks["vm-b"].status == TaskStatus.WARNING and tasks["vm-b"].restore_point is not None
    assert "CBT could not be switched on" in (tasks["vm-b"].warning or "")
    assert (tasks["vm-a"].status, tasks["vm-c"].status) == (TaskStatus.SUCCESS, TaskStatus.SUCCESS)
    lines = [(line.vm, line.text) for line in site.store.log_lines(session_id)]
    assert ("vm-a", "CBT switched on; it takes effect at this snapshot, so this transfer is full") in lines
    assert not any(vm == "vm-c" and "CBT" in text for vm, text in lines)


def test_a_job_without_enable_cbt_never_asks_and_provider_notices_reach_the_session_log(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given ``enable_cbt = false`` and a provider with a set-up warning (vSphere: TLS
    verification off), then CBT is never switched on and the session log carries the warning."""
    def refuse(self: SimulatedProvider, vm: Any) -> bool:
        raise AssertionError("enable_cbt was called for a job with enable_cbt = false")

    monkeypatch.setattr(SimulatedProvider, "enable_cbt", refuse)
    monkeypatch.setattr(SimulatedProvider, "notices", lambda self: ["TLS certificate verification is OFF"])
    site.configure(enable_cbt=False)
    session_id, result = site.run()

    assert result == SessionResult.SUCCESS
    warnings = [line.text for line in site.store.log_lines(session_id) if line.level == "warning"]
    assert warnings == ["provider lab: TLS certificate verification is OFF"]


# -- overhead -----------------------------------------------------------------------------------


def test_a_vm_task_of_an_unchanged_vm_commits_to_the_state_db_four_times_and_releases_its_lock(site: Site) -> None:
    """Each state DB commit is a VM task's largest cost when nothing changed (docs/performance.md,
    the daemon's per-VM overhead): the lock with the task's start and VM id, snapshot id,
    restore point with the plan, end with the snapshot's removal and the lock's release. A
    commit is a transaction's or a single statement's in autocommit mode."""
    from sqlalchemy import event
    from sqlmodel import select

    from backupd.state import VmLock

    site.run()
    commits_by_thread: dict[str, int] = {}

    def count(_connection: Any) -> None:
        name = threading.current_thread().name
        commits_by_thread[name] = commits_by_thread.get(name, 0) + 1

    def count_autocommitted(connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT" \
                and not statement.lstrip().upper().startswith("SELECT"):
            count(connection)

    event.listen(site.store.engine, "commit", count)
    event.listen(site.store.engine, "before_cursor_execute", count_autocommitted)
    session_id, result = site.run()
    event.remove(site.store.engine, "commit", count)
    event.remove(site.store.engine, "before_cursor_execute", count_autocommitted)

    assert result is SessionResult.SUCCESS
    assert {task.mode for task in site.tasks(session_id).values()} == {"incremental"}
    vm_task_commits = sum(n for name, n in commits_by_thread.items() if name.startswith(f"session-{session_id}-vm"))
    assert vm_task_commits == 4 * len(VMS)
    assert {(task.stage, task.snapshot_removed) for task in site.tasks(session_id).values()} == {("done", True)}
    for vm in VMS:  # the plan's line rides on the restore point's record, in its place
        lines = [line.text for line in site.store.log_lines(session_id) if line.vm == vm]
        assert [text.split()[0] for text in lines] == ["snapshot", "incremental", "restore", "snapshot"], lines
        assert lines[1] == "incremental transfer of 1 disk(s), 0 bytes to read"
    with site.store._session() as db:
        assert list(db.exec(select(VmLock))) == []


def test_a_vm_with_blocks_to_read_shows_its_plan_before_its_first_read(site: Site) -> None:
    """The plan of a transfer with something to read (mode, bytes to read) is recorded before
    the first block is read, for the progress view; only a transfer with nothing to read
    leaves it to the restore point's record."""
    site.provider.pause("vm-a", "read")
    running = site.start()
    site.wait_paused("read", ["vm-a"])
    task = site.tasks(running.id)["vm-a"]
    assert (task.status, task.stage, task.mode, task.bytes_total, task.bytes_read) == \
        (TaskStatus.RUNNING, "transfer", "full", DISK_BYTES, 0)
    assert task.started_at is not None and task.vm_id is not None
    assert f"full transfer of 1 disk(s), {DISK_BYTES} bytes to read" in site.log(running.id)
    site.provider.clear_faults("vm-a")
    assert running.outcome() is SessionResult.SUCCESS


def test_the_usual_ways_of_a_vm_task_write_only_the_records_compiled_ahead(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """:data:`backupd.vmtask.TASK_RECORDS` is what the daemon's fork server compiles before it
    forks a session process (:meth:`StateStore.warm_up`); a record missing from it costs every
    session process its compilation. The usual ways: a full transfer with blocks to read, then
    an unchanged VM's incremental one at its retention (its end record gains retention's line).
    Records without columns write only fixed statements, compiled ahead too."""
    from backupd.state import TaskRecord
    from backupd.vmtask import TASK_RECORDS

    site.configure(retention=1)
    written: set[TaskRecord] = set()
    update_task, try_lock_vm = site.store.update_task, site.store.try_lock_vm

    def recording_update_task(task_id: int, *, notes: Any = (), unlock: Any = None, **fields: Any) -> None:
        written.add(TaskRecord(tuple(sorted(fields)), len(notes), unlock is not None))
        update_task(task_id, notes=notes, unlock=unlock, **fields)

    def recording_try_lock_vm(key: str, session_id: int, *, task: Any = None, **fields: Any) -> Any:
        if task is not None and fields:
            written.add(TaskRecord(tuple(sorted(fields)), lock=True))
        return try_lock_vm(key, session_id, task=task, **fields)

    monkeypatch.setattr(site.store, "update_task", recording_update_task)
    monkeypatch.setattr(site.store, "try_lock_vm", recording_try_lock_vm)
    for expected_mode in ("full", "incremental"):
        session_id, result = site.run()
        assert result is SessionResult.SUCCESS
        assert {task.mode for task in site.tasks(session_id).values()} == {expected_mode}
    assert any("retention removed" in line for line in site.log(session_id))

    with_columns = {record for record in written if record.columns}
    assert len(with_columns) >= 7, with_columns  # lock, snapshot, plan, commit, point (2 ways), end (2 ways)
    assert with_columns <= set(TASK_RECORDS), with_columns - set(TASK_RECORDS)
