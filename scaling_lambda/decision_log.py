"""Structured JSON log lines: one per decision or error, with every input that shaped it."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

logger = logging.getLogger("chronolake.scaling")
# The Lambda runtime leaves the root logger at WARNING; decisions are INFO and must be kept.
logger.setLevel(logging.INFO)


def _default(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> dict[str, Any]:
    """Log one JSON object on one line and return it."""
    record = {"event": event, **fields}
    logger.log(level, json.dumps(record, default=_default, sort_keys=True))
    return record
