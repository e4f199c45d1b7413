"""The simulated hypervisor beyond the Provider contract: its state folder, copy-on-write,
exact CBT, faults, throttles, and sharing between threads and processes."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from providers.base import (
    CbtUnavailable,
    DiskReadError,
    Extent,
    ProviderError,
    QuiesceError,
    Snapshot,
    SnapshotError,
    TransientProviderError,
    VmNotFound,
)
from providers.simulated import InvalidArgument, SimulatedProvider
from providers.simulated.config import SimulatedProviderConfig

MiB = 1 << 20
MakeProvider = Callable[..., SimulatedProvider]


def config_document(state_dir: Path, vms: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """A ``[providers.sim]`` section as plain data (also what a child process is given)."""
    return {"type": "simulated", "state_dir": str(state_dir), "vms": vms, **options}


def config_for(
    state_dir: Path, vms: list[dict[str, Any]], **options: Any
) -> SimulatedProviderConfig:
    return SimulatedProviderConfig.model_validate(config_document(state_dir, vms, **options))


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def make_provider(state_dir: Path) -> MakeProvider:
    """``make_provider(vms=None, **options)``: a new provider instance on the test's state_dir,
    by default with one VM ``vm1`` of one 16 MiB disk."""

    def make(vms: list[dict[str, Any]] | None = None, **options: Any) -> SimulatedProvider:
        vms = vms if vms is not None else [{"name": "vm1", "disks": ["16 MiB"]}]
        return SimulatedProvider("sim", config_for(state_dir, vms, **options))

    return make


@pytest.fixture
def sim(make_provider: MakeProvider) -> SimulatedProvider:
    return make_provider()


def snap(provider: SimulatedProvider, vm: str = "vm1", *, quiesce: bool = False) -> Snapshot:
    return provider.create_snapshot(
        provider.find_vm(vm), name="backupd-test", description="", quiesce=quiesce
    )


def read_disk(provider: SimulatedProvider, snapshot: Snapshot, index: int = 0) -> bytes:
    disk = provider.disks(snapshot)[index]
    with provider.open_disk(snapshot, disk) as reader:
        return reader.read(0, disk.capacity_bytes)


def wait_until(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll ``predicate`` every 10 ms until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        time.sleep(0.01)


def make_image(path: Path, size: int, chunks: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)
    return path


# -- disks and the state folder ---------------------------------------------------------------


def test_imported_image_keeps_its_bytes_is_sparse_and_is_never_written(
    tmp_path: Path, make_provider: MakeProvider
) -> None:
    image = make_image(
        tmp_path / "disk.raw", 64 * MiB, {3 * MiB: os.urandom(200_000), 40 * MiB + 7: b"x" * 5000}
    )
    original = image.read_bytes()
    provider = make_provider([{"name": "vm1", "disks": [str(image)]}])

    live = provider.disk_path("vm1")
    assert provider.find_vm("vm1").disks[0].capacity_bytes == 64 * MiB
    assert live.read_bytes() == original
    assert live.stat().st_blocks * 512 <= 1 * MiB  # 205 kB of data, not 64 MiB
    provider.write_data("vm1", offset=3 * MiB, data=b"guest")
    assert image.read_bytes() == original


def test_a_missing_image_is_an_error_naming_the_vm_and_the_path(
    tmp_path: Path, make_provider: MakeProvider
) -> None:
    missing = tmp_path / "nowhere.raw"
    provider = make_provider([{"name": "web", "disks": [str(missing)]}])

    with pytest.raises(ProviderError, match=f"'web'.*{missing}"):
        provider.find_vm("web")


def test_vms_come_from_the_config_with_vsphere_keys_labels_and_stable_ids(
    make_provider: MakeProvider,
) -> None:
    first = make_provider(
        [
            {"name": "b", "disks": ["8 MiB", "4 MiB"], "power_state": "suspended"},
            {"name": "a", "disks": ["8 MiB"]},
        ]
    )
    ids = {vm.name: vm.id for vm in first.list_vms()}
    b = first.find_vm("b")

    assert [vm.name for vm in first.list_vms()] == ["a", "b"]
    assert len(set(ids.values())) == 2 and all(uuid.UUID(vm_id) for vm_id in ids.values())
    assert [(d.key, d.label, d.capacity_bytes) for d in b.disks] == [
        (2000, "Hard disk 1", 8 * MiB),
        (2001, "Hard disk 2", 4 * MiB),
    ]
    assert b.power_state == "suspended"

    again = make_provider(
        [
            {"name": "c", "disks": ["1 MiB"]},
            {"name": "b", "disks": ["8 MiB"]},
            {"name": "a", "disks": ["8 MiB"]},
        ]
    )
    assert again.find_vm("a").id == ids["a"] and again.find_vm("b").id == ids["b"]
    assert again.find_vm("c").id not in ids.values()


def test_state_survives_a_new_provider_instance(make_provider: MakeProvider) -> None:
    first = make_provider()
    first.write_data("vm1", offset=MiB, data=b"persisted")
    snapshot = snap(first)
    first.write_data("vm1", offset=MiB, data=b"overwrote")
    first.close()

    second = make_provider()

    assert second.find_vm("vm1") == first.find_vm("vm1")
    assert second.list_snapshots(second.find_vm("vm1")) == [snapshot]
    assert read_disk(second, snapshot)[MiB : MiB + 9] == b"persisted"
    assert second.disk_path("vm1").read_bytes()[MiB : MiB + 9] == b"overwrote"
    assert snap(second).id not in {snapshot.id}


def test_state_files_are_private_to_the_owner(sim: SimulatedProvider, state_dir: Path) -> None:
    sim.write_data("vm1", offset=0, data=b"secret")
    snap(sim)
    sim.set_fault("vm1", "read")
    sim.pause("vm1", "read")

    for folder, _dirs, files in os.walk(state_dir):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
        for name in files:
            assert stat.S_IMODE(os.stat(Path(folder) / name).st_mode) == 0o600, name


def test_write_random_blocks_writes_distinct_aligned_blocks_reproducibly(
    tmp_path: Path,
) -> None:
    def written(where: str, seed: int) -> tuple[list[Extent], bytes]:
        provider = SimulatedProvider(
            "sim", config_for(tmp_path / where, [{"name": "vm1", "disks": ["16 MiB"]}])
        )
        extents = provider.write_random_blocks("vm1", blocks=5, seed=seed)
        return extents, provider.disk_path("vm1").read_bytes()

    extents, content = written("one", seed=7)

    assert len({e.offset for e in extents}) == 5
    assert extents == sorted(extents, key=lambda e: e.offset)
    assert all(e.offset % MiB == 0 and e.length == MiB for e in extents)
    assert all(
        content[e.offset : e.end].count(0) < MiB // 128 for e in extents
    )  # random: ~1/256 zeros
    assert written("two", seed=7) == (extents, content)
    assert written("three", seed=8)[1] != content


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda p: p.write_data("vm1", offset=16 * MiB - 2, data=b"abc"), InvalidArgument),
        (lambda p: p.write_data("vm1", offset=-1, data=b"abc"), InvalidArgument),
        (lambda p: p.write_data("vm1", offset=0, data=b""), InvalidArgument),
        (lambda p: p.write_data("vm1", disk=1, offset=0, data=b"abc"), InvalidArgument),
        (lambda p: p.disk_path("vm1", 3), InvalidArgument),
        (lambda p: p.write_random_blocks("vm1", blocks=17), InvalidArgument),
        (lambda p: p.set_fault("vm1", "explode"), InvalidArgument),
        (lambda p: p.set_fault("vm1", "read", times=0), InvalidArgument),
        (lambda p: p.write_data("ghost", offset=0, data=b"abc"), VmNotFound),
        (lambda p: p.set_fault("ghost", "read"), VmNotFound),
        (lambda p: p.pause("vm1", "quiesce"), InvalidArgument),
        (lambda p: p.resume("vm1", "remove_snapshot"), InvalidArgument),
        (lambda p: p.pause("ghost", "read"), VmNotFound),
        (lambda p: p.reset_cbt("ghost"), VmNotFound),
    ],
)
def test_administration_calls_reject_what_makes_no_sense(
    sim: SimulatedProvider, call: Callable[[SimulatedProvider], object], error: type[Exception]
) -> None:
    with pytest.raises(error) as caught:
        call(sim)
    assert isinstance(caught.value, ProviderError)
    assert sim.disk_path("vm1").stat().st_blocks == 0  # nothing was written


def test_invalid_arguments_are_also_value_errors(sim: SimulatedProvider) -> None:
    with pytest.raises(ValueError, match="vm1"):
        sim.write_data("vm1", offset=16 * MiB, data=b"x")


def test_a_damaged_state_folder_surfaces_as_provider_errors(sim: SimulatedProvider) -> None:
    snapshot = snap(sim)
    live = sim.disk_path("vm1")
    live.unlink()  # deleted by hand

    with pytest.raises(ProviderError, match=f"write_data.*{live.name}") as caught:
        sim.write_data("vm1", offset=0, data=b"x")
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    with pytest.raises(DiskReadError, match="cannot open"):
        sim.open_disk(snapshot, sim.disks(snapshot)[0])


# -- snapshots and copy-on-write --------------------------------------------------------------


def test_two_snapshots_each_see_their_own_point_in_time(sim: SimulatedProvider) -> None:
    sim.write_data("vm1", offset=MiB - 3, data=b"A" * 10)  # across a grain boundary
    first = snap(sim)
    sim.write_data("vm1", offset=MiB - 1, data=b"B" * 5)
    second = snap(sim)
    sim.write_data("vm1", offset=MiB - 5, data=b"C" * 20)

    assert read_disk(sim, first)[MiB - 5 : MiB + 10] == b"\0\0AAAAAAAAAA\0\0\0"
    assert read_disk(sim, second)[MiB - 5 : MiB + 10] == b"\0\0AABBBBBAAA\0\0\0"
    assert sim.disk_path("vm1").read_bytes()[MiB - 5 : MiB + 15] == b"C" * 20


def test_removing_a_snapshot_deletes_its_saved_data_and_fails_its_open_readers(
    sim: SimulatedProvider, state_dir: Path
) -> None:
    sim.write_random_blocks("vm1", blocks=4, seed=1)
    snapshot = snap(sim)
    reader = sim.open_disk(snapshot, sim.disks(snapshot)[0])
    sim.write_random_blocks("vm1", blocks=8, seed=2)
    saved = list(state_dir.rglob("*.cow"))
    assert saved and sum(f.stat().st_blocks for f in saved) > 0

    sim.remove_snapshot(snapshot)

    assert list(state_dir.rglob("*.cow")) == []
    assert list((state_dir / "vms").glob("*/snapshots/*")) == []
    with pytest.raises(DiskReadError, match="removed"):
        reader.read(0, MiB)
    reader.close()
    sim.write_random_blocks("vm1", blocks=2, seed=3)  # guest writes carry on


def test_a_snapshot_reads_unchanged_while_threads_write_and_read_at_once(
    sim: SimulatedProvider,
) -> None:
    sim.write_random_blocks("vm1", blocks=8, seed=1)
    snapshot = snap(sim)
    expected = sim.disk_path("vm1").read_bytes()
    offsets = [(index * MiB + 100, os.urandom(MiB)) for index in range(15)]
    mismatches: list[int] = []

    def writer(part: list[tuple[int, bytes]]) -> None:
        for offset, data in part:
            sim.write_data("vm1", offset=offset, data=data)

    def reader() -> None:
        for _ in range(10):
            if read_disk(sim, snapshot) != expected:
                mismatches.append(1)

    threads = [threading.Thread(target=writer, args=(offsets[i::3],)) for i in range(3)]
    threads.append(threading.Thread(target=reader))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert mismatches == []
    live = sim.disk_path("vm1").read_bytes()
    assert all(live[o : o + len(d)] == d for o, d in offsets)
    changed = sim.changed_areas(
        snap(sim), sim.disks(snapshot)[0], sim.disks(snapshot)[0].change_id or ""
    )
    assert changed == [Extent(100, 15 * MiB)]


_WRITER = """
import json
import sys
from providers.simulated import SimulatedProvider
from providers.simulated.config import SimulatedProviderConfig
provider = SimulatedProvider("sim", SimulatedProviderConfig.model_validate(json.loads(sys.argv[1])))
for seed in range(int(sys.argv[2])):
    provider.write_random_blocks("vm1", blocks=4, seed=seed)
