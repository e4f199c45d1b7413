"""The repository over time and under stress: retention and garbage collection, verify,
crash recovery, opening, and the safety rules for paths and permissions."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
import pytest
import zstandard

from backupd.errors import RepositoryError
from backupd.repository import Repository, _restore, _writer, image_name
from backupd.repository._layout import FORMAT_VERSION, vm_key
from test_repository_points import BS, backup, disk_image, make_repo, restore_bytes


def block_files(repo: Repository) -> set[Path]:
    return {path for path in (repo.path / "blocks").rglob("*") if path.is_file()}


def block_file(repo: Repository, data: bytes) -> Path:
    """The file holding a block, by the documented naming: blocks/<aa>/<BLAKE3 hex>."""
    name = blake3.blake3(data).hexdigest()
    return repo.path / "blocks" / name[:2] / name


# ---- retention and garbage collection ---------------------------------------------------------


def test_retention_keeps_the_newest_points_of_one_vm_and_job_and_gc_keeps_shared_blocks(tmp_path):
    repo = make_repo(tmp_path)
    shared = disk_image(30, 2)
    images = [shared + disk_image(31 + i, 1) for i in range(4)]
    nightly = [backup(repo, "a", {1: image}) for image in images]
    weekly = backup(repo, "a", {1: disk_image(40, 2)}, job="weekly")
    other_vm = backup(repo, "b", {1: disk_image(41, 2)})
    before = block_files(repo)

    removed = repo.apply_retention(vm_id="a", vm="a", job="nightly", keep=2)

    assert removed == [nightly[1].id, nightly[0].id]
    assert [p.id for p in repo.points(vm="a", job="nightly")] == [nightly[3].id, nightly[2].id]
    assert {p.id for p in repo.points()} == {nightly[3].id, nightly[2].id, weekly.id, other_vm.id}
    assert block_files(repo) == before, "retention deletes manifests only; blocks go at the collection"
    assert repo.garbage_pending()
    repo.collect_garbage()
    gone = before - block_files(repo)
    assert gone == {block_file(repo, images[0][2 * BS :]), block_file(repo, images[1][2 * BS :])}
    assert block_file(repo, shared[:BS]).exists()
    assert restore_bytes(repo, nightly[2].id, tmp_path / "out") == [images[2]]
    assert not (repo.path / "gc-pending").exists()


def test_retention_rejects_keeping_nothing(tmp_path):
    with pytest.raises(ValueError):
        make_repo(tmp_path).apply_retention(vm_id="a", vm="a", job="nightly", keep=0)


def test_gc_reports_what_it_freed(tmp_path):
    repo = make_repo(tmp_path)
    old = backup(repo, "a", {1: disk_image(42, 3)})
    backup(repo, "a", {1: disk_image(43, 3)})
    sizes = sum(path.stat().st_size for path in block_files(repo))

    repo.apply_retention(vm_id="a", vm="a", job="nightly", keep=1)
    first = repo.collect_garbage()
    again = repo.collect_garbage()

    assert (first.removed_blocks, first.freed_bytes, first.deferred) == (3, old.stored_bytes, False)
    assert (again.removed_blocks, again.freed_bytes, again.deferred) == (0, 0, False)
    assert sum(path.stat().st_size for path in block_files(repo)) == sizes - old.stored_bytes


def test_gc_is_deferred_while_a_writer_is_open_and_keeps_what_it_deduplicated_against(tmp_path):
    repo = make_repo(tmp_path)
    old_image = disk_image(50, 3)
    old = backup(repo, "a", {1: old_image})
    backup(repo, "a", {1: disk_image(51, 3)})
    before = block_files(repo)
    with repo.new_point(vm="a", vm_id="a", job="nightly", session="s", mode="incremental") as writer:
        writer.add_disk(key=1, label="d", capacity_bytes=len(old_image), change_id=None, base_point=old.id)

        assert repo.apply_retention(vm_id="a", vm="a", job="nightly", keep=1) == [old.id]
        result = repo.collect_garbage()

        assert result.deferred is True and result.removed_blocks == 0
        assert block_files(repo) == before
        kept = writer.commit()
    assert repo.collect_garbage().removed_blocks == 0, "the new point references the old blocks"
    assert restore_bytes(repo, kept.id, tmp_path / "out") == [old_image]


def test_a_deferred_gc_stays_pending_and_runs_on_the_next_collection(tmp_path):
    repo = make_repo(tmp_path)
    backup(repo, "a", {1: disk_image(52, 2)})
    backup(repo, "a", {1: disk_image(53, 2)})
    writer = repo.new_point(vm="z", vm_id="z", job="other", session="s", mode="full")
    repo.apply_retention(vm_id="a", vm="a", job="nightly", keep=1)
    assert repo.collect_garbage().deferred
    assert len(block_files(repo)) == 4
    writer.abort()

    assert repo.apply_retention(vm_id="a", vm="a", job="nightly", keep=1) == []
    assert repo.garbage_pending(), "the deferred collection is still owed"
    assert len(block_files(repo)) == 4
    assert repo.collect_garbage().removed_blocks == 2

    assert len(block_files(repo)) == 2
    assert not repo.garbage_pending()


# ---- verify -----------------------------------------------------------------------------------


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped bytes": _flip_middle,
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:10]),
    "other content": lambda path: path.write_bytes(zstandard.ZstdCompressor().compress(b"x" * BS)),
    "deleted": lambda path: path.unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_verify_reports_every_point_referencing_a_damaged_block_and_only_those(tmp_path, damage):
    repo = make_repo(tmp_path)
    shared = disk_image(60, 1)
    first = backup(repo, "a", {1: shared + disk_image(61, 1)})
    second = backup(repo, "b", {1: disk_image(62, 1) + shared, 2: disk_image(64, 1, zero_blocks=(0,))})
    clean = backup(repo, "c", {1: disk_image(63, 2)})
    assert repo.verify().ok

    damage(block_file(repo, shared))
    progress = []
    result = repo.verify(progress=lambda done, total: progress.append((done, total)))

    assert result.ok is False
    assert set(result.damaged_points) == {first.id, second.id}
    assert (result.damaged_blocks, result.checked_blocks) == (1, 5)
    assert progress[-1] == (5, 5)
    assert blake3.blake3(shared).hexdigest() in result.problems[0]
    assert repo.verify([clean.id]).ok
    assert repo.verify([second.id]).damaged_points == (second.id,)


def test_verify_counts_each_distinct_block_once(tmp_path):
    repo = make_repo(tmp_path)
    image = disk_image(65, 3)
    for vm in ("a", "b", "c"):
        backup(repo, vm, {1: image, 2: image})

    assert repo.verify().checked_blocks == 3


def test_verify_reports_a_point_whose_manifest_fails_its_checksum(tmp_path):
    repo = make_repo(tmp_path)
    good = backup(repo, "a", {1: disk_image(66, 2)})
    bad = backup(repo, "b", {1: disk_image(67, 2)})
    manifest = next((repo.path / "points").rglob(f"{bad.id}.manifest"))
    header, maps = manifest.read_bytes().split(b"\n", 1)
    edited = json.loads(header)
    edited["job"] = "forged"  # still a valid header, so listing shows it; the checksum does not match
    manifest.write_bytes(json.dumps(edited).encode() + b"\n" + maps)

    result = repo.verify()

    assert result.damaged_points == (bad.id,)
    assert result.damaged_blocks == 0 and "checksum" in result.problems[0]
    assert repo.verify([good.id]).ok


# ---- crashes and concurrent writers -----------------------------------------------------------

CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from backupd.repository import Repository
    repo = Repository.open(Path(sys.argv[1]))
    writer = repo.new_point(vm="vm", vm_id="vm", job="j", session="s", mode="full")
    disk = writer.add_disk(key=1, label="d", capacity_bytes=3 * 4096, change_id=None)
    for i in range(3):
        disk.put_block(i, os.urandom(4096))
    print(writer.id, flush=True)
    os._exit(9)  # dies without commit or abort
    """
)


