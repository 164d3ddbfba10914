"""The assertion algebra against the naive reference model, over thousands of random histories.

Each history is a list of transactions (several assertions per key, out-of-order valid times, bounded,
open-ended and infinite ranges, deletes, replays and conflicting event ids). It is applied by the
algebra, turned into table rows, read back with the Arrow queries, and compared with the reference
at every valid-time cell, at every system time and between them.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronolake.iceberg import queries
from chronolake.iceberg.algebra import Assertion, KeyState, KeyTransaction, apply_transaction, new_key_timeline
from chronolake.iceberg.dataset import CLOSED, OPEN, ROW_KIND, SYSTEM_FROM, SYSTEM_TO, Column, DatasetSpec
from chronolake.iceberg.rows import RowBuilder, python_columns
from chronolake.iceberg.temporal import SENTINEL
from tests.reference_model import INFINITE, RefAssertion, ReferenceModel

H = 10
KEYS = ["a", "b", "c"]
SPEC = DatasetSpec("prop", key=(Column("k", "string"),), columns=(Column("x", "long"),))
EXAMPLES = int(os.environ.get("CHRONOLAKE_PROPERTY_EXAMPLES", "2000"))


@st.composite
def ref_assertions(draw: st.DrawFn) -> RefAssertion:
    valid_from = draw(st.integers(0, H - 1))
    valid_to = draw(st.one_of(st.none(), st.just(INFINITE), st.integers(valid_from + 1, H)))
    return RefAssertion(
        key=draw(st.sampled_from(KEYS)),
        op=draw(st.sampled_from(["upsert", "upsert", "upsert", "delete"])),
        valid_from=valid_from,
        valid_to=valid_to,
        payload=draw(st.integers(0, 3)),
        event_id=draw(st.one_of(st.none(), st.none(), st.sampled_from(["e0", "e1", "e2", "e3"]))),
    )


@st.composite
def histories(draw: st.DrawFn) -> list[list[RefAssertion]]:
    transactions: list[list[RefAssertion]] = []
    sent: list[RefAssertion] = []
    for _ in range(draw(st.integers(1, 6))):
        transaction = []
        for _ in range(draw(st.integers(1, 7))):
            if sent and draw(st.integers(0, 9)) == 0:
                chosen = draw(st.sampled_from(sent))  # a replayed delivery
            else:
                chosen = draw(ref_assertions())
            sent.append(chosen)
            transaction.append(chosen)
        transactions.append(transaction)
    return transactions


def to_assertion(a: RefAssertion) -> Assertion:
    valid_to = SENTINEL if a.valid_to == INFINITE else a.valid_to
    return Assertion((a.key,), a.op, a.valid_from, valid_to, (a.payload,), a.event_id)


def apply_history(history: list[list[RefAssertion]]) -> tuple[pa.Table, list[int]]:
    states: dict[str, KeyState] = defaultdict(KeyState)
    builder = RowBuilder(SPEC)
    times = []
    for number, transaction in enumerate(history, start=1):
        t = 1_000 * number
        times.append(t)
        by_key: dict[str, list[Assertion]] = defaultdict(list)
        for a in transaction:
            by_key[a.key].append(to_assertion(a))
        for key, assertions in by_key.items():
            change = apply_transaction(states[key], assertions, t)
            builder.add_change((key,), change, t)
    return builder.to_arrow(), times


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_as_of_matches_reference_model(history: list[list[RefAssertion]]) -> None:
    model = ReferenceModel(horizon=H)
    for number, transaction in enumerate(history, start=1):
        model.apply(1_000 * number, transaction)
    rows, times = apply_history(history)

    probe_times = sorted({0, *times, *(t - 1 for t in times), *(t + 1 for t in times), times[-1] + 10_000})
    for t in probe_times:
        timeline = queries.current(rows, SPEC, t)
        keys, payloads, vfs, vts, sfs, sts = python_columns(
            timeline, ["k", "x", "valid_from", "valid_to", "system_from", "system_to"]
        )
        assert all(st == SENTINEL for st in sts)
        for key in KEYS:
            mine = [(p, vf, vt, sf) for k, p, vf, vt, sf in zip(keys, payloads, vfs, vts, sfs) if k == key]
            for v in range(H + 3):
                expected = model.as_of(key, v, t)
                got = [(p, vf, None if vt == SENTINEL else vt, sf) for p, vf, vt, sf in mine if vf <= v < vt]
                assert len(got) <= 1, f"overlapping current versions of {key} at v={v}, t={t}: {got}"
                assert (got[0] if got else None) == expected, f"key={key} v={v} t={t}"


@settings(max_examples=EXAMPLES // 4, deadline=None)
@given(histories())
def test_only_net_effect_is_written(history: list[list[RefAssertion]]) -> None:
    rows, _ = apply_history(history)
    versions = rows.filter(pc.is_in(rows[ROW_KIND], pa.array([OPEN, CLOSED])))
    system_from, system_to = python_columns(versions, [SYSTEM_FROM, SYSTEM_TO])
    # A version opened and closed in one transaction would have system_from == system_to.
    assert all(sf < st for sf, st in zip(system_from, system_to))
    identities = python_columns(versions, ["k", "valid_from", SYSTEM_FROM, ROW_KIND])
    seen = list(zip(*identities))
    assert len(seen) == len(set(seen)), "a version was written twice with the same row kind"


def test_as_of_uses_the_point_query_filter() -> None:
    history = [[RefAssertion("a", "upsert", 2, 5, 1)], [RefAssertion("a", "upsert", 3, None, 2)]]
    rows, times = apply_history(history)
    answer = queries.as_of(rows, SPEC, valid_at=3, known_at=times[-1])
    assert python_columns(answer, ["x", "valid_from", "valid_to"]) == [[2], [3], [5]]
    before = queries.as_of(rows, SPEC, valid_at=3, known_at=times[0])
    assert python_columns(before, ["x", "valid_from", "valid_to", "system_to"]) == [[1], [2], [5], [SENTINEL]]


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(ref_assertions(), min_size=1, max_size=12))
def test_new_key_timeline_opens_what_the_transaction_opens(transaction: list[RefAssertion]) -> None:
    # The batch loader's path for keys without stored versions and without event ids.
    assertions = [to_assertion(a)._replace(key=("k",), payload=(position,), event_id=None) for position, a in enumerate(transaction)]
    change = apply_transaction(KeyState(), assertions, 1_000)
    froms, tos, positions = new_key_timeline(
        [a.op == "delete" for a in assertions], [a.valid_from for a in assertions], [a.valid_to for a in assertions], 0, len(assertions)
    )
    assert list(zip(froms, tos, positions)) == [(s[0], s[1], s[3][0]) for s in change.opened]
    assert change.closed == [] and change.events == []
    # The same with the leading upserts without valid_to in ascending valid time taken as known.
    ascending = 0
    while ascending < len(assertions) and assertions[ascending].op == "upsert" and assertions[ascending].valid_to is None and (
        ascending == 0 or assertions[ascending].valid_from > assertions[ascending - 1].valid_from
    ):
        ascending += 1
    shortcut = new_key_timeline(
        [a.op == "delete" for a in assertions], [a.valid_from for a in assertions], [a.valid_to for a in assertions], 0,
        len(assertions), ascending,
    )
    assert shortcut == (froms, tos, positions)


@settings(max_examples=EXAMPLES // 4, deadline=None)
@given(histories())
def test_a_transaction_names_where_the_timeline_it_changed_starts_and_stops_differing(history: list[list[RefAssertion]]) -> None:
    # The stream job rewrites only the stored chunks of a key's state between `changed_from` and the
    # `unchanged_tail`, without comparing the rest.
    states: dict[str, KeyState] = defaultdict(KeyState)
    for number, transaction in enumerate(history, start=1):
        by_key: dict[str, list[Assertion]] = defaultdict(list)
        for a in transaction:
            by_key[a.key].append(to_assertion(a))
        for key, assertions in by_key.items():
            before = list(states[key].segments)
            applied = KeyTransaction(states[key], 1_000 * number)
            for assertion in assertions:
                applied.apply(assertion)
            after = states[key].segments
            same = 0
            while same < min(len(before), len(after)) and before[same] is after[same]:
                same += 1
            tail = 0
            while tail < min(len(before), len(after)) and before[-1 - tail] is after[-1 - tail]:
                tail += 1
            assert applied.changed_from <= same, "a segment before changed_from was replaced"
            assert applied.unchanged_tail <= tail, "a segment of the unchanged tail was replaced"
            if all(a.op == "upsert" for a in assertions):
                # Exactly where they start to differ (a delete over a gap changes nothing at its position).
                assert applied.changed_from == same
                assert applied.unchanged_tail == tail
