"""The job's pure core without Flink: system time, routing and quarantine reasons, rows, stable time."""

from __future__ import annotations

import json
import marshal

from chronolake.iceberg.algebra import KeyState
from chronolake.iceberg.dataset import Column, DatasetSpec
from chronolake.iceberg.temporal import SENTINEL
from chronolake.streaming.transactions import (
    UNROUTED_QUARANTINE,
    EntityTimeline,
    EventRouter,
    Routed,
    SinkRow,
    record_text,
    sql_timestamp,
    stable_system_time,
    system_time,
)

SPEC = DatasetSpec("prices", key=(Column("k", "string"),), columns=(Column("x", "long"),))


def event(**fields: object) -> str:
    return json.dumps({"dataset": "prices", "k": "a", "x": 1, "valid_from": "2024-01-01", **fields})


def test_system_time_follows_the_log_but_always_moves_forward() -> None:
    assert system_time(1_000, None) == 1_000_000
    assert system_time(1_000, 1_000_000) == 1_000_001
    assert system_time(999, 1_000_005) == 1_000_006
    assert system_time(2_000, 1_000_005) == 2_000_000


def test_bad_records_are_routed_to_a_quarantine_with_a_reason() -> None:
    router = EventRouter({"prices": SPEC}, max_event_bytes=200)
    cases = {
        "{not json": (UNROUTED_QUARANTINE, "not a JSON object"),
        "[1, 2]": (UNROUTED_QUARANTINE, "not a JSON object"),
        "null": (UNROUTED_QUARANTINE, "not a JSON object"),
        event(dataset="nope"): (UNROUTED_QUARANTINE, "unknown dataset 'nope'"),
        event(x="abc"): ("prices__quarantine", "x: expected an integer"),
        event(valid_to="2024-01-01"): ("prices__quarantine", "is not after valid_from"),
        event(op="merge"): ("prices__quarantine", "unknown op"),
        event(valid_too="2024-02-01"): ("prices__quarantine", "unknown field(s) valid_too"),
        event(note="y" * 300): ("prices__quarantine", "exceeds 200"),
        event(k="\\ud800"): (UNROUTED_QUARANTINE, "invalid unicode escape"),
    }
    for raw, (table, reason) in cases.items():
        raw = raw.replace("\\\\ud800", "\\ud800")
        routed = router.route(raw, "kafka:t/0@7", 7, 5)
        assert isinstance(routed, SinkRow), raw
        assert routed.target == table
        source, sha, line, text, kept, at = routed.values
        assert (source, sha, line, at) == ("kafka:t/0@7", None, "7", 5)
        assert text is not None and reason in text, (raw, text)
    good = router.route(event(), "kafka:t/0@8", 8, 6)
    assert isinstance(good, Routed) and good.key == ("a",)
    # What crosses to the timeline operator: texts as the sink writes them, the typed digest.
    decimal = EventRouter({"p": DatasetSpec("p", key=(Column("k", "long"),), columns=(Column("x", "decimal(18,6)"),))})
    routed = decimal.route(json.dumps({"dataset": "p", "k": 7, "x": "1.5", "valid_from": "2024-01-01", "event_id": "e"}), "s", 1, 9)
    assert isinstance(routed, Routed)
    assert routed.event[2] == ("7",) and routed.event[6] == ("1.500000",)
    assert routed.event[8] == routed.assertion.digest()


def test_record_values_are_decoded_strictly() -> None:
    assert record_text(None) == ("", None)
    assert record_text('{"k": "é"}'.encode()) == ('{"k": "é"}', None)
    # Not UTF-8: never decoded with replacements (that would silently make another key).
    text, problem = record_text(b'{"k": "k\xff1"}')
    assert text == '{"k": "k\ufffd1"}'
    assert problem is not None and problem.startswith("not valid UTF-8") and "at byte 8" in problem


ROUTER = EventRouter({"prices": SPEC})
NEVER = 10**18  # an event-id TTL longer than any test


def apply(timeline: EntityTimeline, state: KeyState, seen: dict[str, int], raw: str, t: int, line: int = 0, ttl: int = NEVER) -> list[SinkRow]:
    routed = ROUTER.route(raw, "s", line, t)
    assert isinstance(routed, Routed), routed
    return timeline.apply(state, seen, routed.event, ttl)


