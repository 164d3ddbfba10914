"""A deliberately naive bitemporal model, independent of chronolake's algebra, for property tests.

Valid time is a small grid of unit cells ``0..H``: cell ``i < H`` is ``[i, i+1)`` and cell ``H`` is
``[H, infinity)``. The model keeps, after every transaction, a full copy of all cells, each holding the
segment that covers it as ``(segment id, payload, system_from)``. Segment extents are recovered by
scanning for contiguous cells with the same id. No intervals, no bisecting, no closing rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

INFINITE = "infinity"


@dataclass(frozen=True)
class RefAssertion:
    key: str
    op: str  # "upsert" | "delete"
    valid_from: int
    valid_to: int | str | None  # None = not given, "infinity", or a grid point
    payload: Any
    event_id: str | None = None


Cell = tuple[int, Any, int] | None


@dataclass
class ReferenceModel:
    horizon: int
    # per key: list of (system time, cells after the transaction at that time)
    snapshots: dict[str, list[tuple[int, list[Cell]]]] = field(default_factory=dict)
    events: dict[str, dict[str, RefAssertion]] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    def _cells(self, key: str) -> list[Cell]:
        history = self.snapshots.get(key)
        return list(history[-1][1]) if history else [None] * (self.horizon + 1)

    def apply(self, t: int, assertions: list[RefAssertion]) -> None:
        working: dict[str, list[Cell]] = {}
        for a in assertions:
            seen = self.events.setdefault(a.key, {})
            if a.event_id is not None:
                if a.event_id in seen:
                    continue  # replay (same content) or conflicting reuse: either way, not applied
                seen[a.event_id] = a
            cells = working.setdefault(a.key, self._cells(a.key))
            self._apply_one(cells, a, t)
        for key, cells in working.items():
            self.snapshots.setdefault(key, []).append((t, cells))

    def _apply_one(self, cells: list[Cell], a: RefAssertion, t: int) -> None:
        last = self.horizon  # index of the infinite cell
        lo = min(a.valid_from, last)
        if a.valid_to == INFINITE:
            hi = last + 1
        elif a.valid_to is not None:
            hi = a.valid_to  # finite bounds are <= horizon
        elif a.op == "delete":
            hi = last + 1
        elif cells[lo] is not None:
            hi = lo
            while hi <= last and cells[hi] is not None and cells[hi][0] == cells[lo][0]:
                hi += 1
        else:
            hi = lo
            while hi <= last and cells[hi] is None:
                hi += 1
        touched = {cells[i][0] for i in range(lo, hi) if cells[i] is not None}
        # Leftovers: each contiguous run of a touched segment outside [lo, hi) becomes a new segment at t.
        for run_start, run_end in _runs(cells, touched, lo, hi):
            old = cells[run_start]
            assert old is not None
            new_id = next(self._ids)
            for i in range(run_start, run_end):
                cells[i] = (new_id, old[1], t)
        new_id = next(self._ids)
        for i in range(lo, hi):
            cells[i] = (new_id, a.payload, t) if a.op == "upsert" else None

    def as_of(self, key: str, v: int, t: int) -> tuple[Any, int, int | None, int] | None:
        """(payload, valid_from, valid_to or None for infinity, system_from) true at v as known at t."""
        cells: list[Cell] | None = None
        for st, snapshot in self.snapshots.get(key, []):
            if st <= t:
                cells = snapshot
        if cells is None:
            return None
        index = min(v, self.horizon)
        cell = cells[index]
        if cell is None:
            return None
        start = index
        while start > 0 and cells[start - 1] is not None and cells[start - 1][0] == cell[0]:
            start -= 1
        end = index
        while end <= self.horizon and cells[end] is not None and cells[end][0] == cell[0]:
            end += 1
        return cell[1], start, (None if end > self.horizon else end), cell[2]


def _runs(cells: list[Cell], ids: set[int], lo: int, hi: int) -> list[tuple[int, int]]:
    runs = []
    i = 0
    n = len(cells)
    while i < n:
        if (i < lo or i >= hi) and cells[i] is not None and cells[i][0] in ids:
            j = i
            while j < n and (j < lo or j >= hi) and cells[j] is not None and cells[j][0] == cells[i][0]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs
