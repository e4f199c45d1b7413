"""Config validation: every problem is reported with file, line and key path; nothing runs."""

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

[[providers.lab.vms]]
name = "web-01"
disks = ["images/web-01.img", "8 GiB"]

[repositories.local]
path = "repo"

[jobs.nightly]
provider = "lab"
repository = "local"
vms = ["web-01", "db-01"]
max_parallel_vms = 2
quiesce = true
retention = 7
retry = { attempts = 3, wait_seconds = 5 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "backupd.toml"
    path.write_text(text)
    return path


def problems(path: Path) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.exit_code == 78
    assert str(path) in str(caught.value)
    return caught.value.problems


def test_valid_config_resolves_relative_paths_against_the_config_folder(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID))
    assert config.state.url == f"sqlite:///{tmp_path}/state.db"
    assert config.repositories["local"].path == tmp_path / "repo"
    lab = config.providers["lab"]
    assert lab.state_dir == tmp_path / "lab"  # type: ignore[attr-defined]
    assert lab.vms[0].disks == [tmp_path / "images/web-01.img", 8 << 30]  # type: ignore[attr-defined]
    job = config.jobs["nightly"]
    assert (job.vms, job.max_parallel_vms, job.retry.attempts, job.retry.wait_seconds) == (["web-01", "db-01"], 2, 3, 5)


def test_defaults_fill_what_a_job_leaves_out(tmp_path: Path) -> None:
    text = VALID.split("max_parallel_vms")[0]
    job = load_config(write(tmp_path, text)).jobs["nightly"]
    assert (job.max_parallel_vms, job.quiesce, job.retention, job.retry.attempts) == (1, False, 7, 3)


@pytest.mark.parametrize(
    ("change", "key", "line", "words"),
    [
        (("max_parallel_vms = 2", 'max_parallel_vms = "two"'), "jobs.nightly.max_parallel_vms", 19, "integer"),
        (("quiesce = true", "quiesce = true\ncolour = 1"), "jobs.nightly.colour", 21, "unknown key"),
        (('provider = "lab"', 'provider = "lab2"'), "jobs.nightly.provider", 16, "unknown provider 'lab2'"),
        (('repository = "local"', 'repository = "nas"'), "jobs.nightly.repository", 17, "unknown repository 'nas'"),
        (('vms = ["web-01", "db-01"]', "vms = []"), "jobs.nightly.vms", 18, "at least 1"),
        (('"8 GiB"', '"8 GiBs"'), "providers.lab.vms.0.disks.1", 10, "bad size string '8 GiBs'"),
        (("wait_seconds = 5", "wait_seconds = 5, tries = 2"), "jobs.nightly.retry.tries", 22, "unknown key"),
        (('type = "simulated"', 'type = "hyperv"'), "providers.lab.type", 5, "unknown provider type 'hyperv'"),
        (("max_parallel_vms = 2", "max_parallel_vms = 0"), "jobs.nightly.max_parallel_vms", 19, "greater than or equal to 1"),
        (('vms = ["web-01", "db-01"]', 'vms = ["web-01", "web-01"]'), "jobs.nightly.vms", 18, "listed twice"),
    ],
)
def test_an_invalid_value_is_named_by_key_path_and_line(tmp_path, change, key, line, words) -> None:
    path = write(tmp_path, VALID.replace(*change))
    found = problems(path)
    assert any(k == key and ln == line and words in text for k, ln, text in found), found


def test_duplicate_job_tables_are_refused_with_their_line(tmp_path: Path) -> None:
    text = VALID + '\n[jobs.nightly]\nprovider = "lab"\n'
    ((key, line, text_),) = problems(write(tmp_path, text))
    assert (key, line) == ("jobs.nightly", 24) and "declared twice" in text_


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = VALID.replace("max_parallel_vms = 2", "max_parallel_vms = -1").replace('"8 GiB"', '"9 XB"')
    keys = {key for key, _line, _text in problems(write(tmp_path, text))}
    assert keys == {"jobs.nightly.max_parallel_vms", "providers.lab.vms.0.disks.1"}


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    found = problems(tmp_path / "absent.toml")
    assert "cannot read" in found[0][2]


def test_a_bad_block_size_is_refused(tmp_path: Path) -> None:
    text = VALID.replace('path = "repo"', 'path = "repo"\nblock_size = "3 MiB"')
    (problem,) = problems(write(tmp_path, text))
    assert problem[0] == "repositories.local.block_size" and "power of two" in problem[2]


def test_loading_a_config_creates_nothing(tmp_path: Path) -> None:
    load_config(write(tmp_path, VALID))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backupd.toml"]


def test_the_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "config.example.toml"
    config = load_config(example)
    assert config.jobs["nightly"].vms == ["web-01", "db-01", "mail-01"]


def test_a_state_db_password_comes_from_the_environment_and_is_never_in_the_config(tmp_path, monkeypatch) -> None:
    text = VALID.replace('url = "sqlite:///state.db"', 'url = "postgresql://backupd@db.example/backupd"\npassword_env = "BACKUPD_DB_PASSWORD"')
    path = write(tmp_path, text)
    monkeypatch.delenv("BACKUPD_DB_PASSWORD", raising=False)
    (problem,) = problems(path)
    assert problem == ("state.password_env", 3, "environment variable BACKUPD_DB_PASSWORD is not set")

    monkeypatch.setenv("BACKUPD_DB_PASSWORD", "s3cret!")
    config = load_config(path)
    assert "s3cret" not in repr(config) and "s3cret" not in config.model_dump_json()
    assert config.state.connect_url() == "postgresql://backupd:s3cret%21@db.example/backupd"