def test_staging_of_a_writer_that_died_is_discarded_on_open(tmp_path):
    repo = make_repo(tmp_path)
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(repo.path)], capture_output=True, text=True, timeout=60
    )
    assert crashed.returncode == 9, crashed.stderr
    staged = repo.path / "staging" / crashed.stdout.strip()
    assert len([p for p in staged.rglob("*") if p.is_file()]) == 4  # owner + 3 blocks

    reopened = Repository.open(repo.path)

    assert not staged.exists()
    assert reopened.points() == [] and block_files(reopened) == set()


def test_open_leaves_the_staging_of_live_writers_and_other_hosts_alone(tmp_path):
    repo = make_repo(tmp_path)
    foreign = repo.path / "staging" / "20200101T000000.000000Z-0000abcd"
    foreign.mkdir()
    (foreign / "owner").write_text(json.dumps({"host": socket.gethostname() + "-elsewhere", "pid": 1}))
    with repo.new_point(vm="vm", vm_id="vm", job="j", session="s", mode="full") as writer:
        writer.add_disk(key=1, label="d", capacity_bytes=BS, change_id=None).put_block(0, disk_image(70, 1))

        Repository.open(repo.path)

        assert (repo.path / "staging" / writer.id).is_dir()
        info = writer.commit()
    assert foreign.is_dir()
    assert restore_bytes(repo, info.id, tmp_path / "out") == [disk_image(70, 1)]


