"""``bench/compare.py --baseline REV``: the bench's backupd figures of an earlier commit and of
the working tree, measured in one sitting, side by side.

A change that adds work to the hot path (an integrity check, say) has to show what it costs,
and two bench runs hours apart on a shared machine differ by more than such a change. This
runs ``bench/run.py`` alternately for the baseline (``git archive REV`` of ``backupd/`` and
``providers/``, put first on ``PYTHONPATH`` so every ``python -m backupd`` the bench starts
runs that code) and for the working tree (or ``--current REV``, exported the same way),
``--pairs`` times, on the same lab and disk images, and prints the medians of each side and
the change. The bench runs in the lab folder: ``python -m`` puts its working directory first
on ``sys.path``, and in the repository's root that is the working tree's ``backupd/``, which
would hide the baseline.

Run as ``.venv/bin/python bench/compare.py --baseline d8d83ea`` (``make bench-compare
BASELINE=d8d83ea``). Both sides need the same dependencies (the current venv is used).

``--overhead sqlite|postgresql`` compares the daemon bench's per-VM overhead instead: a lab of
``bench/daemon.py`` (100 jobs in the config, the job ``alone`` of 10 unchanged VMs), then
``job start alone --wait`` alternately with each side's code, one session per process (what
the daemon pays per session: imports, a cold connection pool, first statement compilations),
``--pairs`` times (12 is a good start); it prints each side's median ms per VM and the median
of the paired differences. Both sides must know the state DB schema the lab was made with.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent

#: (label, path into results.json's summary); all are seconds, lower is better
FIGURES = [
    ("full backup 2 GiB, whole process (s)", ("full_wall_seconds", "backupd")),
    ("incremental, snapshot to commit (s)", ("incremental_vm_seconds",)),
    ("incremental, whole process (s)", ("incremental_wall_seconds", "backupd")),
]


def progress(message: str) -> None:
    print(f"[compare] {message}", file=sys.stderr, flush=True)


def export(rev: str, into: Path) -> None:
    """The baseline's packages, from git, into ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "backupd", "providers"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def side_env(pythonpath: str | None) -> dict[str, str]:
    """This process's environment with ``pythonpath`` (None: the working tree) as PYTHONPATH."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    else:
        env.pop("PYTHONPATH", None)
    return env


def bench_once(lab: Path, pythonpath: str | None) -> dict[str, Any]:
    lab = lab.resolve()
    lab.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--lab", str(lab)], env=side_env(pythonpath),
                   check=True, stdout=subprocess.DEVNULL, cwd=lab)
    return json.loads((lab / "results.json").read_text())["summary"]


def overhead_once(config: Path, pythonpath: str | None) -> float:
    """ms per VM of one session of the job ``alone`` in a process of its own."""
    done = subprocess.run([sys.executable, "-m", "backupd", "-c", str(config), "job", "start", "alone", "--wait",
                           "--json"], env=side_env(pythonpath), cwd=config.parent, capture_output=True, text=True,
                          check=True)
    session = json.loads(done.stdout)
    return 1000 * session["duration_seconds"] / len(session["vms"])


def compare_overhead(lab: Path, state: str, pairs: int, sides: list[tuple[str, str | None]]) -> str:
    """``--overhead``: the per-VM overhead of both sides on one lab of bench/daemon.py."""
    import daemon as daemon_bench  # bench/daemon.py, beside this script

    lab = (lab / "overhead").resolve()
    database = daemon_bench.create_pg_database() if state == "postgresql" else None
    url = f"{daemon_bench.POSTGRES}/{database}" if database else f"sqlite:///{lab / 'state.db'}"
    try:
        config = lab / "backupd.toml"
        daemon_bench.prepare_lab(lab, url, 100, 10)
        values: dict[str, list[float]] = {name: [] for name, _path in sides}
        for pair in range(1, pairs + 1):
            progress(f"pair {pair}/{pairs}")
            for name, path in sides:
                values[name].append(overhead_once(config, path))
    finally:
        if database:
            daemon_bench.psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    (before, after) = (values[name] for name, _path in sides)
    differences = [b - a for a, b in zip(before, after)]
    return (f"per-VM overhead alone on {state}, ms, {pairs} pairs: {sides[0][0]} median {statistics.median(before):.2f}, "
            f"{sides[1][0]} median {statistics.median(after):.2f}, paired difference median "
            f"{statistics.median(differences):+.2f}\nall values: {json.dumps(values)}")


def figure(summary: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare with (e.g. a hash or HEAD~3)")
    parser.add_argument("--lab", type=Path, default=Path("bench-lab"), help="the bench's lab folder")
    parser.add_argument("--current", help="a commit to measure instead of the working tree")
    parser.add_argument("--pairs", type=int, default=2, help="baseline/current runs, alternated (default 2)")
    parser.add_argument("--overhead", choices=("sqlite", "postgresql"),
                        help="compare the daemon bench's per-VM overhead of a session alone on this state DB")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory(prefix="backupd-baseline-") as tmp, \
            tempfile.TemporaryDirectory(prefix="backupd-current-") as current:
        export(args.baseline, Path(tmp))
        current_path = None  # the working tree, through the venv's editable install
        if args.current:
            export(args.current, Path(current))
            current_path = current
        if args.overhead:
            sides = [(f"baseline {args.baseline}", tmp), (args.current or "current", current_path)]
            print(compare_overhead(args.lab, args.overhead, args.pairs, sides))
            return 0
        for pair in range(1, args.pairs + 1):
            for side, path in (("baseline", tmp), ("current", current_path)):
                progress(f"pair {pair}/{args.pairs}: {side}")
                runs[side].append(bench_once(args.lab, path))
    rows = [("figure (median)", f"baseline {args.baseline}", args.current or "current", "change")]
    for label, path in FIGURES:
        values = {side: [v for v in (figure(s, path) for s in runs[side]) if v is not None] for side in runs}
        if not all(values.values()):
            continue
        before, after = (statistics.median(values[side]) for side in ("baseline", "current"))
        change = (after - before) / before * 100
        rows.append((label, f"{before:.3f}", f"{after:.3f}", f"{change:+.1f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print("\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows))
    print(f"\nall values: {json.dumps({side: [[figure(s, p) for _l, p in FIGURES] for s in runs[side]] for side in runs})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
