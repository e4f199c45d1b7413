"""Restore points follow a VM's stable id, carry its configuration, and read as streams;
repositories of format 1 (points by VM name, no id) stay listable, restorable and usable.

``fixtures/repository-format-1/`` was written by backupd before this change (the code of
commit 338d275): VM ``web``, job ``nightly``, 4 KiB blocks, a full point and an incremental
one; ``fixtures/repository-format-1.disk<key>.img`` are the disks of the newer point.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from backupd.errors import NotFoundError, RepositoryCorruptError, RepositoryError
from backupd.repository import Repository
from backupd.repository._layout import FORMAT_VERSION, vm_key
from providers.base import DiskConfig, NicConfig, VmConfig

from test_repository_points import BS, backup, disk_image, make_repo

FIXTURES = Path(__file__).parents[2] / "fixtures"
UUID = "4211c0de-5b39-8a0e-77f3-0123456789ab"


def vm_config(name: str, *capacities: int) -> VmConfig:
    return VmConfig(
        name=name, guest_os="ubuntu64Guest", cpus=2, memory_bytes=4 << 30, firmware="efi",
        disks=tuple(DiskConfig(key=2000 + n, label=f"Hard disk {n + 1}", controller="scsi",
                               controller_model="pvscsi", bus_number=0, unit_number=n, capacity_bytes=size,
                               thin=True) for n, size in enumerate(capacities)),
        nics=(NicConfig(label="Network adapter 1", network="VM Network", adapter_type="vmxnet3"),),
    )


def test_a_renamed_vm_goes_on_with_its_chain_and_each_point_keeps_the_name_it_was_made_under(tmp_path):
    repo = make_repo(tmp_path)
    image = disk_image(1, 8)
    first = backup(repo, "web", {2000: image}, vm_id=UUID, vm_config=vm_config("web", len(image)))
    changed = image[: 2 * BS] + disk_image(2, 1) + image[3 * BS :]

    base, passed_over = repo.base_point(vm_id=UUID, vm="www", job="nightly")
    assert (base.info, passed_over) == (first, [])
    second = backup(repo, "www", {2000: changed}, vm_id=UUID, base=first.id, changed=[2])
    other = backup(repo, "web", {2000: image}, vm_id="another-vm")  # a new VM that took the old name

    assert [(p.id, p.vm, p.vm_id) for p in repo.chain(vm_id=UUID, vm="www", job="nightly")] == [
        (second.id, "www", UUID), (first.id, "web", UUID)]
    assert repo.points(vm="web") == [other, first] and repo.points(vm_id=UUID) == [second, first]
    assert repo.apply_retention(vm_id=UUID, vm="www", job="nightly", keep=1) == [first.id]
    assert repo.points() == [other, second]
    assert [p.read_bytes() for p in repo.restore(second.id, tmp_path / "out")] == [changed]
    assert sorted(os.listdir(repo.path / "points")) == sorted({vm_key(f"id:{UUID}"), vm_key("id:another-vm")})


def test_a_base_point_of_another_vm_id_is_refused_whatever_its_name(tmp_path):
    repo = make_repo(tmp_path)
    first = backup(repo, "web", {1: disk_image(1, 2)}, vm_id="one")
    with pytest.raises(RepositoryError, match="belongs to VM 'web' \\(id one\\)"):
        backup(repo, "web", {1: disk_image(1, 2)}, vm_id="two", base=first.id, changed=[])


def test_the_configuration_is_stored_under_the_manifest_checksum(tmp_path):
    repo = make_repo(tmp_path)
    config = vm_config("web", 3 * BS)
    point = backup(repo, "web", {2000: disk_image(3, 3)}, vm_id=UUID, vm_config=config)

    assert repo.point(point.id).vm_config == config and repo.point(point.id).vm_id == UUID
    manifest = next((repo.path / "points").rglob("*.manifest"))
    manifest.write_bytes(manifest.read_bytes().replace(b'"cpus":2', b'"cpus":8', 1))
    assert repo.verify([point.id]).damaged_points == (point.id,)
    assert repo.base_point(vm_id=UUID, vm="web", job="nightly")[0] is None


def test_a_disk_streams_byte_identical_and_a_damaged_block_stops_the_stream(tmp_path):
    repo = make_repo(tmp_path)
    image = disk_image(4, 5, tail=123, zero_blocks=(1,))
    point = backup(repo, "web", {2000: image, 2001: disk_image(5, 1)}, vm_id=UUID)

    with repo.open_point(point.id) as reader:
        stream = reader.disk(2000)
        assert b"".join(iter(lambda: stream.read(1000), b"")) == image
        assert reader.disk(2001).read() == disk_image(5, 1)
        with pytest.raises(NotFoundError, match="has no disk 7"):
            reader.disk(7)

    victim = next(p for p in (repo.path / "blocks").rglob("*") if p.is_file())
    victim.write_bytes(b"junk")
    with repo.open_point(point.id) as reader, pytest.raises(RepositoryCorruptError, match=f"restore point {point.id}"):
        for key in (2000, 2001):
            reader.disk(key).read()


@pytest.fixture
def old_repo(tmp_path: Path) -> Repository:
    """A copy of the format 1 fixture (git keeps no empty folders: staging and quarantine are
    made as an old repository has them)."""
    root = tmp_path / "old"
    shutil.copytree(FIXTURES / "repository-format-1", root)
    for folder in ("staging", "quarantine"):
        (root / folder).mkdir(exist_ok=True)
    return Repository.open(root)


def test_a_format_1_repository_lists_and_restores_its_points_as_they_were(old_repo, tmp_path):
    points = old_repo.points(vm="web")

    assert [(p.vm, p.vm_id, p.vm_config, p.mode) for p in points] == [
        ("web", None, None, "incremental"), ("web", None, None, "full")]
    images = old_repo.restore(points[0].id, tmp_path / "out")
    assert [p.read_bytes() for p in images] == [
        (FIXTURES / f"repository-format-1.disk{key}.img").read_bytes() for key in (2000, 2001)]
    assert old_repo.verify().ok
    assert json.loads((old_repo.path / "repository.json").read_text())["version"] == 1, "reading changes nothing"


def test_a_format_1_chain_goes_on_under_the_vm_id_and_the_repository_becomes_format_2(old_repo, tmp_path):
    """The first backup after the upgrade finds the VM's old points by its name (they have no
    id), so it is incremental on the newest of them; from then on the id decides."""
    newest = old_repo.points(vm="web")[0]
    disks = [(FIXTURES / f"repository-format-1.disk{key}.img").read_bytes() for key in (2000, 2001)]

    base, passed_over = old_repo.base_point(vm_id=UUID, vm="web", job="nightly")
    assert (base.info, passed_over) == (newest, [])
    point = backup(old_repo, "web", dict(zip((2000, 2001), disks)), vm_id=UUID, base=base.info.id, changed=[])

    assert json.loads((old_repo.path / "repository.json").read_text())["version"] == FORMAT_VERSION
    assert [p.read_bytes() for p in old_repo.restore(point.id, tmp_path / "out")] == disks
    oldest = old_repo.points()[-1]
    assert old_repo.apply_retention(vm_id=UUID, vm="web", job="nightly", keep=2) == [oldest.id]
    assert [p.vm_id for p in old_repo.chain(vm_id=UUID, vm="web", job="nightly")] == [UUID, None]
    reopened = Repository.open(old_repo.path)
    assert reopened.points(vm_id=UUID) == [point]
