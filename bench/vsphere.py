"""``make bench`` (second part): the cost of the vSphere transport (issue 6, section 5).

Run as ``.venv/bin/python bench/vsphere.py --lab bench-lab``. One VM whose disk is the 2 GiB
ext4 image of ``bench/run.py`` (``share-2g``, built there or here, reused while its recipe is
unchanged), backed up by the public CLI (``job start --wait --json``, timed from outside)
three ways, each into a fresh repository and state DB:

``vsphere-http``
    provider ``type = "vsphere"`` on the project's simulator launcher (contrib/vcsim) over
    plain http: snapshots through the SOAP API, changed areas through
    ``QueryChangedDiskAreas``, disk data over the datastore endpoint (``/folder`` with Range
    requests);
``vsphere-https``
    the same over https, the launcher's self-signed certificate pinned by ``thumbprint``;
``simulated``
    the same image through the simulated provider (its disk imported before timing): no
    network, no SOAP; the difference is the cost of the transport.

Each does a full backup, then 20 random 1 MiB blocks of the disk change (the same offsets and
bytes for every variant: written into the launcher's disk file, or ``sim write --file``), then
an incremental one. The table gives wall seconds of the ``job start`` process, logical MiB/s
(2 GiB / wall time) and the bytes read. The launcher computes CBT by hashing every disk at
each snapshot (contrib/vcsim/README.md), a cost a real vCenter does not have; it is in the
vSphere figures. Needs Go and the govmomi source (``apt-get install golang-go
golang-github-vmware-govmomi-dev``) and e2fsprogs; the table goes to stdout, the numbers to
``LAB/vsphere/results.json``, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from run import IMAGES, Backupd, BenchError, bench_session, machine, progress

from backupd.disk_images import MiB, DiskImageError, build_ext4_image, toml_string

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from vsphere_sim import Vcsim, VcsimUnavailable  # noqa: E402 - the launcher's Python side

VM = "share-2g"
PASSWORD_ENV = "BACKUPD_BENCH_VC_PASSWORD"
#: the guest change between the two sessions: this many random 1 MiB blocks
CHANGED_BLOCKS = 20
VARIANTS = ("vsphere-http", "vsphere-https", "simulated")


def guest_change(size: int, seed: int = 6) -> list[tuple[int, bytes]]:
    """``CHANGED_BLOCKS`` distinct 1 MiB-aligned (offset, 1 MiB of random bytes) of a disk of
    ``size`` bytes, the same for the same seed."""
    rng = random.Random(seed)
    offsets = sorted(rng.sample(range(size // MiB), CHANGED_BLOCKS))
    return [(block * MiB, rng.randbytes(MiB)) for block in offsets]


def write_config(folder: Path, provider: list[str]) -> Path:
    """``FOLDER/backupd.toml``: the ``[providers.p]`` lines given, a repository, SQLite state
    and the job ``bench`` of the one VM."""
    lines = ["# Written by bench/vsphere.py; rewritten on every run.",
             "[state]", 'url = "sqlite:///state.db"', "", *provider, "",
             "[repositories.local]", 'path = "repo"', "",
             "[jobs.bench]", 'provider = "p"', 'repository = "local"', f"vms = [{toml_string(VM)}]"]
    config = folder / "backupd.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def fresh_folder(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def run_variant(cli: Backupd, size: int, change: Any) -> dict[str, Any]:
    """Full session, the guest change (``change()``), incremental session."""
    progress("  full backup")
    full = bench_session(cli, "bench", size, "full")
    change()
    progress("  incremental backup")
    incremental = bench_session(cli, "bench", size, "incremental")
    return {"full": full, "incremental": incremental}


def bench_vsphere(folder: Path, image: Path, tls: bool, blocks: list[tuple[int, bytes]]) -> dict[str, Any]:
    """A variant on the launcher: the VM's disk is a copy of ``image`` (the guest writes into it)."""
    disk = folder / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(disk)], check=True)
    spec = {"vms": [{"name": VM, "cbt": True, "disks": [{"image": str(disk)}]}]}
    with Vcsim(spec, folder / "vcsim", tls=tls) as sim:
        os.environ[PASSWORD_ENV] = sim.password
        values = sim.provider_values(PASSWORD_ENV)
        config = write_config(folder, ["[providers.p]"] + [f"{k} = {_toml(v)}" for k, v in values.items()])

        def change() -> None:
            with open(disk, "r+b") as f:
                for offset, data in blocks:
                    f.seek(offset)
                    f.write(data)

        return run_variant(Backupd(config), image.stat().st_size, change)