def test_one_record_writes_its_net_effect_as_twin_rows() -> None:
    timeline = EntityTimeline(SPEC)
    state, seen = KeyState(), {}
    first = apply(timeline, state, seen, event(event_id="e1"), 10)
    assert [(r.values[0], r.values[1], r.values[5], r.values[6]) for r in first] == [("a", "1", SENTINEL, "open")]
    second = apply(timeline, state, seen, event(x=2, valid_to="2024-01-02", event_id="e2"), 20, 1)
    kinds = sorted((r.values[6], r.values[1], r.values[4], r.values[5]) for r in second)
    assert kinds == [("closed", "1", 10, 20), ("open", "1", 20, SENTINEL), ("open", "2", 20, SENTINEL)]
    assert apply(timeline, state, seen, event(x=2, valid_to="2024-01-02", event_id="e2"), 30, 2) == []
    conflict = apply(timeline, state, seen, event(x=3, event_id="e2"), 40, 3)
    assert [r.target for r in conflict] == ["prices__quarantine"]
    deleted = apply(timeline, state, seen, event(op="delete", event_id="e3"), 50, 4)
    assert sorted(r.values[6] for r in deleted) == ["closed", "closed", "event"]
    assert list(seen) == ["e1", "e2", "e3"] and seen["e3"] == 50


def test_stable_time_is_the_slowest_partition_unless_it_is_idle() -> None:
    marks = {0: 100, 1: 300}
    assert stable_system_time({0: 100}, {0: 0}, 0, 2, 1_000) is None
    assert stable_system_time(marks, {0: 900, 1: 900}, 1_000, 2, 1_000) == 100
    assert stable_system_time(marks, {0: 0, 1: 900}, 1_000, 2, 1_000) == 300
    assert stable_system_time(marks, {0: 0, 1: 0}, 1_000, 2, 1_000) == 300


def test_published_file_rows_name_their_file_and_line_and_the_ledger_event_writes_the_ledger_row() -> None:
    router = EventRouter({"prices": SPEC})
    origin = {"@origin": {"file": "prices.csv", "line": 12}}
    bad = router.route(event(x="abc", **origin), "kafka:t/0@7", 7, 5)
    assert isinstance(bad, SinkRow) and bad.target == "prices__quarantine"
    assert bad.values[:4] == ("prices.csv", None, "12", "x: expected an integer, got 'abc'")
    rejected = router.route(
        event(**origin, **{"@rejected": "malformed CSV row: expected 4 fields, found 2", "@raw": "a,1"}), "s", 8, 6
    )
    assert isinstance(rejected, SinkRow)
    assert rejected.values[2:5] == ("12", "malformed CSV row: expected 4 fields, found 2", "a,1")
    sha = "ab" * 32
    ledger = router.route(json.dumps({"dataset": "prices", "@ledger": {"sha256": sha}}), "s", 9, 7)
    assert isinstance(ledger, SinkRow) and ledger.target == "prices"
    assert ledger.values[4] == 7 and ledger.values[6:8] == ("file", f"sha256:{sha}")
    broken = router.route(json.dumps({"dataset": "prices", "@ledger": {"sha256": "nope"}}), "s", 9, 7)
    assert isinstance(broken, SinkRow) and broken.target == "prices__quarantine"
    # A refusal after routing (a reused event id with other content) names the file and line too.
    timeline = EntityTimeline(SPEC)
    state, seen = KeyState(), {}
    assert apply(timeline, state, seen, event(event_id="e1", **origin), 10)
    conflict = apply(timeline, state, seen, event(x=2, event_id="e1", **origin), 20, 1)
    assert [(r.target, r.values[0], r.values[2]) for r in conflict] == [("prices__quarantine", "prices.csv", "12")]


