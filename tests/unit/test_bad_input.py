"""Bad input in the config file: each case is refused by :func:`load_config` with a
:class:`ConfigError` (exit code 78) naming the file, the key path and the line, before anything
runs or is created.

Each row of :data:`CASES` makes one change to :data:`VALID` (which sets every key, so each
change is a one-line edit); the line expected is the line of the change unless the row says
otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from backupd.config import load_config
from backupd.errors import ConfigError

VALID = """\
[state]
url = "sqlite:///state.db"

[providers.lab]
type = "simulated"
state_dir = "lab"
read_mib_per_s = 0
snapshot_create_seconds = 0.0
snapshot_remove_seconds = 0.0

[[providers.lab.vms]]
name = "web-01"
disks = ["8 GiB", "1 MiB"]

[repositories.local]
path = "repo"
block_size = "1 MiB"
compression_level = 3

[jobs.nightly]
provider = "lab"
repository = "local"
vms = ["web-01"]
max_parallel_vms = 1
retention = 7
retry = { attempts = 3, wait_seconds = 5 }
vm_lock_timeout_seconds = 600
schedule = { cron = "30 22 * * 1-5", timezone = "Europe/Berlin" }
backup_window = { start = "20:00", end = "06:00" }
drain_period_seconds = 900
auto_retry = { times = 3, wait_seconds = 600 }

[jobs.weekly]
provider = "lab"
repository = "local"
vms = [ "web-01" ]
schedule = { after = "nightly" }

