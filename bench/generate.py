"""Deterministic generator of a realistic assertion file for the benchmarks.

    .venv/tools/bin/python bench/generate.py [--rows 1000000] [--keys 100000] [--seed 7]
        [--format csv|csv.gz|parquet] [--event-ids] [--out bench/out/assertions.csv]

The file models an end-of-day price feed for ``--keys`` instruments (key ``instrument``, payload
``price: decimal(18,6)`` and ``currency: string``):

- regular rows: day by day, every instrument gets that day's price (``valid_from`` = the day, no
  ``valid_to``: "until the next known change"); within a day instruments come in a shuffled order, so
  the file is in date order overall but not sorted by key;
- about 10% retroactive corrections: a new price for an earlier day of an instrument, half of them
  with an explicit ``valid_to`` (one to three days later), half without;
- about 1% deletes: half end the instrument (no ``valid_to``), half cut a one-day gap.

Corrections and deletes are interleaved with the regular rows at random positions of the day that
follows the day they correct, so they arrive late, as in a real feed. The same arguments always give
the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import io
import random
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

START = date(2024, 1, 1)
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK")
COLUMNS = ("instrument", "price", "currency", "valid_from", "valid_to", "op")
CORRECTION_SHARE = 0.10
DELETE_SHARE = 0.01


@dataclass(frozen=True)
class Shape:
    """What a generated file holds (for the benchmark's report)."""

    rows: int
    keys: int
    days: int
    regular: int
    corrections: int
    corrections_with_valid_to: int
    deletes: int
    #: Index of the first row of each day's arrivals (for loading the file as daily transactions).
    day_starts: tuple[int, ...] = ()


def instrument(index: int) -> str:
    return f"INS{index:07d}"


def generate(rows: int, keys: int, seed: int, event_ids: bool = False) -> tuple[list[tuple[str, ...]], Shape]:
    """The rows of the file (as text cells, header excluded) and what they hold."""
    rng = random.Random(seed)
    keys = max(1, min(keys, rows))
    regular_total = max(keys, round(rows * (1 - CORRECTION_SHARE - DELETE_SHARE)))
    days = max(1, -(-regular_total // keys))
    currencies = [CURRENCIES[rng.randrange(len(CURRENCIES))] for _ in range(keys)]
    prices = [rng.uniform(5, 500) for _ in range(keys)]

    late_total = rows - regular_total
    late_days = list(range(1, days)) or [0]
    late_per_day = {d: late_total // len(late_days) + (i < late_total % len(late_days)) for i, d in enumerate(late_days)}

    out: list[tuple[str, ...]] = []
    regular = corrections = with_valid_to = deletes = 0
    sequence = 0
    day_starts: list[int] = []
    for day_index in range(days):
        day_starts.append(len(out))
        today = (START + timedelta(days=day_index)).isoformat()
        todays_keys = list(range(keys))
        rng.shuffle(todays_keys)
        todays_keys = todays_keys[: min(keys, regular_total - regular)]
        # Late rows (for earlier days) land at random places among the day's regular rows.
        late_at = sorted(rng.randrange(len(todays_keys) + 1) for _ in range(late_per_day.get(day_index, 0)))
        late_index = 0
        for position in range(len(todays_keys) + 1):
            while late_index < len(late_at) and late_at[late_index] == position:
                sequence += 1
                row, kind = _late_row(rng, keys, day_index, currencies, prices)
                out.append(row + ((f"e{sequence}",) if event_ids else ()))
                if kind == "delete":
                    deletes += 1
                else:
                    corrections += 1
                    with_valid_to += kind == "correction_to"
                late_index += 1
            if position == len(todays_keys):
                break
            k = todays_keys[position]
            prices[k] = max(0.01, prices[k] * (1 + rng.gauss(0, 0.01)))
            sequence += 1
            row = (instrument(k), f"{prices[k]:.6f}", currencies[k], today, "", "")
            out.append(row + ((f"e{sequence}",) if event_ids else ()))
            regular += 1
    shape = Shape(len(out), keys, days, regular, corrections, with_valid_to, deletes, tuple(day_starts))
    return out, shape


def _late_row(
    rng: random.Random, keys: int, day_index: int, currencies: list[str], prices: list[float]
) -> tuple[tuple[str, ...], str]:
    k = rng.randrange(keys)
    back = rng.randrange(1, day_index + 1) if day_index > 0 else 0
    day = START + timedelta(days=day_index - back)
    if rng.random() < DELETE_SHARE / (CORRECTION_SHARE + DELETE_SHARE):
        if rng.random() < 0.5:
            return (instrument(k), "", currencies[k], day.isoformat(), "", "delete"), "delete"
        end = day + timedelta(days=1)
        return (instrument(k), "", currencies[k], day.isoformat(), end.isoformat(), "delete"), "delete"
    price = f"{max(0.01, prices[k] * (1 + rng.gauss(0, 0.02))):.6f}"
    if rng.random() < 0.5:
        end = day + timedelta(days=rng.randrange(1, 4))
        return (instrument(k), price, currencies[k], day.isoformat(), end.isoformat(), ""), "correction_to"
    return (instrument(k), price, currencies[k], day.isoformat(), "", ""), "correction"


def write(path: Path, rows: list[tuple[str, ...]], event_ids: bool) -> None:
    """CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, all columns as strings, empty cells as nulls)."""
    header = COLUMNS + (("event_id",) if event_ids else ())
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = list(zip(*rows)) if rows else [()] * len(header)
        table = pa.table({name: pa.array([v or None for v in values], pa.string()) for name, values in zip(header, columns)})
        pq.write_table(table, path)
        return
    buffer = io.StringIO()
    buffer.write(",".join(header) + "\n")
    for row in rows:
        buffer.write(",".join(row) + "\n")
    data = buffer.getvalue().encode()
    if path.suffix == ".gz":
        # mtime=0 keeps the bytes (and so the file's identity) the same run after run.
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as stream:
            stream.write(data)
    else:
        path.write_bytes(data)


def default_path(rows: int, keys: int, seed: int, fmt: str, event_ids: bool) -> Path:
    suffix = {"csv": ".csv", "csv.gz": ".csv.gz", "parquet": ".parquet"}[fmt]
    tag = "_ids" if event_ids else ""
    return Path(__file__).resolve().parent / "out" / f"assertions_{rows}_{keys}_s{seed}{tag}{suffix}"


def ensure(rows: int, keys: int, seed: int = 7, fmt: str = "csv", event_ids: bool = False) -> tuple[Path, Shape]:
    """Generate the file unless an identical one is already there (the generator is deterministic)."""
    path = default_path(rows, keys, seed, fmt, event_ids)
    data, shape = generate(rows, keys, seed, event_ids)
    if not path.exists():
        write(path, data, event_ids)
    return path, shape


def ensure_daily(rows: int, keys: int, seed: int = 7, fmt: str = "csv") -> tuple[list[Path], Shape]:
    """The same rows split by arrival day: one file per day, to load as one transaction each."""
    base = default_path(rows, keys, seed, fmt, False)
    data, shape = generate(rows, keys, seed)
    bounds = [*shape.day_starts, len(data)]
    paths = []
    for day, (start, end) in enumerate(zip(bounds, bounds[1:])):
        path = base.with_name(base.name.replace("assertions_", "daily_").replace(".", f"_d{day:03d}.", 1))
        if not path.exists():
            write(path, data[start:end], False)
        paths.append(path)
    return paths, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--format", choices=("csv", "csv.gz", "parquet"), default="csv")
    parser.add_argument("--event-ids", action="store_true", help="add a unique event_id column")
    parser.add_argument("--out", type=Path, help="output file (default: bench/out/assertions_<rows>_<keys>_s<seed>...)")
    args = parser.parse_args()
    data, shape = generate(args.rows, args.keys, args.seed, args.event_ids)
    path = args.out or default_path(args.rows, args.keys, args.seed, args.format, args.event_ids)
    write(path, data, args.event_ids)
    print(f"{path}: {shape}")


if __name__ == "__main__":
    main()
