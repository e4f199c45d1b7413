"""What scripts rely on besides session results: an invalid config is refused before anything
runs (exit 78, naming the file and the key path), and the not-found and usage exit codes."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator

import pytest

from labkit import EXIT_CONFIG, EXIT_NOT_FOUND, EXIT_USAGE, Lab

VALID = """\
[state]
url = {state_url}

[repositories.local]
path = {repository_path}
{repository_extra}

[providers.lab]
type = "simulated"
state_dir = "lab"
{provider_extra}

[[providers.lab.vms]]
name = "web-01"
disks = [{disk}]

[jobs.{job_name}]
provider = {provider}
repository = {repository}
vms = {vms}
max_parallel_vms = {max_parallel_vms}
{job_extra}
"""

DEFAULTS = {
    "state_url": '"sqlite:///state.db"',
    "repository_path": '"repo"',
    "repository_extra": "",
    "provider_extra": "",
    "job_name": "nightly",
    "disk": '"32 MiB"',
    "provider": '"lab"',
    "repository": '"local"',
    "vms": '["web-01"]',
    "max_parallel_vms": "2",
    "job_extra": "",
}

# (id, the change to the valid config, the key path the message must name)
BAD_CONFIGS = [
    ("unknown key", {"job_extra": "max_paralel_vms = 4"}, "jobs.nightly.max_paralel_vms"),
    ("wrong type", {"max_parallel_vms": '"two"'}, "jobs.nightly.max_parallel_vms"),
    ("unknown provider", {"provider": '"vcenter-01"'}, "jobs.nightly.provider"),
    ("unknown repository", {"repository": '"offsite"'}, "jobs.nightly.repository"),
    ("empty VM list", {"vms": "[]"}, "jobs.nightly.vms"),
    ("bad disk size", {"disk": '"32 MeB"'}, "providers.lab.vms"),
    ("bad block size", {"repository_extra": 'block_size = "1 MiBB"'}, "repositories.local.block_size"),
    (
        "duplicate job table",
        {"job_extra": '\n[jobs.nightly]\nprovider = "lab"\nrepository = "local"\nvms = ["web-01"]'},
        "jobs.nightly",
    ),
    # bad input (issue 7, section 5): each of these was accepted, or crashed with exit 2
    ("disk larger than 62 TiB", {"disk": '"16 EiB"'}, "providers.lab.vms.0.disks.0: disk size '16 EiB' is too large"),
    ("negative disk size", {"disk": '"-1 GiB"'}, "providers.lab.vms.0.disks.0: bad size string"),
    ("snapshot seconds inf", {"provider_extra": "snapshot_create_seconds = inf"}, "providers.lab.snapshot_create_seconds"),
    ("snapshot seconds 1e300", {"provider_extra": "snapshot_remove_seconds = 1e300"}, "providers.lab.snapshot_remove_seconds"),
    ("read throttle nan", {"provider_extra": "read_mib_per_s = nan"}, "providers.lab.read_mib_per_s"),
    ("retention huge", {"job_extra": "retention = 99999999999999999999999"}, "jobs.nightly.retention"),
    ("VM lock timeout inf", {"job_extra": "vm_lock_timeout_seconds = inf"}, "jobs.nightly.vm_lock_timeout_seconds"),
    ("state URL not a URL", {"state_url": '"not a url"'}, "state.url: not a database URL"),
    ("state URL empty", {"state_url": '""'}, "state.url: not a database URL"),
    ("state URL unknown dialect", {"state_url": '"mysqlx://backupd:hunter2@db/backupd"'}, "state.url: unknown database dialect"),
    ("repository path is a file", {"repository_path": '"backupd.toml"'}, "repositories.local.path"),
    ("repository path under a file", {"repository_path": '"backupd.toml/repo"'}, "repositories.local.path"),
    ("empty job name", {"job_name": '""'}, 'jobs."": a name cannot be empty'),
    ("NUL in a job's VM name", {"vms": '["web\\u000001"]'}, "jobs.nightly.vms.0: a name cannot contain control characters"),
]


def test_the_valid_base_config_runs(lab: Lab) -> None:
    """Given the config the bad cases below are derived from, when the job runs, then it succeeds
    (so each bad case fails for its one change, not for something else)."""
    lab.write_raw_config(VALID.format(**DEFAULTS))
    doc = lab.start_wait("nightly")
    assert doc["result"] == "success" and [vm["status"] for vm in doc["vms"]] == ["success"]


@pytest.mark.parametrize(("change", "key_path"), [(c, k) for _, c, k in BAD_CONFIGS], ids=[i for i, _, _ in BAD_CONFIGS])
def test_invalid_config_is_refused_with_exit_78_naming_file_and_key_and_nothing_is_created(
    lab: Lab, change: dict[str, str], key_path: str
) -> None:
    """Given a config with one mistake, when a job is started, then the command exits 78, stderr
    names the config file and the key path of the mistake, stdout stays empty, and nothing was
    created: no state DB, no repository, no simulated hypervisor state."""
    lab.write_raw_config(VALID.format(**{**DEFAULTS, **change}))

    for command in (["job", "start", "nightly", "--wait", "--json"], ["job", "list", "--json"]):
        proc = lab.run(*command)
        assert proc.returncode == EXIT_CONFIG, proc
        assert str(lab.config) in proc.stderr, f"stderr names the file: {proc.stderr!r}"
        assert key_path in proc.stderr, f"stderr names {key_path}: {proc.stderr!r}"
        assert proc.stdout == "", "no JSON document for a refused config"
        assert "Traceback" not in proc.stderr and "hunter2" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in lab.site.iterdir()) == ["backupd.toml"], "nothing else was created"


def test_a_config_file_that_is_not_utf8_exits_78_naming_line_and_byte(lab: Lab) -> None:
    """Given the valid config saved in Latin-1 with an "é" in a comment on its last line, when
    a job is started, then it exits 78 naming the file, the line and the byte offset, and
    nothing is created."""
    text = VALID.format(**DEFAULTS) + "# café\n"
    data = text.encode("latin-1")
    lab.config.write_bytes(data)
    line, offset = text.count("\n"), data.index("é".encode("latin-1"))

    proc = lab.run("job", "start", "nightly", "--wait")

    assert proc.returncode == EXIT_CONFIG, proc
    assert f"{lab.config}:{line}: not UTF-8 text: byte 0xe9 at line {line} (byte offset {offset})" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in lab.site.iterdir()) == ["backupd.toml"]


def test_unknown_job_exits_4_for_start_and_stop(lab: Lab) -> None:
    """Given a valid config, when a job that is not in it is started or stopped, then the exit
    code is 4 (not found) and the message names it."""
    lab.write_raw_config(VALID.format(**DEFAULTS))
    for command in (["job", "start", "weekly", "--wait"], ["job", "start", "weekly"], ["job", "stop", "weekly"]):
        proc = lab.run(*command)
        assert proc.returncode == EXIT_NOT_FOUND, proc
        assert "weekly" in proc.stderr


def test_unknown_session_restore_point_and_vm_exit_4(lab: Lab) -> None:
    """Given a lab with one finished session, when a session, restore point or VM that does not
    exist is asked for, then the exit code is 4."""
    lab.write_raw_config(VALID.format(**DEFAULTS))
    lab.start_wait("nightly")
    for command in (
        ["session", "show", "999999"],
        ["session", "show", "999999", "--json"],
        ["restore-point", "verify", "999999"],
        ["restore", "db-99", "--to", str(lab.scratch / "out")],
        ["restore", "web-01", "--point", "999999", "--to", str(lab.scratch / "out")],
    ):
        proc = lab.run(*command)
        assert proc.returncode == EXIT_NOT_FOUND, proc


def test_usage_errors_exit_64_not_2_which_means_failed(lab: Lab) -> None:
    """Given a valid config, when a command line is wrong (unknown option, missing argument),
    then the exit code is 64, never 2, which a scheduler reads as a failed
    session."""
    lab.write_raw_config(VALID.format(**DEFAULTS))
    for command in (
        ["job", "start", "nightly", "--no-such-option"],
        ["job", "stop"],
        ["restore", "web-01"],
    ):
        proc = lab.run(*command)
        assert proc.returncode == EXIT_USAGE, proc


def test_a_runner_that_cannot_start_exits_2_and_ends_its_session_failed(lab: Lab) -> None:
    """Given a file where the runner's log folder should be, when a job is started detached,
    then the command exits 2 (failed, never 1, which scripts read as a warning) naming the
    problem, and the session it created is ended ``failed`` with its VMs ``not_processed``:
    nothing is left looking as if it ran, and a stop of the job finds no running session."""
    lab.configure(vms={"vm-a": "1 MiB"}, jobs={"nightly": {"vms": ["vm-a"]}})
    (lab.site / "logs").write_text("not a folder")

    proc = lab.run("job", "start", "nightly")
    assert proc.returncode == 2, proc
    assert "logs" in proc.stderr and "Traceback" not in proc.stderr
    (session,) = lab.sessions("nightly")
    doc = lab.session(session["id"])
    assert (doc["state"], doc["result"]) == ("stopped", "failed")
    assert [vm["status"] for vm in doc["vms"]] == ["not_processed"]
    assert lab.run("job", "stop", "nightly").returncode == 3


# -- bad command-line arguments -------------------------------------------------------------------

BIG = "10000000000000000000000"  # beyond SQLite's and C's 64-bit integers

# (id, arguments ({payload}: a 4 KiB file, {empty}: an empty file), exit code, words stderr has)
BAD_ARGUMENTS = [
    ("--limit huge", ["session", "list", "--limit", BIG], EXIT_USAGE, "1<=x<=100000"),
    ("--limit zero", ["session", "list", "--limit", "0"], EXIT_USAGE, "--limit"),
    ("session id huge", ["session", "show", BIG], EXIT_NOT_FOUND, f"no session {BIG}"),
    ("session id huge, --json", ["session", "show", BIG, "--json"], EXIT_NOT_FOUND, f"no session {BIG}"),
    ("session id 2**63", ["session", "show", str(2**63)], EXIT_NOT_FOUND, f"no session {2**63}"),
    ("session id zero", ["session", "show", "0"], EXIT_NOT_FOUND, "no session 0"),
    ("session id negative", ["session", "show", "--", "-1"], EXIT_NOT_FOUND, "no session -1"),
    ("session id not a number", ["session", "show", "abc"], EXIT_USAGE, "'abc' is not a valid integer"),
    ("--blocks more than the disk has", ["sim", "write", "web-01", "--blocks", "5000"], EXIT_USAGE,
     "--blocks 5000: VM 'web-01' Hard disk 1 has 4 blocks of 1 MiB"),
    ("--blocks huge", ["sim", "write", "web-01", "--blocks", BIG], EXIT_USAGE, f"--blocks {BIG}:"),
    ("--blocks zero", ["sim", "write", "web-01", "--blocks", "0"], EXIT_USAGE, "--blocks"),
    ("--disk that does not exist", ["sim", "write", "web-01", "--disk", "7", "--blocks", "1"], EXIT_USAGE,
     "--disk 7: VM 'web-01' has 1 disk(s) (index 0..0)"),
    ("--disk huge", ["sim", "write", "web-01", "--disk", BIG, "--blocks", "1"], EXIT_USAGE, f"--disk {BIG}:"),
    ("--disk negative", ["sim", "write", "web-01", "--disk", "-1", "--blocks", "1"], EXIT_USAGE, "--disk"),
    ("--offset past the end", ["sim", "write", "web-01", "--file", "{payload}", "--offset", str(4 << 20)], EXIT_USAGE,
     f"--offset {4 << 20}: VM 'web-01' Hard disk 1: cannot write 4096 bytes at offset {4 << 20}; the disk has {4 << 20} bytes"),
    ("--offset huge", ["sim", "write", "web-01", "--file", "{payload}", "--offset", BIG], EXIT_USAGE, f"--offset {BIG}:"),
    ("--file empty", ["sim", "write", "web-01", "--file", "{empty}", "--offset", "0"], EXIT_USAGE, "nothing to write"),
    ("--times huge", ["sim", "fault", "web-01", "--op", "read", "--times", BIG], EXIT_USAGE, "1<=x<=1000000"),
    ("job name not UTF-8", ["job", "start", "night\udcffly"], EXIT_USAGE, "is not UTF-8 text (byte 0xff"),
    ("VM name not UTF-8", ["sim", "cbt-reset", "web\udcff01"], EXIT_USAGE, "is not UTF-8 text"),
    ("empty job name", ["job", "start", ""], EXIT_USAGE, "JOB': cannot be empty"),
    ("stop message with a control character", ["job", "stop", "nightly", "--message", "a\x1bb"], EXIT_USAGE,
     "contains a control character"),
    ("empty provider name", ["vm", "list", "--provider", ""], EXIT_USAGE, "--provider': cannot be empty"),
    ("empty restore folder", ["restore", "web-01", "--to", ""], EXIT_USAGE, "--to': cannot be empty"),
    ("empty config path", ["-c", "", "job", "list"], EXIT_USAGE, "--config': cannot be empty"),
]


@pytest.fixture(scope="module")
def args_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One lab for the whole table (a refused command changes nothing, so the rows cannot
    disturb each other): VM web-01 with one 4 MiB disk, made by a first ``vm list``."""
    lab = Lab(tmp_path_factory.mktemp("bad-arguments"))
    lab.configure(vms={"web-01": "4 MiB"}, jobs={"nightly": {"vms": ["web-01"]}})
    assert lab.run("vm", "list").returncode == 0
    (lab.scratch / "payload.bin").write_bytes(b"x" * 4096)
    (lab.scratch / "empty.bin").write_bytes(b"")
    try:
        yield lab
    finally:
        lab.close()


