"""Every error the vSphere provider can meet, mapped into the :mod:`providers.base` tree.

Three families reach the provider's boundary:

- SOAP faults (pyVmomi raises them as exceptions): ``vim.fault.*`` and ``vmodl.fault.*``. The
  table :data:`FAULTS` gives each fault type backupd can meet a :class:`Kind`; a fault type
  not in the table takes the kind of its nearest ancestor that is (``vim.fault.FileFault``
  covers ``FileNotFound``, ``FileLocked`` ...), and the roots ``vim.fault.VimFault``,
  ``vmodl.RuntimeFault`` and ``vmodl.MethodFault`` are the explicit default: the operation
  failed, not retried. ``tests/unit/test_vsphere_errors.py`` fails when a fault declared by
  a method the provider calls (:data:`CALLED_METHODS`), or any runtime fault, falls through
  to that default without a deliberate entry.
- HTTP answers of the datastore endpoint (:func:`http_status_kind`): 401 the session
  expired, 403 a privilege is missing, 404 the file is gone, 416 a range past the end, 429
  and 5xx transient.
- Network errors (:func:`translate`): a connection reset, refused or timed out, a TLS error
  other than a certificate that fails verification, ``http.client`` protocol errors and
  urllib3's are transient; a certificate that fails verification (or a pinned thumbprint
  that does not match) is permanent: retrying cannot fix trust.

A :class:`Kind` becomes an exception class only with the operation's :class:`Operation`:
"failed" in a snapshot creation is a :class:`~providers.base.SnapshotError`, in a disk read
a :class:`~providers.base.DiskReadError`. Every translated exception is raised ``from`` the
original.
"""

from __future__ import annotations

import enum
import http.client
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

import urllib3.exceptions
from pyVmomi import vmodl

from providers.base import (
    ProviderError,
    QuiesceError,
    SnapshotError,
    TransientProviderError,
)


class Kind(enum.Enum):
    """What a fault means to backupd."""

    #: a retry may succeed (busy host, lost connection, a task in progress, a timeout)
    TRANSIENT = "transient"
    #: the guest could not be quiesced
    QUIESCE = "quiesce"
    #: the object named is gone (VM, snapshot, file)
    GONE = "gone"
    #: the session is not (or no longer) authenticated: log in again, then retry
    AUTH = "auth"
    #: a missing vCenter privilege: permanent, the message names the privilege
    PERMISSION = "permission"
    #: the operation failed and will fail again
    FAILED = "failed"


