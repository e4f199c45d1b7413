"""One pyVmomi session with a vCenter: TLS, timeouts, relogin, logout.

TLS (:func:`ssl_context`), the same for the SOAP API and the datastore endpoint:

- default: verified against the system CAs, host name checked;
- ``ca_file``: verified against that PEM bundle instead, host name checked;
- ``thumbprint``: the certificate's SHA-256 must equal the pinned one; chain and host name
  are not checked (the pin is the trust). The check runs on every TLS connection, the
  datastore endpoint's included (:class:`PinnedContext`) — pyVmomi's own ``thumbprint``
  argument checks only connections whose CA verification failed, and after the first it
  switches verification off for the whole pool, so it is not used;
- ``insecure``: nothing is verified; logged as a warning each time the session opens.

Timeouts: every SOAP call and every HTTP request has the config's ``timeout_seconds`` as
socket timeout (pyVmomi's ``httpConnectionTimeout``); nothing here calls ``WaitForUpdates``,
which blocks without one (tasks are polled, see :mod:`providers.vsphere._snapshots`).

Sessions expire (vCenter's idle timeout, 30 minutes by default, or a restart of vpxd): a
call answered ``vim.fault.NotAuthenticated`` logs in again once and is repeated
(:meth:`Connection.call`). Calls from several threads share the session; pyVmomi's stub
keeps a locked pool of HTTP connections, and login, relogin and logout hold this object's
lock.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any, TypeVar

from pyVim import connect
from pyVmomi import vim

from providers.base import ProviderError
from providers.vsphere._errors import CertificateMismatch, Operation, session_expired, translate
from providers.vsphere.config import VsphereProviderConfig

log = logging.getLogger("backupd.providers.vsphere")
T = TypeVar("T")
#: the name of vCenter's session cookie (``Set-Cookie`` of ``SessionManager.Login``)
SESSION_COOKIE = "vmware_soap_session"


class PinnedContext(ssl.SSLContext):
    """A client TLS context that accepts exactly one certificate: the one whose SHA-256 is
    ``pin`` (64 lower-case hex digits). Works wherever an :class:`ssl.SSLContext` goes
    (``http.client``, urllib3), checking after each handshake.

    :raises CertificateMismatch: from :meth:`wrap_socket`, when the peer's certificate has
        another thumbprint (the socket is closed).
    """

    pin: str

    def __new__(cls, pin: str) -> "PinnedContext":
        context = super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)
        context.pin = pin
        context.check_hostname = False  # the pin is the trust, not the chain or the name
        context.verify_mode = ssl.CERT_NONE
        return context

    def __init__(self, pin: str) -> None:  # SSLContext does its set-up in __new__
        pass

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        wrapped = super().wrap_socket(sock, *args, **kwargs)
        try:
            if not kwargs.get("do_handshake_on_connect", True):
                wrapped.do_handshake()
            der = wrapped.getpeercert(binary_form=True)
            actual = hashlib.sha256(der or b"").hexdigest()
            if actual != self.pin:
                raise CertificateMismatch(
                    f"the server's certificate has SHA-256 thumbprint {_colons(actual)}, not the pinned"
                    f" {_colons(self.pin)}"
                )
        except BaseException:
            wrapped.close()
            raise
        return wrapped


def _colons(hexdigest: str) -> str:
    return "SHA256:" + ":".join(hexdigest[i : i + 2] for i in range(0, len(hexdigest), 2)).upper()


def ssl_context(config: VsphereProviderConfig) -> ssl.SSLContext | None:
    """The TLS context for the vCenter's API and datastore endpoint; None for ``http``."""
    if config.protocol == "http":
        return None
    if config.thumbprint is not None:
        return PinnedContext(config.thumbprint)
    if config.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file is not None else None)


