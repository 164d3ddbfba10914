"""The assertion algebra: applying assertions to one key's current timeline (DESIGN.md section 1).

Pure Python, stdlib only, so the Flink job and the batch tools run the same rules. Times are UTC
microseconds (see :mod:`chronolake.iceberg.temporal`); intervals are half-open ``[from, to)``.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple

from chronolake.iceberg.temporal import SENTINEL

UPSERT = "upsert"
DELETE = "delete"
OPS = (UPSERT, DELETE)

Key = tuple[Any, ...]
Payload = tuple[Any, ...]


class Assertion(NamedTuple):
    """One claim about a key over a valid-time range.

    ``valid_to`` is ``None`` when not given (the range is then derived, rule 1) and
    :data:`SENTINEL` when given as ``infinity``.
    """

    key: Key
    op: str
    valid_from: int
    valid_to: int | None
    payload: Payload
    event_id: str | None = None

    def digest(self) -> str:
        """Content fingerprint, to tell a replayed event from a conflicting reuse of its id."""
        content = repr((self.op, self.valid_from, self.valid_to, self.payload))
        return hashlib.blake2b(content.encode(), digest_size=12).hexdigest()


class Segment(NamedTuple):
    """One current stored version of a key. Its identity is ``(key, valid_from, system_from)``.

    The algebra reads segments by position and makes plain tuples of these fields (a state may hold
    either): plain tuples of plain values cost less to make, `marshal` writes them as they are (the
    stream job's state), and the cyclic garbage collector stops tracking them."""

    valid_from: int
    valid_to: int
    system_from: int
    payload: Payload
    event_id: str | None = None
    event_digest: str | None = None


@dataclass
class KeyState:
    """What the algebra needs to know about a key: its current segments and the event ids it has seen."""

    segments: list[Segment] = field(default_factory=list)
    events: dict[str, str] = field(default_factory=dict)


@dataclass
class KeyChange:
    """The net effect of one transaction on one key: what to write."""

    opened: list[Segment]
    closed: list[Segment]
    #: Applied event ids that no opened segment carries (deletes, versions superseded in the same
    #: transaction); they are written as markers so dedup state can be rebuilt from the table.
    events: list[tuple[str, str]]
    applied: int
    duplicates: int
    #: ``(position in the input, reason)`` of assertions refused by the algebra.
    rejected: list[tuple[int, str]]


_VALID_TO = itemgetter(1)


class KeyTransaction:
    """One transaction on one key at system time ``t``: assertions are applied one at a time, in input
    order, and :meth:`finish` gives the net effect. ``t`` must be later than every ``system_from`` in
    ``state``, which is mutated in place.
    """

    __slots__ = (
        "state", "t", "_closed", "_applied_events", "applied", "duplicates", "_was_empty", "_opened", "changed_from",
        "unchanged_tail",
    )

    def __init__(self, state: KeyState, t: int) -> None:
        self.state = state
        self.t = t
        self._was_empty = not state.segments
        self._closed: list[Segment] = []
        self._applied_events: list[tuple[str, str]] = []
        self.applied = 0
        self.duplicates = 0
        self._opened: list[Segment] = []  # what the first assertion opened (see `finish`)
        #: Every segment of ``state.segments`` before this position is the one it held before the
        #: transaction (the same object): a caller that stored the key's segments rewrites the rest.
        self.changed_from = len(state.segments)
        #: So many segments at the end of ``state.segments`` are the last ones it held before the
        #: transaction (the same objects, in the same order).
        self.unchanged_tail = len(state.segments)

    def apply(self, assertion: Assertion, digest: str | None = None) -> str | None:
        """Apply one assertion; returns the reason when the algebra refuses it (then nothing changed).

        ``digest``: the assertion's :meth:`~Assertion.digest`, when the caller took it already (the
        stream job takes it from the typed payload, then carries the payload as text)."""
        if assertion.event_id is not None:
            if digest is None:
                digest = assertion.digest()
            seen = self.state.events.get(assertion.event_id)
            if seen is not None:
                if seen == digest:
                    self.duplicates += 1
                    return None
                return f"event_id {assertion.event_id!r} was already used with different content"
            self.state.events[assertion.event_id] = digest
            self._applied_events.append((assertion.event_id, digest))
        else:
            digest = None
        segments = self.state.segments
        opened, first = _apply(segments, assertion, digest, self.t, self._closed)
        if first < self.changed_from:
            self.changed_from = first
        after = len(segments) - first - len(opened)  # the segments after those it replaced
        if after < self.unchanged_tail:
            self.unchanged_tail = after
        if not self.applied:
            self._opened = opened
        self.applied += 1
        return None

    def finish(self, rejected: list[tuple[int, str]] | None = None) -> KeyChange:
        t = self.t
        segments = self.state.segments
        if self.applied == 1:
            # No segment had system time t before (see the class), so the one assertion applied
            # opened exactly these, in valid-time order; found without reading the whole timeline.
            opened = self._opened
        elif self._was_empty:
            opened = list(segments)  # a key with no earlier segments has only this transaction's
        else:
            opened = [s for s in segments if s[2] == t]
        carried = {s[4] for s in opened}  # event_id
        markers = [(eid, d) for eid, d in self._applied_events if eid not in carried]
        return KeyChange(opened, self._closed, markers, self.applied, self.duplicates, rejected or [])


def apply_transaction(state: KeyState, assertions: Sequence[Assertion], t: int) -> KeyChange:
    """Apply ``assertions`` (in input order) to ``state`` at system time ``t``; mutates ``state``.

    Versions opened and closed inside the transaction are not part of the result.
    """
    transaction = KeyTransaction(state, t)
    rejected = []
    for position, assertion in enumerate(assertions):
        reason = transaction.apply(assertion)
        if reason is not None:
            rejected.append((position, reason))
    return transaction.finish(rejected)


def new_key_timeline(
    deletes: Sequence[bool],
    valid_from: Sequence[int],
    valid_to: Sequence[int | None],
    start: int,
    stop: int,
    ascending_until: int | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """The net effect of one transaction on a key with no current versions, whose assertions
    (positions ``start`` to ``stop`` of the parallel sequences, in input order) carry no event ids.

    Returns the opened versions as parallel lists ``(valid_from, valid_to, position)`` in valid-time
    order, ``position`` naming the assertion whose payload the version carries. It is what
    :func:`apply_transaction` opens on an empty :class:`KeyState` (nothing is closed: every version
    superseded was opened in this transaction; no event ids, no markers), with the same rules as
    :func:`_apply` on plain integers, so that a batch load carries payloads by reference
    (tests/iceberg/test_algebra_properties.py checks the two agree).

    ``ascending_until``: the caller knows that the assertions before this position are upserts
    without ``valid_to`` in strictly ascending ``valid_from``; each then runs until the next one
    (the last one forever), which is taken without a loop.
    """
    froms: list[int] = []
    tos: list[int] = []
    refs: list[int] = []
    if ascending_until is not None and ascending_until > start:
        froms = list(valid_from[start:ascending_until])
        tos = froms[1:]
        tos.append(SENTINEL)
        refs = list(range(start, ascending_until))
        start = ascending_until
    for position in range(start, stop):
        begin = valid_from[position]
        end = valid_to[position]
        upsert = not deletes[position]
        count = len(froms)
        if upsert and end is None and count and begin > froms[-1]:
            # In valid-time order (the usual feed): the new version cuts the last one or follows it.
            last_end = tos[-1]
            if begin < last_end:
                tos[-1] = begin
            else:
                last_end = SENTINEL
            froms.append(begin)
            tos.append(last_end)
            refs.append(position)
            continue
        first = bisect_right(tos, begin) if count else 0
        if end is None:
            if not upsert or first == count:
                end = SENTINEL
            else:
                end = tos[first] if froms[first] <= begin else froms[first]
        last = first
        while last < count and froms[last] < end:
            last += 1
        new_froms: list[int] = []
        new_tos: list[int] = []
        new_refs: list[int] = []
        if last > first and froms[first] < begin:
            new_froms.append(froms[first])
            new_tos.append(begin)
            new_refs.append(refs[first])
        if upsert:
            new_froms.append(begin)
            new_tos.append(end)
            new_refs.append(position)
        if last > first and tos[last - 1] > end:
            new_froms.append(end)
            new_tos.append(tos[last - 1])
            new_refs.append(refs[last - 1])
        froms[first:last] = new_froms
        tos[first:last] = new_tos
        refs[first:last] = new_refs
    return froms, tos, refs


def _apply(
    segments: list[Segment], assertion: Assertion, digest: str | None, t: int, closed: list[Segment]
) -> tuple[list[Segment], int]:
    """Applies one assertion at ``t`` to ``segments``; appends the segments it closes to ``closed``
    and returns those it opened (in valid-time order), and the position of the first segment it
    replaced (those before it are untouched)."""
    # The hot path of every load: plain tuple indexing and plain tuples instead of NamedTuple
    # attribute access and constructors (each several times slower). Segment fields by index:
    # 0 valid_from, 1 valid_to, 2 system_from, 3 payload, 4 event_id, 5 event_digest.
    valid_from = assertion[2]
    valid_to = assertion[3]
    upsert = assertion[1] == UPSERT
    count = len(segments)
    # Segments are sorted and disjoint, so their valid_to ascend too: find the first ending after valid_from.
    first = bisect_right(segments, valid_from, key=_VALID_TO) if count else 0
    if valid_to is None:
        if not upsert or first == count:
            valid_to = SENTINEL
        else:
            covering_or_next = segments[first]
            valid_to = covering_or_next[1] if covering_or_next[0] <= valid_from else covering_or_next[0]

    replacement: list[Any] = []  # plain tuples of Segment's fields
    last = first
    while last < count and segments[last][0] < valid_to:
        overlapping = segments[last]
        if overlapping[2] != t:
            closed.append(overlapping)
        if overlapping[0] < valid_from:
            replacement.append((overlapping[0], valid_from, t, overlapping[3], overlapping[4], overlapping[5]))
        last += 1
    if upsert:
        replacement.append((valid_from, valid_to, t, assertion[4], assertion[5], digest))
    if last > first:
        tail = segments[last - 1]
        if tail[1] > valid_to:
            replacement.append((valid_to, tail[1], t, tail[3], tail[4], tail[5]))
    segments[first:last] = replacement
    return replacement, first