def test_the_state_codec_round_trips_text_states_and_turns_typed_ones_into_text() -> None:
    from datetime import date
    from decimal import Decimal

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from chronolake.iceberg.algebra import Segment
    from chronolake.streaming.transactions import StateCodec, Texts

    spec = DatasetSpec(
        "mixed",
        key=(Column("k", "string"),),
        columns=(
            Column("d", "decimal(18,6)"), Column("day", "date"), Column("n", "long"), Column("x", "double"),
            Column("s", "string"), Column("b", "boolean"), Column("ts", "timestamp"),
        ),
    )
    codec = StateCodec(spec)
    texts = Texts(spec)
    payloads = st.tuples(
        st.none() | st.decimals(allow_nan=False, allow_infinity=False, places=6, min_value=-10**9, max_value=10**9),
        st.none() | st.dates(),
        st.none() | st.integers(-2**63, 2**63 - 1),
        st.none() | st.floats(allow_nan=False),
        st.none() | st.text(),
        st.none() | st.booleans(),
        st.none() | st.integers(0, 253_402_214_400_000_000 - 1),  # timestamps up to 9999-12-31
    )
    segments = st.lists(
        st.builds(
            Segment, st.integers(0, 2**62), st.integers(0, 2**62), st.integers(0, 2**62), payloads,
            st.none() | st.text(), st.none() | st.text(),
        ),
        max_size=8,
        unique_by=lambda segment: segment.valid_from,  # a timeline: no two segments start together
    ).map(sorted)

    @settings(max_examples=300, deadline=None)
    @given(segments, st.dictionaries(st.text(), st.text(), max_size=5))
    def round_trip(typed_segments: list[Segment], events: dict[str, str]) -> None:
        typed = KeyState(typed_segments, events)
        state = texts.state(typed)  # as the job holds it: payloads as their sink text
        assert all(v is None or type(v) is str for s in state.segments for v in s[3])
        seen = {event_id: n for n, event_id in enumerate(events)}
        back, back_seen = codec.decode(codec.encode(state, seen))
        assert (back, back_seen) == (state, seen)
        assert all(type(s) is tuple for s in back.segments)  # plain tuples, as the algebra makes them
        assert codec.decode(codec.encode_typed(typed)) == (state, {})
        # A state of the earlier one-entry format (a checkpoint of an earlier version) restores, and
        # its next write replaces it with a head that reads back the same.
        entity = "mixed\x00('k',)"
        restored, restored_seen, written = codec.read(entity, codec.dump(state, seen), {}.get)
        assert (restored, restored_seen) == (state, seen)
        store = dict(codec.write(entity, restored, restored_seen, written)[0])
        assert codec.read(entity, store[entity], store.get)[:2] == (state, seen)

    round_trip()
    typed = KeyState([Segment(1, 2, 3, (Decimal("1.5"), date(2024, 1, 1), 1, 1.0, "a", True, 5))], {"e": "d"})
    assert codec.decode(codec.encode_typed(typed))[0].segments[0][3] == (
        "1.5", "2024-01-01", "1", "1.0", "a", "true", sql_timestamp(5)
    )


def test_event_ids_are_forgotten_a_ttl_of_system_time_after_they_were_applied() -> None:
    timeline = EntityTimeline(SPEC)
    state, seen = KeyState(), {}
    hour = 3_600_000_000
    day = 24 * hour
    for n, t in enumerate([1 * hour, 2 * hour, 30 * hour]):
        assert apply(timeline, state, seen, event(x=n, valid_from=f"2024-01-0{n + 1}", event_id=f"e{n}"), t, n, day)
        if t == 2 * hour:
            # Within the TTL a redelivery is ignored.
            assert apply(timeline, state, seen, event(x=0, valid_from="2024-01-01", event_id="e0"), t + 1, 9, day) == []
    # At 30 h, e0 (1 h) and e1 (2 h) are older than 24 h: forgotten; e2 is remembered.
    assert set(state.events) == set(seen) == {"e2"}
    assert seen["e2"] == 30 * hour
    redelivered = apply(timeline, state, seen, event(x=0, valid_from="2024-01-01", event_id="e0"), 31 * hour, 10, day)
    assert redelivered, "a redelivery after the TTL is applied again (the documented horizon)"
    # Ids a state brought without times (read from the table) count from the first transaction that finds them.
    fresh = KeyState(list(state.segments), {"old": "digest"})
    fresh_seen: dict[str, int] = {}
    apply(timeline, fresh, fresh_seen, event(x=5, valid_from="2024-02-01", event_id="e9"), 40 * hour, 11, day)
    assert fresh_seen == {"old": 40 * hour, "e9": 40 * hour}