class Connection:
    """The provider's session with one vCenter, opened on first use.

    :param provider_name: the config section's name, for messages.
    """

    def __init__(self, provider_name: str, config: VsphereProviderConfig) -> None:
        self.config = config
        self.provider_name = provider_name
        self.context = ssl_context(config)
        self._lock = threading.Lock()
        self._si: vim.ServiceInstance | None = None
        self._content: vim.ServiceInstanceContent | None = None
        self._generation = 0
        self._closed = False

    @property
    def base_url(self) -> str:
        """``https://host:port`` (or ``http://``), for the datastore endpoint."""
        host = f"[{self.config.host}]" if ":" in self.config.host and not self.config.host.startswith("[") else self.config.host
        return f"{self.config.protocol}://{host}:{self.config.port}"

    def content(self) -> vim.ServiceInstanceContent:
        """The ServiceInstance's content (root folder, view and property managers ...),
        logging in first when there is no session.

        :raises ProviderError: login failed (wrong password: not transient).
        :raises TransientProviderError: the vCenter could not be reached.
        """
        with self._lock:
            if self._content is None:
                self._login()
            assert self._content is not None
            return self._content

    def session_cookie(self) -> str:
        """``vmware_soap_session=...`` of the current session, for the datastore endpoint."""
        self.content()
        assert self._si is not None
        cookie = SimpleCookie(self._si._stub.cookie)
        morsel = cookie.get(SESSION_COOKIE)
        if morsel is None:
            raise ProviderError(f"provider {self.provider_name!r}: the vCenter sent no {SESSION_COOKIE} cookie at login")
        return f"{SESSION_COOKIE}={morsel.coded_value}"

    def call(self, operation: Operation, function: Callable[[vim.ServiceInstanceContent], T]) -> T:
        """``function(content)``, its errors translated for ``operation``; on an expired session
        (``NotAuthenticated``) logs in again once and calls it again.

        :raises ProviderError: mapped by :func:`providers.vsphere._errors.translate`.
        """
        for attempt in (1, 2):
            content = self._content_for(operation)
            generation = self._generation
            try:
                return function(content)
            except ProviderError:
                raise
            except Exception as exc:  # noqa: BLE001 - every error is translated at this boundary
                if attempt == 1 and session_expired(exc):
                    self.relogin(generation)
                    continue
                raise translate(exc, operation) from exc
        raise AssertionError("unreachable")

    def relogin(self, generation: int | None = None) -> None:
        """Drop the session and log in again; with ``generation``, only when no other thread has
        done it since that generation was current."""
        with self._lock:
            if generation is not None and generation != self._generation:
                return
            log.info("provider %s: the vCenter session expired, logging in again", self.provider_name)
            self._drop()
            self._login()

    def _content_for(self, operation: Operation) -> vim.ServiceInstanceContent:
        try:
            return self.content()
        except ProviderError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise translate(exc, Operation(f"connecting to vCenter {self.config.host} ({operation.what})")) from exc

    def _login(self) -> None:
        if self._closed:
            raise ProviderError(f"provider {self.provider_name!r} is closed")
        config = self.config
        password = config.password()
        if config.insecure:
            log.warning(
                "provider %s: TLS certificate verification is OFF (insecure = true): anyone between"
                " backupd and %s can read the password and the disks", self.provider_name, config.host,
            )
        si = connect.SmartConnect(
            protocol=config.protocol,
            host=config.host,
            port=config.port,
            user=config.user,
            pwd=password,
            sslContext=self.context,
            httpConnectionTimeout=config.timeout_seconds,
            disableSslCertValidation=config.insecure,
        )
        self._si = si
        self._content = si.RetrieveContent()
        self._generation += 1

    def _drop(self) -> None:
        if self._si is not None:
            try:
                self._si._stub.DropConnections()
            except Exception:  # noqa: BLE001 - the pool is being thrown away
                pass
        self._si = None
        self._content = None

    def close(self) -> None:
        """Log out and drop the HTTP connections. Idempotent; errors while logging out are
        logged, not raised (the session expires on its own)."""
        with self._lock:
            self._closed = True
            if self._content is not None:
                try:
                    self._content.sessionManager.Logout()
                except Exception as exc:  # noqa: BLE001
                    log.info("provider %s: logout failed: %s", self.provider_name, exc)
            self._drop()
