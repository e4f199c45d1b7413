"""The vSphere error mapping (:mod:`providers.vsphere._errors`): every fault a called method
declares, and every runtime fault, has a deliberate entry; network and HTTP errors map as
documented; translated errors keep the original as their cause."""

from __future__ import annotations

import http.client
import socket
import ssl

import pytest
import urllib3.exceptions
from pyVmomi import VmomiSupport, vim, vmodl

from providers.base import (
    CbtUnavailable,
    DiskReadError,
    ProviderError,
    QuiesceError,
    SnapshotError,
    TransientProviderError,
    VmNotFound,
)
from providers.vsphere._cbt import query_operation
from providers.vsphere._errors import (
    CALLED_METHODS,
    FAULTS,
    CertificateMismatch,
    Kind,
    Operation,
    fault_kind,
    http_status_kind,
    network_kind,
    translate,
)

#: the explicit defaults: a fault whose nearest entry is one of these was never decided on
ROOTS = {"vmodl.MethodFault", "vmodl.RuntimeFault", "vim.fault.VimFault"}


def all_fault_types() -> list[type]:
    """Every vim.fault.* / vmodl.fault.* type pyVmomi knows."""
    names = sorted(n for n in VmomiSupport._dataDefMap if n.startswith(("vim.fault.", "vmodl.fault.")))
    types = [VmomiSupport.GetVmodlType(name) for name in names]
    return [t for t in types if isinstance(t, type) and issubclass(t, vmodl.MethodFault)]


def subclasses(fault_type: type) -> set[type]:
    found = {fault_type}
    for sub in fault_type.__subclasses__():
        found |= subclasses(sub)
    return found


def faults_the_provider_can_meet() -> set[type]:
    """Declared faults of every called method (and their subclasses), and every runtime fault.

    A method declaring a root itself (``Destroy_Task``: ``vim.fault.VimFault``) says nothing
    more particular: the explicit default is the deliberate answer for it."""
    all_fault_types()  # loads every lazy type, so __subclasses__ sees them all
    met: set[type] = set()
    for type_name, method in CALLED_METHODS:
        info = VmomiSupport.GetVmodlType(type_name)._GetMethodInfo(method)
        for fault in info.faults:
            declared = VmomiSupport.GetVmodlType(fault)
            met |= {declared} if fault in ROOTS else subclasses(declared)
    return met | subclasses(vmodl.RuntimeFault)


def test_every_table_entry_names_a_fault_type_pyvmomi_knows() -> None:
    for name in FAULTS:
        assert issubclass(VmomiSupport.GetVmodlType(name), vmodl.MethodFault), name


def test_every_fault_type_pyvmomi_knows_maps_to_a_kind() -> None:
    faults = all_fault_types()

    assert len(faults) > 500
    for fault in faults:
        kind, entry = fault_kind(fault)
        assert isinstance(kind, Kind) and entry in FAULTS


def test_every_fault_the_provider_can_meet_has_a_deliberate_entry() -> None:
    undecided = sorted(
        VmomiSupport.GetVmodlName(fault)
        for fault in faults_the_provider_can_meet()
        if fault_kind(fault)[1] in ROOTS and VmomiSupport.GetVmodlName(fault) not in ROOTS
    )

    assert undecided == [], f"faults a called method can raise with no entry in FAULTS: {undecided}"


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (vim.fault.NotAuthenticated, Kind.AUTH),
        (vmodl.fault.HostCommunication, Kind.TRANSIENT),
        (vmodl.fault.HostNotReachable, Kind.TRANSIENT),
        (vim.fault.TaskInProgress, Kind.TRANSIENT),
        (vim.fault.ApplicationQuiesceFault, Kind.QUIESCE),
        (vim.fault.ToolsUnavailable, Kind.QUIESCE),
        (vmodl.fault.ManagedObjectNotFound, Kind.GONE),
        (vim.fault.FileNotFound, Kind.GONE),
        (vim.fault.FileLocked, Kind.TRANSIENT),
        (vim.fault.NoPermission, Kind.PERMISSION),
        (vim.fault.InvalidLogin, Kind.FAILED),
        (vim.fault.SnapshotDisabled, Kind.FAILED),
        (vim.fault.NoDiskSpace, Kind.FAILED),
    ],
)
def test_fault_kinds_of_the_issue(fault: type, kind: Kind) -> None:
    assert fault_kind(fault)[0] is kind