[daemon]
misfire_grace_seconds = 3600
metrics_listen = "127.0.0.1:9188"
"""

# (id, (text in VALID, its replacement), key path named, words of the message)
CASES = [
    # schedules, windows, retries and the daemon
    ("cron with 4 fields", ('cron = "30 22 * * 1-5"', 'cron = "30 22 * *"'), "jobs.nightly.schedule.cron", "5-field"),
    ("cron minute 61", ('cron = "30 22 * * 1-5"', 'cron = "61 22 * * 1-5"'), "jobs.nightly.schedule.cron",
     "minute field"),
    ("cron day of week 8", ('cron = "30 22 * * 1-5"', 'cron = "30 22 * * 1-8"'), "jobs.nightly.schedule.cron", "0-7"),
    ("unknown time zone", ('"Europe/Berlin"', '"Europe/Atlantis"'), "jobs.nightly.schedule.timezone",
     "unknown time zone"),
    ("every and cron", ('timezone = "Europe/Berlin" }', 'timezone = "Europe/Berlin", every = "4h" }'),
     "jobs.nightly.schedule", "exactly one of cron, every or after"),
    ("after an unknown job", ('after = "nightly"', 'after = "monthly"'), "jobs.weekly.schedule.after", "unknown job"),
    ("after itself", ('after = "nightly"', 'after = "weekly"'), "jobs.weekly.schedule.after", "comes back to this job"),
    ("window start not a time", ('start = "20:00"', 'start = "8pm"'), "jobs.nightly.backup_window.start",
     "not a time of day"),
    ("window empty", ('end = "06:00"', 'end = "20:00"'), "jobs.nightly.backup_window", "window would be empty"),
    ("drain period negative", ("drain_period_seconds = 900", "drain_period_seconds = -1"),
     "jobs.nightly.drain_period_seconds", "greater than or equal to 0"),
    ("drain period inf", ("drain_period_seconds = 900", "drain_period_seconds = inf"),
     "jobs.nightly.drain_period_seconds", "finite number"),
    ("auto retry zero times", ("times = 3", "times = 0"), "jobs.nightly.auto_retry.times", "greater than or equal to 1"),
    ("misfire grace nan", ("misfire_grace_seconds = 3600", "misfire_grace_seconds = nan"),
     "daemon.misfire_grace_seconds", "finite number"),
    ("metrics port out of range", ('"127.0.0.1:9188"', '"127.0.0.1:99999"'), "daemon.metrics_listen", "port"),
    ("notify URL apprise cannot use", ('metrics_listen = "127.0.0.1:9188"', 'notify = ["nosuchscheme://x"]'),
     "daemon.notify", "apprise cannot use it"),
    # disk sizes: positive, at most vSphere's largest virtual disk
    ("disk 16 EiB", ('"8 GiB"', '"16 EiB"'), "providers.lab.vms.0.disks.0", "at most 62 TiB, vSphere's largest virtual disk"),
    ("disk 63 TiB", ('"8 GiB", "1 MiB"', '"8 GiB", "63 TiB"'), "providers.lab.vms.0.disks.1", "at most 62 TiB"),
    ("disk -1 GiB", ('"8 GiB"', '"-1 GiB"'), "providers.lab.vms.0.disks.0", "bad size string '-1 GiB'"),
    ("disk 0 B", ('"8 GiB"', '"0 B"'), "providers.lab.vms.0.disks.0", "must be positive"),
    ("disk half a byte", ('"8 GiB"', '"0.5 B"'), "providers.lab.vms.0.disks.0", "must be positive"),
    ("disk 0 bytes as integer", ('"8 GiB"', "0"), "providers.lab.vms.0.disks.0", "must be positive"),
    ("disk huge integer", ('"8 GiB"', "9223372036854775807"), "providers.lab.vms.0.disks.0", "at most 62 TiB"),
    ("disk as float", ('"8 GiB"', "1.5"), "providers.lab.vms.0.disks.0", "a path or a size string"),
    ("disk image path empty", ('"8 GiB"', '""'), "providers.lab.vms.0.disks.0", "cannot be empty"),
    ("disk image path with NUL", ('"8 GiB"', '"a\\u0000b.img"'), "providers.lab.vms.0.disks.0", "NUL"),
    # floats: finite, inside a documented range
    ("snapshot seconds 1e300", ("snapshot_create_seconds = 0.0", "snapshot_create_seconds = 1e300"),
     "providers.lab.snapshot_create_seconds", "less than or equal to 3600"),
    ("snapshot seconds inf", ("snapshot_create_seconds = 0.0", "snapshot_create_seconds = inf"),
     "providers.lab.snapshot_create_seconds", "finite number"),
    ("snapshot seconds nan", ("snapshot_remove_seconds = 0.0", "snapshot_remove_seconds = nan"),
     "providers.lab.snapshot_remove_seconds", "finite number"),
    ("snapshot seconds negative", ("snapshot_remove_seconds = 0.0", "snapshot_remove_seconds = -1.0"),
     "providers.lab.snapshot_remove_seconds", "greater than or equal to 0"),
    ("read throttle inf", ("read_mib_per_s = 0", "read_mib_per_s = inf"), "providers.lab.read_mib_per_s", "finite number"),
    ("read throttle huge", ("read_mib_per_s = 0", "read_mib_per_s = 1e300"), "providers.lab.read_mib_per_s", "less than or equal to"),
    ("read throttle tiny", ("read_mib_per_s = 0", "read_mib_per_s = 1e-300"), "providers.lab.read_mib_per_s", "at least 0.01"),
    ("read throttle negative", ("read_mib_per_s = 0", "read_mib_per_s = -1"), "providers.lab.read_mib_per_s", "greater than or equal to 0"),
    ("retry wait nan", ("wait_seconds = 5", "wait_seconds = nan"), "jobs.nightly.retry.wait_seconds", "finite number"),
    ("retry wait inf", ("wait_seconds = 5", "wait_seconds = inf"), "jobs.nightly.retry.wait_seconds", "finite number"),
    ("retry attempts huge", ("attempts = 3", "attempts = 99999999999999999999999"), "jobs.nightly.retry.attempts", "less than or equal to 100"),
    ("VM lock timeout inf", ("vm_lock_timeout_seconds = 600", "vm_lock_timeout_seconds = inf"),
     "jobs.nightly.vm_lock_timeout_seconds", "finite number"),
    ("VM lock timeout over 7 days", ("vm_lock_timeout_seconds = 600", "vm_lock_timeout_seconds = 604801"),
     "jobs.nightly.vm_lock_timeout_seconds", "less than or equal to 604800"),
    ("VM lock timeout negative", ("vm_lock_timeout_seconds = 600", "vm_lock_timeout_seconds = -1"),
     "jobs.nightly.vm_lock_timeout_seconds", "greater than or equal to 0"),
    # integers: inside a documented range
    ("retention huge", ("retention = 7", "retention = 99999999999999999999999"), "jobs.nightly.retention", "less than or equal to 10000"),
    ("retention zero", ("retention = 7", "retention = 0"), "jobs.nightly.retention", "greater than or equal to 1"),
    ("parallel VMs huge", ("max_parallel_vms = 1", "max_parallel_vms = 9223372036854775807"),
     "jobs.nightly.max_parallel_vms", "less than or equal to 64"),
    ("compression level 20", ("compression_level = 3", "compression_level = 20"),
     "repositories.local.compression_level", "less than or equal to 19"),
    ("compression level nan", ("compression_level = 3", "compression_level = nan"),
     "repositories.local.compression_level", "valid integer"),
    ("compression level true", ("compression_level = 3", "compression_level = true"),
     "repositories.local.compression_level", "valid integer"),
    ("retention 7.5", ("retention = 7", "retention = 7.5"), "jobs.nightly.retention", "valid integer"),
    ("block size 16 EiB", ('block_size = "1 MiB"', 'block_size = "16 EiB"'), "repositories.local.block_size", "power of two"),
    ("block size negative", ('block_size = "1 MiB"', "block_size = -1048576"), "repositories.local.block_size", "could not parse"),
    # the state DB URL: a SQLAlchemy URL of a dialect SQLAlchemy has
    ("state URL not a URL", ('url = "sqlite:///state.db"', 'url = "not a url"'), "state.url", "not a database URL"),
    ("state URL empty", ('url = "sqlite:///state.db"', 'url = ""'), "state.url", "not a database URL"),
    ("state URL unknown dialect", ('url = "sqlite:///state.db"', 'url = "foo://x"'), "state.url", "unknown database dialect 'foo'"),
    ("state URL unknown dialect, no host", ('url = "sqlite:///state.db"', 'url = "mysqlx://"'), "state.url", "unknown database dialect 'mysqlx'"),
    ("state URL unknown driver", ('url = "sqlite:///state.db"', 'url = "postgresql+nodriver://u:hunter2@db/backupd"'),
     "state.url", "unknown database dialect 'postgresql+nodriver'"),
    ("state URL asyncio driver", ('url = "sqlite:///state.db"', 'url = "postgresql+asyncpg://u:hunter2@db/backupd"'),
     "state.url", "asyncio driver"),
    ("state URL with NUL", ('url = "sqlite:///state.db"', 'url = "sqlite:///state\\u0000.db"'), "state.url", "control characters"),
    ("state URL SQLite file is a folder", ('url = "sqlite:///state.db"', 'url = "sqlite:///a-folder"'), "state.url", "a folder, not a database file"),
    ("state URL SQLite under a file", ('url = "sqlite:///state.db"', 'url = "sqlite:///a-file/state.db"'), "state.url", "is a file, not a folder"),
    # folders: where a folder is to be, a file is refused
    ("repository path is a file", ('path = "repo"', 'path = "a-file"'), "repositories.local.path", "a-file is a file, not a folder"),
    ("repository path under a file", ('path = "repo"', 'path = "a-file/repo"'), "repositories.local.path", "a-file is a file, not a folder"),
    ("repository path empty", ('path = "repo"', 'path = ""'), "repositories.local.path", "cannot be empty"),
    ("repository path with NUL", ('path = "repo"', 'path = "re\\u0000po"'), "repositories.local.path", "NUL"),
    ("state_dir is a file", ('state_dir = "lab"', 'state_dir = "a-file"'), "providers.lab.state_dir", "a-file is a file, not a folder"),
    ("state_dir empty", ('state_dir = "lab"', 'state_dir = ""'), "providers.lab.state_dir", "cannot be empty"),
    # names: not empty, no control characters
    ("job name empty", ("[jobs.nightly]", '[jobs.""]'), 'jobs.""', "cannot be empty"),
    ("job name blank", ("[jobs.nightly]", '[jobs." "]'), 'jobs." "', "cannot be empty"),
    ("job name with NUL", ("[jobs.nightly]", '[jobs."night\\u0000ly"]'), 'jobs."night\\u0000ly"', "control characters"),
    ("job name too long", ("[jobs.nightly]", f"[jobs.{'n' * 256}]"), f"jobs.{'n' * 256}", "at most 255 characters"),
    ("provider name empty", ("[providers.lab]", '[providers.""]'), 'providers.""', "cannot be empty"),
    ("repository name with escape", ("[repositories.local]", '[repositories."lo\\u001bcal"]'), 'repositories."lo\\u001bcal"', "control characters"),
    ("VM name empty", ('name = "web-01"', 'name = ""'), "providers.lab.vms.0.name", "cannot be empty"),
    ("VM name with newline", ('name = "web-01"', 'name = "web\\n01"'), "providers.lab.vms.0.name", "control characters"),
    ("VM name with spaces around", ('name = "web-01"', 'name = " web-01"'), "providers.lab.vms.0.name", "begin or end with spaces"),
    ("job VM name with NUL", ('vms = ["web-01"]', 'vms = ["web\\u000001"]'), "jobs.nightly.vms.0", "control characters"),
    ("job VM name empty", ('vms = ["web-01"]', 'vms = [""]'), "jobs.nightly.vms.0", "cannot be empty"),
]


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "backupd.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path) -> ConfigError:
    """The ConfigError loading ``path`` raises, after checking what every refusal shares."""
    before = sorted(path.parent.rglob("*"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    assert error.exit_code == 78
    assert str(error).startswith("invalid config\n") and str(path) in str(error)
    assert sorted(path.parent.rglob("*")) == before, "nothing was created"
    return error


def test_the_valid_base_config_loads(tmp_path: Path) -> None:
    """Each case below fails for its one change, not for something else."""
    config = load_config(write(tmp_path, VALID))
    assert config.providers["lab"].vms[0].disks == [8 << 30, 1 << 20]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("change", "key", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_value_is_refused_naming_file_key_path_and_line(tmp_path: Path, change, key: str, words: str) -> None:
    old, new = change
    assert VALID.count(old) == 1, f"{old!r} must occur once in VALID"
    text = VALID.replace(old, new)
    line = VALID[: VALID.index(old)].count("\n") + 1
    path = write(tmp_path, text)
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()

    error = refused(path)

    assert any(k == key and ln == line and words in t for k, ln, t in error.problems), error.problems
    assert f"{path}:{line}: {key}: " in str(error), str(error)
    assert "hunter2" not in str(error), "a password is never shown"


def test_a_config_file_that_is_not_utf8_names_the_line_and_byte_of_the_first_bad_byte(tmp_path: Path) -> None:
    """Given a config saved in Latin-1 (an "é" in a job description on line 21), when it is
    loaded, then it is refused as not UTF-8 text, naming the line and the byte offset."""
    text = VALID.replace("[jobs.nightly]", '[jobs.nightly]\ndescription = "caf\u00e9"')
    data = text.encode("latin-1")
    path = write(tmp_path, data)

    error = refused(path)

    ((key, line, words),) = error.problems
    offset = data.index(b"\xe9")
    assert (key, line) == ("", 21)
    assert words == f"not UTF-8 text: byte 0xe9 at line 21 (byte offset {offset}) cannot be decoded; save the file as UTF-8"
    assert f"{path}:21: not UTF-8 text" in str(error)


def test_a_utf16_config_file_is_refused_as_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.encode("utf-16"))
    ((_, line, words),) = refused(path).problems
    assert line == 1 and words.startswith("not UTF-8 text: byte 0xff at line 1 (byte offset 0)")


def test_a_state_db_whose_driver_is_not_installed_is_a_state_error_without_the_password(monkeypatch) -> None:
    """A known dialect whose DBAPI package is missing is not a config error (the package may be
    installed later): opening the DB says which module is missing, and hides the password."""
    from backupd.errors import StateError
    from backupd.state import StateStore

    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg fails, installed or not
    with pytest.raises(StateError) as caught:
        StateStore("postgresql+psycopg://backupd:hunter2@db.invalid/backupd")
    message = str(caught.value)
    assert "driver is not installed" in message and "'psycopg'" in message, message
    assert "hunter2" not in message and "backupd:***@db.invalid" in message, message


def test_a_sqlite_state_db_under_a_file_is_a_state_error(tmp_path: Path) -> None:
    from backupd.errors import StateError
    from backupd.state import StateStore

    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(StateError, match="cannot open the state DB .*a-file"):
        StateStore(f"sqlite:///{tmp_path}/a-file/state.db")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["job", "start", "night\0ly"], "contains a control character ('\\x00')"),
        (["job", "start", "night\udcffly"], "is not UTF-8 text (byte 0xff at character 6)"),
        (["sim", "write", "\ud800", "--blocks", "1"], "is not UTF-8 text (lone surrogate U+D800 at character 1)"),
        (["job", "stop", "nightly", "--message", "two\nlines"], "contains a control character ('\\n')"),
    ],
    ids=["NUL", "undecodable byte", "lone surrogate", "newline in a message"],
)
def test_a_name_that_is_not_text_is_a_usage_error_before_the_config_is_read(tmp_path: Path, capsys, argv, words) -> None:
    """Arguments that cannot come from a shell (a NUL, a surrogate outside Python's
    surrogateescape range) can come from a caller of :func:`backupd.cli.main`: refused alike."""
    from backupd.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["-c", str(tmp_path / "absent.toml"), *argv])
    assert caught.value.code == 64
    assert words in capsys.readouterr().err
