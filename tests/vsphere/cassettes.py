"""vcrpy set-up shared by the recording script and the replay tests.

pyVmomi binds ``HTTPConnection`` / ``HTTPSConnection`` at import in two modules
(``pyVmomi.SoapAdapter`` for the SOAP API, ``pyVim.connect`` for the API version discovery),
so vcrpy's default patches of ``http.client`` miss them: :func:`recorder` adds the four as
``custom_patches``. Every SOAP call is a ``POST /sdk``: requests are matched on method,
scheme, path and query only (not host and port, so a replay may name any vCenter), and
answers are played in the recorded order. Passwords and session cookies are scrubbed before
anything is written (:func:`scrub_request`, :func:`scrub_response`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import vcr
from vcr.stubs import VCRHTTPConnection, VCRHTTPSConnection

#: where the cassettes live
CASSETTES = Path(__file__).resolve().parents[2] / "fixtures" / "cassettes"
#: the user and password a cassette's login is recorded (and replayed) with
USER = "user"
SCRUBBED = "**scrubbed**"
#: SOAP elements holding secrets (``Login``'s ``<password versionId="...">``), attributes kept
_SECRET_ELEMENTS = re.compile(rb"<(password|pwd|token)(\s[^>]*)?>.*?</\1>", re.DOTALL)
_SESSION = re.compile(r"(vmware_soap_session=)(\"[^\"]*\"|[^;]*)")


def scrub_request(request: Any) -> Any:
    """Remove passwords from a SOAP body and cookies from the headers."""
    if request.body:
        body = request.body if isinstance(request.body, bytes) else request.body.encode()
        request.body = _SECRET_ELEMENTS.sub(
            lambda m: b"<%s%s>%s</%s>" % (m[1], m[2] or b"", SCRUBBED.encode(), m[1]), body
        )
    for header in ("Cookie", "cookie", "Authorization", "authorization"):
        request.headers.pop(header, None)
    return request


def scrub_response(response: dict[str, Any]) -> dict[str, Any]:
    """Replace the session cookie's value in ``Set-Cookie``."""
    headers = response.get("headers", {})
    for name in list(headers):
        if name.lower() == "set-cookie":
            headers[name] = [_SESSION.sub(r'\1"scrubbed-session"', value) for value in headers[name]]
    return response


def recorder(record_mode: str) -> vcr.VCR:
    """A VCR patching pyVmomi's connection classes; ``record_mode`` ``"none"`` to replay only,
    ``"all"`` to record anew."""
    import pyVim.connect
    import pyVmomi.SoapAdapter

    return vcr.VCR(
        cassette_library_dir=str(CASSETTES),
        record_mode=record_mode,
        match_on=["method", "scheme", "path", "query"],
        before_record_request=scrub_request,
        before_record_response=scrub_response,
        decode_compressed_response=True,
        custom_patches=(
            (pyVmomi.SoapAdapter, "HTTPConnection", VCRHTTPConnection),
            (pyVmomi.SoapAdapter, "HTTPSConnection", VCRHTTPSConnection),
            (pyVim.connect, "HTTPConnection", VCRHTTPConnection),
            (pyVim.connect, "HTTPSConnection", VCRHTTPSConnection),
        ),
    )
