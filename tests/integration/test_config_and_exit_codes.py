"""What scripts rely on besides session results: an invalid config is refused before anything
runs (exit 78, naming the file and the key path), and the not-found and usage exit codes."""

from __future__ import annotations

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

