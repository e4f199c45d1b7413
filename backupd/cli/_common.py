"""What the commands of :mod:`backupd.cli` share: argument types that refuse bad input before
anything is opened, the per-invocation context (config path, service opened on first use), the
``--json`` option and its printer, the exit code constants and the log format."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from backupd.errors import NotFoundError

if TYPE_CHECKING:
    from backupd.service import Backupd

#: most sessions ``session list`` prints (``--limit``)
MAX_LIST_LIMIT = 100_000
#: largest session id there can be: the state DB's integers are signed 64-bit
MAX_SESSION_ID = 2**63 - 1
#: exit code of a full-VM restore that would create a VM whose name is taken (``sysexits.h``
#: ``EX_CANTCREAT``: "a (user specified) output file cannot be created")
VM_EXISTS_EXIT = 73


class Text(click.ParamType):
    """A name or message from the command line: text that is valid UTF-8 (an argument whose
    bytes are not arrives with lone surrogates) and has no control characters.

    :param empty_ok: whether the empty string is accepted.
    """

    name = "text"

    def __init__(self, *, empty_ok: bool = False) -> None:
        self.empty_ok = empty_ok

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        import unicodedata

        text = str(value)
        if not text and not self.empty_ok:
            self.fail("cannot be empty", param, ctx)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(text[exc.start])  # Python hands an undecodable byte B over as U+DC00 + B
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
            self.fail(f"{text!r} is not UTF-8 text ({what} at character {exc.start + 1})", param, ctx)
        control = next((char for char in text if unicodedata.category(char) == "Cc"), None)
        if control is not None:
            self.fail(f"{text!r} contains a control character ({control!r})", param, ctx)
        return text


#: a job, VM, provider or restore point name or id
TEXT = Text()


class PathArg(click.Path):
    """``click.Path`` that refuses the empty string (which would mean the working directory)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value:
            self.fail("cannot be empty", param, ctx)
        return super().convert(value, param, ctx)


def session_in_range(session_id: int) -> int:
    """``session_id`` if the state DB can hold it; else :class:`NotFoundError`, as for any id
    no session has."""
    if not 1 <= session_id <= MAX_SESSION_ID:
        raise NotFoundError(f"no session {session_id}")
    return session_id


class Context:
    """Per-invocation state: the config path, and the service opened from it on first use."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self._service: Backupd | None = None

    @property
    def service(self) -> "Backupd":
        if self._service is None:
            from backupd.config import load_config
            from backupd.service import Backupd

            self._service = Backupd(load_config(self.config_path))
        return self._service


pass_ctx = click.make_pass_decorator(Context)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


def print_json(document: Any) -> None:
    from backupd.render import dumps

    click.echo(dumps(document))



class _OneLineFormatter(logging.Formatter):
    """Log records as ``backupd: message``; tracebacks only with ``BACKUPD_DEBUG=1``, so an
    administrator sees what went wrong once, in words."""

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]  # noqa: N802 (logging's name)
        return super().formatException(ei) if os.environ.get("BACKUPD_DEBUG") else ""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).rstrip("\n")


def configure_logging(*, daemon: bool = False) -> None:
    """Log records on stderr, one line each (:class:`_OneLineFormatter`), warnings and up;
    for the daemon, its events too (info) with their time (UTC)."""
    handler = logging.StreamHandler(sys.stderr)
    if daemon:
        formatter = _OneLineFormatter("%(asctime)s backupd: %(message)s", datefmt="%Y-%m-%dT%H:%M:%SZ")
        formatter.converter = time.gmtime
        logging.getLogger("backupd.daemon").setLevel(logging.INFO)
    else:
        formatter = _OneLineFormatter("backupd: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