def bench_simulated(folder: Path, image: Path, blocks: list[tuple[int, bytes]]) -> dict[str, Any]:
    """The variant on the simulated provider (its disk imported from ``image`` before timing)."""
    config = write_config(folder, ["[providers.p]", 'type = "simulated"', 'state_dir = "sim"', "",
                                   "[[providers.p.vms]]", f"name = {toml_string(VM)}",
                                   f"disks = [{toml_string(str(image))}]"])
    cli = Backupd(config)
    cli.run("vm", "list", "--json")

    def change() -> None:
        for number, (offset, data) in enumerate(blocks):
            block = folder / f"block-{number}.bin"
            block.write_bytes(data)
            cli.run("sim", "write", VM, "--file", str(block), "--offset", str(offset))

    return run_variant(cli, image.stat().st_size, change)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return toml_string(str(value))


def report(results: dict[str, Any]) -> str:
    host = results["machine"]
    lines = [
        f"vSphere transport: {VM} ({results['image_bytes'] // MiB} MiB ext4), full then "
        f"{CHANGED_BLOCKS} x 1 MiB changed, incremental",
        f"machine: {host['cpus']} CPUs ({host['cpu']}), load {host['load_before']:.2f} before, "
        f"{results['load_after']:.2f} after",
        "",
        f"| {'variant':<14} | {'session':<11} | {'seconds':>8} | {'MiB/s':>7} | {'MiB read':>9} |",
        f"|{'-' * 16}|{'-' * 13}|{'-' * 10}|{'-' * 9}|{'-' * 11}|",
    ]
    for name in VARIANTS:
        variant = results["variants"].get(name)
        if isinstance(variant, str):
            lines.append(f"| {name:<14} | failed: {variant[:200]}")
            continue
        for kind in ("full", "incremental"):
            run = variant[kind]
            lines.append(
                f"| {name:<14} | {kind:<11} | {run['wall_seconds']:>8.1f} | "
                f"{run['throughput_bytes_per_s'] / MiB:>7.1f} | {run['bytes_read'] / MiB:>9.1f} |")
    return "\n".join(lines)


def run_bench(lab: Path) -> dict[str, Any]:
    """Every variant (a failed one is recorded with its error); the content of results.json.

    :raises DiskImageError: the image could not be built
    :raises VcsimUnavailable: Go or the govmomi source is missing
    """
    lab = lab.resolve()
    image = lab / "images" / f"{VM}.img"
    if build_ext4_image(image, IMAGES[VM]):
        progress(f"built {image}")
    root = fresh_folder(lab / "vsphere")
    host = machine()
    blocks = guest_change(image.stat().st_size)
    variants: dict[str, Any] = {}
    for name in VARIANTS:
        progress(f"{name}:")
        folder = fresh_folder(root / name)
        try:
            if name == "simulated":
                variants[name] = bench_simulated(folder, image, blocks)
            else:
                variants[name] = bench_vsphere(folder, image, name.endswith("https"), blocks)
        except BenchError as exc:
            progress(f"  {name} failed: {exc}")
            variants[name] = str(exc)
        finally:
            shutil.rmtree(folder / "repo", ignore_errors=True)
            (folder / "disk.img").unlink(missing_ok=True)
    return {"machine": host, "image_bytes": image.stat().st_size, "variants": variants,
            "load_after": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/vsphere.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", type=Path, default=Path("bench-lab"),
                        help="the bench lab (its images/ are shared with bench/run.py; default: bench-lab)")
    args = parser.parse_args(argv)
    try:
        results = run_bench(args.lab)
    except (DiskImageError, VcsimUnavailable) as exc:
        progress(f"error: {exc}")
        return 1
    (args.lab / "vsphere" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    return 0 if all(isinstance(v, dict) for v in results["variants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
