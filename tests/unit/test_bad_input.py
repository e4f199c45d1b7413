"""Bad input in the config file: each case is refused by :func:`load_config` with a
:class:`ConfigError` (exit code 78) naming the file, the key path and the line, before anything
runs or is created.

Each row of :data:`CASES` makes one change to :data:`VALID` (which sets every key, so each
change is a one-line edit); the line expected is the line of the change unless the row says
otherwise.
"""

from __future__ import annotations

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
"""

# (id, (text in VALID, its replacement), key path named, words of the message)
CASES = [
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
     "repositories.local.compression_level", "finite number"),
    ("block size 16 EiB", ('block_size = "1 MiB"', 'block_size = "16 EiB"'), "repositories.local.block_size", "power of two"),
    ("block size negative", ('block_size = "1 MiB"', "block_size = -1048576"), "repositories.local.block_size", "could not parse"),
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
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    assert error.exit_code == 78
    assert str(error).startswith("invalid config\n") and str(path) in str(error)
    assert sorted(p.name for p in path.parent.iterdir()) == ["backupd.toml"], "nothing was created"
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

    error = refused(path)

    assert any(k == key and ln == line and words in t for k, ln, t in error.problems), error.problems
    assert f"{path}:{line}: {key}: " in str(error), str(error)
