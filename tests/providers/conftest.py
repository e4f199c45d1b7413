"""The providers the contract suite runs against.

Each backend is a :class:`Backend`: the provider, a VM the tests may snapshot and write to
(with at least one disk that holds data and has 1 MiB-aligned free room for 16 MiB of
writes), and the two operations the Provider ABC does not have: a guest write and a CBT reset.
Backends: the simulated hypervisor (its admin API) and vSphere on the project's simulator
launcher (``vcsim_factory``: skipped without Go/govmomi, failed under ``CI``), whose guest
write is a write into the disk's flat file and whose CBT reset is the launcher's control call.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from providers.base import Provider, Snapshot, VmInfo
from providers.simulated import SimulatedProvider
from providers.simulated.config import SimulatedProviderConfig

MiB = 1 << 20


@dataclass(frozen=True)
class Backend:
    """One provider under test.

    :ivar provider: the provider.
    :ivar vm_name: a VM the tests may snapshot and write to; its first disk holds data.
    :ivar guest_write: ``(vm name, disk index, offset, data)``: write as the guest would.
    :ivar reset_cbt: ``(vm name)``: make every earlier changeId of the VM's disks invalid.
    :ivar shared_snapshot_data: why a snapshot's reads see guest writes made after it on this
        backend ("" when they do not, as the contract asks); the test of that skips with it.
    """

    provider: Provider
    vm_name: str
    guest_write: Callable[[str, int, int, bytes], None]
    reset_cbt: Callable[[str], None]
    shared_snapshot_data: str = ""


def _web_image(tmp_path: Path) -> Path:
    """A 32 MiB raw image with data at the start, in the middle and at the end."""
    image = tmp_path / "web.raw"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
        for offset, size in ((0, 64 << 10), (5 * MiB + 100, 300 << 10), (32 * MiB - 4096, 4096)):
            f.seek(offset)
            f.write(os.urandom(size))
    return image


def _simulated(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    image = _web_image(tmp_path)
    config = SimulatedProviderConfig.model_validate(
        {
            "type": "simulated",
            "state_dir": str(tmp_path / "state"),
            "vms": [
                {"name": "web", "disks": [str(image), "8 MiB"]},
                {"name": "db", "disks": ["16 MiB"], "power_state": "poweredOff"},
                {"name": "app", "disks": ["8 MiB"]},
            ],
        }
    )
    provider = SimulatedProvider("sim", config)

    def guest_write(vm_name: str, disk: int, offset: int, data: bytes) -> None:
        provider.write_data(vm_name, disk=disk, offset=offset, data=data)

    return Backend(provider, "web", guest_write, provider.reset_cbt)


def _vsphere(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    from providers.vsphere import VsphereProvider
    from providers.vsphere.config import VsphereProviderConfig

    image = _web_image(tmp_path)
    sim = request.getfixturevalue("vcsim_factory")({"vms": [
        {"name": "web", "cbt": True, "disks": [{"image": str(image)}, {"capacity_bytes": 8 * MiB}]},
        {"name": "db", "cbt": True, "disks": [{"capacity_bytes": 16 * MiB}]},
        {"name": "app", "cbt": True, "disks": [{"capacity_bytes": 8 * MiB}]},
    ]}, extra_args=("-cbt-window", str(4 * MiB)))  # QueryChangedDiskAreas answers in pieces
    request.getfixturevalue("monkeypatch").setenv("BACKUPD_CONTRACT_VC_PASSWORD", sim.password)
    provider = VsphereProvider(
        "vc", VsphereProviderConfig.model_validate(sim.provider_values("BACKUPD_CONTRACT_VC_PASSWORD"))
    )
    for vm in provider.list_vms():
        # a CBT-enabled VM's disks carry a changeId once it has been stunned: as on vCenter,
        # the launcher's VMs get theirs at their first snapshot
        provider.remove_snapshot(provider.create_snapshot(vm, name="backupd-contract-setup", description="", quiesce=False))
    return Backend(
        provider, "web", sim.guest_write, sim.cbt_reset,
        shared_snapshot_data="the launcher writes no delta disks: a snapshot reads the live disk (contrib/vcsim/README.md)",
    )


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Backend]] = {"simulated": _simulated, "vsphere": _vsphere}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    made = BACKENDS[request.param](request, tmp_path)
    yield made
    made.provider.close()


@pytest.fixture
def provider(backend: Backend) -> Provider:
    return backend.provider


@pytest.fixture
def guest_write(backend: Backend) -> Callable[[str, int, int, bytes], None]:
    return backend.guest_write


@pytest.fixture
def reset_cbt(backend: Backend) -> Callable[[str], None]:
    return backend.reset_cbt


@pytest.fixture
def shared_snapshot_data(backend: Backend) -> str:
    return backend.shared_snapshot_data


@pytest.fixture
def vm(backend: Backend) -> VmInfo:
    return backend.provider.find_vm(backend.vm_name)


@pytest.fixture
def take_snapshot(backend: Backend, vm: VmInfo) -> Iterator[Callable[[], Snapshot]]:
    """Takes snapshots of ``vm`` named ``backupd-contract-<n>``; removes them afterwards."""
    taken: list[Snapshot] = []

    def take() -> Snapshot:
        snapshot = backend.provider.create_snapshot(
            vm, name=f"backupd-contract-{len(taken)}", description="contract test", quiesce=False
        )
        taken.append(snapshot)
        return snapshot

    yield take
    for snapshot in taken:
        backend.provider.remove_snapshot(snapshot)