def test_bundles_go_through_the_clock_and_the_timeline_stages_as_single_records_would() -> None:
    from chronolake.streaming.transactions import ClockStage, StateCodec, TimelineStage, Written, bundle_records, key_bucket

    raws = [event(x=n, valid_from=f"2024-01-0{1 + n % 3}", k="ab"[n % 2], event_id=f"e{n}") for n in range(6)]
    raws.insert(3, "{broken")
    payloads = [raw.encode() for raw in raws]
    positions = ",".join(str(10 + n) for n in range(len(raws)))
    log_times = ",".join("1000" for _ in raws)  # one millisecond: t moves on by 1 us per record
    lengths = ",".join(str(len(p)) for p in payloads)
    records = list(bundle_records(positions, log_times, lengths, b"".join(payloads)))
    assert records[3] == ("13", 1000, b"{broken")

    last, by_bucket, rows = ClockStage({"prices": SPEC}, "kafka:t", 1 << 20, 4).run(0, 999_999, iter(records))
    assert last == 1_000_006
    assert [(r.target, r.values[3], r.values[5]) for r in rows] == [(UNROUTED_QUARANTINE, "not a JSON object", 1_000_003)]
    entities = {event[1]: bucket for bucket, events in by_bucket.items() for event in events}
    assert entities == {f"prices\x00('{k}',)": key_bucket(f"prices\x00('{k}',)", 4) for k in "ab"}

    stage = TimelineStage({"prices": SPEC}, NEVER, cache_keys=0)
    loads: list[str] = []

    def load(ev: tuple) -> tuple[KeyState, dict[str, int], Written]:
        loads.append(ev[1])
        return KeyState(), {}, Written()

    out = [row for bucket, events in by_bucket.items() for row in stage.run(bucket, events, load)]
    # The same rows as applying the records one by one.
    expected, states = [], {}
    for n, raw in enumerate(raws):
        if raw != "{broken":
            state, seen = states.setdefault(raw[raw.index('"k"'):][6], (KeyState(), {}))
            expected += apply(EntityTimeline(SPEC), state, seen, raw, 1_000_000 + n, 10 + n)
    assert sorted(out) == sorted(expected)
    assert sorted(loads) == sorted(entities)  # each key loaded once, then kept while unwritten
    store: dict[str, bytes] = {}
    for bucket in by_bucket:
        flushed = stage.flush(bucket)
        store.update(flushed.puts)
        assert flushed.removes == [] and set(flushed.entities) <= set(entities)
    assert set(store) == set(entities) and stage.cache == {}  # written, then dropped (cache_keys=0)
    codec = StateCodec(SPEC)
    read = {e: codec.read(e, store[e], store.get) for e in entities}
    assert {e: found[0] for e, found in read.items() if found} == {f"prices\x00('{k}',)": states[k][0] for k in "ab"}


