"""The payload an EventBridge Scheduler schedule sends to the rescaling Lambda."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from chronolake.scaling_lambda.exceptions import InvalidScheduleError

# Managed Flink application names: 1-128 of [a-zA-Z0-9_.-] (kinesisanalyticsv2 ApplicationName).
_APPLICATION_NAME = re.compile(r"[a-zA-Z0-9_.-]{1,128}")
_KNOWN_KEYS = frozenset({"application", "intent", "parallelism", "scheduled_at"})


class Intent(enum.Enum):
    """What a schedule asks for."""

    SCALE_TO = "scale_to"
    PEAK = "peak"
    OFF_PEAK = "off_peak"
    AUTO = "auto"


@dataclass(frozen=True)
class ScheduleRequest:
    """One validated schedule invocation."""

    application: str
    intent: Intent
    parallelism: int | None = None
    # The schedule's own fire time (`<aws.scheduler.scheduled-time>`): a second delivery of the
    # same firing finds the application already updated after it and does nothing.
    scheduled_at: datetime | None = None


def parse_schedule(event: Any) -> ScheduleRequest:
    """Validate a schedule payload; raise InvalidScheduleError naming the first problem."""
    if not isinstance(event, Mapping):
        raise InvalidScheduleError(f"payload must be a JSON object, got {type(event).__name__}")
    unknown = sorted(str(k) for k in event if k not in _KNOWN_KEYS)
    if unknown:
        raise InvalidScheduleError(f"unknown payload keys: {', '.join(unknown)}")

    application = event.get("application")
    if not isinstance(application, str) or not _APPLICATION_NAME.fullmatch(application):
        raise InvalidScheduleError(
            "'application' must be a Managed Flink application name (1-128 of a-z A-Z 0-9 _ . -)"
        )

    raw_intent = event.get("intent")
    try:
        intent = Intent(raw_intent)
    except ValueError:
        choices = ", ".join(i.value for i in Intent)
        raise InvalidScheduleError(f"'intent' must be one of {choices}, got {raw_intent!r}") from None

    parallelism = event.get("parallelism")
    if intent is Intent.SCALE_TO:
        # bool is an int subclass; true/false is never a parallelism.
        if not isinstance(parallelism, int) or isinstance(parallelism, bool) or parallelism < 1:
            raise InvalidScheduleError("'scale_to' needs 'parallelism' as an integer >= 1")
    elif parallelism is not None:
        raise InvalidScheduleError(f"'parallelism' is only allowed with 'scale_to', not {intent.value!r}")

    return ScheduleRequest(
        application=application,
        intent=intent,
        parallelism=parallelism,
        scheduled_at=_parse_time(event.get("scheduled_at")),
    )


def _parse_time(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidScheduleError("'scheduled_at' must be an ISO-8601 timestamp string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidScheduleError(f"'scheduled_at' is not an ISO-8601 timestamp: {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)
