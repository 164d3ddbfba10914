"""Turning a transaction's net effect into the rows of one atomic append (the twin-row layout)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from chronolake.iceberg.algebra import Key, KeyChange
from chronolake.iceberg.dataset import (
    CLOSED,
    CONTROL,
    EVENT,
    FILE,
    OPEN,
    SYSTEM_FROM,
    SYSTEM_TO,
    VALID_FROM,
    VALID_TO,
    DatasetSpec,
)
from chronolake.iceberg.schema import TIMESTAMP, arrow_schema
from chronolake.iceberg.temporal import SENTINEL


class RowBuilder:
    """Accumulates the rows of one append; columns are built in bulk at the end."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self._schema = arrow_schema(spec)
        # (key, change, t) per key transaction; (key, system_from, kind, event_id, digest) per marker.
        self._changes: list[tuple[Key, KeyChange, int]] = []
        self._markers: list[tuple[Key | None, int, str, str | None, str | None]] = []

    def __len__(self) -> int:
        return sum(len(c.opened) + len(c.closed) for _, c, _ in self._changes) + len(self._markers)

    def add_change(self, key: Key, change: KeyChange, t: int) -> None:
        self._changes.append((key, change, t))
        if change.events:
            self._markers.extend((key, t, EVENT, event_id, digest) for event_id, digest in change.events)

    def add_file(self, sha256: str, t: int) -> None:
        self._markers.append((None, t, FILE, f"sha256:{sha256}", None))

    def add_control(self, stable: int) -> None:
        self._markers.append((None, stable, CONTROL, None, None))

    def to_arrow(self) -> pa.Table:
        schema = self._schema
        changes, markers = self._changes, self._markers
        # Closed twins first, then open versions; the commit sorts the whole append anyway.
        keys = [k for k, c, _ in changes for _s in c.closed]
        closed_at = [t for _k, c, t in changes for _s in c.closed]
        segments = [s for _k, c, _t in changes for s in c.closed]
        closed_count = len(segments)
        keys += [k for k, c, _ in changes for _s in c.opened]
        segments += [s for _k, c, _t in changes for s in c.opened]
        opened_count = len(segments) - closed_count
        width, payload_width = len(self.spec.key), len(self.spec.columns)
        blank_key = (None,) * width
        keys += [m[0] or blank_key for m in markers]
        payloads = [s[3] for s in segments] + [(None,) * payload_width] * len(markers)
        none = [None] * len(markers)
        arrays: list[pa.Array] = []
        # Column by column: transposing with zip(*rows) is quadratic-ish in practice for 100k+ rows.
        for index, column in enumerate(self.spec.key):
            arrays.append(_array([k[index] for k in keys], schema.field(column.name).type))
        for index, column in enumerate(self.spec.columns):
            arrays.append(_array([p[index] for p in payloads], schema.field(column.name).type))
        times = {
            VALID_FROM: [s[0] for s in segments] + none,
            VALID_TO: [s[1] for s in segments] + none,
            SYSTEM_FROM: [s[2] for s in segments] + [m[1] for m in markers],
            SYSTEM_TO: closed_at + [SENTINEL] * opened_count + none,
        }
        for name in (VALID_FROM, VALID_TO, SYSTEM_FROM, SYSTEM_TO):
            arrays.append(pa.array(times[name], type=pa.int64()).cast(TIMESTAMP))
        kinds = [CLOSED] * closed_count + [OPEN] * opened_count + [m[2] for m in markers]
        arrays.append(pa.array(kinds, type=pa.string()))
        arrays.append(pa.array([s[4] for s in segments] + [m[3] for m in markers], type=pa.string()))
        arrays.append(pa.array([s[5] for s in segments] + [m[4] for m in markers], type=pa.string()))
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
