"""Loading and validating the TOML config file.

One file holds the state DB, providers, repositories and jobs; tables are keyed by name. The
whole file is validated before anything runs: unknown keys, wrong types, dangling provider or
repository names, duplicate tables and bad size strings are all reported together, each with
the file, the line (where it can be found) and the key path such as
``jobs.nightly.max_parallel_vms`` (:class:`~backupd.errors.ConfigError`, exit code 78).

Relative paths (repository paths, the simulated provider's ``state_dir`` and disk images, a
relative SQLite database) are relative to the folder of the config file.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from backupd.errors import ConfigError
from backupd.schedule import AutoRetryConfig, DaemonConfig, ScheduleConfig, WindowConfig, check_notify_urls
from providers.config_types import FolderPath, Name, absolute, refuse_files_on_the_way
from providers.simulated.config import SimulatedProviderConfig
from providers.vsphere.config import VsphereProviderConfig

if TYPE_CHECKING:
    from backupd.repository import Repository

_FROZEN = ConfigDict(frozen=True, extra="forbid")

#: provider ``type`` → config model; a new provider adds its model here
PROVIDER_TYPES: dict[str, type[BaseModel]] = {"simulated": SimulatedProviderConfig, "vsphere": VsphereProviderConfig}

#: longest stop message accepted (characters), as in the stop contract
MAX_STOP_MESSAGE = 320
#: most restore points kept per VM of a job
MAX_RETENTION = 10_000
#: longest wait for a VM another session is processing, in seconds (7 days: a weekly job's
#: VM lock never waits past the next week's run)
MAX_VM_LOCK_TIMEOUT_SECONDS = 7 * 24 * 3600.0


class StateConfig(BaseModel):
    """``[state]``: where the state DB lives (a SQLAlchemy URL).

    The URL must parse (``sqlalchemy.engine.make_url``) and name a dialect and driver SQLAlchemy
    knows (``sqlite``, ``postgresql+psycopg`` ...), a synchronous one; whether the driver's
    package is installed is found when the DB is opened. A SQLite database must be a file:
    the URL is refused when it names a folder, or a path through a file.

    The password of a server database is best kept out of the file: name an environment
    variable in ``password_env`` and it is read when the DB is opened, never stored in the
    config object, printed or logged. No message about the URL ever shows a password.
    """

    model_config = _FROZEN

    url: str = "sqlite:///state.db"
    password_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @field_validator("url")
    @classmethod
    def _a_known_database(cls, url: str, info: ValidationInfo) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        if any(unicodedata.category(char) == "Cc" for char in url):
            raise ValueError("a database URL cannot contain control characters (NUL, newline ...)")
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):
            raise ValueError("not a database URL (e.g. 'sqlite:///state.db', 'postgresql+psycopg://user@host/db')") from None
        try:
            dialect = parsed.get_dialect()
        except NoSuchModuleError:
            raise ValueError(f"unknown database dialect {parsed.drivername!r} (e.g. 'sqlite', 'postgresql+psycopg')") from None
        if getattr(dialect, "is_async", False):
            raise ValueError(f"{parsed.drivername!r} is an asyncio driver; backupd needs a synchronous one (e.g. 'postgresql+psycopg')")
        database = parsed.database
        if parsed.get_backend_name() == "sqlite" and database and database != ":memory:" and not database.startswith("file:"):
            path = absolute(Path(database), info)
            if path.is_dir():
                raise ValueError(f"{path} is a folder, not a database file")
            refuse_files_on_the_way(path.parent)
        return url

    def connect_url(self) -> str:
        """The URL to connect with, the password from ``password_env`` filled in.

        :raises ConfigError: the environment variable is not set.
        """
        if self.password_env is None:
            return self.url
        from sqlalchemy.engine import make_url

        password = os.environ.get(self.password_env)
        if password is None:
            from backupd.errors import StateError

            raise StateError(f"the state DB password variable {self.password_env} is not set")
        return make_url(self.url).set(password=password).render_as_string(hide_password=False)


class ProxiesConfig(BaseModel):
    """``[proxies]``: VM tasks run on backup proxies (``backupd proxy``) through a Celery broker
    instead of inside the session's process (docs/scale-out.md). Absent: every VM task runs
    in the session's process (the embedded default).

    The broker's password is best kept out of the file: name an environment variable in
    ``broker_password_env``; it is read when the broker is connected to and never printed.
    PostgreSQL must be the state DB: the daemon, the sessions and the proxies share it.
    """

    model_config = _FROZEN

    #: the Celery broker URL, e.g. ``amqp://guest@127.0.0.1:5672//`` (RabbitMQ)
    broker: str
    broker_password_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    #: seconds a session waits for a live proxy of a job's pool before the VMs waiting for
    #: one end ``failed``, 0 to 86,400 (default 600: ten minutes, a proxy host's reboot)
    proxy_wait_seconds: float = Field(default=600.0, ge=0, le=86400, allow_inf_nan=False)

    @field_validator("broker")
    @classmethod
    def _a_broker_url(cls, url: str) -> str:
        from urllib.parse import urlsplit

        if any(unicodedata.category(char) == "Cc" for char in url):
            raise ValueError("a broker URL cannot contain control characters (NUL, newline ...)")
        if urlsplit(url).scheme not in ("amqp", "amqps", "pyamqp", "redis", "rediss"):
            raise ValueError("not a broker URL (e.g. 'amqp://guest@127.0.0.1:5672//', 'redis://127.0.0.1:6379/0')")
        return url

    def connect_url(self) -> str:
        """The broker URL to connect with, the password from ``broker_password_env`` filled in.

        :raises ConfigError: the environment variable is not set.
        """
        if self.broker_password_env is None:
            return self.broker
        from urllib.parse import quote, urlsplit, urlunsplit

        password = os.environ.get(self.broker_password_env)
        if password is None:
            raise ConfigError("[proxies]", [("proxies.broker_password_env", None,
                                             f"environment variable {self.broker_password_env} is not set")])
        parts = urlsplit(self.broker)
        user = parts.username or ""
        host = parts.hostname or ""
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    def safe_url(self) -> str:
        """The broker URL with any password hidden, for messages."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.broker)
        if parts.password is None:
            return self.broker
        return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