def test_two_writers_of_the_same_new_blocks_both_commit(tmp_path):
    repo = make_repo(tmp_path)
    image = disk_image(71, 4)
    first = repo.new_point(vm="a", vm_id="a", job="j", session="s", mode="full")
    second = repo.new_point(vm="b", vm_id="b", job="j", session="s", mode="full")
    for writer in (first, second):
        disk = writer.add_disk(key=1, label="d", capacity_bytes=len(image), change_id=None)
        for i in range(4):
            disk.put_block(i, image[i * BS : (i + 1) * BS])

    one, two = first.commit(), second.commit()

    assert one.stored_bytes > 0 and two.stored_bytes == 0, "the second commit found the blocks published"
    assert len(block_files(repo)) == 4
    assert repo.verify().ok


CONCURRENT_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from backupd.repository import Repository
    repo = Repository.open(Path(sys.argv[1]))
    image = Path(sys.argv[2]).read_bytes()
    for round in range(3):
        with repo.new_point(vm=sys.argv[3], vm_id=sys.argv[3], job="j", session=str(round), mode="full") as writer:
            disk = writer.add_disk(key=1, label="d", capacity_bytes=len(image), change_id=None)
            for i in range(len(image) // 4096):
                disk.put_block(i, image[i * 4096 : (i + 1) * 4096])
            writer.commit()
        repo.apply_retention(vm_id=sys.argv[3], vm=sys.argv[3], job="j", keep=1)
    """
)


def test_processes_writing_the_same_blocks_while_gc_runs_leave_every_point_whole(tmp_path):
    repo = make_repo(tmp_path)
    image = disk_image(72, 16)
    (tmp_path / "image").write_bytes(image)
    writers = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(repo.path), str(tmp_path / "image"), vm])
        for vm in ("a", "b", "c")
    ]
    while any(writer.poll() is None for writer in writers):
        repo.collect_garbage()  # deferred while any writer is open, collects in between
    assert [writer.wait(60) for writer in writers] == [0, 0, 0]

    assert sorted(p.vm for p in repo.points()) == ["a", "b", "c"]
    assert repo.verify().ok and len(block_files(repo)) == 16
    for point in repo.points():
        assert restore_bytes(repo, point.id, tmp_path / point.vm) == [image]


def test_a_commit_that_fails_before_the_manifest_leaves_no_point_and_gc_frees_its_blocks(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    repo = make_repo(tmp_path)
    monkeypatch.setattr(_writer, "write_manifest", disk_full)
    with pytest.raises(RepositoryError, match="No space left"):
        backup(repo, "vm", {1: disk_image(73, 3)})

    assert repo.points() == [] and os.listdir(repo.path / "staging") == []
    assert len(block_files(repo)) == 3, "published before the manifest failed"
    assert repo.collect_garbage().removed_blocks == 3


# ---- interrupted restores --------------------------------------------------------------------

#: restores a point in another process and stops at the first progress call, with the partial
#: image created (and flock'ed) and its first block written: the test then kills the process
#: (``kill -9``) or lets it finish by writing a line to its stdin
PAUSED_RESTORE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from backupd.repository import Repository
    repo = Repository.open(Path(sys.argv[1]))
    paused = []
    def progress(done, total):
        if not paused:
            paused.append(done)
            print("writing", flush=True)
            sys.stdin.readline()
    repo.restore(sys.argv[2], Path(sys.argv[3]), progress=progress)
    """
)


