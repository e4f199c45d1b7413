"""``[proxies]`` and ``proxy_pool``: validated with the rest of the config; the broker password
comes from the environment and is never shown; the Celery app delivers at most once."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupd.config import load_config
from backupd.errors import ConfigError

BASE = """\
[state]
url = "{url}"

[providers.lab]
type = "simulated"
state_dir = "lab"

[[providers.lab.vms]]
name = "web-01"
disks = ["8 GiB"]

[repositories.local]
path = "repo"

[jobs.nightly]
provider = "lab"
repository = "local"
vms = ["web-01"]
{job}
{proxies}
"""
PG = "postgresql+psycopg://backupd@db.example/backupd"


def load(tmp_path: Path, *, url: str = PG, job: str = "", proxies: str = "") -> object:
    path = tmp_path / "backupd.toml"
    path.write_text(BASE.format(url=url, job=job, proxies=proxies))
    return load_config(path)


def test_without_proxies_vm_tasks_stay_in_the_session_and_jobs_default_to_pool_default(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert config.proxies is None
    assert config.jobs["nightly"].proxy_pool == "default"


def test_proxies_with_their_documented_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, job='proxy_pool = "site-a"', proxies='[proxies]\nbroker = "amqp://guest@127.0.0.1:5672//"')
    assert config.proxies.broker == "amqp://guest@127.0.0.1:5672//"
    assert config.proxies.proxy_wait_seconds == 600.0
    assert config.jobs["nightly"].proxy_pool == "site-a"


def test_proxies_on_a_sqlite_state_db_are_a_config_error_naming_the_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, url="sqlite:///state.db", proxies='[proxies]\nbroker = "amqp://127.0.0.1//"')
    assert "backupd.toml:20: proxies: backup proxies need a PostgreSQL state DB" in str(caught.value)


@pytest.mark.parametrize(("line", "words"), [
    ('broker = "http://127.0.0.1/"', "not a broker URL"),
    ('broker = "amqp://h//"\nproxy_wait_seconds = -1', "greater than or equal to 0"),
    ('broker = "amqp://h//"\nworkers = 3', "unknown key"),
])
def test_bad_proxies_settings_are_named(tmp_path: Path, line: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, proxies=f"[proxies]\n{line}")
    assert "proxies." in str(caught.value) and words in str(caught.value)


def test_the_broker_password_comes_from_the_environment_and_is_never_shown(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    proxies = '[proxies]\nbroker = "amqp://backupd@mq.example:5672/site"\nbroker_password_env = "MQ_PASSWORD"'
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, proxies=proxies)
    assert "proxies.broker_password_env: environment variable MQ_PASSWORD is not set" in str(caught.value)

    monkeypatch.setenv("MQ_PASSWORD", "s3cret/:@")
    config = load(tmp_path, proxies=proxies)
    assert config.proxies.connect_url() == "amqp://backupd:s3cret%2F%3A%40@mq.example:5672/site"
    assert "s3cret" not in config.proxies.safe_url() and "s3cret" not in repr(config.proxies)


def test_the_celery_app_delivers_at_most_once_and_a_proxy_reserves_one_message_per_thread(tmp_path: Path) -> None:
    from backupd.celery_app import celery_app, queue_name

    config = load(tmp_path, proxies='[proxies]\nbroker = "amqp://guest@127.0.0.1:5672//"')
    app = celery_app(config.proxies)
    assert app.conf.task_acks_late is False and app.conf.task_reject_on_worker_lost is False
    assert app.conf.worker_prefetch_multiplier == 1
    assert queue_name("site-a") == "backupd.pool.site-a"