class RepositoryConfig(BaseModel):
    """``[repositories.NAME]``: a deduplicating repository on a local or mounted filesystem."""

    model_config = _FROZEN

    #: the repository's folder, created on first use; refused if it or a folder above is a file
    path: FolderPath
    #: fixed block size of a new repository (an existing one keeps its own)
    block_size: ByteSize = ByteSize(1 << 20)
    #: zstd level, 1 (fast) to 19 (small)
    compression_level: int = Field(default=3, ge=1, le=19, strict=True)
    #: seconds between two garbage collections at the end of a job session (a collection reads
    #: every manifest): the blocks of points retention deleted are freed by the first session
    #: to end this long after the last collection; 0: by every session that deleted points
    gc_interval_seconds: float = Field(default=86400.0, ge=0)

    def open(self, *, create: bool) -> "Repository":
        """Open this repository.

        :param create: initialise it if absent (a job writing its first restore point);
            otherwise an absent repository is a RepositoryError.
        :raises RepositoryError: not a repository, unreadable, or of a newer format.
        """
        from backupd.repository import Repository

        return Repository.open(
            self.path, create=create, block_size=int(self.block_size), compression_level=self.compression_level
        )

    @field_validator("block_size")
    @classmethod
    def _block_size_range(cls, value: ByteSize) -> ByteSize:
        if value < 64 * 1024 or value > 64 << 20 or value & (value - 1):
            raise ValueError("must be a power of two from 64 KiB to 64 MiB")
        return value


class RetryConfig(BaseModel):
    """How transient provider errors are retried (tenacity: fixed wait, bounded attempts)."""

    model_config = _FROZEN

    #: total tries of one operation, the first included, 1 to 100
    attempts: int = Field(default=3, ge=1, le=100, strict=True)
    #: seconds between tries, 0 to 3600
    wait_seconds: float = Field(default=5.0, ge=0, le=3600, allow_inf_nan=False)


