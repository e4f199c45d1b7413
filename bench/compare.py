"""``bench/compare.py --baseline REV``: the bench's backupd figures of an earlier commit and of
the working tree, measured in one sitting, side by side.

A change that adds work to the hot path (an integrity check, say) has to show what it costs,
and two bench runs hours apart on a shared machine differ by more than such a change. This
runs ``bench/run.py`` alternately for the baseline (``git archive REV`` of ``backupd/`` and
``providers/``, put first on ``PYTHONPATH`` so every ``python -m backupd`` the bench starts
runs that code) and for the working tree, ``--pairs`` times, on the same lab and disk images,
and prints the medians of each side and the change.

Run as ``.venv/bin/python bench/compare.py --baseline d8d83ea`` (``make bench-compare
BASELINE=d8d83ea``). Both sides need the same dependencies (the current venv is used).
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


def bench_once(lab: Path, pythonpath: str | None) -> dict[str, Any]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    else:
        env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--lab", str(lab)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((lab / "results.json").read_text())["summary"]


def figure(summary: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare with (e.g. a hash or HEAD~3)")
    parser.add_argument("--lab", type=Path, default=Path("bench-lab"), help="the bench's lab folder")
    parser.add_argument("--pairs", type=int, default=2, help="baseline/current runs, alternated (default 2)")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory(prefix="backupd-baseline-") as tmp:
        export(args.baseline, Path(tmp))
        for pair in range(1, args.pairs + 1):
            for side, path in (("baseline", tmp), ("current", None)):
                progress(f"pair {pair}/{args.pairs}: {side}")
                runs[side].append(bench_once(args.lab, path))
    rows = [("figure (median)", f"baseline {args.baseline}", "current", "change")]
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
