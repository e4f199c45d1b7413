"""Config model of a ``[providers.NAME]`` section with ``type = "vsphere"``.

The password is never part of the config: ``password_env`` names the environment variable it
is read from when the provider connects (:meth:`VsphereProviderConfig.password`), so it is
never stored in the config object, printed, logged or recorded.

TLS: by default the vCenter's certificate is verified against the system CAs. A self-signed
vCenter is trusted through ``ca_file`` (a PEM bundle) or ``thumbprint`` (the SHA-256 of the
certificate, pinned); ``insecure = true`` switches verification off and is said in every
session log. ``protocol = "http"`` is for simulators only. At most one of ``ca_file``,
``thumbprint`` and ``insecure`` may be given, and none of them with ``protocol = "http"``.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from providers.config_types import ConfigPath, Name

_FROZEN = ConfigDict(frozen=True, extra="forbid")
#: "SHA256:AB:CD:..." (32 bytes), the colons and the prefix optional, any case
_THUMBPRINT = re.compile(r"^(?:sha256:)?((?:[0-9a-f]{2}:?){32})$", re.IGNORECASE)


def normalise_thumbprint(value: str) -> str:
    """A SHA-256 certificate thumbprint as 64 lower-case hex digits.

    Accepts ``SHA256:AB:CD:...``, ``AB:CD:...`` or ``abcd...`` (what vCenter's UI and
    ``openssl x509 -fingerprint -sha256`` print).

    :raises ValueError: not 32 bytes of hex.
    """
    match = _THUMBPRINT.match(value.strip())
    if match is None:
        raise ValueError(
            "a thumbprint is the certificate's SHA-256 as 32 hex bytes, e.g. 'SHA256:AB:CD:...'"
            " (openssl x509 -noout -fingerprint -sha256); SHA-1 thumbprints are refused"
        )
    return match.group(1).replace(":", "").lower()


class VsphereProviderConfig(BaseModel):
    """A vCenter Server (or an ESXi host) reached through its SOAP API (pyvmomi)."""

    model_config = _FROZEN

    type: Literal["vsphere"]
    #: the vCenter's host name or address
    host: str = Field(min_length=1, pattern=r"^[A-Za-z0-9.\-:\[\]]+$")
    #: TCP port, default 443
    port: int = Field(default=443, ge=1, le=65535, strict=True)
    #: the user backupd logs in as, e.g. ``svc-backup@vsphere.local``
    user: Name
    #: the environment variable holding the password (never the password itself)
    password_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    #: restrict VM lookups to this datacenter
    datacenter: Name | None = None
    #: a PEM file of CAs the vCenter's certificate is verified against (instead of the system's)
    ca_file: ConfigPath | None = None
    #: the vCenter certificate's SHA-256 thumbprint, pinned (normalised to 64 hex digits)
    thumbprint: str | None = None
    #: no certificate verification at all (explicit opt-out; logged in every session)
    insecure: bool = False
    #: ``https``; ``http`` only for simulators
    protocol: Literal["https", "http"] = "https"
    #: seconds any one API or HTTP call may take before it fails as transient, 1 to 3600
    timeout_seconds: float = Field(default=120.0, ge=1, le=3600, allow_inf_nan=False)
    #: seconds a snapshot creation or removal task may take, 10 to 86,400
    task_timeout_seconds: float = Field(default=3600.0, ge=10, le=86400, allow_inf_nan=False)

    @field_validator("thumbprint")
    @classmethod
    def _thumbprint(cls, value: str | None) -> str | None:
        return None if value is None else normalise_thumbprint(value)

    @field_validator("ca_file")
    @classmethod
    def _ca_file_readable(cls, value, info):  # type: ignore[no-untyped-def]
        from providers.config_types import absolute

        if value is not None and not os.path.isfile(absolute(value, info)):
            raise ValueError(f"CA file {absolute(value, info)} does not exist or is not a file")
        return value

    @model_validator(mode="after")
    def _one_trust_choice(self) -> "VsphereProviderConfig":
        chosen = [key for key in ("ca_file", "thumbprint") if getattr(self, key) is not None]
        if self.insecure:
            chosen.append("insecure")
        if len(chosen) > 1:
            raise ValueError(f"give at most one of ca_file, thumbprint and insecure (got {', '.join(chosen)})")
        if self.protocol == "http" and chosen:
            raise ValueError(f"protocol = \"http\" has no TLS: {chosen[0]} makes no sense with it")
        return self

    def password(self) -> str:
        """The password, read from ``password_env`` now.

        :raises ProviderError: the variable is not set (the message names it).
        """
        from providers.base import ProviderError

        value = os.environ.get(self.password_env)
        if value is None:
            raise ProviderError(f"the vCenter password variable {self.password_env} is not set")
        return value