class JobConfig(BaseModel):
    """``[jobs.NAME]``: which VMs, in which order, from which provider into which repository."""

    model_config = _FROZEN

    provider: str
    repository: str
    #: VM names in processing order
    vms: list[Name] = Field(min_length=1)
    #: VMs processed at once, 1 to 64
    max_parallel_vms: int = Field(default=1, ge=1, le=64, strict=True)
    #: quiesce the guest before the snapshot; a failure falls back to crash-consistent
    quiesce: bool = False
    #: switch changed block tracking on for VMs without it (vSphere: takes effect at the next
    #: snapshot, so the session that switches it on reads the disks whole)
    enable_cbt: bool = True
    #: restore points kept per VM of this job, 1 to 10,000
    retention: int = Field(default=7, ge=1, le=MAX_RETENTION, strict=True)
    retry: RetryConfig = RetryConfig()
    #: seconds a VM task waits for a VM another session is processing before it fails, 0 to
    #: 604,800 (7 days)
    vm_lock_timeout_seconds: float = Field(default=600.0, ge=0, le=MAX_VM_LOCK_TIMEOUT_SECONDS, allow_inf_nan=False)
    description: str = ""
    #: when the daemon runs it (none: only when started by hand)
    schedule: ScheduleConfig | None = None
    #: the hours scheduled sessions may run, in the schedule's timezone
    backup_window: WindowConfig | None = None
    #: seconds a graceful stop waits for VMs in flight before it escalates to immediate,
    #: 0 to 86,400
    drain_period_seconds: float = Field(default=900.0, ge=0, le=86400, allow_inf_nan=False)
    #: retry sessions the daemon starts after a failed one
    auto_retry: AutoRetryConfig | None = None
    #: apprise URLs told when a session of this job ends
    notify: list[str] = Field(default_factory=list)
    #: the backup proxies that run this job's VM tasks, when ``[proxies]`` is set
    proxy_pool: Name = "default"

    @field_validator("notify")
    @classmethod
    def _notify(cls, urls: list[str]) -> list[str]:
        return check_notify_urls(urls)

    @field_validator("vms")
    @classmethod
    def _unique_vms(cls, vms: list[str]) -> list[str]:
        seen: set[str] = set()
        for vm in vms:
            if vm in seen:
                raise ValueError(f"VM {vm!r} is listed twice")
            seen.add(vm)
        return vms


class _Document(BaseModel):
    """The file's top level, providers still raw (their type picks their model)."""

    model_config = _FROZEN

    state: StateConfig = StateConfig()
    daemon: DaemonConfig = DaemonConfig()
    proxies: ProxiesConfig | None = None
    providers: dict[Name, dict[str, Any]] = Field(default_factory=dict)
    repositories: dict[Name, RepositoryConfig] = Field(default_factory=dict)
    jobs: dict[Name, JobConfig] = Field(default_factory=dict)


