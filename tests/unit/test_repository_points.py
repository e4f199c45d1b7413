"""The deduplicating repository: writing, listing, deduplication, incremental points, restore.

Blocks are 4 KiB here so disks of a few dozen blocks exercise every path quickly.
Maintenance (retention, GC, verify) and the on-disk safety rules (paths, permissions,
crash recovery, opening) are in ``test_repository_maintenance.py``, which reuses the helpers here.
"""

from __future__ import annotations

import json
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone
from pathlib import Path

import pytest

from backupd.enums import TransferMode
from backupd.errors import NotFoundError, RepositoryCorruptError, RepositoryError
from backupd.repository import PointDisk, PointInfo, Repository, image_name
from providers.base import VmConfig

BS = 4096
ABSENT_POINT = "20200101T000000.000000Z-00000000"


def make_repo(tmp_path: Path, **options) -> Repository:
    return Repository.open(tmp_path / "repo", create=True, block_size=BS, **options)


def disk_image(seed: int, blocks: int, *, tail: int = 0, zero_blocks: tuple[int, ...] = ()) -> bytes:
    """``blocks`` random blocks (those in ``zero_blocks`` all zero) plus a ``tail``-byte block."""
    rng = random.Random(seed)
    parts = [bytes(BS) if i in zero_blocks else rng.randbytes(BS) for i in range(blocks)]
    return b"".join(parts) + rng.randbytes(tail)