def start_paused_restore(repo: Repository, point_id: str, to_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_RESTORE, str(repo.path), point_id, str(to_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "writing\n", "the restore did not start writing"
    return proc


def partials(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".partial"))


def dead_partial(folder: Path, vm: str, disk_key: int, size: int = 3 * BS) -> Path:
    """A partial image as a restore killed while writing leaves it: the documented name, some
    data, and no process holding its flock."""
    folder.mkdir(exist_ok=True)
    path = folder / f".{image_name(vm, disk_key)}.0123abcd.partial"
    path.write_bytes(os.urandom(size))
    return path


def test_a_restore_removes_the_partial_image_of_a_restore_killed_in_the_same_folder(tmp_path, caplog):
    repo = make_repo(tmp_path)
    image = disk_image(80, 8, tail=9, zero_blocks=(2,))
    info = backup(repo, "web01", {2000: image})
    out = tmp_path / "out"
    killed = start_paused_restore(repo, info.id, out)
    [leftover] = partials(out)
    killed.kill()  # SIGKILL: no finally block runs
    assert killed.wait(60) == -9
    assert partials(out) == [leftover], "a killed restore leaves its partial image"

    with caplog.at_level(logging.INFO, logger="backupd.repository"):
        assert restore_bytes(repo, info.id, out) == [image]

    assert os.listdir(out) == [image_name("web01", 2000)]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "removed 1 leftover partial image(s) of an interrupted restore" in warning
    assert leftover in warning


def test_a_restore_leaves_the_partial_image_of_a_live_restore_in_the_same_folder_alone(tmp_path):
    repo = make_repo(tmp_path)
    live_image, other_image = disk_image(81, 6), disk_image(82, 4)
    live_point = backup(repo, "db01", {2000: live_image})
    other_point = backup(repo, "web01", {2000: other_image})
    out = tmp_path / "out"
    dead = dead_partial(out, "old01", 2000)
    live = start_paused_restore(repo, live_point.id, out)
    try:
        [live_partial] = [name for name in partials(out) if name != dead.name]

        assert restore_bytes(repo, other_point.id, out) == [other_image]

        assert partials(out) == [live_partial], "the dead writer's partial is removed, the live one's kept"
        live.communicate("go on\n", timeout=60)
    finally:
        live.kill()  # a no-op once it has finished
        live.wait(60)
    assert live.returncode == 0
    assert (out / image_name("db01", 2000)).read_bytes() == live_image
    assert partials(out) == []


def test_a_restore_removes_only_files_named_as_its_own_partial_images(tmp_path):
    repo = make_repo(tmp_path)
    image = disk_image(83, 3)
    info = backup(repo, "web01", {2000: image})
    out = tmp_path / "out"
    dead = dead_partial(out, "web01", 2000)
    name = image_name("web01", 2000)
    decoys = [
        ".notes.partial",
        "x.img",
        ".web-disk2000.img.zzzz.partial",  # no VM key hash, no 8-hex token
        ".web-disk2000.img.0123abcd.partial",  # no VM key hash
        f".{name}.0123ABCD.partial",  # restore's tokens are lower-case
        f".{name}.0123abc.partial",
        f".{name}.0123abcd.partial.old",
        f"{name}.0123abcd.partial",  # not hidden
        f".{name}.partial",
    ]
    for decoy in decoys:
        (out / decoy).write_bytes(b"not mine")
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"not mine either")
    (out / f".{name}.aaaaaaaa.partial").symlink_to(outside)
    (out / f".{name}.bbbbbbbb.partial").mkdir()
    os.mkfifo(out / f".{name}.cccccccc.partial")  # opening it for reading must not hang

    assert restore_bytes(repo, info.id, out) == [image]

    assert not dead.exists()
    assert all((out / decoy).read_bytes() == b"not mine" for decoy in decoys)
    assert (out / f".{name}.aaaaaaaa.partial").is_symlink() and outside.read_bytes() == b"not mine either"
    assert (out / f".{name}.bbbbbbbb.partial").is_dir()
    assert stat.S_ISFIFO((out / f".{name}.cccccccc.partial").lstat().st_mode)