class Config(BaseModel):
    """A validated config, every relative path already resolved.

    :ivar path: the config file it was read from.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    path: Path
    #: the file's bytes this config was read from
    source: bytes = Field(default=b"", repr=False)
    state: StateConfig
    daemon: DaemonConfig = DaemonConfig()
    #: backup proxies; None: VM tasks run in the session's process
    proxies: ProxiesConfig | None = None
    providers: dict[str, BaseModel]
    repositories: dict[str, RepositoryConfig]
    jobs: dict[str, JobConfig]

    def job(self, name: str) -> JobConfig:
        """The job called ``name``.

        :raises NotFoundError: no such job in this config.
        """
        from backupd.errors import NotFoundError

        try:
            return self.jobs[name]
        except KeyError:
            known = ", ".join(sorted(self.jobs)) or "none"
            raise NotFoundError(f"no job {name!r} in {self.path} (jobs: {known})") from None


def default_config_path() -> Path:
    """``$BACKUPD_CONFIG`` if set, else ``./backupd.toml``."""
    return Path(os.environ.get("BACKUPD_CONFIG") or "backupd.toml")


def load_config(path: Path, *, data: bytes | None = None) -> Config:
    """Read, validate and resolve a config file.

    :param path: the TOML file; relative paths in it are relative to its folder.
    :param data: the file's bytes as read earlier (the daemon hands its session processes the
        config it runs with, whatever the file holds now); by default the file is read.
    :raises ConfigError: the file is missing, not UTF-8 text, not TOML, or invalid; every
        problem found is listed with its key path and line. Paths on the way to a folder the
        config names (a repository, a ``state_dir``, the SQLite database's folder) are looked
        at, relative ones against the config file's folder; nothing is created.
    """
    path = Path(path)
    try:
        if data is None:
            data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [("", None, f"cannot read the config file: {exc.strerror}")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(str(path), [("", line, (
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} (byte offset {exc.start}) cannot be"
            " decoded; save the file as UTF-8"))]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [_decode_problem(str(exc))]) from None

    locate = _KeyLocator(text)
    problems: list[tuple[str, int | None, str]] = []
    context = {"base": path.resolve().parent}

    def collect(err: ValidationError, prefix: tuple[Any, ...] = ()) -> None:
        for item in err.errors():
            loc = prefix + tuple(part for part in item["loc"] if part != "[key]")  # a bad table name
            problems.append((_key_path(loc), locate(loc), _describe(item)))

    doc: _Document | None = None
    try:
        doc = _Document.model_validate(raw, context=context)
    except ValidationError as exc:
        collect(exc)

    providers: dict[str, BaseModel] = {}
    sections = raw.get("providers")
    for name, section in (sections.items() if isinstance(sections, dict) else ()):
        if not isinstance(section, dict):
            continue  # already reported by the document's validation
        kind = section.get("type")
        model = PROVIDER_TYPES.get(kind) if isinstance(kind, str) else None
        if model is None:
            known = ", ".join(sorted(PROVIDER_TYPES))
            problems.append(
                (_key_path(("providers", name, "type")), locate(("providers", name, "type")),
                 f"unknown provider type {kind!r} (known: {known})")
            )
            continue
        try:
            providers[name] = model.model_validate(section, context=context)
        except ValidationError as exc:
            collect(exc, ("providers", name))

    if doc is None:
        raise ConfigError(str(path), problems)
    secret = doc.state.password_env
    if secret is not None and secret not in os.environ:
        problems.append(("state.password_env", locate(("state", "password_env")),
                         f"environment variable {secret} is not set"))
    problems.extend(_proxies_problems(doc, locate))
    for name, job in doc.jobs.items():
        if job.provider not in doc.providers:
            problems.append(
                (_key_path(("jobs", name, "provider")), locate(("jobs", name, "provider")),
                 f"unknown provider {job.provider!r} (defined: {_names(doc.providers)})")
            )
        if job.repository not in doc.repositories:
            problems.append(
                (_key_path(("jobs", name, "repository")), locate(("jobs", name, "repository")),
                 f"unknown repository {job.repository!r} (defined: {_names(doc.repositories)})")
            )
        problems.extend(_chain_problems(doc.jobs, name, locate))
    if problems:
        raise ConfigError(str(path), problems)

    base = path.resolve().parent
    return Config(
        path=path.resolve(),
        state=doc.state.model_copy(update={"url": _resolve_sqlite_url(doc.state.url, base)}),
        providers={name: _resolve_paths(model, base) for name, model in providers.items()},
        repositories={name: _resolve_paths(repo, base) for name, repo in doc.repositories.items()},
        jobs=dict(doc.jobs),
        daemon=doc.daemon,
        proxies=doc.proxies,
        source=data,
    )


def _proxies_problems(doc: _Document, locate: Any) -> list[tuple[str, int | None, str]]:
    """``[proxies]`` needs the state DB every proxy reaches (PostgreSQL), and its broker
    password variable set."""
    from sqlalchemy.engine import make_url

    if doc.proxies is None:
        return []
    problems = []
    if make_url(doc.state.url).get_backend_name() != "postgresql":
        problems.append(("proxies", locate(("proxies",)),
                         "backup proxies need a PostgreSQL state DB that the daemon and every proxy reach "
                         f"([state] url is {make_url(doc.state.url).get_backend_name()})"))
    secret = doc.proxies.broker_password_env
    if secret is not None and secret not in os.environ:
        problems.append(("proxies.broker_password_env", locate(("proxies", "broker_password_env")),
                         f"environment variable {secret} is not set"))
    return problems


def _chain_problems(jobs: dict[str, JobConfig], name: str, locate: Any) -> list[tuple[str, int | None, str]]:
    """A ``schedule = { after = JOB }`` must name another job and never lead back to itself."""
    schedule = jobs[name].schedule
    if schedule is None or schedule.after is None:
        return []
    where = (_key_path(("jobs", name, "schedule", "after")), locate(("jobs", name, "schedule")))
    seen = [name]
    current = schedule.after
    while True:
        if current not in jobs:
            return [(*where, f"unknown job {current!r} (defined: {_names(jobs)})")] if current == schedule.after else []
        if current in seen:
            return [(*where, "the chain of after= jobs comes back to this job: " + " -> ".join([*seen, current]))]
        seen.append(current)
        upstream = jobs[current].schedule
        if upstream is None or upstream.after is None:
            return []
        current = upstream.after


def _key_path(loc: tuple[Any, ...]) -> str:
    """A location as a TOML dotted key (``jobs.nightly.vms.0``); a part that is not a bare
    TOML key is quoted and escaped as TOML writes it (``jobs.""``, ``jobs."a\\u0000b"``)."""
    return ".".join(
        str(part) if re.fullmatch(r"[A-Za-z0-9_-]+", str(part)) else json.dumps(str(part), ensure_ascii=False)
        for part in loc
    )


def _names(table: dict[str, Any]) -> str:
    return ", ".join(sorted(table)) or "none"


def _describe(item: dict[str, Any]) -> str:
    """A pydantic error in the words of a config file (no Python type names)."""
    kind = item["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    message = str(item["msg"])
    return message.removeprefix("Value error, ")


def _resolve_paths(model: BaseModel, base: Path) -> Any:
    """A copy of ``model`` whose relative :class:`Path` values (also inside lists and nested
    models) are made absolute against ``base``."""

    def resolve(value: Any) -> Any:
        if isinstance(value, Path):
            return value if value.is_absolute() else (base / value)
        if isinstance(value, BaseModel):
            return _resolve_paths(value, base)
        if isinstance(value, list):
            return [resolve(item) for item in value]
        return value

    update = {name: resolve(getattr(model, name)) for name in type(model).model_fields}
    return model.model_copy(update=update)


def _resolve_sqlite_url(url: str, base: Path) -> str:
    """Make a relative SQLite database path relative to the config folder."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() == "sqlite" and database and database != ":memory:":
        if not Path(database).is_absolute():
            return parsed.set(database=str(base / database)).render_as_string(hide_password=False)
    return url


def _decode_problem(message: str) -> tuple[str, int | None, str]:
    """A TOML syntax error as (key path, line, text); a table declared twice (e.g. two
    ``[jobs.nightly]``, which is how a duplicate job name shows) names its key path."""
    line = re.search(r"at line (\d+)", message)
    twice = re.match(r"Cannot declare \(([^)]*)\) twice", message)
    if twice:
        key = ".".join(part.strip().strip("'\"") for part in twice.group(1).split(","))
        return key, int(line.group(1)) if line else None, "declared twice (duplicate name)"
    return "", int(line.group(1)) if line else None, f"not valid TOML: {message}"


class _KeyLocator:
    """Finds the line of a key path in TOML text, for error messages.

    Tracks ``[table]`` and ``[[array.of.tables]]`` headers and ``key =`` lines; an inline table
    or array item is located at its key's line. Returns None when the key is not written in the
    file (e.g. a missing required key: then the table's header line).
    """

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'. \\]+?)\s*=")

    def __init__(self, text: str) -> None:
        self._keys: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        counts: dict[tuple[str, ...], int] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            header = self._HEADER.match(line)
            if header:
                table = tuple(_split_key(header.group(2)))
                if header.group(1) == "[[":
                    index = counts.get(table, -1) + 1
                    counts[table] = index
                    table = table + (str(index),)
                self._keys.setdefault(table, number)
                continue
            key = self._KEY.match(line)
            if key:
                self._keys.setdefault(table + tuple(_split_key(key.group(1))), number)

    def __call__(self, loc: tuple[Any, ...]) -> int | None:
        parts = tuple(str(part) for part in loc)
        while parts:
            if parts in self._keys:
                return self._keys[parts]
            parts = parts[:-1]
        return None


def _split_key(key: str) -> list[str]:
    """The parts of a TOML dotted key as written (``jobs."a.b"`` → ``["jobs", "a.b"]``),
    escapes decoded, by letting tomllib read ``KEY = 0``."""
    try:
        table: Any = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        return [part.strip().strip("\"'") for part in key.split(".")]
    parts = []
    while isinstance(table, dict) and len(table) == 1:
        ((name, table),) = table.items()
        parts.append(name)
    return parts
