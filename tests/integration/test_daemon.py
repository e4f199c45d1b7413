"""``backupd daemon`` driven as systemd or an administrator would: a real daemon process,
``every`` schedules a few seconds apart, signals, ``kill -9``; outcomes read through the CLI
and the daemon's own log (stderr), polled, never slept for."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from labkit import EXIT_FAILED, EXIT_NOT_FOUND, Lab, describe, on_every_state_db, vms_by_name, wait_until

pytestmark = pytest.mark.slow

EXIT_ANOTHER_DAEMON = 5


def _sessions(lab: Lab, job: str) -> list[dict[str, Any]]:
    return [lab.session(s["id"]) for s in reversed(lab.sessions(job))]


def _ended(lab: Lab, job: str, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        done = [s for s in lab.sessions(job) if s["state"] == "stopped"]
        return list(reversed(done)) if len(done) >= count else None

    return [lab.session(s["id"]) for s in wait_until(enough, timeout, what=f"{count} ended sessions of {job}")]


@on_every_state_db
def test_a_scheduled_job_runs_on_time_and_a_second_daemon_is_refused(lab: Lab, daemons) -> None:  # noqa: ANN001
    lab.configure(vms={"web": "4 MiB"}, jobs={"nightly": {"vms": ["web"], "schedule": {"every": "2s"}}})
    lab.fill("web")
    daemon = daemons()

    first, second = _ended(lab, "nightly", 2)
    assert [s["result"] for s in (first, second)] == ["success", "success"]
    assert first["trigger"] == "schedule"
    status = lab.run_json("daemon", "status")
    assert status["running"] and status["pid"] == daemon.pid
    (job,) = status["jobs"]
    assert job["job"] == "nightly" and job["schedule"] == "every 2s"
    assert datetime.fromisoformat(job["next_run"]).tzinfo is not None
    assert {j["name"]: j["next_run"] for j in lab.run_json("job", "list")}["nightly"]

    again = lab.run("daemon")
    assert again.returncode == EXIT_ANOTHER_DAEMON
    assert "another daemon runs on the state DB" in again.stderr and f"pid {daemon.pid}" in again.stderr

    log = daemon.stop()
    assert "session 1 of job nightly started (scheduled for" in log
    assert "daemon stopped: every session has ended" in log
    assert lab.run_json("daemon", "status")["running"] is False
    assert lab.backupd_snapshots() == {}


@on_every_state_db
def test_a_chain_runs_in_order_and_a_recursive_stop_stops_it(lab: Lab, daemons) -> None:  # noqa: ANN001
    lab.configure(
        vms={"vm-a": "8 MiB", "vm-b": "4 MiB", "vm-c": "4 MiB"},
        jobs={"infra": {"vms": ["vm-a"]},
              "apps": {"vms": ["vm-b"], "schedule": {"after": "infra"}},
              "reports": {"vms": ["vm-c"], "schedule": {"after": "apps"}}},
    )
    for seed, vm in enumerate(("vm-a", "vm-b", "vm-c")):
        lab.fill(vm, seed=seed)
    daemon = daemons()

    handed = lab.run_json("job", "start", "infra")
    assert handed["daemon"]["pid"] == daemon.pid
    (reports,) = _ended(lab, "reports", 1)
    (infra,) = _sessions(lab, "infra")
    (apps,) = _sessions(lab, "apps")
    assert infra["id"] == handed["session"] and infra["result"] == "success"
    assert (apps["trigger"], apps["triggered_by"]) == ("chain", infra["id"])
    assert (reports["trigger"], reports["triggered_by"]) == ("chain", apps["id"])
    assert infra["ended_at"] <= apps["started_at"] and apps["ended_at"] <= reports["started_at"]

    lab.configure(read_mib_per_s=1)  # the next infra session takes 8 s, once the daemon reloads
    daemon.bg.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("SIGHUP: config")
    second = lab.run_json("job", "start", "infra", "--full")["session"]
    lab.wait_for_vms_in_flight(second, ["vm-a"])
    stops = lab.run_json("job", "stop", "infra", "--recursive", "--immediate")["stops"]
    assert [(s["job"], s["outcome"]) for s in stops] == [("infra", "stop_requested")]
    daemon.wait_log(f"job apps: not started after session {second}: that session was stopped recursively")
    assert lab.session(second)["stop"]["recursive"] is True
    assert len(lab.sessions("apps")) == 1, "no chained job starts after a recursive stop"


def test_a_window_ending_mid_session_stops_it_gracefully_then_immediately(lab: Lab, daemons) -> None:  # noqa: ANN001
    # The window ends 30 s from now: time for the daemon to start its first session even on a
    # loaded machine; vm-a's reads are held, so that session is in flight when the window ends.
    now = datetime.now(timezone.utc)
    start, end = (now - timedelta(hours=1)).strftime("%H:%M:%S"), (now + timedelta(seconds=30)).strftime("%H:%M:%S")
    lab.configure(
        vms={"vm-a": "32 MiB", "vm-b": "4 MiB"},
        jobs={"nightly": {"vms": ["vm-a", "vm-b"], "schedule": {"every": "1s", "timezone": "UTC"},
                          "backup_window": {"start": start, "end": end}, "drain_period_seconds": 2}},
    )
    lab.fill("vm-a")
    lab.pause("vm-a", "read")
    daemon = daemons()
    first = lab.wait_for_new_session("nightly", timeout=30)
    lab.wait_for_vms_in_flight(first, ["vm-a"], timeout=30)
    lab.wait_for_session(first, lambda d: (d["stop"] or {}).get("mode") == "immediate", timeout=90,
                         what="the window's graceful stop to escalate after the drain period")
    lab.resume("vm-a")

    (session,) = _ended(lab, "nightly", 1, timeout=90)
    assert session["trigger"] == "schedule"
    assert session["stop"]["reason"] == "window" and session["stop"]["mode"] == "immediate"
    assert session["stop"]["drain_deadline"]
    assert session["result"] == "failed" and f"the backup window {start}-{end} of job nightly ended" in session["message"]
    log = "\n".join(line["text"] for line in session["log"])
    assert "graceful stop requested" in log and "the drain period ended" in log
    assert [vm["status"] for vm in session["vms"]] == ["cancelled", "not_processed"]
    daemon.wait_log("skipped: outside its backup window")
    assert lab.backupd_snapshots() == {}


def test_automatic_retry_processes_only_the_vm_that_failed(lab: Lab, daemons) -> None:  # noqa: ANN001
    lab.configure(vms={"vm-a": "4 MiB", "vm-b": "4 MiB"},
                  jobs={"nightly": {"vms": ["vm-a", "vm-b"], "auto_retry": {"times": 2, "wait_seconds": 5}}})
    lab.fill("vm-a", seed=1)
    lab.fill("vm-b", seed=2)
    lab.sim("fault", "vm-b", "--op", "read", "--permanent")
    daemons()

    first = lab.run_json("job", "start", "nightly")["session"]
    failed = lab.wait_stopped(first)
    lab.sim("fault", "vm-b", "--clear")
    assert [(vm["name"], vm["status"]) for vm in failed["vms"]] == [("vm-a", "success"), ("vm-b", "failed")]

    _, retry = _ended(lab, "nightly", 2)
    assert (retry["trigger"], retry["retry_of"], retry["result"]) == ("auto_retry", first, "success")
    assert [vm["name"] for vm in retry["vms"]] == ["vm-b"]
    assert lab.restore("vm-b")[1] == bytes(lab.disks["vm-b"])


def test_an_automatic_retry_planned_by_a_killed_daemon_is_started_by_the_next_one(lab: Lab, daemons) -> None:  # noqa: ANN001
    """The retry's time follows from the failed session's record (its end + wait_seconds), so
    ``kill -9`` of the daemon between a failure and its retry loses nothing: the next daemon
    plans the same retry from the state DB and starts it."""
    lab.configure(vms={"vm-a": "4 MiB", "vm-b": "4 MiB"},
                  jobs={"nightly": {"vms": ["vm-a", "vm-b"], "auto_retry": {"times": 1, "wait_seconds": 15}}})
    lab.fill("vm-a", seed=1)
    lab.fill("vm-b", seed=2)
    lab.sim("fault", "vm-b", "--op", "read", "--permanent")
    first_daemon = daemons()
    first = lab.run_json("job", "start", "nightly")["session"]
    lab.wait_stopped(first)
    first_daemon.wait_log(f"automatic retry 1 of 1 of session {first} at")
    first_daemon.kill()
    assert [s["id"] for s in lab.sessions("nightly")] == [first], "killed before the retry was due"
    lab.sim("fault", "vm-b", "--clear")

    second_daemon = daemons()
    second_daemon.wait_log(f"automatic retry 1 of 1 of session {first} at")
    _, retry = _ended(lab, "nightly", 2)
    assert (retry["trigger"], retry["retry_of"], retry["result"]) == ("auto_retry", first, "success")
    assert [vm["name"] for vm in retry["vms"]] == ["vm-b"]
    assert len(lab.sessions("nightly")) == 2, "one retry, not one per daemon"


def test_sighup_reloads_a_valid_config_and_keeps_the_old_one_when_invalid(lab: Lab, daemons) -> None:  # noqa: ANN001
    lab.configure(vms={"web": "4 MiB"}, jobs={"nightly": {"vms": ["web"], "schedule": {"every": "1h"}}})
    daemon = daemons()
    assert lab.run_json("daemon", "status")["jobs"][0]["schedule"] == "every 1h"

    lab.configure(jobs={"nightly": {"vms": ["web"], "schedule": {"every": "2s"}}})
    daemon.bg.proc.send_signal(signal.SIGHUP)
    daemon.wait_log("SIGHUP: config")
    _ended(lab, "nightly", 1)

    valid = lab.config.read_text()
    lab.write_raw_config(valid.replace('every = "2s"', 'every = "2 fortnights"'))
    daemon.bg.proc.send_signal(signal.SIGHUP)
    log = daemon.wait_log("SIGHUP: the config was not reloaded")
    assert "jobs.nightly.schedule.every" in log and "2 fortnights" in log
    refused = log.index("SIGHUP: the config was not reloaded")
    wait_until(lambda: "of job nightly started (scheduled" in daemon.log()[refused:],
               what="the old schedule to go on")
    lab.write_raw_config(valid)


@on_every_state_db
def test_sigterm_stops_sessions_gracefully_and_a_second_one_immediately(lab: Lab, daemons) -> None:  # noqa: ANN001
    lab.configure(vms={"vm-a": "32 MiB", "vm-b": "4 MiB"}, jobs={"nightly": {"vms": ["vm-a", "vm-b"]}},
                  read_mib_per_s=1)
    lab.fill("vm-a")
    daemon = daemons()
    session = lab.run_json("job", "start", "nightly")["session"]
    lab.wait_for_vms_in_flight(session, ["vm-a"])

    daemon.bg.proc.send_signal(signal.SIGTERM)
    stopping = lab.wait_for_session(session, lambda d: d["stop"] is not None, what="the graceful stop")
    assert (stopping["stop"]["mode"], stopping["stop"]["reason"]) == ("graceful", "shutdown")
    assert vms_by_name(stopping)["vm-a"]["status"] == "running", "the VM in flight goes on"
    daemon.bg.proc.send_signal(signal.SIGTERM)
    log = daemon.stop()

    doc = lab.session(session)
    assert (doc["result"], doc["stop"]["mode"]) == ("failed", "immediate")
    assert [vm["status"] for vm in doc["vms"]] == ["cancelled", "not_processed"]
    assert "second signal: immediate stop" in log
    assert lab.backupd_snapshots() == {}


@on_every_state_db
def test_kill_9_of_a_session_process_and_of_the_daemon_then_restart(lab: Lab, daemons) -> None:  # noqa: ANN001
    """The crash targets: after kill -9 of a session process and of the daemon, and a restart,
    no session is left running, no snapshot on any VM, every restore point verifies and the
    next scheduled session succeeds."""
    lab.configure(vms={"vm-a": "16 MiB", "vm-b": "4 MiB"}, jobs={"nightly": {"vms": ["vm-a", "vm-b"]}},
                  read_mib_per_s=2)
    lab.fill("vm-a", seed=1)
    lab.fill("vm-b", seed=2)
    daemon = daemons()
    session = lab.run_json("job", "start", "nightly")["session"]
    doc = lab.wait_for_vms_in_flight(session, ["vm-a"])
    os.kill(doc["runner"]["pid"], signal.SIGKILL)
    ended = lab.wait_stopped(session)
    assert (ended["result"], ended["message"]) == ("failed", "runner process died")
    daemon.wait_log(f"session {session}: its process ended abnormally (exit -9); recovering")
    wait_until(lambda: lab.backupd_snapshots() == {}, what="the killed session's snapshot to be removed")

    second = lab.run_json("job", "start", "nightly")["session"]
    lab.wait_for_vms_in_flight(second, ["vm-a"])
    daemon.kill()

    lab.configure(read_mib_per_s=0, jobs={"nightly": {"vms": ["vm-a", "vm-b"], "schedule": {"every": "2s"}}})
    restarted = daemons()
    wait_until(lambda: lab.session(second)["state"] == "stopped", timeout=90,
               what="the session killed with the daemon to end")
    scheduled = wait_until(lambda: [s for s in _sessions(lab, "nightly") if s["trigger"] == "schedule"
                                    and s["state"] == "stopped"], timeout=90, what="a scheduled session after the restart")
    assert scheduled[0]["result"] == "success"
    log = restarted.stop()
    assert f"session {session} of job nightly ended" not in log, "an end its predecessor handled is not acted on again"
    assert lab.backupd_snapshots() == {}
    assert lab.run_json("restore-point", "verify", "--all")["ok"]
    assert not any((lab.repo / "staging").iterdir()), "no staging debris"


def test_the_snapshot_hunter_removes_prefixed_snapshots_of_ended_sessions_only(lab: Lab) -> None:
    lab.configure(vms={"web": "4 MiB"}, jobs={"nightly": {"vms": ["web"]}})
    ended = lab.start_wait("nightly")["id"]
    from backupd.config import load_config
    from providers import open_provider

    provider = open_provider("lab", load_config(lab.config).providers["lab"])
    vm = provider.find_vm("web")
    leaked = provider.create_snapshot(vm, name=f"backupd-nightly-{ended}", description="", quiesce=False)
    provider.create_snapshot(vm, name="before-upgrade", description="", quiesce=False)

    dry = lab.run_json("snapshot", "hunt", "--dry-run")
    assert [(o["vm"], o["snapshot"], o["session"], o["action"]) for o in dry] == [("web", leaked.id, ended, "would remove")]
    assert len(lab.snapshots()["web"]) == 2
    done = lab.run_json("snapshot", "hunt")
    assert [o["action"] for o in done] == ["removed"]
    assert [s["name"] for s in lab.snapshots()["web"]] == ["before-upgrade"]
    assert lab.run_json("snapshot", "hunt") == []


def test_a_run_missed_while_the_daemon_was_down_starts_once(lab: Lab, daemons) -> None:  # noqa: ANN001
    lab.configure(vms={"web": "4 MiB"}, jobs={"nightly": {"vms": ["web"], "schedule": {"cron": "* * * * *"}}},
                  daemon={"misfire_grace_seconds": 600})
    daemons().stop()
    with sqlite3.connect(lab.state_db) as db:  # the daemon was last up 5 minutes ago
        db.execute("update daemon set heartbeat_at = datetime('now', '-5 minutes')")

    daemon = daemons()
    (session,) = _ended(lab, "nightly", 1)
    log = daemon.log()
    assert session["trigger"] == "schedule"
    assert log.count("was missed while the daemon was down") >= 3
    assert log.count("started late") == 1, "missed runs are coalesced, never a burst"


def test_a_drain_period_escalates_a_graceful_stop(lab: Lab) -> None:
    lab.configure(vms={"vm-a": "32 MiB"}, jobs={"nightly": {"vms": ["vm-a"]}}, read_mib_per_s=1)
    lab.fill("vm-a")
    runner = lab.popen("job", "start", "nightly", "--wait", "--json")
    session = lab.wait_for_new_session("nightly")
    lab.wait_for_vms_in_flight(session, ["vm-a"])
    lab.run_json("job", "stop", "nightly", "--drain", "1")

    doc = runner.finish_json(rc=EXIT_FAILED)
    assert doc["stop"]["mode"] == "immediate" and doc["stop"]["drain_deadline"]
    assert doc["vms"][0]["status"] == "cancelled"
    assert any("the drain period ended" in line["text"] for line in doc["log"])
    assert lab.run("job", "stop", "nightly", "--immediate", "--drain", "5").returncode == 64


def test_a_retry_session_processes_only_the_vms_without_a_restore_point(lab: Lab) -> None:
    lab.configure(vms={"vm-a": "4 MiB", "vm-b": "4 MiB"}, jobs={"nightly": {"vms": ["vm-a", "vm-b"]}})
    lab.fill("vm-b")
    lab.sim("fault", "vm-b", "--op", "create_snapshot", "--permanent")
    first = lab.start_wait("nightly", rc=EXIT_FAILED)
    lab.sim("fault", "vm-b", "--clear")

    retry = lab.start_wait("nightly", "--retry")
    assert (retry["trigger"], retry["retry_of"]) == ("retry", first["id"])
    assert [(vm["name"], vm["status"]) for vm in retry["vms"]] == [("vm-b", "success")]
    nothing = lab.run("job", "start", "nightly", "--retry")
    assert nothing.returncode == EXIT_NOT_FOUND and "nothing to retry" in nothing.stderr
    assert json.loads(lab.run("session", "show", retry["id"], "--json").stdout)["retry_of"] == first["id"]


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_metrics_are_served_and_a_notification_reaches_a_webhook(lab: Lab, daemons) -> None:  # noqa: ANN001
    """Given a daemon with a metrics endpoint and a job that notifies a local webhook, when a
    session ends, then the webhook receives the job, session, result and VM statuses, and a
    Prometheus scrape over HTTP counts the session."""
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from prometheus_client.parser import text_string_to_metric_families

    received: list[dict[str, Any]] = []

    class Webhook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    webhook = HTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    metrics_port = _free_port()
    try:
        lab.configure(vms={"web": "4 MiB", "db": "4 MiB"},
                      jobs={"nightly": {"vms": ["web", "db"], "notify": [f"json://127.0.0.1:{webhook.server_port}/"]}},
                      daemon={"metrics_listen": f"127.0.0.1:{metrics_port}"})
        lab.sim("fault", "db", "--op", "create_snapshot", "--permanent")
        daemons()
        session = lab.run_json("job", "start", "nightly")["session"]
        lab.wait_stopped(session)

        (message,) = wait_until(lambda: received, what="the notification")
        assert f"session {session}" in message["title"] and "failed" in message["title"]
        assert "web: success" in message["message"] and "db: failed" in message["message"]

        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert samples[("backupd_sessions_total", (("job", "nightly"), ("result", "failed")))] == 1
        assert samples[("backupd_vm_tasks_total", (("job", "nightly"), ("status", "success")))] == 1
        assert samples[("backupd_vm_tasks_total", (("job", "nightly"), ("status", "failed")))] == 1
    finally:
        webhook.shutdown()


def test_sessions_beyond_max_sessions_wait_their_turn(lab: Lab, daemons) -> None:  # noqa: ANN001
    lab.configure(vms={"vm-a": "24 MiB", "vm-b": "4 MiB"},
                  jobs={"first": {"vms": ["vm-a"]}, "second": {"vms": ["vm-b"]}},
                  daemon={"max_sessions": 1}, read_mib_per_s=2)
    lab.fill("vm-a")
    daemons()
    first = lab.run_json("job", "start", "first")["session"]
    lab.wait_for_vms_in_flight(first, ["vm-a"])
    second = lab.run_json("job", "start", "second")["session"]

    waiting = lab.session(second)
    if lab.session(first)["state"] != "stopped":  # the first still runs (it takes ~12 s): the second waits
        assert (waiting["state"], waiting["vms"][0]["status"]) == ("starting", "pending")
    done_first, done_second = lab.wait_stopped(first), lab.wait_stopped(second)
    assert (done_first["result"], done_second["result"]) == ("success", "success")
    assert done_second["started_at"] >= done_first["ended_at"], "the second started when the first had ended"