def _fingerprint(lab: Lab) -> dict[str, str]:
    """Every file under the lab's folder but the state DB's (which SQLite may rewrite when only
    read), with a hash of its bytes: the VMs' disks, CBT logs and faults, the repository."""
    return {
        str(path.relative_to(lab.site)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(lab.site.rglob("*"))
        if path.is_file() and not path.name.startswith("state.db")
    }


def _sessions(lab: Lab) -> int:
    if not lab.state_db.exists():
        return 0
    with sqlite3.connect(lab.state_db) as db:
        return db.execute("SELECT count(*) FROM job_session").fetchone()[0]


@pytest.mark.parametrize(("args", "code", "words"), [row[1:] for row in BAD_ARGUMENTS], ids=[row[0] for row in BAD_ARGUMENTS])
def test_a_bad_argument_exits_with_its_code_and_a_message_and_changes_nothing(
    args_lab: Lab, args: list[str], code: int, words: str
) -> None:
    """Given a lab with one VM, when a command gets an argument out of range, not a number, not
    UTF-8 or empty, then it exits 64 (usage) or 4 (a session id no session can have), stderr
    names the problem without a traceback, and nothing changed: no disk written, no fault
    armed, no session created, no repository."""
    lab = args_lab
    files = {"payload": str(lab.scratch / "payload.bin"), "empty": str(lab.scratch / "empty.bin")}
    before, sessions = _fingerprint(lab), _sessions(lab)

    proc = lab.run(*[arg.format(**files) if arg.startswith("{") else arg for arg in args])

    assert proc.returncode == code, proc
    assert words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc
    assert _fingerprint(lab) == before, "a refused command changed the lab"
    assert _sessions(lab) == sessions and not lab.repo.exists()
