"""A realistic, endless index-level feed for `chronolake produce --demo-feed`: what an index
provider's real-time distribution looks like to the lake.

Each trading day every index publishes one end-of-day level (`valid_from` = the day, open-ended:
valid until the next level). Then, as in real feeds:

- about 3% of the events are **late corrections** of an earlier day's level (a fat finger fixed
  one to five trading days later), bounded to that day (`valid_to` = the next day);
- about 0.5% of the days of an index start a **restatement**: a divisor error fixed for every day
  from a past day up to yesterday, one bounded assertion per day;
- about 0.2% are **late deliveries**: a day's level that was missing arrives days late;
- redeliveries: about 1% of events are sent twice (same `event_id`), which the job ignores.

Deterministic for a seed. The dataset is `index_id` (key) with `level: decimal(18,2)` and
`currency: string`, the demo's `index_levels`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import date, timedelta
from decimal import Decimal

from chronolake.iceberg.dataset import DatasetSpec

INDICES = {
    "STOXX50": ("EUR", Decimal("4521.65")), "SMI": ("CHF", Decimal("11137.79")),
    "NIKKEI225": ("JPY", Decimal("33464.17")), "SPX": ("USD", Decimal("4769.83")),
    "FTSE100": ("GBP", Decimal("7733.24")), "DAX": ("EUR", Decimal("16751.64")),
    "CAC40": ("EUR", Decimal("7543.18")), "HSI": ("HKD", Decimal("17047.39")),
    "ASX200": ("AUD", Decimal("7590.80")), "TSX": ("CAD", Decimal("20958.40")),
}
START = date(2020, 1, 2)
REQUIRED = {"level": "decimal", "currency": "string"}


def check_dataset(spec: DatasetSpec) -> str | None:
    """Why the feed cannot go to this dataset, or None."""
    columns = {c.name: c.type for c in spec.columns}
    if [c.name for c in spec.key] != ["index_id"] or any(not columns.get(n, "").startswith(t) for n, t in REQUIRED.items()):
        return (
            f"the demo feed writes index levels; {spec.name!r} does not have them: create one with "
            "`chronolake dataset create index_levels --key index_id --column level:decimal(18,2) --column currency:string`"
        )
    return None


def _trading_days(start: date) -> Iterator[date]:
    day = start
    while True:
        if day.weekday() < 5:
            yield day
        day += timedelta(days=1)


def feed(dataset: str, seed: int = 20240315, indices: int = len(INDICES)) -> Iterator[tuple[bytes, bytes]]:
    """Endless (Kafka key, value) events, day after day."""
    rng = random.Random(seed)
    names = list(INDICES)[: max(1, min(indices, len(INDICES)))]
    levels = {name: INDICES[name][1] for name in names}
    history: dict[tuple[str, date], Decimal] = {}
    days: list[date] = []
    missing: list[tuple[str, date]] = []

    def event(index: str, fields: dict[str, object]) -> tuple[bytes, bytes]:
        record = {"dataset": dataset, "index_id": index, "currency": INDICES[index][0], **fields}
        return f"{dataset}\x00{(index,)!r}".encode(), json.dumps(record, separators=(",", ":")).encode()

    for day in _trading_days(START):
        days.append(day)
        order = names[:]
        rng.shuffle(order)
        for index in order:
            levels[index] = (levels[index] * Decimal(1 + rng.gauss(0.0003, 0.01))).quantize(Decimal("0.01"))
            history[(index, day)] = levels[index]
            if rng.random() < 0.002:
                missing.append((index, day))  # delivered late
                continue
            value = event(index, {"level": str(levels[index]), "valid_from": day.isoformat(), "event_id": f"{index}-{day}"})
            yield value
            if rng.random() < 0.01:
                yield value  # a redelivery
            roll = rng.random()
            if roll < 0.03 and len(days) > 5:
                fixed_day = days[-rng.randint(2, 5)]
                fixed = (history[(index, fixed_day)] * Decimal(1 + rng.gauss(0, 0.002))).quantize(Decimal("0.01"))
                history[(index, fixed_day)] = fixed
                yield event(index, {
                    "level": str(fixed), "valid_from": fixed_day.isoformat(),
                    "valid_to": (fixed_day + timedelta(days=1)).isoformat(), "event_id": f"fix-{index}-{fixed_day}-{day}",
                })
            elif roll < 0.035 and len(days) > 20:
                for past in days[-rng.randint(5, 20):-1]:
                    restated = (history[(index, past)] / Decimal("1.004")).quantize(Decimal("0.01"))
                    history[(index, past)] = restated
                    yield event(index, {
                        "level": str(restated), "valid_from": past.isoformat(),
                        "valid_to": (past + timedelta(days=1)).isoformat(), "event_id": f"restate-{index}-{past}-{day}",
                    })
        while missing and rng.random() < 0.5:
            index, late_day = missing.pop(0)
            yield event(index, {
                "level": str(history[(index, late_day)]), "valid_from": late_day.isoformat(),
                "valid_to": (late_day + timedelta(days=1)).isoformat(), "event_id": f"{index}-{late_day}",
            })
