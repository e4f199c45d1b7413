"""The vSphere simulator for tests: builds and runs ``contrib/vcsim`` (``backupd-vcsim``, a
launcher of the project's own on VMware's govmomi ``simulator`` package as Debian ships it).

Needs Go and the govmomi source, from the Debian packages named in :data:`DEBIAN_PACKAGES`;
:func:`unavailable_reason` says what is missing. The launcher is built once into
``.build/vcsim/`` (git-ignored) under a name keyed by a hash of its Go source, so a changed
source is rebuilt and concurrent test processes share one build (a file lock).

Typical use::

    with Vcsim({"vms": [{"name": "web-01", "disks": [{"image": str(img)}]}]}, tmp_path) as sim:
        si = SmartConnect(host=sim.host, port=sim.port, user=sim.user, pwd=sim.password,
                          protocol="http")
        sim.fault("CreateSnapshot_Task", "web-01", "ApplicationQuiesceFault", times=1)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import selectors
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIR = REPO / "contrib" / "vcsim"
BUILD_DIR = REPO / ".build" / "vcsim"
#: where Debian's golang-github-vmware-govmomi-dev puts the source (GOPATH layout)
GOPATH = Path("/usr/share/gocode")
GOVMOMI_SIMULATOR = GOPATH / "src/github.com/vmware/govmomi/simulator"
DEBIAN_PACKAGES = ("golang-go", "golang-github-vmware-govmomi-dev")
READY_PREFIX = "BACKUPD_VCSIM "
#: seconds: a cold build takes ~20-50 s on a busy 2-core machine; start-up about one
BUILD_TIMEOUT = 600
START_TIMEOUT = 60


class VcsimUnavailable(RuntimeError):
    """Go or the govmomi source is missing (the message names the Debian packages), or the
    launcher did not build or start (the message carries its output)."""


def go_binary() -> str | None:
    """The ``go`` command: on PATH, or Debian's /usr/lib/go/bin/go."""
    debian = "/usr/lib/go/bin/go"
    return shutil.which("go") or (debian if os.access(debian, os.X_OK) else None)


def unavailable_reason() -> str | None:
    """Why the simulator cannot run here, or None when Go and the govmomi source are present."""
    missing = []
    if go_binary() is None:
        missing.append("go (Debian package golang-go)")
    if not GOVMOMI_SIMULATOR.is_dir():
        missing.append(f"the govmomi source in {GOVMOMI_SIMULATOR} (Debian package golang-github-vmware-govmomi-dev)")
    if not missing:
        return None
    return (
        f"vSphere simulator unavailable: missing {' and '.join(missing)}; "
        f"install with: apt-get install -y {' '.join(DEBIAN_PACKAGES)}"
    )


