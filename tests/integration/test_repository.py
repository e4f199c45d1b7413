"""The repository seen from the CLI: retention with garbage collection, and verify finding a
damaged block.

Disk contents are built from whole 1 MiB blocks of known data written at block boundaries, so
which blocks each restore point references is known, including blocks two VMs share
(deduplication). Blocks are found on disk only as "the files under ``repo/blocks``"; which file
holds which block is told apart by when it appeared, never by the repository's naming scheme.
"""

from __future__ import annotations

import os

from labkit import EXIT_FAILED, EXIT_NOT_FOUND, MiB, Lab, payload

BLOCK = MiB  # the repository's default block size


def _ids(doc: dict) -> dict[str, str]:
    return {vm["name"]: vm["restore_point"] for vm in doc["vms"]}


def test_retention_keeps_the_newest_points_and_collects_blocks_only_the_deleted_ones_used(lab: Lab) -> None:
    """Given retention = 2 and two VMs sharing one block, when the job runs three times with
    changes in between, then each VM keeps its two newest restore points; the one block that
    only a deleted point referenced is removed from the repository, a block the deleted point
    shared with a kept point stays; the kept points verify and restore exactly."""
    lab.configure(
        vms={"vm-a": "4 MiB", "vm-b": "4 MiB"},
        jobs={"nightly": {"vms": ["vm-a", "vm-b"], "retention": 2}},
    )
    a0, y, z = payload(BLOCK, 10), payload(BLOCK, 11), payload(BLOCK, 12)
    lab.write_disk("vm-a", a0 + y, offset=0)
    lab.write_disk("vm-b", a0 + z, offset=0)  # a0 is shared by both VMs
    run1 = _ids(lab.start_wait("nightly"))
    files1 = lab.block_files()
    assert len(files1) == 3, f"a0, y and z, each stored once: {sorted(files1)}"

    lab.write_disk("vm-a", payload(BLOCK, 20), offset=0)  # a1 replaces a0 on vm-a only
    lab.write_disk("vm-b", payload(BLOCK, 21), offset=BLOCK)  # z1 replaces z
    run2 = _ids(lab.start_wait("nightly"))
    files2 = lab.block_files()
    disks_at_run2 = {name: bytes(lab.disks[name]) for name in ("vm-a", "vm-b")}
    assert files1 <= files2 and len(files2 - files1) == 2, "only a1 and z1 are new"

    lab.write_disk("vm-a", payload(BLOCK, 30), offset=0)  # a2
    lab.write_disk("vm-b", payload(BLOCK, 31), offset=BLOCK)  # z2
    run3 = _ids(lab.start_wait("nightly"))
    files3 = lab.block_files()

    for name in ("vm-a", "vm-b"):
        kept = [p["id"] for p in lab.points(vm=name)]
        assert kept == [run3[name], run2[name]], f"{name} keeps its two newest points, newest first"
    # The deleted points referenced a0, y (vm-a) and a0, z (vm-b). a0 is still used by vm-b's
    # kept points and y by vm-a's; z by nobody any more. Exactly one block file must go, and it
    # is one that existed after the first run; everything else, old or new, stays.
    gone = files2 - files3
    assert len(gone) == 1 and gone <= files1, f"expected exactly z collected, gone: {sorted(gone)}"
    assert len(files3 - files2) == 2, "a2 and z2 were added"

    verified = lab.run_json("restore-point", "verify", "--all")
    assert verified["ok"] is True and verified["damaged_points"] == []
    assert verified["checked_points"] == 4
    for name in ("vm-a", "vm-b"):
        assert lab.restore(name)[1] == bytes(lab.disks[name])
        assert lab.restore(name, point=run2[name])[1] == disks_at_run2[name]
    assert lab.run("restore", "vm-a", "--point", run1["vm-a"], "--to", lab.scratch / "gone").returncode == EXIT_NOT_FOUND