def put_all(disk, image: bytes, indexes) -> int:
    """put_block the given block indexes of ``image`` from two threads, as the engine does."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return sum(pool.map(lambda i: disk.put_block(i, image[i * BS : (i + 1) * BS]), indexes))


def backup(
    repo: Repository,
    vm: str,
    images: dict[int, bytes],
    *,
    job: str = "nightly",
    base: str | None = None,
    changed: list[int] | None = None,
    vm_id: str | None = None,
    vm_config: VmConfig | None = None,
) -> PointInfo:
    """Write one restore point with a disk per ``images`` entry (key → bytes), of the VM id
    ``vm_id`` (default: the name).

    Without ``changed`` every block is put (a full transfer); with it only those indexes.
    """
    mode = "full" if base is None else "incremental"
    with repo.new_point(vm=vm, vm_id=vm_id or vm, vm_config=vm_config, job=job, session="session-1",
                        mode=mode) as writer:
        for key, image in images.items():
            disk = writer.add_disk(
                key=key, label=f"Hard disk {key}", capacity_bytes=len(image), change_id=f"cid-{key}", base_point=base
            )
            put_all(disk, image, changed if changed is not None else range(-(-len(image) // BS)))
        return writer.commit()


def restore_bytes(repo: Repository, point_id: str, to_dir: Path) -> list[bytes]:
    return [path.read_bytes() for path in repo.restore(point_id, to_dir)]


def test_round_trip_restores_zero_blocks_and_short_last_block_exactly(tmp_path):
    repo = make_repo(tmp_path)
    image = disk_image(1, 10, tail=100, zero_blocks=(0, 4, 5))

    info = backup(repo, "web01", {2000: image})

    [path] = repo.restore(info.id, tmp_path / "out")
    assert path.read_bytes() == image
    assert path.name == "web01-" + path.name.split("-")[1] + "-disk2000.img"
    assert path.stat().st_blocks * 512 < len(image), "zero blocks must be holes"
    assert info.logical_bytes == len(image) == info.bytes_read
    assert info.disks == (PointDisk(2000, "Hard disk 2000", capacity_bytes=len(image), change_id="cid-2000"),)
    assert 0 < info.stored_bytes
    assert info.created_at.tzinfo is timezone.utc
    assert (info.vm, info.job, info.session, info.mode) == ("web01", "nightly", "session-1", "full")
    assert repo.point(info.id) == info == repo.points()[0]


def test_several_disks_restore_in_the_order_they_were_added(tmp_path):
    repo = make_repo(tmp_path)
    images = {2001: disk_image(2, 3), 2000: disk_image(3, 2, tail=7)}

    info = backup(repo, "db", images)

    paths = repo.restore(info.id, tmp_path / "out")
    assert [p.name.rsplit("-", 1)[1] for p in paths] == ["disk2001.img", "disk2000.img"]
    assert [p.read_bytes() for p in paths] == list(images.values())
    assert [d.key for d in info.disks] == [2001, 2000]


def test_blocks_never_put_restore_as_zeros(tmp_path):
    repo = make_repo(tmp_path)
    image = disk_image(4, 6)

    info = backup(repo, "vm", {1: image}, changed=[2])

    [restored] = restore_bytes(repo, info.id, tmp_path / "out")
    assert restored == bytes(2 * BS) + image[2 * BS : 3 * BS] + bytes(3 * BS)
    assert info.bytes_read == BS


def test_identical_point_stores_nothing_new_even_for_another_vm(tmp_path):
    repo = make_repo(tmp_path)
    image = disk_image(5, 8, tail=10, zero_blocks=(3,))

    first = backup(repo, "vm-a", {2000: image})
    second = backup(repo, "vm-a", {2000: image})
    other_vm = backup(repo, "vm-b", {2000: image})

    assert first.stored_bytes > 0
    assert second.stored_bytes == 0 and other_vm.stored_bytes == 0
    assert sum(1 for _ in (repo.path / "blocks").rglob("*") if _.is_file()) == 8  # 7 data + tail
    assert restore_bytes(repo, other_vm.id, tmp_path / "out") == [image]


def test_put_block_returns_compressed_bytes_staged_and_zero_for_zero_or_known_blocks(tmp_path):
    repo = make_repo(tmp_path)
    block = b"abc" * (BS // 3) + b"x"
    with repo.new_point(vm="vm", vm_id="vm", job="j", session="s", mode="full") as writer:
        disk = writer.add_disk(key=1, label="d", capacity_bytes=3 * BS, change_id=None)
        written = disk.put_block(0, block)
        assert 0 < written < BS  # compressed
        assert disk.put_block(1, block) == 0  # same bytes, same point
        assert disk.put_block(2, bytes(BS)) == 0
        assert disk.put_block(2, memoryview(bytearray(BS))) == 0
        info = writer.commit()
    assert info.stored_bytes == written


def test_incremental_point_is_complete_base_plus_changes(tmp_path):
    repo = make_repo(tmp_path)
    old = disk_image(6, 12, tail=33, zero_blocks=(7,))
    base = backup(repo, "vm", {2000: old, 2001: disk_image(7, 2)})
    new = bytearray(old)
    new[1 * BS : 2 * BS] = random.Random(8).randbytes(BS)
    new[7 * BS : 8 * BS] = b"\x01" * BS  # a zero block gets data
    new[9 * BS : 10 * BS] = bytes(BS)  # a data block becomes zero
    new[12 * BS :] = b"t" * 33  # the short last block changes

    incremental = backup(repo, "vm", {2000: bytes(new)}, base=base.id, changed=[1, 7, 9, 12])

    assert incremental.mode == "incremental"
    assert incremental.bytes_read == 3 * BS + 33
    assert restore_bytes(repo, incremental.id, tmp_path / "new") == [bytes(new)]
    assert restore_bytes(repo, base.id, tmp_path / "old")[0] == old


def test_a_writer_builds_on_the_block_maps_base_point_checked_without_reading_them_again(tmp_path):
    """base_point reads the base manifest in full and checks it; handed to new_point, those
    block maps are what the new point starts from: the manifest is not read a second time."""
    repo = make_repo(tmp_path)
    old = disk_image(6, 4)
    first = backup(repo, "vm", {2000: old})
    base, passed_over = repo.base_point(vm_id="vm", vm="vm", job="nightly")
    assert (base.info, passed_over, len(base.maps)) == (first, [], 1)
    next((repo.path / "points").rglob(f"{first.id}.manifest")).unlink()  # read again: "does not exist"
    new = bytearray(old)
    new[2 * BS : 3 * BS] = random.Random(9).randbytes(BS)

    with repo.new_point(vm="vm", vm_id="vm", job="nightly", session="s", mode="incremental", base=base) as writer:
        disk = writer.add_disk(key=2000, label="Hard disk 2000", capacity_bytes=len(old), change_id="c",
                               base_point=first.id)
        put_all(disk, bytes(new), [2])
        point = writer.commit()

    assert restore_bytes(repo, point.id, tmp_path / "out") == [bytes(new)]


@pytest.mark.parametrize(
    ("changed", "syncs"),
    [
        ([], 0),  # an unchanged VM: only inherited entries
        ([3], 0),  # a zero block put: still nothing new referenced
        ([1], 2),  # a block already stored (deduplicated): it may be a concurrent writer's, not yet durable
        ([2], 2),  # a new block: staged, published
    ],
)
def test_commit_flushes_the_file_system_only_when_a_non_zero_block_was_put(tmp_path, monkeypatch, changed, syncs):
    from backupd.repository import _writer

    repo = make_repo(tmp_path)
    image = disk_image(11, 4, zero_blocks=(3,))
    base = backup(repo, "vm", {2000: image})
    new = bytearray(image)
    new[1 * BS : 2 * BS] = image[0:BS]  # block 1 now holds block 0's bytes: deduplicated
    new[2 * BS : 3 * BS] = b"\x02" * BS
    flushed = []
    monkeypatch.setattr(_writer, "sync_filesystem", lambda path: flushed.append(path))

    point = backup(repo, "vm", {2000: bytes(new)}, base=base.id, changed=changed)

    assert len(flushed) == syncs
    expected = bytearray(image)
    for index in changed:
        expected[index * BS : (index + 1) * BS] = new[index * BS : (index + 1) * BS]
    assert restore_bytes(repo, point.id, tmp_path / "out") == [bytes(expected)]


@pytest.mark.parametrize(
    ("base_vm", "key", "capacity", "message"),
    [
        ("vm", 9999, 4 * BS, "has no disk 9999"),
        ("vm", 2000, 5 * BS, "a full transfer is needed"),
        ("other", 2000, 4 * BS, "belongs to VM 'other'"),
    ],
)
def test_incremental_base_must_match_vm_disk_and_capacity(tmp_path, base_vm, key, capacity, message):
    repo = make_repo(tmp_path)
    base = backup(repo, base_vm, {2000: disk_image(9, 4)})
    with repo.new_point(vm="vm", vm_id="vm", job="j", session="s", mode="incremental") as writer:
        with pytest.raises(RepositoryError, match=message):
            writer.add_disk(key=key, label="d", capacity_bytes=capacity, change_id=None, base_point=base.id)


def test_incremental_from_a_missing_base_point_is_a_repository_error(tmp_path):
    repo = make_repo(tmp_path)
    with repo.new_point(vm="vm", vm_id="vm", job="j", session="s", mode="incremental") as writer:
        with pytest.raises(RepositoryError, match="does not exist"):
            writer.add_disk(key=1, label="d", capacity_bytes=BS, change_id=None, base_point=ABSENT_POINT)


def test_put_block_rejects_wrong_index_or_length(tmp_path):
    repo = make_repo(tmp_path)
    with repo.new_point(vm="vm", vm_id="vm", job="j", session="s", mode="full") as writer:
        disk = writer.add_disk(key=1, label="d", capacity_bytes=2 * BS + 10, change_id=None)
        for index, data in [(3, bytes(10)), (-1, bytes(BS)), (0, bytes(BS - 1)), (2, bytes(BS))]:
            with pytest.raises(ValueError):
                disk.put_block(index, data)
        with pytest.raises(ValueError, match="already added"):
            writer.add_disk(key=1, label="again", capacity_bytes=BS, change_id=None)


def test_no_manifest_exists_until_commit(tmp_path):
    repo = make_repo(tmp_path)
    image = disk_image(10, 4)
    with repo.new_point(vm="vm", vm_id="vm", job="j", session="s", mode=TransferMode.FULL) as writer:
        put_all(writer.add_disk(key=1, label="d", capacity_bytes=len(image), change_id=None), image, range(4))
        assert repo.points() == []
        assert not list((repo.path / "points").rglob("*.manifest"))
        info = writer.commit()
    assert [p.id for p in repo.points()] == [info.id]
    assert info.mode == "full" and repo.point(info.id).mode == "full"
    assert os.listdir(repo.path / "staging") == []


def test_abort_leaves_no_point_no_staging_and_refuses_further_puts(tmp_path):
    repo = make_repo(tmp_path)
    writer = repo.new_point(vm="vm", vm_id="vm", job="j", session="s", mode="full")
    disk = writer.add_disk(key=1, label="d", capacity_bytes=2 * BS, change_id=None)
    disk.put_block(0, disk_image(11, 1))

    writer.abort()
    writer.abort()  # idempotent

    assert repo.points() == []
    assert os.listdir(repo.path / "staging") == []
    with pytest.raises(RepositoryError, match="aborted"):
        disk.put_block(1, disk_image(12, 1))
    with pytest.raises(RepositoryError, match="aborted"):
        writer.commit()


def test_an_exception_inside_the_writer_block_aborts(tmp_path):
    repo = make_repo(tmp_path)
    with pytest.raises(RuntimeError):
        with repo.new_point(vm="vm", vm_id="vm", job="j", session="s", mode="full") as writer:
            writer.add_disk(key=1, label="d", capacity_bytes=BS, change_id=None).put_block(0, disk_image(13, 1))
            raise RuntimeError("transfer failed")
    assert repo.points() == [] and os.listdir(repo.path / "staging") == []


def test_commit_refuses_while_put_block_calls_run(tmp_path):
    repo = make_repo(tmp_path)
    entered, release = threading.Event(), threading.Event()
    with repo.new_point(vm="vm", vm_id="vm", job="j", session="s", mode="full") as writer:
        disk = writer.add_disk(key=1, label="d", capacity_bytes=BS, change_id=None)
        store = disk._store
        original = store.stage

        def slow_stage(*args):
            entered.set()
            release.wait(5)
            return original(*args)

        store.stage = slow_stage
        worker = threading.Thread(target=disk.put_block, args=(0, disk_image(14, 1)))
        worker.start()
        entered.wait(5)
        with pytest.raises(RepositoryError, match="put_block calls are running"):
            writer.commit()
        release.set()
        worker.join()
        assert writer.commit().bytes_read == BS


def test_points_filter_by_vm_and_job_newest_first(tmp_path):
    repo = make_repo(tmp_path)
    image = {1: disk_image(15, 1)}
    a1 = backup(repo, "a", image, job="nightly")
    b1 = backup(repo, "b", image, job="nightly")
    a2 = backup(repo, "a", image, job="weekly")
    a3 = backup(repo, "a", image, job="nightly")

    assert [p.id for p in repo.points()] == [a3.id, a2.id, b1.id, a1.id]
    assert [p.id for p in repo.points(vm="a")] == [a3.id, a2.id, a1.id]
    assert [p.id for p in repo.points(job="nightly")] == [a3.id, b1.id, a1.id]
    assert [p.id for p in repo.points(vm="a", job="nightly")] == [a3.id, a1.id]
    assert repo.base_point(vm_id="a", vm="a", job="nightly")[0].info == a3
    assert repo.base_point(vm_id="c", vm="c", job="nightly") == (None, [])
    assert repo.points(vm="nobody") == []


def test_listing_reads_headers_only_and_skips_a_manifest_with_a_broken_header(tmp_path):
    repo = make_repo(tmp_path)
    good = backup(repo, "vm", {1: disk_image(16, 3)})
    bad = backup(repo, "vm", {1: disk_image(17, 3)})
    manifest = next((repo.path / "points").rglob(f"{bad.id}.manifest"))
    header, maps = manifest.read_bytes().split(b"\n", 1)
    assert json.loads(header)["disks"][0]["blocks"] == 3 and len(maps) == 3 * 32
    manifest.write_bytes(b"{not json\n" + maps)

    assert repo.points() == [good]
    with pytest.raises(RepositoryCorruptError):
        repo.point(bad.id)


@pytest.mark.parametrize("point_id", [ABSENT_POINT, "../../etc/passwd", ""])
def test_unknown_or_malformed_point_id_is_not_found(tmp_path, point_id):
    repo = make_repo(tmp_path)
    with pytest.raises(NotFoundError):
        repo.point(point_id)
    with pytest.raises(NotFoundError):
        repo.restore(point_id, tmp_path / "out")


def test_restore_refuses_to_overwrite_an_existing_image(tmp_path):
    repo = make_repo(tmp_path)
    info = backup(repo, "vm", {1: disk_image(18, 2), 2: disk_image(19, 2)})
    out = tmp_path / "out"
    out.mkdir()
    existing = out / image_name("vm", 2)
    existing.write_bytes(b"keep me")

    with pytest.raises(RepositoryError, match=str(existing)):
        repo.restore(info.id, out)

    assert existing.read_bytes() == b"keep me"
    assert os.listdir(out) == [existing.name]


def test_restore_detects_a_corrupted_block_and_leaves_nothing_behind(tmp_path):
    repo = make_repo(tmp_path)
    info = backup(repo, "vm", {1: disk_image(20, 3), 2: disk_image(21, 3)})
    victim = sorted((repo.path / "blocks").rglob("*"))[-1]
    victim.chmod(0o600)
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    out = tmp_path / "out"

    with pytest.raises(RepositoryCorruptError, match=info.id):
        repo.restore(info.id, out)

    assert os.listdir(out) == []


def test_restore_reports_progress_in_bytes(tmp_path):
    repo = make_repo(tmp_path)
    image = disk_image(22, 3, tail=5, zero_blocks=(1,))
    info = backup(repo, "vm", {1: image})
    seen = []

    repo.restore(info.id, tmp_path / "out", progress=lambda done, total: seen.append((done, total)))

    assert seen[-1] == (len(image), len(image))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
