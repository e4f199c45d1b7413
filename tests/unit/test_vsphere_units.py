"""The vSphere provider's pieces that need no vCenter: config validation, TLS (the pinned
thumbprint checked on every connection), the CBT loop over partial answers, VM name
resolution, and a snapshot creation that fails leaving nothing behind."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import ssl
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import urllib3
from pydantic import ValidationError

from providers.base import AmbiguousVmName, CbtUnavailable, Disk, Extent, ProviderError, VmInfo, VmNotFound
from providers.vsphere._cbt import changed_areas
from providers.vsphere._connection import PinnedContext, ssl_context
from providers.vsphere._errors import CertificateMismatch
from providers.vsphere._inventory import VmRecord, resolve
from providers.vsphere.config import VsphereProviderConfig, normalise_thumbprint

MiB = 1 << 20


def config(**values: object) -> VsphereProviderConfig:
    return VsphereProviderConfig.model_validate(
        {"type": "vsphere", "host": "vc.example.com", "user": "svc@vsphere.local", "password_env": "VC_PW", **values}
    )


# -- config ---------------------------------------------------------------------------------------


def test_defaults_are_https_on_443_verified_against_system_cas() -> None:
    made = config()

    assert (made.protocol, made.port, made.insecure, made.ca_file, made.thumbprint) == ("https", 443, False, None, None)
    context = ssl_context(made)
    assert context is not None and context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname


def test_a_password_key_is_refused_and_the_password_comes_only_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="password"):
        config(password="hunter2")
    made = config()
    monkeypatch.delenv("VC_PW", raising=False)
    with pytest.raises(ProviderError, match="VC_PW is not set"):
        made.password()
    monkeypatch.setenv("VC_PW", "s3cret")
    assert made.password() == "s3cret"
    assert "s3cret" not in repr(made) and "s3cret" not in made.model_dump_json()


@pytest.mark.parametrize(
    "values",
    [
        {"insecure": True, "thumbprint": "ab" * 32},
        {"thumbprint": "ab" * 32, "ca_file": __file__},
        {"protocol": "http", "insecure": True},
        {"thumbprint": "ab" * 20},  # SHA-1: refused
        {"thumbprint": "not hex"},
        {"ca_file": "/no/such/ca.pem"},
        {"port": 0},
        {"host": ""},
        {"protocol": "ftp"},
    ],
)
def test_contradictory_or_bad_tls_settings_are_refused(values: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        config(**values)


def test_thumbprints_are_normalised_from_the_forms_vcenter_and_openssl_print() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    colons = ":".join(digest[i : i + 2] for i in range(0, 64, 2)).upper()

    assert normalise_thumbprint(f"SHA256:{colons}") == digest
    assert normalise_thumbprint(colons) == digest
    assert normalise_thumbprint(digest.upper()) == digest


def test_the_vsphere_type_is_known_to_the_config_and_open_provider(tmp_path: Path) -> None:
    from backupd.config import load_config

    path = tmp_path / "backupd.toml"
    path.write_text(
        '[providers.vc]\ntype = "vsphere"\nhost = "127.0.0.1"\nport = 8989\nuser = "user"\npassword_env = "VC_PW"\n'
        'protocol = "http"\n[repositories.r]\npath = "repo"\n'
        '[jobs.j]\nprovider = "vc"\nrepository = "r"\nvms = ["DC0/vm/web-01"]\nenable_cbt = false\n'
    )
    loaded = load_config(path)

    assert isinstance(loaded.providers["vc"], VsphereProviderConfig)
    assert loaded.jobs["j"].enable_cbt is False
    from providers import open_provider

    provider = open_provider("vc", loaded.providers["vc"])
    try:
        assert provider.name == "vc"
    finally:
        provider.close()


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """A local HTTPS server with a self-signed certificate: (port, its SHA-256 thumbprint)."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=vc.test"],
        check=True, capture_output=True,
    )
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], hashlib.sha256(der).hexdigest()
    server.shutdown()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_a_pinned_thumbprint_admits_its_certificate_over_http_client_and_urllib3(tls_server: tuple[int, str]) -> None:
    port, thumbprint = tls_server
    context = ssl_context(config(thumbprint=thumbprint))
    assert isinstance(context, PinnedContext)

    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    connection.request("GET", "/")
    assert connection.getresponse().read() == b"ok"
    connection.close()
    pool = urllib3.PoolManager(ssl_context=context, retries=False)
    for _ in range(2):  # every new connection is checked, not only the first
        assert pool.request("GET", f"https://127.0.0.1:{port}/").data == b"ok"
        pool.clear()


def test_a_certificate_other_than_the_pinned_one_is_refused_on_every_connection(tls_server: tuple[int, str]) -> None:
    port, _ = tls_server
    context = ssl_context(config(thumbprint="00" * 32))

    for _ in range(2):
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        with pytest.raises(CertificateMismatch, match="not the pinned"):
            connection.request("GET", "/")
    with pytest.raises(urllib3.exceptions.SSLError):
        urllib3.PoolManager(ssl_context=context, retries=False).request("GET", f"https://127.0.0.1:{port}/")