#: fault type name (pyVmomi's ``vim.fault.X`` / ``vmodl.fault.X``) → kind; a fault type takes
#: the entry of its nearest ancestor in this table
FAULTS: Mapping[str, Kind] = {
    # the explicit defaults: a fault of the operation that no entry below names
    "vmodl.MethodFault": Kind.FAILED,
    "vmodl.RuntimeFault": Kind.FAILED,
    "vim.fault.VimFault": Kind.FAILED,
    # runtime faults (any method may raise them: vSphere API reference, "Faults" of every method)
    "vmodl.fault.HostCommunication": Kind.TRANSIENT,  # HostNotConnected, HostNotReachable
    "vmodl.fault.SystemError": Kind.TRANSIENT,  # vpxd's internal error; clears on a later call
    "vmodl.fault.RequestCanceled": Kind.TRANSIENT,  # the server dropped the request
    "vmodl.fault.ManagedObjectNotFound": Kind.GONE,  # the VM / snapshot moref does not exist
    "vmodl.fault.InvalidArgument": Kind.FAILED,
    "vmodl.fault.InvalidRequest": Kind.FAILED,  # incl. MethodNotFound: unsupported API version
    "vmodl.fault.NotSupported": Kind.FAILED,
    "vmodl.fault.NotImplemented": Kind.FAILED,
    "vmodl.fault.SecurityError": Kind.PERMISSION,  # incl. NotEnoughLicenses' siblings
    "vmodl.fault.NotEnoughLicenses": Kind.FAILED,
    "vmodl.fault.InvalidToken": Kind.AUTH,
    "vmodl.fault.SessionNotFound": Kind.AUTH,
    "vmodl.fault.AuthenticationRequired": Kind.AUTH,
    "vmodl.fault.UnexpectedFault": Kind.FAILED,
    "vmodl.query.InvalidProperty": Kind.FAILED,  # a property path this vCenter version lacks
    "vim.fault.NotAuthenticated": Kind.AUTH,  # session expired: relogin
    "vim.fault.VAppOperationInProgress": Kind.TRANSIENT,
    "vim.fault.DisallowedChangeByService": Kind.FAILED,  # another solution (SRM, vSAN) owns the VM
    "vim.fault.OperationDisallowedOnHost": Kind.FAILED,
    "vim.fault.DisallowedOperationOnFailoverHost": Kind.FAILED,
    "vim.fault.MethodAlreadyDisabledFault": Kind.FAILED,
    "vim.fault.FailToLockFaultToleranceVMs": Kind.TRANSIENT,
    "vim.fault.ConflictingDatastoreFound": Kind.FAILED,
    # runtime faults of administration methods backupd does not call: failures if ever met
    "vim.fault.CannotDisableDrsOnClustersWithVApps": Kind.FAILED,
    "vim.fault.InvalidProfileReferenceHost": Kind.FAILED,
    "vim.fault.InvalidScheduledTask": Kind.FAILED,
    "vim.fault.LicenseAssignmentFailed": Kind.FAILED,
    "vim.fault.ThirdPartyLicenseAssignmentFailed": Kind.FAILED,
    "vim.fault.NoPermission": Kind.PERMISSION,
    "vim.fault.InvalidLogin": Kind.FAILED,  # wrong user or password: retrying locks the account
    "vim.fault.InvalidLocale": Kind.FAILED,
    "vim.fault.RestrictedByAdministrator": Kind.PERMISSION,
    "vim.fault.MethodDisabled": Kind.TRANSIENT,  # another solution disabled it for a while
    "vim.fault.DatabaseError": Kind.TRANSIENT,
    "vim.fault.HostConnectFault": Kind.TRANSIENT,
    "vim.fault.HostPowerOpFailed": Kind.FAILED,
    "vim.fault.Timedout": Kind.TRANSIENT,
    "vim.fault.TaskInProgress": Kind.TRANSIENT,  # incl. VAppTaskInProgress
    "vim.fault.ConcurrentAccess": Kind.TRANSIENT,
    "vim.fault.ResourceInUse": Kind.TRANSIENT,
    "vim.fault.InvalidState": Kind.TRANSIENT,  # e.g. a host in maintenance, a VM being migrated
    "vim.fault.InvalidPowerState": Kind.FAILED,
    "vim.fault.InvalidDatastore": Kind.FAILED,  # incl. InaccessibleDatastore
    "vim.fault.InaccessibleDatastore": Kind.TRANSIENT,  # all paths down for a moment
    "vim.fault.InsufficientResourcesFault": Kind.FAILED,
    "vim.fault.NotFound": Kind.GONE,
    "vim.fault.ToolsUnavailable": Kind.QUIESCE,
    # snapshots (CreateSnapshot_Task, RemoveSnapshot_Task: vSphere API reference)
    "vim.fault.SnapshotFault": Kind.FAILED,  # disabled, too many levels, incompatible devices ...
    "vim.fault.ApplicationQuiesceFault": Kind.QUIESCE,
    "vim.fault.FilesystemQuiesceFault": Kind.QUIESCE,
    "vim.fault.SnapshotLocked": Kind.TRANSIENT,
    "vim.fault.SnapshotNoChange": Kind.FAILED,
    "vim.fault.VmConfigFault": Kind.FAILED,
    "vim.fault.InvalidName": Kind.FAILED,
    "vim.fault.DuplicateName": Kind.FAILED,
    "vim.fault.AlreadyExists": Kind.FAILED,
    "vim.fault.OutOfBounds": Kind.FAILED,
    "vim.fault.FileFault": Kind.FAILED,
    "vim.fault.FileNotFound": Kind.GONE,
    "vim.fault.FileLocked": Kind.TRANSIENT,  # another process (a backup proxy, HA) holds it
    "vim.fault.NoDiskSpace": Kind.FAILED,
    "vim.fault.InvalidFolder": Kind.FAILED,
    "vim.fault.InvalidDeviceSpec": Kind.FAILED,
    "vim.fault.VmWwnConflict": Kind.FAILED,
    "vim.fault.RemoveFailed": Kind.FAILED,
}

#: managed methods the provider calls, (managed object type, method name): their declared
#: faults must each have a deliberate entry in :data:`FAULTS` (the test checks)
CALLED_METHODS: tuple[tuple[str, str], ...] = (
    ("vim.SessionManager", "Login"),
    ("vim.SessionManager", "Logout"),
    ("vim.view.ViewManager", "CreateContainerView"),
    ("vim.view.View", "Destroy"),
    ("vmodl.query.PropertyCollector", "RetrievePropertiesEx"),
    ("vmodl.query.PropertyCollector", "ContinueRetrievePropertiesEx"),
    ("vim.VirtualMachine", "CreateSnapshot"),
    ("vim.vm.Snapshot", "Remove"),
    ("vim.VirtualMachine", "QueryChangedDiskAreas"),
    ("vim.VirtualMachine", "Reconfigure"),
    ("vim.Folder", "CreateVm"),
    ("vim.ManagedEntity", "Destroy"),
    ("vim.FileManager", "DeleteFile"),
    ("vim.FileManager", "MakeDirectory"),
    ("vim.Task", "Cancel"),
)


def fault_kind(fault_type: type) -> tuple[Kind, str]:
    """The kind of a pyVmomi fault type and the table entry that decided it.

    :returns: (kind, the name of the nearest ancestor of ``fault_type`` in :data:`FAULTS`).
    :raises TypeError: ``fault_type`` is not a ``vmodl.MethodFault``.
    """
    if not (isinstance(fault_type, type) and issubclass(fault_type, vmodl.MethodFault)):
        raise TypeError(f"{fault_type!r} is not a vmodl.MethodFault type")
    for ancestor in fault_type.__mro__:
        name = getattr(ancestor, "_wsdlName", None) and _vmodl_name(ancestor)
        if name in FAULTS:
            return FAULTS[name], name
    raise AssertionError("vmodl.MethodFault is in FAULTS")  # unreachable: the root is mapped