def test_key_states_are_written_in_chunks_and_read_back_whole_after_any_history(monkeypatch) -> None:
    """`StateCodec.write` rewrites only what changed (the head and the chunks that filled up or lost
    ids); whatever the history of versions, forgotten ids, checkpoints and restores, RocksDB (here a
    dict) holds after each checkpoint exactly the state the events make, and no entry the state does
    not use; a job restored from it goes on as the first would have. Small chunks, so that short
    histories span several."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    import copy

    from chronolake.streaming import transactions
    from chronolake.streaming.transactions import StateCodec, TimelineStage, Written

    monkeypatch.setattr(transactions, "CHUNK", 3)
    codec = StateCodec(SPEC)
    entity = "prices\x00('a',)"
    hour = 3_600_000_000
    event_step = st.tuples(
        st.just("event"), st.integers(1, 28), st.sampled_from(["upsert", "upsert", "upsert", "delete"]),
        st.integers(0, 60), st.integers(0, 9), st.booleans(), st.integers(1, 4),
    )
    # An event from another writer's clock: at or before the key's latest version (refused unless a
    # delete has removed the versions after it since).
    late_step = st.tuples(
        st.just("late"), st.integers(1, 28), st.sampled_from(["upsert", "delete"]),
        st.integers(0, 60), st.integers(0, 9), st.booleans(), st.integers(0, 3),
    )
    # Mostly events, now and then a checkpoint, sometimes a restore (by a job whose chunk size may
    # differ from the one that wrote the state: an upgrade).
    step = st.one_of(*[event_step] * 5, late_step, st.just(("flush",)), st.tuples(st.just("restart"), st.sampled_from([3, 3, 4])))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(step, min_size=10, max_size=150), st.sampled_from([0, 10]))
    def history(steps: list[tuple], cache_keys: int) -> None:
        monkeypatch.setattr(transactions, "CHUNK", 3)
        # The stage under test writes into `store` (RocksDB); `state` and `seen` are the same events
        # applied one by one in memory, reset to what was checkpointed when the job is restored.
        store: dict[str, bytes] = {}

        def load(_: tuple) -> tuple[KeyState, dict[str, int], Written]:
            if entity not in store:
                return KeyState(), {}, Written()
            found = codec.read(entity, store[entity], store.get)
            assert found is not None, "a chunk the head names is missing"
            return found

        stage = TimelineStage({"prices": SPEC}, 12 * hour, cache_keys)
        timeline, state, seen = EntityTimeline(SPEC), KeyState(), {}
        checkpointed = copy.deepcopy((state, seen))
        t = 0
        for current in [*steps, ("flush",), ("restart", 3), ("flush",)]:
            if current[0] in ("event", "late"):
                _, day, op, event_id, x, closed, hours = current
                if current[0] == "event":
                    t += hours * hour  # ids are forgotten 12 h after they were applied
                fields = {"x": x, "valid_from": f"2024-01-{day:02d}", "op": op, "event_id": f"e{event_id}"}
                if closed:
                    fields["valid_to"] = f"2024-01-{day + 1:02d}"
                routed = ROUTER.route(event(**fields), "s", 0, t if current[0] == "event" else max(0, t - hours * hour))
                assert isinstance(routed, Routed)
                assert stage.run(0, [routed.event], load) == timeline.apply(state, seen, routed.event, 12 * hour)
            elif current[0] == "flush":
                flushed = stage.flush(0)
                assert not set(flushed.puts) & set(flushed.removes)
                for name in flushed.removes:
                    store.pop(name, None)  # a chunk put and removed again since the last flush was never stored
                store.update(flushed.puts)
                if store:
                    found = codec.read(entity, store[entity], store.get)
                    assert found is not None
                    assert (found[0], found[1]) == (state, seen) and list(found[1]) == list(seen)
                    assert set(store) == reachable(store, entity), "no entry the state does not use"
                checkpointed = copy.deepcopy((state, seen))
            else:  # a restore from the last checkpoint: a new stage that reads what was written
                monkeypatch.setattr(transactions, "CHUNK", current[1])
                stage = TimelineStage({"prices": SPEC}, 12 * hour, cache_keys)
                state, seen = copy.deepcopy(checkpointed)

    history()


def reachable(store: dict[str, bytes], entity: str) -> set[str]:
    """The entries a key's state in `store` uses: its head, the chunks of segments the head's chain
    names (from the last one back), and the chunks of ids its ordinals span."""
    layout, size, last, _, first, end, _, _ = marshal.loads(store[entity])
    assert layout == 4
    names = {entity} | {f"{entity}\x1fe{n}" for n in range(first // size, end // size)}
    while last is not None:
        names.add(f"{entity}\x1fv{last}")
        last = marshal.loads(store[f"{entity}\x1fv{last}"])[1]
    return names


def test_a_change_rewrites_the_chunks_around_it_however_long_the_timeline() -> None:
    """A key with years of daily versions: a new version after the last rewrites the head (and the
    chunk of the version it closes, when that one is stored apart); a correction or a delete of an
    old day rewrites the chunk it changed and at most the next one's link, not the chunks after it. What RocksDB (here a dict) then holds reads back
    as the state the events made, and holds no entry the state does not use."""
    from datetime import date, timedelta

    from chronolake.streaming.transactions import StateCodec, TimelineStage, Written

    codec = StateCodec(SPEC)
    entity = "prices\x00('a',)"
    hour = 3_600_000_000
    stage = TimelineStage({"prices": SPEC}, 24 * hour, 10)
    timeline, state, seen = EntityTimeline(SPEC), KeyState(), {}
    store: dict[str, bytes] = {}

    def load(_: tuple) -> tuple[KeyState, dict[str, int], Written]:
        return KeyState(), {}, Written()

    def day(n: int) -> str:
        return (date(2020, 1, 1) + timedelta(days=n)).isoformat()

    def step(t: int, **fields: object) -> tuple[dict[str, bytes], list[str]]:
        routed = ROUTER.route(event(**fields), "s", 0, t)
        assert isinstance(routed, Routed)
        assert stage.run(0, [routed.event], load) == timeline.apply(state, seen, routed.event, 24 * hour)
        flushed = stage.flush(0)
        for name in flushed.removes:
            store.pop(name, None)
        store.update(flushed.puts)
        found = codec.read(entity, store[entity], store.get)
        assert found is not None and found[:2] == (state, seen)
        assert set(store) == reachable(store, entity)
        return flushed.puts, flushed.removes

    days = 1500
    for n in range(days):
        step((n + 1) * hour, x=n, valid_from=day(n), event_id=f"e{n}")
    assert len(state.segments) == days and len(store) > days // 8  # stored in many chunks
    t = (days + 1) * hour
    for n in range(60):  # corrections anywhere in the timeline: of a day, of half a day, deletes
        old = (n * 7919) % (days - 1)
        kind = n % 3
        fields = {"valid_from": day(old) if kind != 1 else f"{day(old)}T12:00:00Z", "valid_to": day(old + 1)}
        if kind == 2:
            fields["op"] = "delete"
        puts, removes = step(t, x=-n, event_id=f"c{n}", **fields)
        # At most: the chunk it changed, under a new name, split in two, and the next one's link.
        chunks = [name for name in [*puts, *removes] if "\x1fv" in name]
        assert len(chunks) <= 4, (old, sorted(puts), removes)
        t += hour
    puts, removes = step(t, x=0, valid_from=day(days), event_id="last")
    assert len(puts) <= 3 and not removes


def test_a_state_stored_by_position_restores_and_is_rewritten_by_content() -> None:
    """Checkpoints of the previous version hold a key's segments in chunks by position (a head of
    layout 3: its count of chunks of `size`, `entity + "\\x1fs" + n`). Such a state reads back whole;
    the key's next change stores it in this layout and removes the old entries."""
    from chronolake.streaming.transactions import StateCodec

    codec = StateCodec(SPEC)
    entity = "prices\x00('a',)"
    hour = 3_600_000_000
    timeline, state, seen = EntityTimeline(SPEC), KeyState(), {}
    for n in range(1, 23):
        apply(timeline, state, seen, event(x=n, valid_from=f"2024-01-{n:02d}", event_id=f"e{n}"), n * hour)
    size, full = 8, len(state.segments) // 8
    store = {f"{entity}\x1fs{n}": marshal.dumps(state.segments[n * size:(n + 1) * size], 4) for n in range(full)}
    ids = list(seen)  # ordinals 0 .. len(seen): chunks of `size` ids apart, the rest in the head
    for n in range(len(ids) // size):
        chunk = ids[n * size:(n + 1) * size]
        store[f"{entity}\x1fe{n}"] = marshal.dumps(({i: state.events[i] for i in chunk}, {i: seen[i] for i in chunk}), 4)
    rest = ids[len(ids) // size * size:]
    store[entity] = marshal.dumps(
        (3, size, full, state.segments[full * size:], 0, len(ids), {i: state.events[i] for i in rest}, {i: seen[i] for i in rest}), 4
    )

    found = codec.read(entity, store[entity], store.get)
    assert found is not None and found[:2] == (state, seen)
    restored, restored_seen, written = found
    apply(timeline, state, seen, event(x=0, valid_from="2024-01-23", event_id="e23"), 23 * hour)
    apply(timeline, restored, restored_seen, event(x=0, valid_from="2024-01-23", event_id="e23"), 23 * hour)
    puts, removes = codec.write(entity, restored, restored_seen, written)
    for name in removes:
        store.pop(name)
    store.update(puts)
    assert not any("\x1fs" in name for name in store), "the positional chunks are gone"
    assert len(store) > 3 and any("\x1fv" in name for name in store)
    assert set(store) == reachable(store, entity)
    found = codec.read(entity, store[entity], store.get)
    assert found is not None and found[:2] == (state, seen)