"""


def test_a_snapshot_is_isolated_from_guest_writes_of_another_process(state_dir: Path) -> None:
    document = config_document(state_dir, [{"name": "vm1", "disks": ["32 MiB"]}])
    provider = SimulatedProvider("sim", SimulatedProviderConfig.model_validate(document))
    provider.write_random_blocks("vm1", blocks=20, seed=99)
    snapshot = snap(provider)
    expected = provider.disk_path("vm1").read_bytes()

    writer = subprocess.Popen([sys.executable, "-c", _WRITER, json.dumps(document), "60"])
    reads = 0
    disk = provider.disks(snapshot)[0]
    with provider.open_disk(snapshot, disk) as reader:  # open across the writes, as a job's is
        while writer.poll() is None:
            assert reader.read(0, disk.capacity_bytes) == expected
            reads += 1
    assert writer.returncode == 0

    assert reads > 1, "the reads did not overlap the writes"
    assert read_disk(provider, snapshot) == expected
    assert provider.disk_path("vm1").read_bytes() != expected


_FIRST_USE = """
import json
import sys
from providers.simulated import SimulatedProvider
from providers.simulated.config import SimulatedProviderConfig
provider = SimulatedProvider("sim", SimulatedProviderConfig.model_validate(json.loads(sys.argv[1])))
index = int(sys.argv[2])
provider.write_data("vm1", offset=index * 1048576, data=b"process %d" % index)
print(provider.find_vm("vm1").id)
"""


def test_processes_racing_to_first_use_import_the_image_once(
    tmp_path: Path, state_dir: Path
) -> None:
    image = make_image(
        tmp_path / "disk.raw", 64 * MiB, {MiB * i + 20: os.urandom(MiB) for i in range(0, 64, 2)}
    )
    document = config_document(state_dir, [{"name": "vm1", "disks": [str(image)]}])

    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _FIRST_USE, json.dumps(document), str(index)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for index in range(1, 6)
    ]
    ids = {process.communicate()[0].strip() for process in processes}

    assert len(ids) == 1, "every process sees the one VM the first of them made"
    live = SimulatedProvider("sim", SimulatedProviderConfig.model_validate(document)).disk_path(
        "vm1"
    )
    content, original = live.read_bytes(), image.read_bytes()
    for index in range(1, 6):  # a second import would have wiped an earlier process's write
        marker = b"process %d" % index
        assert content[index * MiB : index * MiB + len(marker)] == marker
    assert content[:MiB] == original[:MiB] and content[10 * MiB :] == original[10 * MiB :]


# -- changed block tracking -------------------------------------------------------------------


def test_changed_areas_are_the_exact_unaligned_bytes_written_merged(sim: SimulatedProvider) -> None:
    base = snap(sim)
    for offset, size in (
        (100, 50),
        (140, 30),
        (5000, 10),
        (5010, 10),
        (MiB - 10, 20),
        (9 * MiB + 1, 1),
    ):
        sim.write_data("vm1", offset=offset, data=os.urandom(size))
    later = snap(sim)
    since = sim.disks(base)[0].change_id or ""

    changed = sim.changed_areas(later, sim.disks(later)[0], since)

    assert changed == [
        Extent(100, 70),
        Extent(5000, 20),
        Extent(MiB - 10, 20),
        Extent(9 * MiB + 1, 1),
    ]


def test_changed_areas_stop_at_the_snapshot_and_start_after_since(sim: SimulatedProvider) -> None:
    first = snap(sim)
    sim.write_data("vm1", offset=0, data=b"before second")
    second = snap(sim)
    sim.write_data("vm1", offset=4096, data=b"between")
    third = snap(sim)
    sim.write_data("vm1", offset=8192, data=b"after third")
    disk = sim.disks(third)[0]

    assert sim.changed_areas(third, disk, sim.disks(first)[0].change_id or "") == [
        Extent(0, 13),
        Extent(4096, 7),
    ]
    assert sim.changed_areas(third, disk, sim.disks(second)[0].change_id or "") == [Extent(4096, 7)]


def test_change_ids_look_like_vsphere_ones(sim: SimulatedProvider) -> None:
    sim.write_data("vm1", offset=0, data=b"one")
    sim.write_data("vm1", offset=0, data=b"two")

    change_id = sim.find_vm("vm1").disks[0].change_id or ""

    epoch, seq = change_id.split("/")
    assert seq == "2"
    assert [len(part.split(" ")) for part in epoch.split("-")] == [8, 8]


def test_changed_areas_refuse_a_change_id_newer_than_the_snapshot(sim: SimulatedProvider) -> None:
    snapshot = snap(sim)
    sim.write_data("vm1", offset=0, data=b"after the snapshot")
    newer = sim.find_vm("vm1").disks[0].change_id or ""

    with pytest.raises(CbtUnavailable, match="newer"):
        sim.changed_areas(snapshot, sim.disks(snapshot)[0], newer)


def test_changed_areas_refuse_a_change_id_of_another_disk(make_provider: MakeProvider) -> None:
    provider = make_provider([{"name": "vm1", "disks": ["8 MiB", "8 MiB"]}])
    snapshot = snap(provider)
    first, second = provider.disks(snapshot)

    with pytest.raises(CbtUnavailable, match="epoch"):
        provider.changed_areas(snapshot, first, second.change_id or "")


def test_changed_areas_refuse_even_older_change_ids_once_cbt_was_reset(
    sim: SimulatedProvider,
) -> None:
    base = snap(sim)
    sim.write_data("vm1", offset=0, data=b"x")
    snapshot = snap(sim)

    sim.reset_cbt("vm1")

    with pytest.raises(CbtUnavailable, match="reset"):
        sim.changed_areas(snapshot, sim.disks(snapshot)[0], sim.disks(base)[0].change_id or "")


def _punch_hole(path: Path, offset: int, length: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(path, os.O_RDWR)
    try:  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if libc.fallocate(fd, 0x02 | 0x01, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
            pytest.skip(f"cannot punch holes here: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def test_star_includes_grains_a_snapshot_saved_even_where_the_live_disk_is_a_hole(
    sim: SimulatedProvider,
) -> None:
    """File systems that store zero writes as holes (ZFS with compression) leave the live disk
    unallocated where the snapshot still holds data."""
    sim.write_data("vm1", offset=6 * MiB, data=os.urandom(MiB))
    snapshot = snap(sim)
    sim.write_data("vm1", offset=6 * MiB, data=bytes(MiB))
    _punch_hole(sim.disk_path("vm1"), 6 * MiB, MiB)

    assert sim.changed_areas(snapshot, sim.disks(snapshot)[0], "*") == [Extent(6 * MiB, MiB)]


# -- faults -----------------------------------------------------------------------------------


def test_a_fault_armed_by_one_instance_fires_in_another(make_provider: MakeProvider) -> None:
    job, admin = make_provider(), make_provider()

    admin.set_fault("vm1", "create_snapshot")

    with pytest.raises(TransientProviderError, match=r"injected fault: create_snapshot .*'vm1'"):
        snap(job)
    assert admin.faults("vm1") == {}
    assert snap(job).vm_name == "vm1"


def test_a_transient_fault_fails_the_next_calls_then_lets_them_through(
    sim: SimulatedProvider,
) -> None:
    sim.set_fault("vm1", "create_snapshot", times=2)
    assert sim.faults("vm1") == {"create_snapshot": {"permanent": False, "remaining": 2}}

    with pytest.raises(TransientProviderError):
        snap(sim)
    assert sim.faults("vm1") == {"create_snapshot": {"permanent": False, "remaining": 1}}
    with pytest.raises(TransientProviderError):
        snap(sim)

    assert snap(sim)
    assert len(sim.list_snapshots(sim.find_vm("vm1"))) == 1


@pytest.mark.parametrize(
    ("op", "error"), [("create_snapshot", SnapshotError), ("remove_snapshot", SnapshotError)]
)
def test_a_permanent_fault_fails_every_call_with_a_non_transient_error_until_cleared(
    sim: SimulatedProvider, op: str, error: type[Exception]
) -> None:
    snapshot = snap(sim)
    call = {
        "create_snapshot": lambda: snap(sim),
        "remove_snapshot": lambda: sim.remove_snapshot(snapshot),
    }[op]
    sim.set_fault("vm1", op, permanent=True)

    for _ in range(3):
        with pytest.raises(error, match=f"injected fault: {op}") as caught:
            call()
        assert not isinstance(caught.value, TransientProviderError)
    assert sim.list_snapshots(sim.find_vm("vm1")) == [snapshot]

    sim.clear_faults("vm1")
    call()


def test_a_permanent_quiesce_fault_leaves_no_snapshot_and_spares_crash_consistent_ones(
    sim: SimulatedProvider,
) -> None:
    sim.set_fault("vm1", "quiesce", permanent=True)

    with pytest.raises(QuiesceError, match="injected fault: quiesce"):
        snap(sim, quiesce=True)
    assert sim.list_snapshots(sim.find_vm("vm1")) == []

    fallback = snap(sim, quiesce=False)
    assert fallback.quiesced is False
    assert sim.faults("vm1") == {"quiesce": {"permanent": True, "remaining": None}}


def test_a_transient_quiesce_fault_is_retryable_and_leaves_no_snapshot(
    sim: SimulatedProvider,
) -> None:
    sim.set_fault("vm1", "quiesce")

    with pytest.raises(TransientProviderError):
        snap(sim, quiesce=True)
    assert sim.list_snapshots(sim.find_vm("vm1")) == []
    assert snap(sim, quiesce=True).quiesced is True


def test_read_faults_reach_a_reader_opened_before_they_were_armed(
    make_provider: MakeProvider,
) -> None:
    job, admin = make_provider(), make_provider()
    snapshot = snap(job)
    disk = job.disks(snapshot)[0]
    with job.open_disk(snapshot, disk) as reader:
        reader.read(0, MiB)

        admin.set_fault("vm1", "read")
        with pytest.raises(TransientProviderError, match="injected fault: read"):
            reader.read(0, MiB)
        assert reader.read(0, MiB) == bytes(MiB)

        admin.set_fault("vm1", "read", permanent=True)
        with pytest.raises(DiskReadError, match="injected fault: read"):
            reader.read(MiB, MiB)
        admin.clear_faults("vm1")
        assert len(reader.read(MiB, MiB)) == MiB


def test_removing_a_snapshot_that_is_gone_does_not_consume_a_fault(sim: SimulatedProvider) -> None:
    snapshot = snap(sim)
    sim.remove_snapshot(snapshot)
    sim.set_fault("vm1", "remove_snapshot")

    sim.remove_snapshot(snapshot)

    assert sim.faults("vm1") == {"remove_snapshot": {"permanent": False, "remaining": 1}}


# -- pauses ----------------------------------------------------------------------------------


class Call(threading.Thread):
    """A provider call on its own thread, so the test can watch it block."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self._fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def outcome(self) -> Any:
        self.join(timeout=30)
        assert not self.is_alive(), "the call is still blocked"
        if self.error is not None:
            raise self.error
        return self.result


