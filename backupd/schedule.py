"""When jobs run: schedules, backup windows and automatic retry, as the config gives them, and
the triggers the daemon builds from them (APScheduler 3.x triggers, used as triggers only: the
state DB stays the record of sessions).

::

    schedule = { cron = "30 22 * * 1-5", timezone = "Europe/Berlin" }   # standard 5-field cron
    schedule = { every = "4h" }                                       # "30s", "15m", "4h"
    schedule = { after = "infra" }        # when a session of job "infra" ends (any result)
    backup_window = { start = "20:00", end = "06:00" }   # in the schedule's timezone
    auto_retry = { times = 3, wait_seconds = 600 }

APScheduler serves as the trigger only: the daemon asks a trigger for its next run time
(``next_after``) and starts the session itself, so the state DB, not a job store, records
what ran.

Two behaviours of APScheduler 3's cron trigger differ from cron's and are corrected here
(:class:`CronSchedule`):

- day of week: APScheduler 3 numbers days 0 = Monday, cron 0 (and 7) = Sunday, and
  ``CronTrigger.from_crontab`` passes the numbers through, so ``1-5`` would mean Tuesday to
  Saturday. Numeric days are translated to names (``mon-fri``).
- daylight-saving changes: when clocks go back, a wall-clock time happens twice, and
  APScheduler 3.11 fires at both (and, asked from inside the repeated hour, can return a time
  that has passed). Like ISC cron, a run at a fixed hour runs once (the first time); a job whose
  hour field is ``*`` runs in both real hours. In spring a skipped wall-clock time runs right
  after the jump: no run is lost.
"""

from __future__ import annotations

import re
from datetime import datetime, time, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


_FROZEN = ConfigDict(frozen=True, extra="forbid")
_EVERY = re.compile(r"^\s*([0-9]+)\s*([smh])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
_DAY_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
#: the longest ``every`` interval, in seconds (a week)
MAX_EVERY_SECONDS = 7 * 24 * 3600


def every_seconds(text: str) -> int:
    """``"30s"``, ``"15m"``, ``"4h"`` in seconds.

    :raises ValueError: not a whole number followed by s, m or h, zero, or over a week.
    """
    match = _EVERY.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not an interval like '30s', '15m' or '4h'")
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
    if not 1 <= seconds <= MAX_EVERY_SECONDS:
        raise ValueError(f"{text!r}: the interval must be 1 s to 7 days")
    return seconds


def timezone_named(name: str | None) -> tzinfo:
    """The IANA time zone of that name, or this machine's local zone for None.

    :raises ValueError: no such zone.
    """
    if name is None:
        from tzlocal import get_localzone

        return get_localzone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as 'Europe/Berlin' or 'UTC')") from None