def source_hash() -> str:
    """A hash of the launcher's Go source (names and contents), 16 hex digits."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.glob("*.go")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_launcher() -> Path:
    """The launcher binary for the current source, built if needed (GOPATH mode against the
    Debian govmomi tree, GOCACHE inside the build folder). Raises VcsimUnavailable."""
    reason = unavailable_reason()
    if reason:
        raise VcsimUnavailable(reason)
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    binary = BUILD_DIR / f"backupd-vcsim-{source_hash()}"
    with open(BUILD_DIR / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        for stale in BUILD_DIR.glob("backupd-vcsim-*"):
            stale.unlink(missing_ok=True)
        env = dict(os.environ, GOPATH=str(GOPATH), GO111MODULE="off", GOCACHE=str(BUILD_DIR / "gocache"), GOFLAGS="")
        partial = binary.with_suffix(".partial")
        result = subprocess.run(
            [go_binary(), "build", "-o", str(partial), "./contrib/vcsim"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
        )
        if result.returncode != 0:
            raise VcsimUnavailable(f"building contrib/vcsim failed:\n{result.stdout}{result.stderr}")
        partial.replace(binary)
        return binary


class Vcsim:
    """A running launcher serving ``spec`` (the JSON spec of contrib/vcsim/README.md, as a
    dict) with its datastore in ``tmpdir/datastore``; a context manager (stops on exit).

    Attributes after start: url, host, port, user, password, thumbprint ("AB:CD:..." SHA-256,
    "" without TLS), cert_path (PEM, None without TLS), datacenter, datastore,
    datastore_dir (Path), control_url.
    """

    def __init__(self, spec: dict[str, Any], tmpdir: Path, tls: bool = False, extra_args: tuple[str, ...] = ()):
        self.spec = spec
        self.tmpdir = Path(tmpdir)
        self.tls = tls
        self.extra_args = extra_args
        self.process: subprocess.Popen[str] | None = None

    # -- life cycle -----------------------------------------------------------------
    def start(self) -> Vcsim:
        """Build if needed, start and wait for the ready line (START_TIMEOUT seconds).
        Raises VcsimUnavailable with the launcher's stderr when it exits or stays silent."""
        binary = build_launcher()
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        spec_file = self.tmpdir / "vcsim-spec.json"
        spec_file.write_text(json.dumps(self.spec))
        self.datastore_dir = self.tmpdir / "datastore"
        self.stderr_path = self.tmpdir / "vcsim-stderr.log"
        args = [str(binary), "-listen", "127.0.0.1:0", "-spec", str(spec_file), "-dir", str(self.datastore_dir)]
        if self.tls:
            args.append("-tls")
        args.extend(self.extra_args)
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True)
        ready = self._read_ready_line()
        self.url: str = ready["url"]
        parts = urlsplit(self.url)
        self.host: str = parts.hostname or "127.0.0.1"
        self.port: int = parts.port or (443 if parts.scheme == "https" else 80)
        self.user: str = ready["user"]
        self.password: str = ready["password"]
        self.thumbprint: str = ready["thumbprint"]
        self.cert_path: str | None = ready["cert"] or None
        self.datacenter: str = ready["datacenter"]
        self.datastore: str = ready["datastore"]
        self.control_url: str = ready["control"]
        return self

    def _read_ready_line(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    line = self.process.stdout.readline()
                    if line.startswith(READY_PREFIX):
                        return json.loads(line[len(READY_PREFIX):])
                    if line == "":  # exited
                        break
        self.stop()
        raise VcsimUnavailable(f"backupd-vcsim did not start:\n{self.stderr_path.read_text()}")

    def stop(self) -> None:
        """SIGTERM and wait (then SIGKILL after 10 s); idempotent."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()
        self.process = None

    def __enter__(self) -> Vcsim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connection helpers ---------------------------------------------------------
    @property
    def protocol(self) -> str:
        """"https" with tls, else "http" (pyVmomi's SmartConnect ``protocol``)."""
        return "https" if self.tls else "http"

    def ssl_context(self) -> ssl.SSLContext | None:
        """A context trusting only the launcher's certificate (None without TLS)."""
        if not self.cert_path:
            return None
        context = ssl.create_default_context(cafile=self.cert_path)
        return context

    def folder_url(self, path: str) -> str:
        """The datastore HTTP URL of ``path`` (relative to the datastore root)."""
        base = f"{self.protocol}://{self.host}:{self.port}"
        return f"{base}/folder/{path}?dcPath={self.datacenter}&dsName={self.datastore}"

    def provider_values(self, password_env: str, *, trust: str = "thumbprint") -> dict[str, Any]:
        """A ``[providers.NAME]`` section (``type = "vsphere"``) pointing at this launcher, the
        password read from ``password_env`` (the caller sets it to :attr:`password`).

        :param trust: with TLS, ``"thumbprint"`` (pin the certificate) or ``"ca_file"`` (its
            PEM as the CA); ignored over http.
        :raises ValueError: another ``trust``.
        """
        values: dict[str, Any] = {
            "type": "vsphere", "host": self.host, "port": self.port, "user": self.user,
            "password_env": password_env, "protocol": self.protocol, "datacenter": self.datacenter,
        }
        if self.tls:
            if trust not in ("thumbprint", "ca_file"):
                raise ValueError(f"trust must be 'thumbprint' or 'ca_file', not {trust!r}")
            values[trust] = self.thumbprint if trust == "thumbprint" else self.cert_path
        return values

    # -- control API ----------------------------------------------------------------
    def _control(self, call: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.control_url}/{call}",
            data=None if body is None else json.dumps(body).encode(),
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.ssl_context()) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"backupd-vcsim control {call}: {exc.code} {exc.read().decode()}") from exc

    def fault(self, method: str, vm: str, fault: str, times: int = 1) -> None:
        """The next ``times`` calls of SOAP ``method`` (e.g. "CreateSnapshot_Task") on VM
        ``vm`` (name, inventory path or "*") fail with vim fault ``fault`` (e.g.
        "ApplicationQuiesceFault"): a task method's task fails, another call faults."""
        self._control("fault", {"method": method, "vm": vm, "fault": fault, "times": times})

    def clear_faults(self) -> None:
        """Drop pending faults, 503s and the snapshot delay."""
        self._control("clear-faults", {})

    def http_503(self, times: int = 1) -> None:
        """The next ``times`` /folder requests answer HTTP 503."""
        self._control("http-503", {"times": times})

    def expire_sessions(self) -> int:
        """End every session (next call: NotAuthenticated; a new login works); how many."""
        return self._control("expire-sessions", {})["expired"]

    def rename(self, vm: str, new_name: str) -> None:
        """Rename VM ``vm`` (Rename_Task: its instanceUuid stays)."""
        self._control("rename", {"vm": vm, "new_name": new_name})

    def cbt_reset(self, vm: str) -> None:
        """Invalidate every changeId of VM ``vm`` (as a CBT reset on vCenter)."""
        self._control("cbt-reset", {"vm": vm})

    def slow_snapshots(self, seconds: float) -> None:
        """CreateSnapshot_Task answers a running task that finishes after ``seconds``
        (0: immediately again); CancelTask cancels it before then."""
        self._control("slow-snapshots", {"seconds": seconds})

    def state(self) -> dict[str, Any]:
        """{"vms": [{name, moref, instance_uuid, path, power_state, cbt_enabled,
        snapshots: [{name, moref}], disks: [{key, file, capacity_bytes, change_id}]}],
        "files": [{path, size}], "faults": [...], "http_503": n, "slow_snapshot_seconds": s,
        "creating_snapshots": {vm name: slow snapshot tasks still running}}"""
        return self._control("state")

    def flat_file(self, vm: str, disk: int = 0) -> Path:
        """The data extent (``-flat.vmdk``) of disk number ``disk`` (0-based, device order) of
        VM ``vm``: a guest write is a write into it (for a spec ``image`` it is a symbolic link
        to the image)."""
        datastore_path = self.vm_state(vm)["disks"][disk]["file"]  # "[LocalDS_0] web/web.vmdk"
        relative = datastore_path.split("] ", 1)[1]
        return self.datastore_dir / (relative[: -len(".vmdk")] + "-flat.vmdk")

    def guest_write(self, vm: str, disk: int, offset: int, data: bytes) -> None:
        """Write ``data`` at byte ``offset`` of disk ``disk`` of VM ``vm``, as its guest would."""
        with open(self.flat_file(vm, disk), "r+b") as f:
            f.seek(offset)
            f.write(data)

    def vm_state(self, name: str) -> dict[str, Any]:
        """The ``state()`` entry of the one VM named ``name`` (or with that inventory path)."""
        matches = [vm for vm in self.state()["vms"] if name in (vm["name"], vm["path"])]
        if len(matches) != 1:
            raise LookupError(f"{len(matches)} VMs named {name!r} in the simulator")
        return matches[0]