def test_a_restore_keeps_its_finished_partial_images_locked_until_it_publishes_them(tmp_path):
    """A cleanup that runs while the second disk is written finds the first disk's partial image
    complete but still locked, so it cannot take it away before it is linked to its name."""
    repo = make_repo(tmp_path)
    images = {1: disk_image(86, 3), 2: disk_image(87, 3)}
    info = backup(repo, "db01", images)
    out = tmp_path / "out"
    cleanups = []

    def progress(done, total):
        if done > len(images[1]) and not cleanups:  # writing disk 2
            cleanups.append(_restore.discard_dead_partials(out))

    paths = repo.restore(info.id, out, progress=progress)

    assert cleanups == [[]]
    assert [path.read_bytes() for path in paths] == list(images.values())


def test_a_partial_image_removed_between_its_creation_and_its_lock_is_created_anew(tmp_path, monkeypatch):
    """The window between ``open`` and ``flock`` of a new partial image: another restore's
    cleanup, running just then, takes the free lock and removes the file; the writer must notice
    (it holds a file without a name) and not lose its image."""
    repo = make_repo(tmp_path)
    image = disk_image(84, 4)
    info = backup(repo, "web01", {2000: image})
    out = tmp_path / "out"
    real_flock = fcntl.flock
    interfered = []

    def cleanup_runs_first(fd, operation):
        if operation == fcntl.LOCK_EX and not interfered:  # the writer's lock, not the cleanup's
            interfered.extend(_restore.discard_dead_partials(out))
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", cleanup_runs_first)

    assert restore_bytes(repo, info.id, out) == [image]

    [(removed, _)] = interfered
    assert removed.startswith(f".{image_name('web01', 2000)}."), "the cleanup did remove the writer's file"
    assert os.listdir(out) == [image_name("web01", 2000)]


def test_a_restore_into_a_folder_without_flock_still_restores(tmp_path, monkeypatch, caplog):
    repo = make_repo(tmp_path)
    image = disk_image(85, 4)
    info = backup(repo, "web01", {2000: image})
    real_flock = fcntl.flock

    def no_locks_on_partials(fd, operation):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", no_locks_on_partials)
    dead = dead_partial(tmp_path / "out", "old01", 2000)

    assert restore_bytes(repo, info.id, tmp_path / "out") == [image]

    assert dead.exists(), "without flock nobody can tell a dead writer from a live one"
    assert "does the file system support flock?" in caplog.text


# ---- opening ----------------------------------------------------------------------------------


CONFIG = {"format": "backupd-repository", "version": FORMAT_VERSION, "block_size": BS, "hash": "blake3", "compression": "zstd"}


