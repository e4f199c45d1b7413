"""Backup proxies (``backupd proxy``) with real services: a PostgreSQL state DB, the RabbitMQ
broker, sessions run by ``job start --wait`` and two or three proxy processes, each with its
own host id. Outcomes are read through the CLI (``session show``, ``proxy list``) and polled,
never slept for. Skipped without PostgreSQL or RabbitMQ, failed in CI."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import datetime
from typing import Any, Iterator

import pytest

from labkit import EXIT_FAILED, Background, Lab, describe, vms_by_name, wait_until
from providers.simulated._layout import Layout
from state_urls import BROKER_URL, require_rabbitmq

pytestmark = pytest.mark.slow


class ProxyProcess:
    """A ``backupd proxy`` process of the lab."""

    def __init__(self, lab: Lab, pool: str, max_tasks: int, host: str) -> None:
        self.lab = lab
        self.host = host
        self.max_tasks = max_tasks
        self.bg: Background = lab.popen("proxy", "--pool", pool, "--max-tasks", max_tasks, "--host-id", host)
        self.pid = self.bg.proc.pid
        wait_until(lambda: any(p["pid"] == self.pid and p["status"] == "up" for p in lab.run_json("proxy", "list")),
                   what=f"proxy {host} to be up")

    def log(self) -> str:
        return self.bg._err.read_text()

    def kill(self) -> None:
        self.bg.proc.send_signal(signal.SIGKILL)
        self.bg.proc.wait()


@pytest.fixture
def lab(tmp_path, postgresql_url) -> Iterator[Lab]:  # noqa: ANN001 - pytest fixtures
    """A lab on PostgreSQL whose jobs use a pool of their own on the broker (so messages a
    test leaves in a queue never reach another test's proxies)."""
    require_rabbitmq()
    the_lab = Lab(tmp_path, postgresql_url)
    the_lab.pool = f"test-{secrets.token_hex(4)}"  # type: ignore[attr-defined]
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture
def proxies(lab: Lab):  # noqa: ANN201 - yields a factory
    started: list[ProxyProcess] = []

    def start(max_tasks: int, host: str) -> ProxyProcess:
        started.append(ProxyProcess(lab, lab.pool, max_tasks, host))  # type: ignore[attr-defined]
        return started[-1]

    yield start
    for proxy in started:
        if proxy.bg.proc.poll() is None:
            proxy.bg.proc.send_signal(signal.SIGTERM)
            try:
                proxy.bg.proc.wait(timeout=60)
            except Exception:  # noqa: BLE001 - a hung proxy is killed
                proxy.kill()


def _configure(lab: Lab, vms: dict[str, str], *, proxy_wait_seconds: float = 600, **job: Any) -> None:
    lab.configure(
        vms=vms,
        jobs={"nightly": {"vms": list(vms), "proxy_pool": lab.pool, **job}},  # type: ignore[attr-defined]
        proxies={"broker": BROKER_URL, "proxy_wait_seconds": proxy_wait_seconds},
    )


def _peak_overlap(vms: list[dict[str, Any]]) -> dict[tuple[str, int], int]:
    """Per proxy (host, pid), the most VM tasks whose [started, ended] overlapped."""
    events: dict[tuple[str, int], list[tuple[datetime, int]]] = defaultdict(list)
    for vm in vms:
        key = (vm["proxy"]["host"], vm["proxy"]["pid"])
        events[key].append((datetime.fromisoformat(vm["started_at"]), 1))
        events[key].append((datetime.fromisoformat(vm["ended_at"]), -1))
    peaks = {}
    for key, moments in events.items():
        running = peak = 0
        for _at, step in sorted(moments, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
            running += step
            peak = max(peak, running)
        peaks[key] = peak
    return peaks


def test_twelve_vms_spread_over_three_proxies_within_their_limits_restore_bit_for_bit(lab: Lab, proxies) -> None:  # noqa: ANN001
    vms = {f"vm-{i:02d}": "4 MiB" for i in range(12)}
    _configure(lab, vms, max_parallel_vms=6)
    lab.configure(read_mib_per_s=8)  # ~0.5 s per VM, so tasks overlap
    for seed, vm in enumerate(vms):
        lab.fill(vm, seed=seed)
    started = [proxies(2, "host-a"), proxies(2, "host-b"), proxies(1, "host-c")]

    doc = lab.start_wait("nightly")

    assert doc["result"] == "success", doc
    by_vm = vms_by_name(doc)
    assert [vm["name"] for vm in doc["vms"]] == list(vms), "job order kept"
    used = {(vm["proxy"]["host"], vm["proxy"]["pid"]) for vm in by_vm.values()}
    assert used <= {(p.host, p.pid) for p in started} and len(used) >= 2, used
    limits = {(p.host, p.pid): p.max_tasks for p in started}
    for proxy, peak in _peak_overlap(doc["vms"]).items():
        assert peak <= limits[proxy], f"proxy {proxy} ran {peak} VM tasks at once, more than --max-tasks {limits[proxy]}"
    listed = {(p["host"], p["pid"]): p for p in lab.run_json("proxy", "list")}
    for proxy, limit in limits.items():
        assert listed[proxy]["capacity"] == limit and listed[proxy]["peak_running"] <= limit, listed[proxy]
    text = lab.run("session", "show", doc["id"]).stdout
    assert "PROXY" in text and "host-a pid" in text
    for vm in vms:
        point, image = lab.restore(vm)
        assert point == by_vm[vm]["restore_point"]
        assert image == bytes(lab.disks[vm]), f"{vm} restores bit for bit"
    assert lab.backupd_snapshots() == {}


def test_immediate_stop_cancels_every_vm_task_on_every_proxy(lab: Lab, proxies) -> None:  # noqa: ANN001
    vms = {f"vm-{i}": "16 MiB" for i in range(8)}
    _configure(lab, vms, max_parallel_vms=8)
    lab.configure(read_mib_per_s=1)
    for seed, vm in enumerate(vms):
        lab.fill(vm, seed=seed)
    proxies(4, "host-a")
    proxies(4, "host-b")
    for vm in vms:
        lab.pause(vm, "read")  # in flight for as long as the test needs, however slow its polls
    run = lab.popen("job", "start", "nightly", "--wait", "--json")
    session = lab.wait_for_new_session("nightly")
    lab.wait_for_vms_in_flight(session, list(vms), timeout=60)

    asked = time.monotonic()
    lab.run_json("job", "stop", "nightly", "--immediate")
    for vm in vms:
        lab.resume(vm)
    doc = lab.wait_stopped(session)
    took = time.monotonic() - asked

    recorded = datetime.fromisoformat(doc["ended_at"]) - datetime.fromisoformat(doc["stop"]["requested_at"])
    print(f"immediate stop of 8 VM tasks on 2 proxies: request to stopped {recorded.total_seconds():.2f} s as "
          f"recorded in the state DB, {took:.2f} s as the CLI saw it")
    run.finish_json(EXIT_FAILED)
    assert doc["result"] == "failed"
    assert {vm["status"] for vm in doc["vms"]} == {"cancelled"}, doc["vms"]
    assert len({vm["proxy"]["host"] for vm in doc["vms"]}) == 2
    assert all(vm["snapshot"]["removed"] for vm in doc["vms"]), doc["vms"]
    assert lab.backupd_snapshots() == {}
    assert lab.points(job="nightly") == []


def test_graceful_stop_dispatches_nothing_more_and_lets_vm_tasks_in_flight_finish(lab: Lab, proxies) -> None:  # noqa: ANN001
    vms = {f"vm-{i}": "16 MiB" for i in range(6)}
    _configure(lab, vms, max_parallel_vms=2)
    in_flight = ["vm-0", "vm-1"]
    for seed, vm in enumerate(vms):
        lab.fill(vm, seed=seed)
    for vm in in_flight:  # held mid-transfer until the stop is seen, however slow the machine
        lab.pause(vm, "read")
    proxies(1, "host-a")
    proxies(1, "host-b")
    run = lab.popen("job", "start", "nightly", "--wait", "--json")
    session = lab.wait_for_new_session("nightly")
    wait_until(lambda: all(lab.pause(vm, "read") >= 1 for vm in in_flight), timeout=90,
               what="two VM tasks held mid-transfer on the proxies")

    lab.run_json("job", "stop", "nightly")
    lab.wait_for_session(session, lambda d: d["state"] == "stopping", what="state stopping")
    for vm in in_flight:
        lab.resume(vm)
    doc = lab.wait_stopped(session, timeout=90)

    run.finish_json(1)
    statuses = [vm["status"] for vm in doc["vms"]]
    assert statuses == ["success", "success"] + ["not_processed"] * 4, statuses
    assert doc["result"] == "warning"
    assert lab.backupd_snapshots() == {}


def test_a_proxy_killed_mid_task_fails_its_vms_and_the_session_goes_on(lab: Lab, proxies) -> None:  # noqa: ANN001
    vms = {f"vm-{i}": "16 MiB" for i in range(4)}
    _configure(lab, vms, max_parallel_vms=4)
    for seed, vm in enumerate(vms):
        lab.fill(vm, seed=seed)
        lab.pause(vm, "read")  # held mid-transfer until the kill, however slow the machine
    doomed = proxies(2, "host-doomed")
    survivor = proxies(2, "host-survivor")
    run = lab.popen("job", "start", "nightly", "--wait", "--json")
    session = lab.wait_for_new_session("nightly")
    wait_until(lambda: all(lab.pause(vm, "read") >= 1 for vm in vms), timeout=90,
               what="the four VM tasks held mid-transfer on the proxies")
    on_doomed = [vm["name"] for vm in lab.session(session)["vms"] if vm["proxy"]["host"] == "host-doomed"]
    assert on_doomed, "the doomed proxy holds VM tasks"

    killed = time.monotonic()
    doomed.kill()
    for vm in vms:
        lab.resume(vm)
    doc = lab.wait_for_session(
        session, lambda d: all(vms_by_name(d)[vm]["status"] == "failed" for vm in on_doomed), timeout=60,
        what="the killed proxy's VM tasks to fail")
    print(f"kill -9 of a proxy: its VM tasks failed after {time.monotonic() - killed:.1f} s")

    doc = run.finish_json(EXIT_FAILED, timeout=120)
    by_vm = vms_by_name(doc)
    for vm in on_doomed:
        assert by_vm[vm]["error"].startswith("proxy lost: proxy pid"), by_vm[vm]
        assert by_vm[vm]["restore_point"] is None
    for vm in set(vms) - set(on_doomed):
        assert by_vm[vm]["status"] == "success" and by_vm[vm]["proxy"]["host"] == survivor.host
    assert lab.backupd_snapshots() == {}, "the lost proxy's snapshots are removed"
    assert {p["vm"] for p in lab.points(job="nightly")} == set(vms) - set(on_doomed), "no partial restore point"
    assert not (lab.repo / "staging").exists() or not any((lab.repo / "staging").iterdir())

    retry = lab.start_wait("nightly", "--retry")  # the VM locks were released
    assert [vm["name"] for vm in retry["vms"]] == sorted(on_doomed)
    assert {vm["status"] for vm in retry["vms"]} == {"success"}
    assert {vm["proxy"]["host"] for vm in retry["vms"]} == {survivor.host}


def _snapshots_ever_taken(lab: Lab) -> int:
    """How many snapshots the lab's simulated hypervisor has ever created (its id counter)."""
    return Layout(lab.site / "lab").snapshot_ids_handed_out()


def test_a_restarted_daemon_adopts_a_session_whose_vm_tasks_run_on_proxies(lab: Lab, proxies, daemons) -> None:  # noqa: ANN001
    """kill -9 of the daemon while VM tasks run on proxies: the session process and the VM tasks
    go on undisturbed; a new daemon adopts the session, follows its end (the chained job
    starts) and no VM task runs twice. The last two VM tasks are held at their snapshot by a
    pause, so they are mid-task on the proxies across the restart however slow the machine."""
    vms = {f"vm-{i}": "4 MiB" for i in range(4)}
    _configure(lab, vms, max_parallel_vms=2)
    lab.configure(jobs={**lab.settings["jobs"], "report": {"vms": ["vm-0"], "proxy_pool": lab.pool,  # type: ignore[attr-defined]
                                                           "schedule": {"after": "nightly"}}})
    for seed, vm in enumerate(vms):
        lab.fill(vm, seed=seed)
    held = ["vm-2", "vm-3"]
    for vm in held:
        lab.pause(vm, "create_snapshot")
    proxies(1, "host-a")
    proxies(1, "host-b")
    first = daemons()
    session = lab.run_json("job", "start", "nightly")["session"]
    wait_until(lambda: all(lab.pause(vm, "create_snapshot") == 1 for vm in held), timeout=90,
               what="the last two VM tasks to be held at their snapshot on the proxies")
    runner = lab.session(session)["runner"]["pid"]

    first.kill()
    undisturbed = lab.session(session)
    assert (undisturbed["state"], undisturbed["runner"]["pid"]) == ("working", runner)
    assert {vm["name"]: vm["status"] for vm in undisturbed["vms"]} == \
        {"vm-0": "success", "vm-1": "success", "vm-2": "running", "vm-3": "running"}
    os.kill(runner, 0)  # the session process outlived the daemon that spawned it
    restarted = daemons()
    restarted.wait_log(f"session {session} of job nightly adopted (its process pid {runner} runs on)")
    for vm in held:
        lab.resume(vm)

    ended = lab.wait_stopped(session, timeout=120)
    assert ended["result"] == "success", ended
    assert {vm["status"] for vm in ended["vms"]} == {"success"}
    assert {vm["proxy"]["host"] for vm in ended["vms"]} == {"host-a", "host-b"}
    (report,) = wait_until(lambda: [s for s in lab.sessions("report") if s["state"] == "stopped"], timeout=60,
                           what="the chained job to run after the adopted session")
    report = lab.session(report["id"])
    assert (report["trigger"], report["triggered_by"], report["result"]) == ("chain", session, "success")
    assert _snapshots_ever_taken(lab) == len(vms) + 1, "each VM task took one snapshot: none ran twice"
    assert sorted(p["vm"] for p in lab.points(job="nightly")) == sorted(vms)
    assert lab.backupd_snapshots() == {}
    log = restarted.stop()
    assert f"session {session} of job nightly ended: success" in log


def test_a_recursive_stop_with_a_drain_period_cancels_the_vm_tasks_on_proxies_and_the_chain(lab: Lab, proxies, daemons) -> None:  # noqa: ANN001
    """``job stop --recursive --drain 1`` of a daemon's session whose VM tasks run on proxies:
    the graceful stop lets them run, the drain period's end cancels them on the proxies
    (snapshots removed, nothing committed) and the chained job does not start."""
    vms = {"vm-0": "16 MiB", "vm-1": "16 MiB"}
    _configure(lab, vms, max_parallel_vms=2)
    lab.configure(read_mib_per_s=1, jobs={**lab.settings["jobs"], "report": {"vms": ["vm-0"], "proxy_pool": lab.pool,  # type: ignore[attr-defined]
                                                                             "schedule": {"after": "nightly"}}})
    for seed, vm in enumerate(vms):
        lab.fill(vm, seed=seed)
    proxies(1, "host-a")
    proxies(1, "host-b")
    daemon = daemons()
    session = lab.run_json("job", "start", "nightly")["session"]
    lab.wait_for_vms_in_flight(session, list(vms), timeout=90)

    stops = lab.run_json("job", "stop", "nightly", "--recursive", "--drain", "1")["stops"]
    assert [(s["job"], s["outcome"]) for s in stops] == [("nightly", "stop_requested")]
    doc = lab.wait_stopped(session, timeout=90)

    assert (doc["result"], doc["stop"]["mode"], doc["stop"]["recursive"]) == ("failed", "immediate", True)
    assert doc["stop"]["drain_deadline"] and any("the drain period ended" in line["text"] for line in doc["log"])
    assert {vm["status"] for vm in doc["vms"]} == {"cancelled"}, doc["vms"]
    assert {vm["proxy"]["host"] for vm in doc["vms"]} == {"host-a", "host-b"}
    assert all(vm["snapshot"]["removed"] for vm in doc["vms"]), doc["vms"]
    daemon.wait_log(f"job report: not started after session {session}: that session was stopped recursively")
    assert lab.sessions("report") == []
    assert lab.points(job="nightly") == [] and lab.backupd_snapshots() == {}


def test_auto_retry_reprocesses_the_vms_of_a_killed_proxy_on_another(lab: Lab, proxies, daemons) -> None:  # noqa: ANN001
    """A proxy killed mid-task: its VM ends ``failed`` (proxy lost), the session ``failed``,
    and the daemon's automatic retry processes that VM alone, on the live proxy."""
    vms = {"vm-0": "4 MiB", "vm-1": "4 MiB"}
    _configure(lab, vms, max_parallel_vms=2, auto_retry={"times": 1, "wait_seconds": 0})
    for seed, vm in enumerate(vms):
        lab.fill(vm, seed=seed)
        lab.pause(vm, "create_snapshot")  # held at the snapshot, so each proxy holds one VM task
    doomed = proxies(1, "host-doomed")
    survivor = proxies(1, "host-survivor")
    daemons()
    first = lab.run_json("job", "start", "nightly")["session"]
    wait_until(lambda: all(lab.pause(vm, "create_snapshot") == 1 for vm in vms), timeout=90,
               what="both VM tasks to be held at their snapshot on the proxies")
    (lost,) = [vm["name"] for vm in lab.session(first)["vms"] if vm["proxy"]["host"] == doomed.host]

    doomed.kill()
    for vm in vms:
        lab.sim("fault", vm, "--clear")
    failed = lab.wait_stopped(first, timeout=90)

    assert failed["result"] == "failed"
    assert vms_by_name(failed)[lost]["error"].startswith("proxy lost: proxy pid"), failed["vms"]
    (retry,) = wait_until(lambda: [s for s in lab.sessions("nightly") if s["id"] != first and s["state"] == "stopped"],
                          timeout=90, what="the automatic retry to end")
    retry = lab.session(retry["id"])
    assert (retry["trigger"], retry["retry_of"], retry["result"]) == ("auto_retry", first, "success")
    assert [(vm["name"], vm["proxy"]["host"]) for vm in retry["vms"]] == [(lost, survivor.host)]
    assert lab.restore(lost)[1] == bytes(lab.disks[lost])
    assert lab.backupd_snapshots() == {}


def test_a_pool_without_a_live_proxy_waits_then_fails_its_vms(lab: Lab) -> None:
    _configure(lab, {"vm-0": "4 MiB", "vm-1": "4 MiB"}, proxy_wait_seconds=2)

    doc = lab.start_wait("nightly", rc=EXIT_FAILED)

    assert [vm["status"] for vm in doc["vms"]] == ["failed", "failed"]
    assert all("no live backup proxy in pool" in vm["error"] for vm in doc["vms"]), doc["vms"]
    assert any("no live backup proxy; waiting up to 2 s" in line["text"] for line in doc["log"])


class CuttableLink:
    """A TCP forwarder of this test to a service (the broker), which the test can cut (every
    connection through it closed, new ones closed at once) and restore, the way a network
    failure between a proxy and the broker would, without touching the shared broker."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self._up = threading.Event()
        self._up.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            try:
                if not self._up.is_set():
                    raise ConnectionRefusedError("the link is cut")
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), name="link-pump", daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self._up.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for end in sockets:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self.cut()
        self.server.close()


def test_a_proxy_cut_off_from_the_broker_pauses_says_so_and_takes_work_again_when_it_is_back(lab: Lab, proxies) -> None:  # noqa: ANN001
    link = CuttableLink(("127.0.0.1", 5672))
    try:
        _configure(lab, {"vm-0": "4 MiB"})
        lab.configure(proxies={"broker": f"amqp://guest:guest@127.0.0.1:{link.port}//", "proxy_wait_seconds": 600})
        lab.fill("vm-0")
        proxy = proxies(1, "host-a")

        def status() -> str:
            return next(p["status"] for p in lab.run_json("proxy", "list") if p["pid"] == proxy.pid)

        link.cut()
        wait_until(lambda: status() == "paused", timeout=60, what="the proxy to be paused")
        assert "cannot reach the broker amqp://guest:***@127.0.0.1" in proxy.log()
        assert "taking no VM task until it is back" in proxy.log()
        (listed,) = [p for p in lab.run_json("proxy", "list") if p["pid"] == proxy.pid]
        assert "cannot reach the broker" in (listed.get("note") or ""), listed

        link.restore()
        wait_until(lambda: status() == "up", timeout=60, what="the proxy to be up again")
        doc = lab.start_wait("nightly")
        assert doc["result"] == "success" and doc["vms"][0]["proxy"]["pid"] == proxy.pid
    finally:
        link.close()


def test_a_proxy_cut_off_from_the_state_db_stops_taking_work_says_so_and_resumes(lab: Lab) -> None:
    """A proxy whose own config reaches PostgreSQL through a link the test cuts: it cancels
    its queue consumer and says so; once the link is back it consumes again and runs a VM
    task (the lab's CLI and sessions reach PostgreSQL directly)."""
    link = CuttableLink(("127.0.0.1", 5432))
    _configure(lab, {"vm-0": "4 MiB"})
    lab.fill("vm-0")
    own = lab.site / "proxy.toml"
    own.write_text(lab.config.read_text().replace("@127.0.0.1:5432/", f"@127.0.0.1:{link.port}/"))
    err = lab.scratch / "proxy-cut.err"
    with err.open("w") as stderr:
        proxy = subprocess.Popen([sys.executable, "-m", "backupd", "-c", str(own), "proxy", "--pool", lab.pool,  # type: ignore[attr-defined]
                                  "--max-tasks", "1", "--host-id", "host-cut"], cwd=lab.site, stdout=subprocess.DEVNULL,
                                 stderr=stderr)
    try:
        wait_until(lambda: any(p["pid"] == proxy.pid and p["status"] == "up" for p in lab.run_json("proxy", "list")),
                   timeout=90, what="the proxy to be up")
        link.cut()
        wait_until(lambda: "taking no VM task until the state DB is back" in err.read_text(), timeout=60,
                   what="the proxy to say it lost the state DB")
        assert "cannot be used" in err.read_text()
        link.restore()
        wait_until(lambda: "the state DB is back; taking VM tasks again" in err.read_text(), timeout=60,
                   what="the proxy to take work again")
        doc = lab.start_wait("nightly")
        assert doc["result"] == "success" and doc["vms"][0]["proxy"]["pid"] == proxy.pid
    finally:
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
        link.close()


def test_proxies_need_a_postgresql_state_db(tmp_path) -> None:  # noqa: ANN001
    lab = Lab(tmp_path)
    lab.configure(vms={"vm-0": "4 MiB"}, jobs={"nightly": {"vms": ["vm-0"]}}, proxies={"broker": BROKER_URL})
    proc = lab.run("job", "list")
    assert proc.returncode == 78, describe(proc, "a config error")
    assert "backup proxies need a PostgreSQL state DB" in proc.stderr
