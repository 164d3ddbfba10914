"""Turning a transaction's net effect into the rows of one atomic append (the twin-row layout)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from chronolake.iceberg.algebra import Key, KeyChange
from chronolake.iceberg.dataset import CONTROL, FILE, LEDGER_PREFIX, DatasetSpec
from chronolake.iceberg.schema import TIMESTAMP, arrow_schema
from chronolake.iceberg.twins import StoredRow, change_rows, marker_row


class RowBuilder:
    """Accumulates the rows of one append (:mod:`chronolake.iceberg.twins`) and builds Arrow columns."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self._schema = arrow_schema(spec)
        self._rows: list[StoredRow] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add_change(self, key: Key, change: KeyChange, t: int) -> None:
        self._rows.extend(change_rows(key, change, t))

    def add_file(self, sha256: str, t: int) -> None:
        self._rows.append(marker_row(None, t, FILE, f"{LEDGER_PREFIX}{sha256}"))

    def add_control(self, stable: int) -> None:
        self._rows.append(marker_row(None, stable, CONTROL))

    def to_arrow(self) -> pa.Table:
        schema, rows = self._schema, self._rows
        blank_key = (None,) * len(self.spec.key)
        blank_payload = (None,) * len(self.spec.columns)
        keys = [r[0] or blank_key for r in rows]
        payloads = [blank_payload if r[1] is None else r[1] for r in rows]
        # Column by column: transposing with zip(*rows) is quadratic-ish in practice for 100k+ rows.
        arrays = [_array([k[i] for k in keys], schema.field(c.name).type) for i, c in enumerate(self.spec.key)]
        arrays += [_array([p[i] for p in payloads], schema.field(c.name).type) for i, c in enumerate(self.spec.columns)]
        arrays += [pa.array([r[i] for r in rows], type=pa.int64()).cast(TIMESTAMP) for i in range(2, 6)]
        arrays += [pa.array([r[i] for r in rows], type=pa.string()) for i in range(6, 9)]
        return pa.Table.from_arrays(arrays, schema=schema)


def _array(values: Sequence[Any], arrow_type: pa.DataType) -> pa.Array:
    # Payload timestamps travel through the algebra as integer microseconds.
    if pa.types.is_timestamp(arrow_type):
        return pa.array(values, type=pa.int64()).cast(arrow_type)
    return pa.array(values, type=arrow_type)


def python_columns(table: pa.Table, names: Iterable[str]) -> list[list[Any]]:
    """Columns as Python lists in the algebra's representation (timestamps as integer microseconds)."""
    columns = []
    for name in names:
        column = table[name]
        if pa.types.is_timestamp(column.type):
            column = column.cast(pa.int64())
        columns.append(column.to_pylist())
    return columns