def test_a_paused_read_blocks_until_resumed_and_is_counted_while_it_waits(
    make_provider: MakeProvider,
) -> None:
    job, admin = make_provider(), make_provider()
    job.write_random_blocks("vm1", blocks=1, seed=5)
    snapshot = snap(job)
    expected = job.disk_path("vm1").read_bytes()[:MiB]
    with job.open_disk(snapshot, job.disks(snapshot)[0]) as reader:  # opened before the pause
        admin.pause("vm1", "read")
        assert admin.paused("vm1") == {"read": 0}

        blocked = Call(lambda: reader.read(0, MiB))
        wait_until(lambda: admin.paused("vm1") == {"read": 1})
        assert blocked.is_alive()

        admin.resume("vm1")
        assert blocked.outcome() == expected
        assert admin.paused("vm1") == {}
        assert reader.read(0, MiB) == expected


def test_a_fault_armed_during_a_pause_fires_when_the_pause_is_lifted(
    sim: SimulatedProvider,
) -> None:
    snapshot = snap(sim)
    with sim.open_disk(snapshot, sim.disks(snapshot)[0]) as reader:
        sim.pause("vm1", "read")
        blocked = Call(lambda: reader.read(0, MiB))
        wait_until(lambda: sim.paused("vm1") == {"read": 1})

        sim.set_fault("vm1", "read", permanent=True)
        sim.resume("vm1", "read")

        with pytest.raises(DiskReadError, match="injected fault: read"):
            blocked.outcome()
        assert sim.faults("vm1") == {"read": {"permanent": True, "remaining": None}}, "resume keeps faults"