class ScheduleConfig(BaseModel):
    """``schedule``: exactly one of ``cron``, ``every`` or ``after``.

    :ivar cron: a standard 5-field cron expression (minute hour day month day-of-week; days of
        week 0-7 with 0 and 7 Sunday, or names).
    :ivar every: an interval, ``"30s"``, ``"15m"``, ``"4h"``.
    :ivar after: a job; this job starts when a session of that one ends, whatever its result.
    :ivar timezone: the IANA zone of ``cron`` and of the backup window (default: the machine's).
    """

    model_config = _FROZEN

    cron: str | None = None
    every: str | None = None
    after: str | None = None
    timezone: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ScheduleConfig":
        given = [key for key in ("cron", "every", "after") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of cron, every or after")
        return self

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            cron_fields(value)
        return value

    @field_validator("every")
    @classmethod
    def _every(cls, value: str | None) -> str | None:
        if value is not None:
            every_seconds(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        if value is not None:
            timezone_named(value)
        return value

    def zone(self) -> tzinfo:
        return timezone_named(self.timezone)

    def describe(self) -> str:
        """For people: ``cron 30 22 * * 1-5 (Europe/Berlin)``, ``every 4h``, ``after infra``."""
        if self.cron is not None:
            return f"cron {self.cron} ({self.timezone or 'local time'})"
        if self.every is not None:
            return f"every {self.every}"
        return f"after {self.after}"


def _clock(value: str) -> time:
    """``HH:MM`` (or ``HH:MM:SS``) as a time of day."""
    try:
        return time(*(int(part) for part in value.split(":", 2)))  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a time of day like '20:00'") from None


class WindowConfig(BaseModel):
    """``backup_window``: the hours scheduled sessions may run, ``start`` to ``end`` (``HH:MM``,
    or ``HH:MM:SS``, in the schedule's timezone; ``end`` before ``start`` spans midnight)."""

    model_config = _FROZEN

    start: str
    end: str

    @field_validator("start", "end")
    @classmethod
    def _time_of_day(cls, value: str) -> str:
        _clock(value)
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> "WindowConfig":
        if _clock(self.start) == _clock(self.end):
            raise ValueError("start and end are the same time: the window would be empty")
        return self

    def contains(self, moment: datetime, zone: tzinfo) -> bool:
        """Whether ``moment`` (timezone-aware) falls inside the window."""
        now = moment.astimezone(zone).time().replace(microsecond=0)
        start, end = _clock(self.start), _clock(self.end)
        return start <= now < end if start < end else (now >= start or now < end)

    def describe(self) -> str:
        return f"{self.start}-{self.end}"


class AutoRetryConfig(BaseModel):
    """``auto_retry``: after a session ends ``failed`` with VMs lacking a restore point, the
    daemon starts up to ``times`` retry sessions, ``wait_seconds`` apart."""

    model_config = _FROZEN

    times: int = Field(ge=1, le=100, strict=True)
    wait_seconds: float = Field(default=600.0, ge=0, le=86400, allow_inf_nan=False)


class DaemonConfig(BaseModel):
    """``[daemon]``: the scheduler's own settings.

    :ivar misfire_grace_seconds: a run whose time passed while the daemon was down starts once
        when it starts, if it is at most this late; older ones are logged as missed.
    :ivar max_sessions: sessions run at once; a session process costs ~60 MB and its share of
        the cores, so 100 jobs due at the same minute queue instead of starting 100 processes.
    :ivar metrics_listen: ``HOST:PORT`` of the Prometheus endpoint, off when absent.
    :ivar notify: apprise URLs told about every session's end (jobs add their own).
    """

    model_config = _FROZEN

    misfire_grace_seconds: float = Field(default=3600.0, ge=0, le=7 * 86400, allow_inf_nan=False)
    #: sessions the daemon runs at once (one process each); more wait their turn, oldest first
    max_sessions: int = Field(default=8, ge=1, le=1000, strict=True)
    metrics_listen: str | None = None
    notify: list[str] = Field(default_factory=list)

    @field_validator("metrics_listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            from backupd.metrics import parse_listen

            parse_listen(value)
        return value

    @field_validator("notify")
    @classmethod
    def _notify(cls, urls: list[str]) -> list[str]:
        return check_notify_urls(urls)


def check_notify_urls(urls: list[str]) -> list[str]:
    """A validator of ``notify`` lists: every URL one apprise can use (messages redact them).

    :raises ValueError: naming each URL apprise cannot use.
    """
    if urls:
        from backupd.notify import check_urls

        problems = check_urls(urls)
        if problems:
            raise ValueError("; ".join(problems))
    return urls


# -- triggers ---------------------------------------------------------------------------------


def cron_fields(expression: str) -> dict[str, str]:
    """A standard 5-field cron expression as APScheduler ``CronTrigger`` keyword arguments,
    days of week as names (see the module docstring).

    :raises ValueError: not 5 fields, or a field APScheduler refuses.
    """
    parts = expression.split()
    if len(parts) != 5:
        raise ValueError(f"{expression!r} is not a 5-field cron expression (minute hour day month day-of-week)")
    minute, hour, day, month, dow = parts
    fields = {"minute": minute, "hour": hour, "day": day, "month": month, "day_of_week": _cron_days(dow)}
    from apscheduler.triggers.cron import CronTrigger

    for name, value in fields.items():  # one at a time, to name the field that is wrong
        try:
            CronTrigger(**{name: value}, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"cron {expression!r}: {name.replace('_', ' ')} field: {exc}") from None
    return fields


def _cron_days(field: str) -> str:
    """Cron's day-of-week field with numbers (0-7, 0 and 7 Sunday) as day names."""
    if field == "*" or not any(char.isdigit() for char in field):
        return field
    days: list[int] = []
    for part in field.split(","):
        spec, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if spec == "*":
            first, last = 0, 6
        elif "-" in spec:
            first, last = (_day_number(x) for x in spec.split("-", 1))
        else:
            first = _day_number(spec)
            last = 6 if step_text else first
        if first > last or step < 1:
            raise ValueError(f"day of week {part!r} is not a range cron accepts")
        days.extend(range(first, last + 1, step))
    return ",".join(_DAY_NAMES[day] for day in sorted({day % 7 for day in days}))


def _day_number(text: str) -> int:
    if text.isdigit():
        number = int(text)
        if not 0 <= number <= 7:
            raise ValueError(f"day of week {text} is not 0-7")
        return number
    name = text.lower()[:3]
    if name not in _DAY_NAMES:
        raise ValueError(f"day of week {text!r} is not a number 0-7 or a day name")
    return _DAY_NAMES.index(name)


def build_trigger(schedule: ScheduleConfig, anchor: datetime) -> "CronSchedule | Every | None":
    """The trigger of a ``cron`` or ``every`` schedule; None for ``after`` (the daemon starts
    those when the other job's session ends).

    :param anchor: where an ``every`` interval counts from (timezone-aware).
    """
    if schedule.cron is not None:
        return CronSchedule(schedule.cron, schedule.zone())
    if schedule.every is not None:
        return Every(every_seconds(schedule.every), anchor)
    return None


class Every:
    """Every ``seconds`` after ``anchor`` (its last run, or when counting began), the anchor
    itself excluded (APScheduler's ``IntervalTrigger``)."""

    def __init__(self, seconds: int, anchor: datetime) -> None:
        from apscheduler.triggers.interval import IntervalTrigger

        first = anchor + timedelta(seconds=seconds)
        self._trigger = IntervalTrigger(seconds=seconds, start_date=first, timezone=anchor.tzinfo)

    def next_after(self, moment: datetime) -> datetime | None:
        """The first run strictly after ``moment``."""
        return self._trigger.get_next_fire_time(None, moment + _TICK)


class CronSchedule:
    """Runs at the times of a standard cron expression in a time zone, with cron's day
    numbering and cron's handling of daylight-saving changes (see the module docstring).

    APScheduler's ``CronTrigger`` finds the matching *wall-clock* times (run in UTC, where no
    clock changes); this class maps each to the real instants it names in ``zone``: none in
    the spring gap (it then runs at the instant the pre-change offset gives, right after the
    jump), two in the autumn fold (both when the hour field is ``*``, else the first). Each
    real instant runs at most once.

    :param expression: a standard 5-field cron expression.
    :param zone: its time zone.
    """

    def __init__(self, expression: str, zone: tzinfo) -> None:
        from apscheduler.triggers.cron import CronTrigger

        fields = cron_fields(expression)
        self._wall_clock = CronTrigger(**fields, timezone=timezone.utc)
        self._every_hour = fields["hour"] == "*"
        self.expression = expression
        self.zone = zone

    def next_after(self, moment: datetime) -> datetime | None:
        """The first run strictly after ``moment`` (timezone-aware)."""
        # Start the wall-clock search before the moment's own wall-clock time: in the second
        # pass of an autumn fold, times already seen on the clock are real instants to come.
        wall = moment.astimezone(self.zone).replace(tzinfo=None) - _LONGEST_SHIFT
        candidate = self._wall_clock.get_next_fire_time(None, wall.replace(tzinfo=timezone.utc))
        after = moment.astimezone(timezone.utc)  # aware datetimes of one zone compare by wall clock
        while candidate is not None:
            for instant in self._instants(candidate.replace(tzinfo=None)):
                if instant.astimezone(timezone.utc) > after:
                    return instant.astimezone(timezone.utc).astimezone(self.zone)  # gap times shown as real
            candidate = self._wall_clock.get_next_fire_time(candidate, candidate + _TICK)
        return None

    def _instants(self, wall: datetime) -> list[datetime]:
        first = wall.replace(tzinfo=self.zone, fold=0)
        second = wall.replace(tzinfo=self.zone, fold=1)
        if first.utcoffset() == second.utcoffset():
            return [first]
        if _round_trips(first) and _round_trips(second):  # the autumn fold: the time happens twice
            return [first, second] if self._every_hour else [first]
        return [first]  # the spring gap: the instant the offset before the change gives

    def __str__(self) -> str:
        return f"cron[{self.expression}]"


_TICK = timedelta(microseconds=1)
#: more than any daylight-saving shift (Antarctica/Troll's is two hours)
_LONGEST_SHIFT = timedelta(hours=3)


def _round_trips(moment: datetime) -> bool:
    """Whether the wall-clock time exists in its zone (it is not in a spring gap)."""
    back = moment.astimezone(timezone.utc).astimezone(moment.tzinfo)
    return back.replace(tzinfo=None, fold=0) == moment.replace(tzinfo=None, fold=0)


def fire_times(trigger: "CronSchedule | Every", since: datetime, until: datetime, limit: int = 10_000) -> list[datetime]:
    """The trigger's run times in ``(since, until]``, oldest first (at most ``limit``)."""
    times: list[datetime] = []
    moment = since
    end = until.astimezone(timezone.utc)
    while len(times) < limit:
        following = trigger.next_after(moment)
        if following is None or following.astimezone(timezone.utc) > end:
            break
        times.append(following)
        moment = following
    return times