def test_a_self_signed_certificate_fails_system_ca_verification_and_passes_its_own_ca_file(
    tls_server: tuple[int, str], tmp_path: Path
) -> None:
    port, _ = tls_server
    with pytest.raises(ssl.SSLCertVerificationError):
        http.client.HTTPSConnection("127.0.0.1", port, context=ssl_context(config(host="127.0.0.1")), timeout=10).request("GET", "/")
    pem = ssl.get_server_certificate(("127.0.0.1", port))
    (tmp_path / "ca.pem").write_text(pem)
    trusted = ssl_context(config(ca_file=str(tmp_path / "ca.pem")))
    trusted.check_hostname = False  # the test certificate names vc.test, not 127.0.0.1
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=trusted, timeout=10)
    connection.request("GET", "/")
    assert connection.getresponse().read() == b"ok"


def test_insecure_verifies_nothing_and_http_has_no_context() -> None:
    insecure = ssl_context(config(insecure=True))

    assert insecure is not None and insecure.verify_mode is ssl.CERT_NONE and not insecure.check_hostname
    assert ssl_context(config(protocol="http")) is None


# -- CBT ------------------------------------------------------------------------------------------


def answers(pieces: list[tuple[int, int, list[tuple[int, int]]]]):  # noqa: ANN201
    """A fake QueryChangedDiskAreas answering ``pieces`` in turn; records the start offsets asked."""
    asked: list[int] = []

    def query(start: int) -> SimpleNamespace:
        asked.append(start)
        offset, length, areas = pieces[len(asked) - 1]
        assert offset == start
        return SimpleNamespace(
            startOffset=offset, length=length, changedArea=[SimpleNamespace(start=s, length=n) for s, n in areas]
        )

    return query, asked


def test_changed_areas_are_asked_from_each_answer_s_end_until_the_capacity_is_covered() -> None:
    disk = Disk(key=2000, label="Hard disk 1", capacity_bytes=10 * MiB, change_id="52 a/7")
    query, asked = answers([
        (0, 4 * MiB, [(0, MiB), (3 * MiB, MiB)]),
        (4 * MiB, 4 * MiB, [(4 * MiB, MiB)]),  # touches the previous extent: merged
        (8 * MiB, 2 * MiB, [(9 * MiB, 2 * MiB)]),  # passes the end: clipped
    ])

    extents = changed_areas(query, disk, "52 a/3")

    assert asked == [0, 4 * MiB, 8 * MiB]
    assert extents == [Extent(0, MiB), Extent(3 * MiB, 2 * MiB), Extent(9 * MiB, MiB)]


def test_an_answer_that_does_not_advance_ends_the_loop_with_an_error() -> None:
    disk = Disk(key=2000, label="Hard disk 1", capacity_bytes=4 * MiB, change_id="x")
    query, _ = answers([(0, MiB, []), (MiB, 0, [])])

    with pytest.raises(ProviderError, match="does not advance"):
        changed_areas(query, disk, "*")


def test_without_a_change_id_only_star_is_asked() -> None:
    disk = Disk(key=2000, label="Hard disk 1", capacity_bytes=MiB, change_id=None)
    query, asked = answers([(0, MiB, [(0, 4096)])])

    with pytest.raises(CbtUnavailable):
        changed_areas(query, disk, "52 a/3")
    assert asked == []
    assert changed_areas(query, disk, "*") == [Extent(0, 4096)]


# -- names ----------------------------------------------------------------------------------------


def record(name: str, path: str) -> VmRecord:
    return VmRecord(moref=None, path=path, datacenter=path.split("/")[0], info=VmInfo(name, f"id-{path}", "poweredOn", ()))


def test_a_vm_is_found_by_name_or_by_inventory_path_and_an_ambiguous_name_lists_the_paths() -> None:
    records = [record("web-01", "DC0/vm/prod/web-01"), record("web-01", "DC0/vm/test/web-01"), record("db", "DC1/vm/db")]

    assert resolve(records, "db", where="vc").info.id == "id-DC1/vm/db"
    assert resolve(records, "DC0/vm/test/web-01", where="vc").info.id == "id-DC0/vm/test/web-01"
    with pytest.raises(AmbiguousVmName) as raised:
        resolve(records, "web-01", where="vc")
    assert raised.value.matches == ["DC0/vm/prod/web-01", "DC0/vm/test/web-01"]
    with pytest.raises(VmNotFound, match="DC0/vm/web-01"):
        resolve(records, "DC0/vm/web-01", where="vc")


# -- snapshots ------------------------------------------------------------------------------------


def test_walk_reads_the_whole_snapshot_tree_in_creation_order() -> None:
    from providers.vsphere._snapshots import snapshot_of, walk

    def node(moid: str, hour: int, *children: SimpleNamespace) -> SimpleNamespace:
        return SimpleNamespace(
            snapshot=SimpleNamespace(_moId=moid), name=moid, description=None, quiesced=False,
            createTime=datetime(2026, 1, 1, hour, tzinfo=timezone.utc), childSnapshotList=list(children),
        )

    tree = [node("snapshot-1", 1, node("snapshot-2", 2, node("snapshot-4", 4)), node("snapshot-3", 3))]

    assert [n.snapshot._moId for n in walk(tree)] == ["snapshot-1", "snapshot-2", "snapshot-4", "snapshot-3"]
    assert snapshot_of(tree[0], "web").description == ""
    assert list(walk(None)) == []

