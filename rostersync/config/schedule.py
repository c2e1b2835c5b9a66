"""A source's ``schedule`` block and the APScheduler trigger the daemon builds from it.

Validating a schedule builds that same trigger and asks it for its next fire time, so an
expression APScheduler refuses (``0 25 * * *``) or one that can never fire (``0 0 31 2 *``) is
a config error with its YAML path and line, not a daemon that dies at start or silently drops
the source on reload.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from pydantic import ConfigDict, Field, field_validator, model_validator

from rostersync.config.types import (
    Duration,
    StrictModel,
    exactly_one_of,
    format_duration,
    quoted,
)

if TYPE_CHECKING:
    from apscheduler.triggers.combining import OrTrigger
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
CRON_FIELDS = ("minute", "hour", "day", "month", "day_of_week")
_APS_PREFIX = re.compile(r"^Error validating expression '.*?': ")


def crontab_day_of_week(field_: str) -> str:
    """Translate a crontab day-of-week field (0 or 7 = Sunday) into APScheduler 3.x names.

    APScheduler 3.x counts 0 as Monday (a known mismatch it cannot fix in 3.x), so numbers are
    expanded here into day names and the names are what the trigger sees.
    """
    if field_.strip() == "*":
        return "*"
    days: set[int] = set()
    for item in field_.lower().split(","):
        base, _, step_text = item.partition("/")
        if step_text and (not step_text.isdigit() or int(step_text) == 0):
            raise ValueError(f"day-of-week step {quoted(step_text)} is not a positive number")
        step = int(step_text) if step_text else 1
        if base == "*":
            lo, hi = 0, 6
        elif "-" in base:
            a, b = base.split("-", 1)
            lo, hi = _day_number(a), _day_number(b)
            if hi == 0 and lo > 0:
                hi = 7  # "5-0" / "5-7": Friday to Sunday
        else:
            lo = hi = _day_number(base)
            if step_text:
                hi = 6  # "1/2": from Monday on, every second day (cron semantics)
        if lo > hi:
            raise ValueError(f"day-of-week range {quoted(base)} runs backwards")
        days.update(d % 7 for d in range(lo, hi + 1, step))
    if len(days) == 7:
        return "*"
    return ",".join(DAY_NAMES[d] for d in sorted(days))


def _day_number(token: str) -> int:
    token = token.strip()
    if token.isdigit() and 0 <= int(token) <= 7:
        return int(token)
    if token[:3] in DAY_NAMES:
        return DAY_NAMES.index(token[:3])
    raise ValueError(f"{quoted(token)} is not a day of the week (0-7 or sun-sat)")


def cron_trigger(expression: str, *, jitter: int | None = None) -> CronTrigger | OrTrigger:
    """The trigger for a five-field crontab expression (local time), with crontab's meaning;
    ValueError names the field APScheduler refused.

    Crontab runs a job on a day that matches the day of the month OR the day of the week when
    both fields are restricted (neither starts with ``*``): ``0 2 13 * 5`` runs on every 13th
    and every Friday. APScheduler's cron trigger requires both, so such an expression becomes
    two triggers, one per day field, and fires when either does."""
    from apscheduler.triggers.combining import OrTrigger
    from apscheduler.triggers.cron import CronTrigger

    parts = expression.split()
    if len(parts) != len(CRON_FIELDS):
        raise ValueError(f"cron {quoted(expression)} must have five fields (m h dom mon dow)")
    values = dict(zip(CRON_FIELDS, parts, strict=True))
    try:
        values["day_of_week"] = crontab_day_of_week(values["day_of_week"])
    except ValueError as exc:
        raise ValueError(f"cron {quoted(expression)}: day of week: {exc}") from None
    for name, value in values.items():
        # One field at a time, so the message can say which field is wrong.
        try:
            CronTrigger(**{name: value})
        except ValueError as exc:
            field = f"{name.replace('_', ' ')} {quoted(parts[CRON_FIELDS.index(name)])}"
            reason = _APS_PREFIX.sub("", str(exc))
            raise ValueError(f"cron {quoted(expression)}: {field}: {reason}") from None
    day, dow = parts[2], parts[4]
    if not day.startswith("*") and not dow.startswith("*"):
        by_date = CronTrigger(**{**values, "day_of_week": "*"})
        by_weekday = CronTrigger(**{**values, "day": "*"})
        return OrTrigger([by_date, by_weekday], jitter=jitter)
    return CronTrigger(**values, jitter=jitter)


def interval_trigger(
    interval: timedelta, *, start: datetime | None = None, jitter: int | None = None
) -> IntervalTrigger:
    from apscheduler.triggers.interval import IntervalTrigger

    return IntervalTrigger(seconds=interval.total_seconds(), start_date=start, jitter=jitter)


def build_trigger(
    schedule: Schedule, *, start: datetime | None = None
) -> IntervalTrigger | CronTrigger | OrTrigger:
    """The APScheduler trigger for a source's ``schedule`` (interval or five-field cron)."""
    jitter = int(schedule.jitter.total_seconds()) or None
    if schedule.interval is not None:
        return interval_trigger(schedule.interval, start=start, jitter=jitter)
    assert schedule.cron is not None  # the model guarantees exactly one of the two
    return cron_trigger(schedule.cron, jitter=jitter)


def misfire_grace(schedule: Schedule) -> int:
    """How late a start may be and still run: a slow loop must not drop a run, but a run
    missed by more than one interval is replaced by the next one (coalesce)."""
    if schedule.interval is not None:
        return int(min(max(schedule.interval.total_seconds(), 1), 3600))
    return 3600


class Schedule(StrictModel):
    """When the daemon runs this source: ``{interval: 1h}`` or ``{cron: "0 2 * * *"}``."""

    model_config = ConfigDict(json_schema_extra=exactly_one_of("interval", "cron"))

    interval: Duration | None = None
    cron: str | None = Field(default=None, description="five-field cron expression, local time")
    jitter: Duration = Field(
        default=timedelta(seconds=30), description="random delay added to each start"
    )

    @field_validator("cron")
    @classmethod
    def _cron_fires(cls, value: str | None) -> str | None:
        if value is None:
            return None
        trigger = cron_trigger(value)
        if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
            raise ValueError(f"cron {quoted(value)} never fires (no date matches it)")
        return value

    @field_validator("interval")
    @classmethod
    def _interval_fires(cls, value: timedelta | None) -> timedelta | None:
        if value is None:
            return None
        if value.total_seconds() < 1:
            raise ValueError("interval must be at least 1s")
        now = datetime.now(UTC)
        try:
            interval_trigger(value, start=now).get_next_fire_time(None, now + value)
        except OverflowError:
            raise ValueError("interval is too long for the scheduler") from None
        return value

    @model_validator(mode="after")
    def _one_trigger(self) -> Schedule:
        if (self.interval is None) == (self.cron is None):
            raise ValueError("give exactly one of interval or cron")
        explicit = "jitter" in self.model_fields_set  # the 30s default suits long intervals
        if explicit and self.interval is not None and self.jitter >= self.interval:
            # Each start moves by up to the jitter: as long as the interval or longer, the
            # runs would come in no order, two of them at once as likely as an interval apart.
            raise ValueError(
                f"jitter ({format_duration(self.jitter)}) must be shorter than the interval "
                f"({format_duration(self.interval)})"
            )
        return self
