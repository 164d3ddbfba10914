"""The shipped SQL (``sql/*.sql``) rendered for DuckDB or Trino/Athena, and a DuckDB runner.

Literals always carry ``UTC`` and six fractional digits, so comparisons are exact at microseconds;
nothing uses functions that return ``timestamp(3)`` on Athena.
"""

from __future__ import annotations

import os
import site
from collections.abc import Sequence
from enum import Enum
from importlib.resources import files

from typing import TYPE_CHECKING, Any

from chronolake.iceberg.dataset import DatasetSpec
from chronolake.iceberg.exceptions import ConfigError
from chronolake.iceberg.temporal import SENTINEL, datetime_from_micros

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

QUERIES = ("as_of", "timeline", "history", "stable")


class Dialect(str, Enum):
    duckdb = "duckdb"
    trino = "trino"
    athena = "athena"


def timestamp_literal(micros: int, dialect: Dialect) -> str:
    text = datetime_from_micros(micros).strftime("%Y-%m-%d %H:%M:%S.%f")
    keyword = "TIMESTAMPTZ" if dialect is Dialect.duckdb else "TIMESTAMP"
    return f"{keyword} '{text} UTC'"


def _value_literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, float)):
        return repr(value)
    raise ConfigError(f"cannot use {value!r} as a key literal")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def render(
    query: str,
    spec: DatasetSpec,
    table: str,
    dialect: Dialect,
    *,
    valid_at: int | None = None,
    known_at: int | None = None,
    keys: Sequence[tuple[Any, ...]] | None = None,
) -> str:
    if query not in QUERIES:
        raise ConfigError(f"unknown query {query!r}; one of {', '.join(QUERIES)}")
    template = files("chronolake.iceberg").joinpath("sql", f"{query}.sql").read_text()
    key_filter = ""
    if keys:
        clauses = []
        for key in keys:
            parts = [f"{_quote(n)} = {_value_literal(v)}" for n, v in zip(spec.key_names, key)]
            clauses.append("(" + " AND ".join(parts) + ")")
        key_filter = "\n  AND (" + " OR ".join(clauses) + ")"
    return template.format(
        table=table,
        columns=", ".join(_quote(n) for n in (*spec.key_names, *spec.payload_names)),
        keys=", ".join(_quote(n) for n in spec.key_names),
        sentinel=timestamp_literal(SENTINEL, dialect),
        valid_at=timestamp_literal(valid_at, dialect) if valid_at is not None else "NULL",
        known_at=timestamp_literal(known_at, dialect) if known_at is not None else "NULL",
        key_filter=key_filter,
    )


def duckdb_connection() -> duckdb.DuckDBPyConnection:
    """DuckDB with ``TimeZone='UTC'`` and the Iceberg extension from the pip-installed extension package."""
    import duckdb

    directories = [os.path.join(p, "duckdb_ext", "extensions") for p in site.getsitepackages()]
    directory = next((d for d in directories if os.path.isdir(d)), None)
    config = {"autoinstall_known_extensions": "false", "autoload_known_extensions": "true"}
    if directory is not None:
        config["extension_directory"] = directory
    connection = duckdb.connect(config=config)
    connection.execute("SET TimeZone = 'UTC'")
    connection.execute("LOAD iceberg")
    return connection


def duckdb_table_reference(metadata_location: str) -> str:
    return "iceberg_scan(" + _value_literal(metadata_location) + ")"


def run_duckdb(sql: str, connection: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    connection = connection or duckdb_connection()
    return connection.execute(sql).fetch_arrow_table()
