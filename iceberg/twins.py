"""The rows a transaction writes in the twin-row layout (docs/storage.md), as plain tuples.

Pure Python (stdlib only): the batch loader (through :class:`~chronolake.iceberg.rows.RowBuilder`)
and the Flink job turn the same :class:`~chronolake.iceberg.algebra.KeyChange` into the same rows.
"""

from __future__ import annotations

from typing import NamedTuple

from chronolake.iceberg.algebra import Key, KeyChange, Payload
from chronolake.iceberg.dataset import CLOSED, EVENT, OPEN
from chronolake.iceberg.temporal import SENTINEL


class StoredRow(NamedTuple):
    """One row of a dataset table, in :meth:`DatasetSpec.table_columns` order (key and payload grouped)."""

    key: Key | None
    payload: Payload | None
    valid_from: int | None
    valid_to: int | None
    system_from: int
    system_to: int | None
    row_kind: str
    event_id: str | None
    event_digest: str | None


def change_rows(key: Key, change: KeyChange, t: int) -> list[StoredRow]:
    """A key's net effect at ``t``: a closed twin (``system_to = t``) of every version it superseded,
    the versions it opened (``system_to`` = sentinel), and markers for event ids no opened version carries."""
    rows = [StoredRow(key, s[3], s[0], s[1], s[2], t, CLOSED, s[4], s[5]) for s in change.closed]
    rows += [StoredRow(key, s[3], s[0], s[1], s[2], SENTINEL, OPEN, s[4], s[5]) for s in change.opened]
    rows += [marker_row(key, t, EVENT, event_id, digest) for event_id, digest in change.events]
    return rows


def marker_row(
    key: Key | None, system_from: int, kind: str, event_id: str | None = None, digest: str | None = None
) -> StoredRow:
    """A row that is not a version (event, file or control): no valid time, no payload, no system_to."""
    return StoredRow(key, None, None, None, system_from, None, kind, event_id, digest)