def _vmodl_name(fault_type: type) -> str:
    from pyVmomi import VmomiSupport

    return VmomiSupport.GetVmodlName(fault_type)


def session_expired(exc: BaseException) -> bool:
    """Whether ``exc`` is a fault saying the session is gone (``NotAuthenticated`` ...): the
    caller logs in again and repeats the call."""
    return isinstance(exc, vmodl.MethodFault) and fault_kind(type(exc))[0] is Kind.AUTH


def http_status_kind(status: int) -> Kind:
    """The kind of an HTTP status of the datastore endpoint (``/folder``), for statuses that are
    not success (2xx)."""
    if status == 401:
        return Kind.AUTH
    if status == 403:
        return Kind.PERMISSION
    if status == 404:
        return Kind.GONE
    if status in (408, 429) or 500 <= status < 600 and status not in (501, 505):
        return Kind.TRANSIENT
    return Kind.FAILED


@dataclass(frozen=True)
class Operation:
    """What the provider was doing: the words of the message and the class each kind becomes.

    :ivar what: e.g. ``"creating snapshot 'backupd-nightly-12' of VM 'web-01'"``.
    :ivar failed: the class of :attr:`Kind.FAILED` (and of what no class is given for).
    :ivar gone: the class of :attr:`Kind.GONE`; default: :attr:`failed`.
    :ivar overrides: fault type name → class, for faults that mean something particular in
        this operation (``QueryChangedDiskAreas``'s ``InvalidArgument``: an invalid changeId).
    """

    what: str
    failed: type[ProviderError] = ProviderError
    gone: type[ProviderError] | None = None
    overrides: Mapping[str, type[ProviderError]] = field(default_factory=dict)

    def class_of(self, kind: Kind) -> type[ProviderError]:
        """The ProviderError class for a kind, in this operation."""
        if kind is Kind.TRANSIENT or kind is Kind.AUTH:
            return TransientProviderError
        if kind is Kind.QUIESCE:
            return QuiesceError if issubclass(self.failed, SnapshotError) else self.failed
        if kind is Kind.GONE:
            return self.gone or self.failed
        return self.failed


def describe_fault(fault: vmodl.MethodFault) -> str:
    """A fault as one line: its type and its message (``msg``, else its fault messages)."""
    text = getattr(fault, "msg", None) or "; ".join(
        message.message for message in (getattr(fault, "faultMessage", None) or []) if message.message
    )
    privilege = getattr(fault, "privilegeId", None)
    if privilege:
        text = f"{text} (missing privilege {privilege})" if text else f"missing privilege {privilege}"
    return f"{_vmodl_name(type(fault))}: {text}" if text else _vmodl_name(type(fault))


def translate(exc: BaseException, operation: Operation) -> ProviderError:
    """The :class:`ProviderError` for ``exc`` met during ``operation`` (raise it ``from exc``).

    A ProviderError is returned as it is. Anything that is neither a fault, nor a network,
    TLS or HTTP error is a failure of the operation (the default is explicit: never silently
    transient).
    """
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, vmodl.MethodFault):
        for ancestor in type(exc).__mro__:
            override = operation.overrides.get(_vmodl_name(ancestor)) if hasattr(ancestor, "_wsdlName") else None
            if override is not None:
                return override(f"{operation.what}: {describe_fault(exc)}")
        kind, _ = fault_kind(type(exc))
        return operation.class_of(kind)(f"{operation.what}: {describe_fault(exc)}")
    kind = network_kind(exc)
    return operation.class_of(kind)(f"{operation.what}: {type(exc).__name__}: {exc}")


def network_kind(exc: BaseException) -> Kind:
    """The kind of a non-SOAP error: network, TLS, HTTP protocol, urllib3.

    A certificate that fails verification is permanent (:attr:`Kind.FAILED`): no retry makes
    an untrusted vCenter trusted. Other TLS errors, resets, refusals, timeouts, a connection
    closed mid-answer and DNS failures are transient.
    """
    cause: BaseException | None = exc
    while cause is not None:  # urllib3 wraps the real error (MaxRetryError.reason, SSLError)
        if isinstance(cause, ssl.SSLCertVerificationError):  # CertificateMismatch too
            return Kind.FAILED
        inner = getattr(cause, "reason", None)
        cause = inner if isinstance(inner, BaseException) else cause.__cause__ or cause.__context__
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, socket.gaierror, ssl.SSLError)):
        return Kind.TRANSIENT
    if isinstance(exc, (http.client.HTTPException, urllib3.exceptions.HTTPError)):
        return Kind.TRANSIENT
    if isinstance(exc, OSError):
        return Kind.TRANSIENT  # network unreachable, host down, broken pipe
    return Kind.FAILED


class CertificateMismatch(ssl.SSLCertVerificationError):
    """The vCenter's certificate is not the one pinned by ``thumbprint``."""
