"""Integrity under damage: no new restore point rests on a damaged or missing block, and one
bad file in the repository affects only its own restore point (issue: "Integrity under
damage, crashes and bad input", sections 1 and 2). Driven through the CLI as an administrator
would: damage is done by hand to the repository's files, as a failing disk or a mistaken
`rm` would."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkit import EXIT_FAILED, MiB, Lab, vms_by_name

pytestmark = pytest.mark.slow


def _one_vm(lab: Lab, **job: object) -> None:
    lab.configure(vms={"web": "8 MiB"}, jobs={"nightly": {"vms": ["web"], **job}})
    lab.fill("web", seed=1)


def _block_of(lab: Lab, data: bytes) -> Path:
    import blake3

    name = blake3.blake3(data).hexdigest()
    return lab.repo / "blocks" / name[:2] / name


def _flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _log(doc: dict) -> str:
    return "\n".join(line["text"] for line in doc["log"])


@pytest.mark.parametrize("second_run", [[], ["--full"]], ids=["incremental", "full"])
def test_a_block_found_damaged_is_stored_again_by_the_next_session(lab: Lab, second_run: list[str]) -> None:
    """Given a restore point and a block of it damaged on disk (a flipped byte), found by
    verify, when the next session runs (incremental, or --full), then it stores the good
    bytes again instead of deduplicating against the damaged copy: its restore point
    verifies and restores bit for bit, and the earlier point, which references the same
    content, restores again too."""
    _one_vm(lab)
    first = lab.start_wait("nightly")
    damaged = _block_of(lab, bytes(lab.disks["web"][3 * MiB : 4 * MiB]))
    _flip_a_byte(damaged)

    found = lab.run_json("restore-point", "verify", "--all", rc=EXIT_FAILED)
    assert found["damaged_points"] == [first["vms"][0]["restore_point"]]

    second = lab.start_wait("nightly", *second_run)
    point = second["vms"][0]["restore_point"]
    assert second["result"] == "success" and point
    if not second_run:
        assert second["vms"][0]["mode"] == "incremental"
        assert "damaged or missing block(s); reading them from the snapshot again" in _log(second)
    assert lab.run_json("restore-point", "verify", point) == {
        "ok": True, "damaged_points": [], "checked_points": 1, "checked_blocks": 8, "damaged_blocks": 0,
    }
    assert lab.restore("web", point)[1] == bytes(lab.disks["web"])
    assert lab.run_json("restore-point", "verify", "--all")["ok"], "the same content heals the earlier point"
    assert lab.restore("web", first["vms"][0]["restore_point"])[1] == bytes(lab.disks["web"])


def test_a_deleted_block_is_read_from_the_snapshot_by_the_next_incremental(lab: Lab) -> None:
    """Given a block file deleted from the repository (nothing has looked at it since), when
    the next incremental session runs with no guest write since the base point, then it
    does not copy the base point's reference to the missing block: it reads that block from
    the snapshot again, says so in the log, and its restore point verifies."""
    _one_vm(lab)
    lab.start_wait("nightly")
    _block_of(lab, bytes(lab.disks["web"][5 * MiB : 6 * MiB])).unlink()

    second = lab.start_wait("nightly")
    (vm,) = second["vms"]
    assert (second["result"], vm["mode"]) == ("success", "incremental")
    assert vm["bytes_read"] == MiB, "only the missing block was read"
    assert "references 1 damaged or missing block(s)" in _log(second)
    assert lab.run_json("restore-point", "verify", vm["restore_point"])["ok"]
    assert lab.restore("web")[1] == bytes(lab.disks["web"])


def _manifest(lab: Lab, point: str) -> Path:
    (path,) = (lab.repo / "points").glob(f"*/{point}.manifest")
    return path


@pytest.mark.parametrize("damage", ["junk", "empty"])
def test_a_file_that_is_not_a_manifest_affects_only_its_own_restore_point(lab: Lab, damage: str) -> None:
    """Given a file named like a restore point's manifest that is junk (or a real manifest
    truncated to 0 bytes), when sessions of every job run, then they all succeed with no
    traceback; the bad point is listed as damaged and named by verify; garbage collection
    deletes nothing while it is there (retention's deleted point keeps its blocks) and says so;
    deleting the bad point lets collection run again."""
    lab.configure(vms={"web": "4 MiB", "db": "4 MiB"},
                  jobs={"web-job": {"vms": ["web"], "retention": 1}, "db-job": {"vms": ["db"]}})
    lab.fill("web", seed=1)
    lab.fill("db", seed=2)
    web_point = lab.start_wait("web-job")["vms"][0]["restore_point"]
    manifest = _manifest(lab, web_point)
    bad_id = "20200101T000000.000000Z-0badf00d"
    bad = manifest.parent / f"{bad_id}.manifest"
    bad.write_bytes(b"\x00garbage, not a manifest\n" * 3 if damage == "junk" else b"")
    lab.fill("web", seed=3)  # the next web point has other blocks: the first one's become garbage
    blocks_before = lab.block_files()

    for job in ("web-job", "db-job"):
        proc = lab.run("job", "start", job, "--wait", "--json")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    listed = {row["id"]: row for row in lab.points()}
    assert listed[bad_id]["damaged"] is True and listed[bad_id]["problem"]
    assert web_point not in listed, "retention deleted the first web point"
    verify = lab.run_json("restore-point", "verify", "--all", rc=EXIT_FAILED)
    assert verify["damaged_points"] == [bad_id]
    assert blocks_before <= lab.block_files(), "garbage collection deleted nothing"
    for job in ("web-job", "db-job"):
        warning = f"garbage collection deleted nothing: restore point(s) {bad_id}"
        assert warning in _log(lab.session(lab.sessions(job)[0]["id"])), job
    by_hand = lab.run("repository", "gc")
    assert by_hand.returncode == 1 and f"damaged restore point(s) {bad_id}" in by_hand.stdout, by_hand.stdout
    assert blocks_before <= lab.block_files(), "collected by hand: still nothing deleted"

    assert lab.run_json("restore-point", "delete", bad_id) == {"deleted": [bad_id]}
    assert bad_id not in {row["id"] for row in lab.points()}
    assert not blocks_before <= lab.block_files(), "collection ran again: the first point's blocks are gone"
    assert lab.run_json("restore-point", "verify", "--all")["ok"]


def test_a_truncated_newest_manifest_is_not_used_as_a_base(lab: Lab) -> None:
    """Given a VM whose newest restore point's manifest was truncated to half, when the next
    session runs, then it is incremental from the previous sound point (not failed, not
    forced full by hand), the log names the damaged point, and the new point restores."""
    _one_vm(lab)
    first = lab.start_wait("nightly")
    lab.write_disk("web", b"\x11" * MiB, 2 * MiB)
    second = lab.start_wait("nightly")
    broken = second["vms"][0]["restore_point"]
    manifest = _manifest(lab, broken)
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    lab.write_disk("web", b"\x22" * MiB, 6 * MiB)

    third = lab.start_wait("nightly")
    (vm,) = third["vms"]
    assert (third["result"], vm["mode"]) == ("success", "incremental")
    assert vm["bytes_read"] == 2 * MiB, "both writes since the sound base point are read"
    assert f"restore point {broken} is damaged and is not used as a base" in _log(third)
    assert lab.restore("web", vm["restore_point"])[1] == bytes(lab.disks["web"])
    assert lab.run_json("restore-point", "verify", vm["restore_point"], first["vms"][0]["restore_point"])["ok"]
    assert {row["id"]: row["damaged"] for row in lab.points()}[broken] is True
    assert vms_by_name(third)["web"]["status"] == "success"
