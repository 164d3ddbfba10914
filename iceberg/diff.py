"""What a report would show differently between two system times, per key and valid range.

Pure Python. Two versions with equal payloads are not a difference: a report shows values, not versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

ADDED = "added"
REMOVED = "removed"
CHANGED = "changed"

Piece = tuple[int, int, tuple[Any, ...]]  # valid_from, valid_to, payload


class Difference(NamedTuple):
    valid_from: int
    valid_to: int
    change: str
    before: tuple[Any, ...] | None
    after: tuple[Any, ...] | None


def diff_timelines(before: Sequence[Piece], after: Sequence[Piece]) -> list[Difference]:
    """Compare one key's two timelines (each sorted, non-overlapping); adjacent equal differences merge."""
    bounds = sorted({b for vf, vt, _ in (*before, *after) for b in (vf, vt)})
    result: list[Difference] = []
    i = j = 0
    for start, end in zip(bounds, bounds[1:]):
        while i < len(before) and before[i][1] <= start:
            i += 1
        while j < len(after) and after[j][1] <= start:
            j += 1
        old = before[i][2] if i < len(before) and before[i][0] <= start else None
        new = after[j][2] if j < len(after) and after[j][0] <= start else None
        if old == new:
            continue
        change = ADDED if old is None else REMOVED if new is None else CHANGED
        if result and result[-1].valid_to == start and result[-1][2:] == (change, old, new):
            result[-1] = result[-1]._replace(valid_to=end)
        else:
            result.append(Difference(start, end, change, old, new))
    return result
