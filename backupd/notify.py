"""Notifications when a session ends, sent with apprise to URLs (email, webhooks, chat).

The daemon calls :func:`notify` with a job's ``notify`` URLs (or ``[daemon] notify``) and the
session as ``session show --json`` gives it; the config loader calls :func:`check_urls`.
A notification that fails is logged and returned as a problem; it never fails the session.

Secrets. Notification URLs carry passwords and tokens (``mailtos://user:PASSWORD@host``,
``slack://TOKEN_A/TOKEN_B/TOKEN_C``), so backupd never logs, prints or returns a URL: it
names one by its position and :func:`redact` (scheme, and host and port when the host is a
host name). apprise's own log records can hold secrets: a plugin logs a rejected token's value
at WARNING, a URL apprise cannot load is logged masked only by heuristics that differ between
its versions, and DEBUG records carry request URLs and payloads. So importing this module puts
a filter on the ``apprise`` logger that drops every record before any handler sees it (a
handler attached to that logger directly included) and sets it to WARNING; during each call
to apprise its warnings are collected, every piece of that URL is masked in them, and they
become the reason of the problem reported (over-masking words that contain a piece of the
URL rather than risking a secret).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import apprise

from backupd.render import size

log = logging.getLogger(__name__)

#: one apprise call at a time, so the warnings collected during it are its own
_SENDING = threading.Lock()
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_URL_DELIMITERS = re.compile(r"[:/@?&=#;,]")
#: pieces of a URL shorter than this are left in apprise's messages (they would mask letters)
_MIN_SECRET = 3
_NOTIFY_TYPES = {
    "success": apprise.NotifyType.SUCCESS,
    "warning": apprise.NotifyType.WARNING,
    "failed": apprise.NotifyType.FAILURE,
}


# -- the message --------------------------------------------------------------------------------


def session_message(document: dict[str, Any]) -> tuple[str, str]:
    """The notification of an ended session, as plain text.

    :param document: the session as :func:`backupd.render.session_document` gives it.
    :returns: ``(title, body)``: a title like ``"backupd: job nightly session 42 failed"``;
        a body with the job, session, result, duration, message, stop request, bytes read and
        stored, and every VM's status, error, warning and a snapshot left on the hypervisor.
    """
    outcome = document["result"] or document["state"]
    title = f"backupd: job {document['job']} session {document['id']} {outcome}"
    lines = [f"Job {document['job']}, session {document['id']}: {outcome}"]
    if document["message"]:
        lines.append(f"Message: {document['message']}")
    seconds = document["duration_seconds"]
    lines.append(f"Duration: {_duration(seconds)}" if seconds is not None else "Duration: unknown")
    lines.append(f"Started {document['started_at']}, ended {document['ended_at'] or '-'}")
    stop = document["stop"]
    if stop:
        lines.append(f"Stop: {stop['mode']}, requested at {stop['requested_at']}"
                     + (f": {stop['message']}" if stop["message"] else ""))
    vms = document["vms"]
    read = sum(vm["bytes_read"] for vm in vms)
    stored = sum(vm["bytes_stored"] for vm in vms)
    lines.append(f"Read {size(read)}, stored {size(stored)}")
    lines.append("")
    lines.append("VMs:" if vms else "VMs: none")
    for vm in vms:
        lines.append(f"- {vm['name']}: {vm['status']}")
        if vm["error"]:
            lines.append(f"    error: {vm['error']}")
        if vm["warning"]:
            lines.append(f"    warning: {vm['warning']}")
        snapshot = vm["snapshot"]
        if snapshot and not snapshot["removed"]:
            lines.append(f"    snapshot {snapshot['id']} NOT removed" + (f": {snapshot['error']}" if snapshot["error"] else ""))
    return title, "\n".join(lines)


def _duration(seconds: float) -> str:
    """``"42.5 s"``, or ``"1 h 2 min 3 s"`` from a minute on."""
    if seconds < 60:
        return f"{seconds:g} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours} h " if hours else "") + f"{minutes} min {secs} s"


# -- sending ------------------------------------------------------------------------------------


def notify(urls: list[str], document: dict[str, Any]) -> list[str]:
    """Send the session's notification to every URL, one after another; never raises.

    :param urls: apprise URLs (https://github.com/caronc/apprise/wiki), e.g.
        ``"mailtos://user:pass@example.com"``, ``"json://hooks.example.com/backup"``.
    :param document: the session as :func:`backupd.render.session_document` gives it.
    :returns: one line per URL that was not sent, naming it by position and :func:`redact`
        with apprise's reason (URL pieces masked), e.g.
        ``"URL 2 (json://127.0.0.1:9): not sent: A Connection error occurred ..."``;
        each is also logged at WARNING. Empty when every notification went out.
    """
    try:
        title, body = session_message(document)
        notify_type = _NOTIFY_TYPES.get(document["result"], apprise.NotifyType.INFO)
    except Exception:  # never fail the session for its notification
        log.exception("cannot write the notification of session %s", document.get("id"))
        return ["the notification could not be written (see the log)"]
    problems = []
    for number, url in enumerate(urls, 1):
        name = f"URL {number} ({redact(url)})"
        with _apprise_warnings() as messages:
            try:
                sender = apprise.Apprise()
                sent = sender.add(url) and bool(
                    sender.notify(body=body, title=title, notify_type=notify_type, body_format=apprise.NotifyFormat.TEXT)
                )
            except Exception as exc:  # apprise or a plugin broke: still never fail the session
                messages.append(f"{type(exc).__name__}: {exc}")
                sent = False
        if sent:
            log.info("session %s: notification sent to %s", document["id"], name)
            continue
        reasons = _masked(messages, url)
        problem = f"{name}: not sent" + (f": {reasons}" if reasons else "")
        log.warning("session %s: notification %s", document["id"], problem)
        problems.append(problem)
    return problems


def check_urls(urls: list[str]) -> list[str]:
    """Which notification URLs apprise cannot use (an unknown scheme, a missing or malformed
    token); nothing is sent.

    :returns: one line per such URL, named by position and :func:`redact`, with apprise's
        reason (URL pieces masked), e.g. ``"URL 1 (slakc://****): apprise cannot use it"``.
    """
    problems = []
    for number, url in enumerate(urls, 1):
        with _apprise_warnings() as messages:
            understood = apprise.Apprise().add(url)
        if not understood:
            reasons = _masked(messages, url)
            problems.append(f"URL {number} ({redact(url)}): apprise cannot use it" + (f": {reasons}" if reasons else ""))
    return problems


class _Swallow(logging.Filter):
    """On apprise's logger: drops every record before any handler sees it; while backupd
    calls apprise, keeps the warnings' and errors' messages for the caller to mask."""

    def __init__(self) -> None:
        super().__init__()
        self.collecting: list[str] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.collecting is not None and record.levelno >= logging.WARNING:
            try:
                self.collecting.append(record.getMessage())
            except Exception:  # a malformed record: logging's own error report would print its arguments
                self.collecting.append("(an unreadable apprise message)")
        return False


_SWALLOW = _Swallow()
_APPRISE_LOG = logging.getLogger("apprise")
_APPRISE_LOG.addFilter(_SWALLOW)
_APPRISE_LOG.setLevel(logging.WARNING)  # its DEBUG records would only be dropped


@contextlib.contextmanager
def _apprise_warnings() -> Iterator[list[str]]:
    """The warnings and errors apprise logs meanwhile, from any thread (unmasked: mask
    before use)."""
    with _SENDING:
        _SWALLOW.collecting = messages = []
        try:
            yield messages
        finally:
            _SWALLOW.collecting = None


# -- secrets ------------------------------------------------------------------------------------


def redact(url: str) -> str:
    """A notification URL as it may be logged: its scheme, and its host and port only when
    the host is an IP address, ``localhost`` or a dotted DNS name, since many apprise schemes
    put a token where the host goes (``slack://TOKEN_A/...``).

    ``mailtos://user:pass@example.com`` → ``mailtos://example.com``;
    ``json://127.0.0.1:8080/path?token=abc`` → ``json://127.0.0.1:8080``;
    ``slack://TokenA/TokenB/TokenC`` → ``slack://****``; no scheme → ``<unparseable URL>``.
    """
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url.strip())
    if match is None:
        return "<unparseable URL>"
    scheme = match[1].lower()
    try:
        parts = urlsplit(url.strip())
        host, port = parts.hostname, parts.port
    except ValueError:  # e.g. a token with a colon where the port would be
        return f"{scheme}://****"
    if not host or not _is_host_name(host):
        return f"{scheme}://****"
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" + (f":{port}" if port is not None else "")


def _is_host_name(host: str) -> bool:
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return True
    labels = host.rstrip(".").split(".")
    return host == "localhost" or (
        len(labels) > 1 and all(_DNS_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()
    )


def _masked(messages: list[str], url: str) -> str:
    """apprise's messages joined, with every piece of ``url`` (user, password, path segments,
    query keys and values, a token in the host's place; raw and percent-decoded) as ``****``.
    The host and port :func:`redact` shows stay readable."""
    shown = set(re.split(r"[:/\[\]]", redact(url).lower()))
    rest = url.strip().split("://", 1)[-1]
    pieces = {piece for raw in _URL_DELIMITERS.split(rest) for piece in (raw, unquote(raw))}
    pieces = {p for p in pieces if len(p) >= _MIN_SECRET and p.lower() not in shown}
    text = "; ".join(dict.fromkeys(messages))
    for piece in sorted(pieces, key=len, reverse=True):
        text = re.sub(re.escape(piece), "****", text, flags=re.IGNORECASE)
    return text
