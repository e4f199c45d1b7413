"""Notifications when a session ends: what they say, where they go, and that no URL secret
is ever logged, printed or returned."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from backupd.notify import check_urls, notify, redact, session_message


def document(**changes: Any) -> dict[str, Any]:
    """A failed session as ``session show --json`` gives it."""
    vm = {"mode": "incremental", "stage": None, "restore_point": None, "snapshot": None, "error": None,
          "warning": None, "bytes_read": 0, "bytes_total": 0, "bytes_stored": 0, "started_at": None,
          "ended_at": None, "duration_seconds": None}
    session = {
        "id": 42, "job": "nightly", "state": "stopped", "result": "failed", "message": "runner process died",
        "started_at": "2025-03-01T22:00:00Z", "ended_at": "2025-03-01T23:02:03Z", "full": False, "stop": None,
        "duration_seconds": 3723.0, "runner": None,
        "vms": [
            {**vm, "name": "web-01", "status": "success", "restore_point": "rp-1", "bytes_read": 3 << 30,
             "bytes_stored": 1 << 30},
            {**vm, "name": "db-01", "status": "failed", "error": "cannot create snapshot: host not responding",
             "snapshot": {"id": "snap-7", "removed": False, "error": "task timed out"}},
            {**vm, "name": "mail-01", "status": "warning", "warning": "quiesce failed; crash-consistent"},
            {**vm, "name": "dns-01", "status": "not_processed", "error": "not started: the session's runner died"},
        ],
    }
    session.update(changes)
    return session


class Receiver(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers["Content-Length"])
        self.server.received.append(json.loads(self.rfile.read(length)))  # type: ignore[attr-defined]
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[HTTPServer]:
    """A webhook on 127.0.0.1 (a free port) recording the JSON documents posted to it."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port bound but not listening: every connection to it is refused."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


def test_the_message_names_job_session_result_duration_and_every_vm() -> None:
    title, body = session_message(document())

    assert title == "backupd: job nightly session 42 failed"
    assert "Job nightly, session 42: failed" in body
    assert "Message: runner process died" in body
    assert "Duration: 1 h 2 min 3 s" in body
    assert "Read 3.0 GiB, stored 1.0 GiB" in body
    assert "- web-01: success" in body
    assert "- db-01: failed\n    error: cannot create snapshot: host not responding\n" in body
    assert "    snapshot snap-7 NOT removed: task timed out" in body
    assert "- mail-01: warning\n    warning: quiesce failed; crash-consistent" in body
    assert "- dns-01: not_processed\n    error: not started: the session's runner died" in body


def test_the_message_names_a_stop_request() -> None:
    stop = {"mode": "immediate", "message": "maintenance window", "requested_at": "2025-03-01T22:30:00Z"}
    _, body = session_message(document(stop=stop, duration_seconds=42.5))

    assert "Stop: immediate, requested at 2025-03-01T22:30:00Z: maintenance window" in body
    assert "Duration: 42.5 s" in body


def test_a_webhook_receives_the_session_before_notify_returns(receiver: HTTPServer) -> None:
    url = f"json://127.0.0.1:{receiver.server_port}/backupd"

    problems = notify([url], document())

    assert problems == []
    [posted] = receiver.received  # type: ignore[attr-defined]
    assert posted["title"] == "backupd: job nightly session 42 failed"
    assert posted["type"] == "failure"
    message = posted["message"]
    for expected in ("nightly", "session 42", "failed", "web-01: success", "db-01: failed",
                     "cannot create snapshot: host not responding", "mail-01: warning",
                     "quiesce failed; crash-consistent", "dns-01: not_processed"):
        assert expected in message


def test_a_failed_notification_is_a_redacted_problem_and_the_others_are_still_sent(
    receiver: HTTPServer, refusing_port: int, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given a URL whose server refuses connections, with a password and a query token,
    notify returns one problem naming it by scheme, host and port, still sends to the next
    URL, and neither the problem, the log (at any level) nor the output holds a secret."""
    caplog.set_level(logging.DEBUG)
    failing = f"json://backupd:hunter22@127.0.0.1:{refusing_port}/hook?token=s3cr3tT0ken"

    problems = notify([failing, f"json://127.0.0.1:{receiver.server_port}/"], document())

    assert len(problems) == 1
    assert problems[0].startswith(f"URL 1 (json://127.0.0.1:{refusing_port}): not sent: ")
    assert "connection error" in problems[0].lower()  # apprise's reason, kept
    assert len(receiver.received) == 1  # type: ignore[attr-defined]
    assert any(problems[0] in record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    output = capsys.readouterr()
    everything = "\n".join([*problems, caplog.text, output.out, output.err])
    for secret in ("hunter22", "s3cr3tT0ken"):
        assert secret not in everything


def test_a_url_apprise_cannot_use_is_a_problem_without_its_secret(caplog: pytest.LogCaptureFixture) -> None:
    """apprise itself logs a rejected token's value; backupd neither forwards nor returns it."""
    caplog.set_level(logging.DEBUG)

    problems = notify(["slack://TokenA/Bad Token!/TokenC"], document())

    assert len(problems) == 1 and problems[0].startswith("URL 1 (slack://****): not sent")
    assert "Bad Token!" not in "\n".join(problems) + caplog.text
    assert "TokenA" not in "\n".join(problems) + caplog.text


def test_check_urls_reports_only_urls_apprise_cannot_use() -> None:
    problems = check_urls([
        "json://127.0.0.1:8080/hook",
        "slakc://TokenA/TokenB/TokenC",  # a typo in the scheme
        "mailtos://user:pass@example.com",
        "not a url",
    ])

    assert [problem.split(":")[0] for problem in problems] == ["URL 2 (slakc", "URL 4 (<unparseable URL>)"]
    assert all("apprise cannot use it" in problem for problem in problems)
    assert not any(token in "\n".join(problems) for token in ("TokenA", "TokenB", "TokenC"))


@pytest.mark.parametrize(
    "url, shown",
    [
        ("mailtos://user:pass@example.com", "mailtos://example.com"),
        ("json://127.0.0.1:8080/path?token=abc", "json://127.0.0.1:8080"),
        ("json://[::1]:8080/path", "json://[::1]:8080"),
        ("slack://TokenA/TokenB/TokenC", "slack://****"),  # the first token sits where a host goes
        ("tgram://123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/-100123", "tgram://****"),
        ("discord://4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js", "discord://****"),
        ("not a url", "<unparseable URL>"),
    ],
)
def test_redact_keeps_only_scheme_and_a_real_host(url: str, shown: str) -> None:
    assert redact(url) == shown
