"""Schedules: cron as cron means it (days of week, daylight-saving changes), intervals, backup
windows, and the daemon's planner (due runs, missed runs), with an injected clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import time_machine

from backupd.config import load_config
from backupd.daemon import Planner
from backupd.schedule import CronSchedule, ScheduleConfig, WindowConfig, cron_fields, fire_times

BERLIN = ZoneInfo("Europe/Berlin")


def _runs(expression: str, start: datetime, end: datetime) -> list[str]:
    return [t.astimezone(BERLIN).strftime("%a %d %H:%M%z") for t in fire_times(CronSchedule(expression, BERLIN), start, end)]


def test_cron_days_of_week_are_crons_not_apschedulers() -> None:
    """``1-5`` is Monday to Friday (APScheduler 3 alone would read Tuesday to Saturday)."""
    week = _runs("30 22 * * 1-5", datetime(2026, 11, 22, tzinfo=BERLIN), datetime(2026, 11, 29, tzinfo=BERLIN))
    assert [run[:3] for run in week] == ["Mon", "Tue", "Wed", "Thu", "Fri"]
    assert cron_fields("0 0 * * 0,7")["day_of_week"] == "sun"
    assert cron_fields("0 0 * * */2")["day_of_week"] == "sun,tue,thu,sat"


@pytest.mark.parametrize("expression", ["30 2 * * *", "0 1 * * *", "45 3 * * *"])
def test_a_daily_run_is_neither_lost_in_spring_nor_doubled_in_autumn(expression: str) -> None:
    """Europe/Berlin: on 2026-03-29 02:00 becomes 03:00; on 2026-10-25 03:00 becomes 02:00.
    Each day around both changes has exactly one run."""
    for first_day in (datetime(2026, 3, 27, tzinfo=BERLIN), datetime(2026, 10, 23, tzinfo=BERLIN)):
        runs = _runs(expression, first_day, first_day + timedelta(days=5))
        assert [run[4:6] for run in runs] == [f"{first_day.day + n:02d}" for n in range(5)], runs


def test_the_skipped_spring_time_runs_right_after_the_jump() -> None:
    (run,) = _runs("30 2 29 3 *", datetime(2026, 3, 28, tzinfo=BERLIN), datetime(2026, 3, 30, tzinfo=BERLIN))
    assert run == "Sun 29 03:30+0200"


def test_an_hourly_job_runs_every_real_hour_across_both_changes() -> None:
    spring = _runs("0 * * * *", datetime(2026, 3, 29, 0, tzinfo=BERLIN), datetime(2026, 3, 29, 5, tzinfo=BERLIN))
    autumn = _runs("0 * * * *", datetime(2026, 10, 25, 0, tzinfo=BERLIN), datetime(2026, 10, 25, 5, tzinfo=BERLIN))
    assert [r[7:] for r in spring] == ["01:00+0100", "03:00+0200", "04:00+0200", "05:00+0200"]
    assert [r[7:] for r in autumn] == ["01:00+0200", "02:00+0200", "02:00+0100", "03:00+0100", "04:00+0100",
                                       "05:00+0100"]


def test_asked_from_inside_the_repeated_hour_the_next_run_is_still_ahead() -> None:
    """APScheduler 3.11 alone can answer with a time that has passed in the autumn fold."""
    hourly = CronSchedule("30 * * * *", BERLIN)
    first_pass = datetime(2026, 10, 25, 2, 35, tzinfo=BERLIN)             # 02:35 CEST
    second_pass = datetime(2026, 10, 25, 2, 35, tzinfo=BERLIN, fold=1)    # 02:35 CET, an hour later
    assert hourly.next_after(first_pass).isoformat() == "2026-10-25T02:30:00+01:00"
    assert hourly.next_after(second_pass).isoformat() == "2026-10-25T03:30:00+01:00"


def _config(tmp_path: Path, schedule: str, extra: str = "") -> object:
    path = tmp_path / "backupd.toml"
    path.write_text(f"""
[providers.lab]
type = "simulated"
state_dir = "lab"
[[providers.lab.vms]]
name = "a"
disks = ["1 MiB"]
[repositories.r]
path = "repo"
[jobs.nightly]
provider = "lab"
repository = "r"
vms = ["a"]
schedule = {schedule}
{extra}
""")
    return load_config(path)


def test_the_planner_follows_an_injected_clock_across_the_autumn_change(tmp_path: Path) -> None:
    """The daemon asks the planner what is due as time passes; around the autumn change a
    02:30 job is due once, and a missed-run look-back over those days finds one run a day."""
    config = _config(tmp_path, '{ cron = "30 2 * * *", timezone = "Europe/Berlin" }')
    start = datetime(2026, 10, 24, 12, tzinfo=timezone.utc)
    with time_machine.travel(start, tick=False) as traveller:
        planner = Planner(config, {}, datetime.now(timezone.utc))  # type: ignore[arg-type]
        due = []
        for _ in range(48 * 6):  # every 10 minutes for two days
            traveller.shift(timedelta(minutes=10))
            due += planner.due(datetime.now(timezone.utc))
    assert [at.astimezone(BERLIN).strftime("%d %H:%M%z") for _job, at in due] == ["25 02:30+0200", "26 02:30+0100"]
    missed = planner.missed(start, start + timedelta(days=2))
    assert [t.astimezone(BERLIN).strftime("%d %H:%M") for t in missed["nightly"]] == ["25 02:30", "26 02:30"]


def test_every_counts_from_its_anchor(tmp_path: Path) -> None:
    config = _config(tmp_path, '{ every = "15m" }')
    anchor = datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc)
    planner = Planner(config, {"nightly": anchor}, anchor + timedelta(minutes=20))  # type: ignore[arg-type]
    assert planner.next["nightly"] == anchor + timedelta(minutes=30)
    assert planner.due(anchor + timedelta(minutes=29)) == []
    assert planner.due(anchor + timedelta(minutes=31)) == [("nightly", anchor + timedelta(minutes=30))]
    assert planner.next["nightly"] == anchor + timedelta(minutes=45)


@pytest.mark.parametrize(("moment", "inside"), [("21:00", True), ("02:00", True), ("05:59", True), ("06:00", False),
                                                ("12:00", False), ("19:59", False), ("20:00", True)])
def test_a_backup_window_across_midnight(moment: str, inside: bool) -> None:
    window = WindowConfig(start="20:00", end="06:00")
    hours, minutes = map(int, moment.split(":"))
    assert window.contains(datetime(2026, 1, 10, hours, minutes, tzinfo=BERLIN), BERLIN) is inside


@pytest.mark.parametrize(("schedule", "words"), [
    ({"cron": "61 * * * *"}, "minute"),
    ({"cron": "* * *"}, "5-field"),
    ({"cron": "0 0 * * 8"}, "0-7"),
    ({"every": "4d"}, "'30s', '15m' or '4h'"),
    ({"every": "0s"}, "1 s to 7 days"),
    ({"cron": "0 0 * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
    ({"cron": "0 0 * * *", "every": "4h"}, "exactly one"),
    ({}, "exactly one"),
])
def test_a_bad_schedule_is_refused_with_its_reason(schedule: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ScheduleConfig(**schedule)