def test_a_paused_snapshot_creation_takes_no_snapshot_until_cleared(sim: SimulatedProvider) -> None:
    sim.pause("vm1", "create_snapshot")
    creating = Call(lambda: snap(sim))
    wait_until(lambda: sim.paused("vm1") == {"create_snapshot": 1})
    assert sim.list_snapshots(sim.find_vm("vm1")) == []

    sim.clear_faults("vm1")  # lifts pauses too, as `sim fault --clear` does

    created = creating.outcome()
    assert sim.list_snapshots(sim.find_vm("vm1")) == [created]
    assert sim.paused("vm1") == {}


_PAUSED_READER = """
import json
import sys
from providers.simulated import SimulatedProvider
from providers.simulated.config import SimulatedProviderConfig
provider = SimulatedProvider("sim", SimulatedProviderConfig.model_validate(json.loads(sys.argv[1])))
snapshot = provider.list_snapshots(provider.find_vm("vm1"))[0]
with provider.open_disk(snapshot, provider.disks(snapshot)[0]) as reader:
    print(len(reader.read(0, 1048576)))
"""


def test_reads_blocked_in_other_processes_are_counted_and_a_killed_one_no_longer(
    state_dir: Path,
) -> None:
    document = config_document(state_dir, [{"name": "vm1", "disks": ["16 MiB"]}])
    admin = SimulatedProvider("sim", SimulatedProviderConfig.model_validate(document))
    snap(admin)
    admin.pause("vm1", "read")
    readers = [
        subprocess.Popen([sys.executable, "-c", _PAUSED_READER, json.dumps(document)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        wait_until(lambda: admin.paused("vm1") == {"read": 2})

        readers[0].kill()
        readers[0].wait(timeout=30)
        assert admin.paused("vm1") == {"read": 1}, "a dead waiter's lock went with it"

        admin.resume("vm1")
        out, _ = readers[1].communicate(timeout=30)
        assert (readers[1].returncode, out) == (0, f"{MiB}\n")
    finally:
        for reader in readers:
            reader.kill()
            reader.wait(timeout=30)


def test_sim_fault_pauses_and_resumes_from_the_command_line(
    tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from backupd.cli import main

    config = tmp_path / "backupd.toml"
    config.write_text(
        f'[state]\nurl = "sqlite:///state.db"\n'
        f'[providers.lab]\ntype = "simulated"\nstate_dir = {json.dumps(str(state_dir))}\n'
        f'[[providers.lab.vms]]\nname = "vm1"\ndisks = ["1 MiB"]\n'
    )

    def sim_fault(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as caught:
            main(["-c", str(config), "sim", "fault", "vm1", *args])
        out = capsys.readouterr()
        return caught.value.code, out.out or out.err  # type: ignore[return-value]

    code, text = sim_fault("--op", "read", "--pause", "--json")
    assert (code, json.loads(text)) == (0, {"vm": "vm1", "faults": {}, "paused": {"read": 0}})
    code, text = sim_fault("--op", "create_snapshot", "--pause")
    assert (code, text) == (0, "vm1: faults armed: none; paused: create_snapshot (0 call(s) blocked), read (0 call(s) blocked)\n")
    code, text = sim_fault("--op", "quiesce", "--pause")
    assert code == 64 and "cannot be paused" in text
    code, text = sim_fault("--op", "read", "--resume")
    assert text.endswith("paused: create_snapshot (0 call(s) blocked)\n")
    code, text = sim_fault("--op", "read", "--pause", "--clear")
    assert code == 64 and "give one of" in text
    assert sim_fault("--clear") == (0, "vm1: faults armed: none; paused: none\n")


# -- throttles --------------------------------------------------------------------------------


def test_read_throttle_paces_each_reader(make_provider: MakeProvider) -> None:
    provider = make_provider(read_mib_per_s=40)
    snapshot = snap(provider)
    disk = provider.disks(snapshot)[0]

    started = time.monotonic()
    with provider.open_disk(snapshot, disk) as reader:
        for offset in range(0, 8 * MiB, MiB):
            reader.read(offset, MiB)

    assert time.monotonic() - started >= 0.15  # 8 MiB at 40 MiB/s: 0.2 s


def test_snapshot_creation_and_removal_take_their_configured_time(
    make_provider: MakeProvider,
) -> None:
    provider = make_provider(snapshot_create_seconds=0.2, snapshot_remove_seconds=0.3)

    started = time.monotonic()
    snapshot = snap(provider)
    created = time.monotonic()
    provider.remove_snapshot(snapshot)

    assert created - started >= 0.2
    assert time.monotonic() - created >= 0.3
