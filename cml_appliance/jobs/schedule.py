"""Cron schedules: 5-field expressions with a timezone (croniter), and the scheduler loop.

One scheduler at a time across appliance processes (a Postgres advisory lock); each due job is
claimed with FOR UPDATE SKIP LOCKED and its next fire moved past now before its run starts, so a
fire never starts twice and fires missed during downtime collapse into one run.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cron_descriptor import Options, get_description
from croniter import CroniterBadDateError, croniter

from cml_appliance.core.errors import InvalidArgument

log = logging.getLogger(__name__)
SCHEDULER_LOCK = 0x434D4C20


def check_schedule(schedule: str, timezone: str) -> None:
    if len(schedule.split()) != 5 or not croniter.is_valid(schedule):
        raise InvalidArgument(f"schedule {schedule!r} is not a 5-field cron expression such as '0 13 * * 1'")
    zone(timezone)
    try:  # valid, yet never due (February 31st): refused, or the scheduler could not place it
        next_fire(schedule, timezone, datetime.now(UTC))
    except CroniterBadDateError:
        raise InvalidArgument(f"schedule {schedule!r} never comes (no such date)") from None


def zone(timezone: str) -> ZoneInfo:
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(f"timezone {timezone!r} is not a known time zone such as 'Europe/Berlin' or 'UTC'") from None


def next_fire(schedule: str, timezone: str, after: datetime) -> datetime:
    """The first fire strictly after `after`, in the schedule's own time zone."""
    return croniter(schedule, after.astimezone(zone(timezone))).get_next(datetime)


def english(schedule: str) -> str:
    """CML's english_schedule, e.g. "At 13:00, only on Monday"."""
    if not schedule:
        return ""
    options = Options()
    options.use_24hour_time_format = True
    try:
        return str(get_description(schedule, options))
    except Exception:  # a description is a courtesy: never let it break an answer
        return ""