def test_create_writes_the_repository_config_and_an_existing_repository_keeps_its_block_size(tmp_path):
    make_repo(tmp_path)
    config = json.loads((tmp_path / "repo" / "repository.json").read_text())
    assert config == CONFIG

    again = Repository.open(tmp_path / "repo", create=True, block_size=1 << 20)

    assert again.block_size == BS


def test_open_without_create_names_the_path_that_is_not_a_repository(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(RepositoryError, match=str(path)):
            Repository.open(path)
    assert not (tmp_path / "absent").exists()


def test_create_refuses_a_folder_with_other_contents(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(RepositoryError, match="not empty"):
        Repository.open(tmp_path / "home", create=True)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**CONFIG, "version": FORMAT_VERSION + 1}, "newer"),
        ({**CONFIG, "hash": "sha1"}, "unsupported"),
        ({"format": "something-else"}, "malformed"),
        ("not json", "malformed"),
    ],
)
def test_open_refuses_repositories_it_cannot_read(tmp_path, config, message):
    make_repo(tmp_path)
    (tmp_path / "repo" / "repository.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(RepositoryError, match=message):
        Repository.open(tmp_path / "repo")


@pytest.mark.parametrize("options", [{"block_size": 1000}, {"block_size": 128 << 20}, {"compression_level": 0}])
def test_open_rejects_bad_parameters(tmp_path, options):
    with pytest.raises(ValueError):
        Repository.open(tmp_path / "repo", create=True, **options)


# ---- paths and permissions --------------------------------------------------------------------

HOSTILE_NAMES = [
    "../../etc", "/abs", "a/b", "..", ".", "", ".hidden", "x" * 5000, "ünïcødé ☃ VM", "nul\0byte", "\ud800", "C:\\win",
]


@pytest.mark.parametrize("vm", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_no_vm_name_makes_the_repository_write_outside_its_root(tmp_path, vm):
    repo = make_repo(tmp_path)
    image = disk_image(80, 1, tail=3)

    info = backup(repo, vm, {7: image}, job="../job/\0")
    [restored] = repo.restore(info.id, tmp_path / "out")

    assert sorted(os.listdir(tmp_path)) == ["out", "repo"]
    assert restored.parent == tmp_path / "out" and restored.read_bytes() == image
    [folder] = os.listdir(repo.path / "points")
    assert folder == vm_key(f"id:{vm}") and len(folder) <= 57 and not folder.startswith(".")
    assert set(folder) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    assert [p.vm for p in repo.points(vm=vm)] == [vm]


def test_names_that_sanitize_alike_get_separate_folders(tmp_path):
    names = ["a/b", "a_b", "a?b", "a b", ".a_b"]
    assert len({vm_key(name) for name in names}) == len(names)
    repo = make_repo(tmp_path)
    for seed, name in enumerate(names):
        backup(repo, name, {1: disk_image(seed, 1)})
    assert {name: [p.vm for p in repo.points(vm=name)] for name in names} == {name: [name] for name in names}


def test_files_are_0600_and_folders_0700_whatever_the_umask(tmp_path):
    previous = os.umask(0)
    try:
        repo = Repository.open(tmp_path / "repo", create=True, block_size=BS)
        old = backup(repo, "vm", {1: disk_image(90, 3, zero_blocks=(1,))})
        backup(repo, "vm", {1: disk_image(91, 3)})
        repo.apply_retention(vm_id="vm", vm="vm", job="nightly", keep=1)
        with repo.new_point(vm="vm", vm_id="vm", job="nightly", session="s", mode="full") as writer:
            writer.add_disk(key=1, label="d", capacity_bytes=BS, change_id=None).put_block(0, disk_image(92, 1))
            check_modes(repo.path)  # staging too
        repo.restore(repo.points()[0].id, tmp_path / "restored")
    finally:
        os.umask(previous)
    assert old.id not in {p.id for p in repo.points()}
    check_modes(repo.path)
    check_modes(tmp_path / "restored")


def check_modes(root: Path) -> None:
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for path in root.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path}: {oct(mode)}"
