"""Bitemporal reads over the twin-row layout, as Arrow compute on scanned rows.

A version's identity is ``(key, valid_from, system_from)``. Its open twin carries the sentinel as
``system_to``; its closed twin (appended when it is superseded) the closing time. Grouping by identity
and taking ``min(system_to)`` gives the version's system interval; rows duplicated by a replay collapse.
Results show ``system_to`` *as of* the query's known-at time, so a query answers the same bytes forever.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from chronolake.iceberg.dataset import (
    CLOSED,
    EVENT_ID,
    OPEN,
    ROW_KIND,
    SYSTEM_FROM,
    SYSTEM_TO,
    VALID_FROM,
    VALID_TO,
    DatasetSpec,
)
from chronolake.iceberg.schema import TIMESTAMP
from chronolake.iceberg.temporal import SENTINEL, format_micros

STABLE_METADATA = b"chronolake.stable_system_time"
KNOWN_AT_METADATA = b"chronolake.known_at"


def _ts(micros: int) -> pa.Scalar:
    return pa.scalar(micros, TIMESTAMP)


def versions(rows: pa.Table, spec: DatasetSpec, known_at: int, *, with_event_id: bool = False) -> pa.Table:
    """Every version recorded at or before ``known_at``, with ``system_to`` as of ``known_at``.

    ``rows`` may hold any row kinds and any system times; the result is sorted by key, valid_from, system_from.
    """
    rows = rows.filter(
        pc.and_(pc.is_in(rows[ROW_KIND], pa.array([OPEN, CLOSED])), pc.less_equal(rows[SYSTEM_FROM], _ts(known_at)))
    )
    identity = [*spec.key_names, VALID_FROM, SYSTEM_FROM]
    # Twins carry identical payloads, so any one row of a version represents it: take the first by
    # position (a type-agnostic "first", which Arrow lacks for decimals), with min(system_to) beside it.
    rows = rows.append_column("__row", pa.array(range(rows.num_rows), pa.int64()))
    grouped = rows.group_by(identity, use_threads=False).aggregate([("__row", "min"), (SYSTEM_TO, "min")])
    picked = rows.take(grouped["__row_min"])
    closed_at = grouped[f"{SYSTEM_TO}_min"]
    system_to = pc.if_else(pc.less_equal(closed_at, _ts(known_at)), closed_at, _ts(SENTINEL))
    names = [*spec.key_names, *spec.payload_names, VALID_FROM, VALID_TO, SYSTEM_FROM]
    columns = {name: picked[name] for name in names}
    columns[SYSTEM_TO] = system_to
    if with_event_id:
        columns[EVENT_ID] = picked[EVENT_ID]
    result = pa.table(columns)
    return result.sort_by([(name, "ascending") for name in identity])


def current(rows: pa.Table, spec: DatasetSpec, known_at: int) -> pa.Table:
    """The timeline at ``known_at``: versions not closed by then."""
    all_versions = versions(rows, spec, known_at)
    return all_versions.filter(pc.equal(all_versions[SYSTEM_TO], _ts(SENTINEL)))


def as_of(rows: pa.Table, spec: DatasetSpec, valid_at: int, known_at: int) -> pa.Table:
    """Per key, the version true at ``valid_at`` as known at ``known_at``."""
    v = _ts(valid_at)
    rows = rows.filter(pc.and_(pc.less_equal(rows[VALID_FROM], v), pc.greater(rows[VALID_TO], v)))
    return current(rows, spec, known_at)


def only_keys(table: pa.Table, key_names: Sequence[str], keys: Sequence[tuple[object, ...]]) -> pa.Table:
    """The rows of ``table`` whose key is one of ``keys`` (a hash semi-join, linear in both sizes)."""
    if len(key_names) == 1:
        wanted = pa.array([k[0] for k in keys], type=table.schema.field(key_names[0]).type)
        return table.filter(pc.is_in(table[key_names[0]], wanted))
    wanted_table = pa.table(
        {name: pa.array([k[i] for k in keys], type=table.schema.field(name).type) for i, name in enumerate(key_names)}
    )
    return table.join(wanted_table, keys=list(key_names), join_type="left semi")


def with_metadata(table: pa.Table, *, stable: int, known_at: int | None = None) -> pa.Table:
    """Attach the stable system time a result was answered under (and the known-at time it used)."""
    metadata = dict(table.schema.metadata or {})
    metadata[STABLE_METADATA] = format_micros(stable).encode()
    if known_at is not None:
        metadata[KNOWN_AT_METADATA] = format_micros(known_at).encode()
    return table.replace_schema_metadata(metadata)
