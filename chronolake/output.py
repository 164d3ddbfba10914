"""Printing Arrow results as a table, JSON lines or CSV, with exact timestamps and decimals."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console
from rich.table import Table

from chronolake.iceberg.temporal import format_micros, micros_from_datetime

if TYPE_CHECKING:
    import pyarrow as pa


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def text(value: Any) -> str:
    """A value as printed in tables and CSV: timestamps with six fractional digits and a Z."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return format_micros(micros_from_datetime(value))
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _json_value(value: Any) -> str:
    if isinstance(value, Decimal):
        # Exact digits as a JSON number; json.dumps would need a float and lose them.
        return str(value) if value.is_finite() else json.dumps(str(value))
    if isinstance(value, (datetime, date)):
        return json.dumps(text(value))
    return json.dumps(value)


def json_line(row: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{json.dumps(k)}: {_json_value(v)}" for k, v in row.items()) + "}"


def print_rows(result: pa.Table, fmt: Format, *, title: str | None = None, out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    rows: Iterable[dict[str, Any]] = result.to_pylist()
    if fmt is Format.json:
        for row in rows:
            stream.write(json_line(row) + "\n")
    elif fmt is Format.csv:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(result.column_names)
        for row in rows:
            writer.writerow([text(v) for v in row.values()])
    else:
        table = Table(title=title, title_justify="left", show_lines=False)
        for name in result.column_names:
            table.add_column(name, no_wrap=name in ("valid_from", "valid_to", "system_from", "system_to"))
        for row in rows:
            table.add_row(*(text(v) for v in row.values()))
        Console(file=stream, width=max(200, Console().width), soft_wrap=True).print(table)