def test_a_session_collects_garbage_only_when_gc_interval_seconds_have_passed(lab: Lab) -> None:
    """Given retention = 1 and the default gc_interval_seconds (a day): the first collection
    ever runs at the end of the session whose retention made garbage; a session within a day
    of it leaves its garbage and says when it will be freed; ``repository gc`` frees it now;
    and the first session to end a day after the last collection collects again."""
    lab.configure(vms={"web": "2 MiB"}, jobs={"nightly": {"vms": ["web"], "retention": 1}})

    def run(seed: int) -> dict:
        lab.write_disk("web", payload(BLOCK, seed) + payload(BLOCK, seed + 1), offset=0)
        return lab.start_wait("nightly")

    run(1)
    first_blocks = lab.block_files()
    run(3)  # retention deletes the first point; no collection yet: this one is due
    assert not first_blocks & lab.block_files(), "the first collection freed the first point's blocks"

    second_blocks = lab.block_files()
    third = run(5)  # within a day of that collection
    assert second_blocks <= lab.block_files(), "not due: the deleted point's blocks stay"
    log = [line["text"] for line in lab.session(third["id"])["log"]]
    assert any(text.startswith("garbage collection not due:") and "backupd repository gc local" in text
               for text in log), log

    collected = lab.run_json("repository", "gc")
    assert collected == [{"repository": "local", "removed_blocks": 2, "freed_bytes": collected[0]["freed_bytes"],
                          "deferred": False, "damaged_points": []}]
    assert collected[0]["freed_bytes"] > 0
    assert not second_blocks & lab.block_files(), "repository gc freed them now"

    third_blocks = lab.block_files()
    run(7)
    assert third_blocks <= lab.block_files(), "not due again: that collection was just now"
    day_ago = (lab.repo / "gc-last").stat().st_mtime - 86400
    os.utime(lab.repo / "gc-last", (day_ago, day_ago))
    run(9)
    assert not third_blocks & lab.block_files(), "a day after the last collection, the session collects"
    assert lab.run_json("restore-point", "verify", "--all")["ok"] is True

    assert lab.run("repository", "gc", "nowhere").returncode == EXIT_NOT_FOUND


def test_verify_reports_exactly_the_points_that_reference_a_corrupted_block(lab: Lab) -> None:
    """Given two VMs whose second restore points share one block (and whose first points do
    not use it), when bytes of that block's file are flipped, then ``verify --all`` exits 2 with
    ok = false and lists exactly those two points as damaged; the first points still verify."""
    lab.configure(vms={"vm-a": "4 MiB", "vm-b": "4 MiB"}, jobs={"nightly": {"vms": ["vm-a", "vm-b"]}})
    s, p, q, n = (payload(BLOCK, seed) for seed in (1, 2, 3, 4))
    lab.write_disk("vm-a", s + p, offset=0)
    lab.write_disk("vm-b", s + q, offset=0)
    first = _ids(lab.start_wait("nightly"))
    files1 = lab.block_files()

    lab.write_disk("vm-a", n, offset=BLOCK)  # both VMs now hold block n, stored once
    lab.write_disk("vm-b", n, offset=BLOCK)
    second_doc = lab.start_wait("nightly")
    assert {vm["mode"] for vm in second_doc["vms"]} == {"incremental"}
    second = _ids(second_doc)
    new = lab.block_files() - files1
    assert len(new) == 1, f"block n is stored once for both VMs: {sorted(new)}"

    assert lab.run_json("restore-point", "verify", "--all")["ok"] is True
    block_file = lab.repo / "blocks" / new.pop()
    data = bytearray(block_file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    block_file.write_bytes(bytes(data))

    report = lab.run_json("restore-point", "verify", "--all", rc=EXIT_FAILED)
    assert report["ok"] is False
    assert sorted(report["damaged_points"]) == sorted([second["vm-a"], second["vm-b"]])
    assert report["checked_points"] == 4

    untouched = lab.run_json("restore-point", "verify", first["vm-a"], first["vm-b"])
    assert untouched["ok"] is True and untouched["damaged_points"] == []
    one = lab.run_json("restore-point", "verify", second["vm-b"], rc=EXIT_FAILED)
    assert one["damaged_points"] == [second["vm-b"]]