def test_a_quiesce_fault_in_a_snapshot_creation_is_a_quiesce_error_caused_by_the_fault() -> None:
    fault = vim.fault.ApplicationQuiesceFault(msg="VSS writer timed out")

    error = translate(fault, Operation("creating snapshot 'b' of VM 'web'", failed=SnapshotError))

    assert type(error) is QuiesceError
    assert "ApplicationQuiesceFault" in str(error) and "VSS writer timed out" in str(error)


def test_gone_and_failed_take_the_operation_classes() -> None:
    operation = Operation("listing", failed=SnapshotError, gone=VmNotFound)

    assert type(translate(vmodl.fault.ManagedObjectNotFound(), operation)) is VmNotFound
    assert type(translate(vim.fault.SnapshotDisabled(), operation)) is SnapshotError
    assert type(translate(vim.fault.TaskInProgress(), operation)) is TransientProviderError


def test_a_missing_privilege_is_named() -> None:
    error = translate(vim.fault.NoPermission(privilegeId="VirtualMachine.State.CreateSnapshot"), Operation("x"))

    assert "VirtualMachine.State.CreateSnapshot" in str(error)
    assert not isinstance(error, TransientProviderError)


def test_an_invalid_change_id_is_cbt_unavailable_but_a_gone_snapshot_is_a_snapshot_error() -> None:
    operation = query_operation("QueryChangedDiskAreas")

    assert type(translate(vmodl.fault.InvalidArgument(invalidProperty="changeId"), operation)) is CbtUnavailable
    assert type(translate(vim.fault.FileFault(), operation)) is CbtUnavailable
    assert type(translate(vmodl.fault.MethodNotFound(), operation)) is CbtUnavailable
    assert type(translate(vmodl.fault.ManagedObjectNotFound(), operation)) is SnapshotError
    assert type(translate(vmodl.fault.HostCommunication(), operation)) is TransientProviderError


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(104, "Connection reset by peer"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
        socket.timeout("timed out"),
        socket.gaierror(-3, "Temporary failure in name resolution"),
        http.client.RemoteDisconnected("Remote end closed connection without response"),
        http.client.IncompleteRead(b"", 10),
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
        urllib3.exceptions.ProtocolError("Connection aborted."),
        urllib3.exceptions.ReadTimeoutError(None, "/folder", "Read timed out."),
        OSError(101, "Network is unreachable"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_network_errors_are_transient(error: BaseException) -> None:
    assert network_kind(error) is Kind.TRANSIENT
    assert type(translate(error, Operation("reading", failed=DiskReadError))) is TransientProviderError


def test_an_untrusted_certificate_is_permanent_even_wrapped_by_urllib3() -> None:
    verification = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed certificate")
    wrapped = urllib3.exceptions.MaxRetryError(None, "/folder", reason=urllib3.exceptions.SSLError(verification))
    wrapped.reason.__cause__ = verification

    assert network_kind(verification) is Kind.FAILED
    assert network_kind(wrapped) is Kind.FAILED
    assert network_kind(CertificateMismatch("pinned thumbprint differs")) is Kind.FAILED


@pytest.mark.parametrize(
    ("status", "kind"),
    [(401, Kind.AUTH), (403, Kind.PERMISSION), (404, Kind.GONE), (400, Kind.FAILED), (408, Kind.TRANSIENT),
     (429, Kind.TRANSIENT), (500, Kind.TRANSIENT), (502, Kind.TRANSIENT), (503, Kind.TRANSIENT),
     (504, Kind.TRANSIENT), (501, Kind.FAILED)],
)
def test_http_statuses_of_the_datastore_endpoint(status: int, kind: Kind) -> None:
    assert http_status_kind(status) is kind


def test_anything_else_is_a_failure_of_the_operation_never_silently_transient() -> None:
    error = translate(TypeError("For 'entity' expected type vim.ManagedEntity"), Operation("removing", failed=SnapshotError))

    assert type(error) is SnapshotError


def test_a_provider_error_passes_through_unchanged() -> None:
    original = DiskReadError("already mapped")

    assert translate(original, Operation("x")) is original
    assert isinstance(translate(ValueError("x"), Operation("x")), ProviderError)
