"""Dataset declarations: key columns, typed payload columns, partitioning.

Pure Python (stdlib only), shared by the Flink job and the tools; the Iceberg and Arrow schemas they
imply are in :mod:`chronolake.iceberg.schema`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from chronolake.iceberg.exceptions import ConfigError

VALID_FROM = "valid_from"
VALID_TO = "valid_to"
SYSTEM_FROM = "system_from"
SYSTEM_TO = "system_to"
ROW_KIND = "row_kind"
EVENT_ID = "event_id"
EVENT_DIGEST = "event_digest"
TIME_COLUMNS = (VALID_FROM, VALID_TO, SYSTEM_FROM, SYSTEM_TO)
SYSTEM_COLUMNS = (*TIME_COLUMNS, ROW_KIND, EVENT_ID, EVENT_DIGEST)

# Row kinds of the "twin rows" layout (docs/storage.md).
OPEN = "open"
CLOSED = "closed"
EVENT = "event"  # an applied event id no version row carries (deletes, superseded in-transaction)
FILE = "file"  # a loaded file's SHA-256 (the idempotency ledger), committed with its rows
LEDGER_PREFIX = "sha256:"  # event_id of a file row: this prefix and the hex SHA-256
CONTROL = "control"  # the stable system time published by the commit

#: The quarantine table beside each dataset table, and its columns.
QUARANTINE_SUFFIX = "__quarantine"

SPEC_PROPERTY = "chronolake.dataset"
DEFAULT_BUCKETS = 16

_DECIMAL = re.compile(r"^decimal\(\s*(\d+)\s*,\s*(\d+)\s*\)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TYPE_NAMES = "string, long, double, decimal(p,s), date, timestamp, boolean"


@dataclass(frozen=True)
class Column:
    name: str
    type: str


QUARANTINE_COLUMNS = (
    Column("source", "string"),
    Column("source_sha256", "string"),
    Column("line", "long"),
    Column("reason", "string"),
    Column("raw", "string"),
    Column("system_time", "timestamp"),
)


def _normalise_type(text: str) -> str:
    type_name = text.strip().lower().replace(" ", "")
    if type_name in {"string", "long", "double", "date", "timestamp", "boolean"}:
        return type_name
    match = _DECIMAL.match(type_name)
    if match and 1 <= int(match[1]) <= 38 and int(match[2]) <= int(match[1]):
        return f"decimal({int(match[1])},{int(match[2])})"
    raise ConfigError(f"unknown column type {text!r}; use one of: {TYPE_NAMES}")


def parse_column(text: str, default_type: str | None = None) -> Column:
    """``NAME:TYPE`` (or ``NAME`` when a default type is given)."""
    name, sep, type_text = text.partition(":")
    name = name.strip()
    if not sep:
        if default_type is None:
            raise ConfigError(f"column {text!r} needs a type: NAME:TYPE with TYPE one of {TYPE_NAMES}")
        type_text = default_type
    return Column(name, _normalise_type(type_text))


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's declaration: the key identifies an entity, the payload is what is asserted about it."""

    name: str
    key: tuple[Column, ...]
    columns: tuple[Column, ...]
    buckets: int = DEFAULT_BUCKETS

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"dataset name {self.name!r} must be letters, digits and underscores")
        if not self.key:
            raise ConfigError(f"dataset {self.name!r} needs at least one key column")
        seen: set[str] = set()
        for column in (*self.key, *self.columns):
            if not _NAME.match(column.name):
                raise ConfigError(f"column name {column.name!r} must be letters, digits and underscores")
            if column.name in SYSTEM_COLUMNS or column.name == "op":
                raise ConfigError(f"column name {column.name!r} is reserved by chronolake")
            if column.name in seen:
                raise ConfigError(f"column {column.name!r} is declared twice in dataset {self.name!r}")
            seen.add(column.name)
        if not 1 <= self.buckets <= 1024:
            raise ConfigError("partition buckets must be between 1 and 1024")

    @property
    def key_names(self) -> list[str]:
        return [c.name for c in self.key]

    @property
    def payload_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def table_columns(self) -> tuple[Column, ...]:
        """The dataset table's columns in schema order: the one definition of the physical layout."""
        return (
            *self.key,
            *self.columns,
            *(Column(name, "timestamp") for name in TIME_COLUMNS),
            Column(ROW_KIND, "string"),
            Column(EVENT_ID, "string"),
            Column(EVENT_DIGEST, "string"),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "key": [[c.name, c.type] for c in self.key],
                "columns": [[c.name, c.type] for c in self.columns],
                "buckets": self.buckets,
            }
        )

    @classmethod
    def from_json(cls, name: str, text: str) -> DatasetSpec:
        data = json.loads(text)
        return cls(
            name=name,
            key=tuple(Column(n, t) for n, t in data["key"]),
            columns=tuple(Column(n, t) for n, t in data["columns"]),
            buckets=int(data.get("buckets", DEFAULT_BUCKETS)),
        )

    @classmethod
    def from_declaration(cls, name: str, declaration: dict[str, Any]) -> DatasetSpec:
        """From a config-file entry: ``{key: [COL or COL:TYPE], columns: {COL: TYPE}, partition: {buckets: N}}``."""
        if not isinstance(declaration, dict):
            raise ConfigError(f"dataset {name!r}: expected a mapping with 'key' and 'columns'")
        unknown = set(declaration) - {"key", "columns", "partition"}
        if unknown:
            raise ConfigError(f"dataset {name!r}: unknown setting(s) {', '.join(sorted(unknown))}")
        key_decl = declaration.get("key")
        if isinstance(key_decl, str):
            key_decl = [key_decl]
        if not isinstance(key_decl, list) or not key_decl:
            raise ConfigError(f"dataset {name!r}: 'key' must list at least one column")
        columns_decl = declaration.get("columns") or {}
        if not isinstance(columns_decl, dict):
            raise ConfigError(f"dataset {name!r}: 'columns' must map column names to types")
        partition = declaration.get("partition") or {}
        buckets = partition.get("buckets", DEFAULT_BUCKETS) if isinstance(partition, dict) else DEFAULT_BUCKETS
        return cls(
            name=name,
            key=tuple(parse_column(str(k), default_type="string") for k in key_decl),
            columns=tuple(Column(str(n), _normalise_type(str(t))) for n, t in columns_decl.items()),
            buckets=int(buckets),
        )


def decimal_precision_scale(column_type: str) -> tuple[int, int] | None:
    """(precision, scale) of a `decimal(p,s)` column type; None for any other type."""
    match = _DECIMAL.match(column_type)
    return None if match is None else (int(match[1]), int(match[2]))


def coerce_decimal(value: Any, column: Column) -> Decimal:
    """Decimal with the column's scale; raises ValueError when it does not fit exactly."""
    match = _DECIMAL.match(column.type)
    assert match is not None
    precision, scale = int(match[1]), int(match[2])
    number = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    if not number.is_finite():
        raise ValueError(f"not a finite decimal: {value!r}")
    quantized = number.quantize(Decimal(1).scaleb(-scale))
    if quantized != number:
        raise ValueError(f"{value!r} has more than {scale} decimal places")
    if len(quantized.as_tuple().digits) > precision:
        raise ValueError(f"{value!r} does not fit decimal({precision},{scale})")
    # Stored decimals have no negative zero; normalise so every path fingerprints -0 and 0 alike.
    return quantized.copy_abs() if quantized.is_zero() else quantized
