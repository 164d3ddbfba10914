"""Time on the two axes: UTC microseconds since the epoch, the open-end sentinel, parsing and printing.

Pure Python (stdlib only): the Flink job and the tools share it.
"""

from __future__ import annotations

import calendar
from datetime import date, datetime, timedelta, timezone

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

#: The open end of either interval: 9999-12-31T00:00:00Z, exact at milli- and microsecond precision.
SENTINEL = 253_402_214_400_000_000

#: Spelling of the sentinel accepted for ``valid_to``.
INFINITY = "infinity"

_ONE_US = timedelta(microseconds=1)


class TimestampError(ValueError):
    """A value is not an ISO-8601 timestamp or date."""


def micros_from_datetime(value: datetime) -> int:
    """UTC microseconds of a datetime; a naive datetime means UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return (value - EPOCH) // _ONE_US


def micros_from_date(value: date) -> int:
    """A date means 00:00 UTC of that day."""
    return (value - date(1970, 1, 1)).days * 86_400_000_000


def parse_timestamp(text: str) -> int:
    """Parse ISO-8601 text to UTC microseconds.

    Date-only means 00:00 UTC, naive means UTC, digits finer than a microsecond are floored.
    """
    stripped = text.strip()
    if not stripped or not stripped[0].isdigit():
        raise TimestampError(f"not an ISO-8601 timestamp: {text!r}")
    try:
        parsed = datetime.fromisoformat(stripped)
    except ValueError:
        raise TimestampError(f"not an ISO-8601 timestamp: {text!r}") from None
    return micros_from_datetime(parsed)


def to_micros(value: object) -> int:
    """Microseconds of a timestamp given as ISO text, a datetime or a date (as files and JSON carry them)."""
    if isinstance(value, str):
        return parse_timestamp(value)
    if isinstance(value, datetime):
        return micros_from_datetime(value)
    if isinstance(value, date):
        return micros_from_date(value)
    raise TimestampError(f"not a timestamp: {value!r}")


def datetime_from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def format_micros(micros: int) -> str:
    """ISO-8601 UTC with exactly six fractional digits, so the text round-trips through ``--known-at``."""
    return datetime_from_micros(micros).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


PERIODS = ("day", "week", "month", "quarter", "year")
_MONTHS = {"month": 1, "quarter": 3, "year": 12}


def add_period(micros: int, period: str) -> int:
    """The end of a periodic observation starting at ``micros`` (calendar months, clamped to month end)."""
    if period == "day":
        return micros + 86_400_000_000
    if period == "week":
        return micros + 7 * 86_400_000_000
    if period not in _MONTHS:
        raise ValueError(f"unknown period {period!r}; one of {', '.join(PERIODS)}")
    start = datetime_from_micros(micros)
    month_index = start.month - 1 + _MONTHS[period]
    year, month = start.year + month_index // 12, month_index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return micros_from_datetime(start.replace(year=year, month=month, day=day))
