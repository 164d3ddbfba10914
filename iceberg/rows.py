"""Turning a transaction's net effect into the rows of one atomic append (the twin-row layout)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from chronolake.iceberg.algebra import Key, KeyChange, Segment
from chronolake.iceberg.dataset import (
    CLOSED,
    CONTROL,
    EVENT,
    EVENT_DIGEST,
    EVENT_ID,
    FILE,
    OPEN,
    ROW_KIND,
    SYSTEM_FROM,
    SYSTEM_TO,
    VALID_FROM,
    VALID_TO,
    DatasetSpec,
)
from chronolake.iceberg.schema import TIMESTAMP, arrow_schema
from chronolake.iceberg.temporal import SENTINEL


class RowBuilder:
    """Column-wise accumulation of the rows a transaction writes."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self._schema = arrow_schema(spec)
        self._keys: list[list[Any]] = [[] for _ in spec.key]
        self._payload: list[list[Any]] = [[] for _ in spec.columns]
        self._times: dict[str, list[int | None]] = {VALID_FROM: [], VALID_TO: [], SYSTEM_FROM: [], SYSTEM_TO: []}
        self._kind: list[str] = []
        self._event_id: list[str | None] = []
        self._event_digest: list[str | None] = []

    def __len__(self) -> int:
        return len(self._kind)

    def _version(self, key: Key, segment: Segment, system_to: int, kind: str) -> None:
        for values, part in zip(self._keys, key):
            values.append(part)
        for values, part in zip(self._payload, segment.payload):
            values.append(part)
        self._times[VALID_FROM].append(segment.valid_from)
        self._times[VALID_TO].append(segment.valid_to)
        self._times[SYSTEM_FROM].append(segment.system_from)
        self._times[SYSTEM_TO].append(system_to)
        self._kind.append(kind)
        self._event_id.append(segment.event_id)
        self._event_digest.append(segment.event_digest)

    def _marker(self, key: Key | None, system_from: int, kind: str, event_id: str | None, digest: str | None) -> None:
        for index, values in enumerate(self._keys):
            values.append(None if key is None else key[index])
        for values in self._payload:
            values.append(None)
        self._times[VALID_FROM].append(None)
        self._times[VALID_TO].append(None)
        self._times[SYSTEM_FROM].append(system_from)
        self._times[SYSTEM_TO].append(None)
        self._kind.append(kind)
        self._event_id.append(event_id)
        self._event_digest.append(digest)

    def add_change(self, key: Key, change: KeyChange, t: int) -> None:
        for segment in change.closed:
            self._version(key, segment, t, CLOSED)
        for segment in change.opened:
            self._version(key, segment, SENTINEL, OPEN)
        for event_id, digest in change.events:
            self._marker(key, t, EVENT, event_id, digest)

    def add_file(self, sha256: str, t: int) -> None:
        self._marker(None, t, FILE, f"sha256:{sha256}", None)

    def add_control(self, stable: int) -> None:
        self._marker(None, stable, CONTROL, None, None)

    def to_arrow(self) -> pa.Table:
        schema = self._schema
        arrays: list[pa.Array] = []
        for column, values in zip(self.spec.key, self._keys):
            arrays.append(_array(values, schema.field(column.name).type))
        for column, values in zip(self.spec.columns, self._payload):
            arrays.append(_array(values, schema.field(column.name).type))
        for name in (VALID_FROM, VALID_TO, SYSTEM_FROM, SYSTEM_TO):
            arrays.append(pa.array(self._times[name], type=pa.int64()).cast(TIMESTAMP))
        arrays.append(pa.array(self._kind, type=pa.string()))
        arrays.append(pa.array(self._event_id, type=pa.string()))
        arrays.append(pa.array(self._event_digest, type=pa.string()))
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
