"""Hostile input at scale: over a thousand malformed or hostile records of many kinds interleaved
with good assertion events, through Kafka and the real PyFlink job into Iceberg.

Every good event is applied (the table equals the naive reference model), every bad record is
quarantined exactly once, in the right quarantine table, with its reason (counted per class), and
the job keeps running: a final good batch produced after all the bad records is applied too.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chronolake.iceberg.rows import python_columns
from chronolake.lake import Lake
from chronolake.streaming.broker import LocalKafkaBroker
from chronolake.streaming.runtime import JobRuntime, StreamJobSettings
from chronolake.streaming.transactions import UNROUTED_QUARANTINE
from tests.streaming.support import (
    AssertionStream,
    Producer,
    StreamJob,
    cell_time,
    check_stream_result,
    first_system_times,
    partition_of,
    quarantine_rows,
    rows_of,
    wait_applied,
)

PARTITIONS = 2
KEYS = 60
GOOD = 1_500
FINAL_GOOD = 200
BAD_PER_CLASS = 70
MAX_EVENT_BYTES = 8192
TIMEOUT_S = 300.0
DATASET_Q = "prices__quarantine"
GOOD_LABELS = {"good", "final"}

Bad = tuple[bytes | None, str, str]  # record value (None = a tombstone), quarantine table, reason fragment


def _event(rng: random.Random, **changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "dataset": "prices",
        "k": f"k{rng.randrange(KEYS):05d}",
        "x": rng.randrange(1000),
        "valid_from": cell_time(rng.randrange(8)),
        "event_id": f"bad-{rng.randrange(10**9)}",
    }
    for name, value in changes.items():
        if value is ...:
            event.pop(name, None)
        else:
            event[name] = value
    return event


def _json(event: Any) -> bytes:
    return json.dumps(event).encode()


def bad_classes(sent: list[dict[str, Any]]) -> dict[str, Callable[[random.Random], Bad]]:
    """Each class makes one bad record (value, expected table, expected reason fragment) per call."""

    def broken_json(rng: random.Random) -> Bad:
        text = json.dumps(_event(rng))
        return text[: rng.randrange(1, len(text) - 1)].encode(), UNROUTED_QUARANTINE, "not a JSON object"

    def not_an_object(rng: random.Random) -> Bad:
        value = rng.choice([b"[1, 2, 3]", b'"a string"', b"42", b"true", b"null", b"", b"  "])
        return value, UNROUTED_QUARANTINE, "not a JSON object"

    def tombstone(rng: random.Random) -> Bad:
        return None, UNROUTED_QUARANTINE, "not a JSON object"

    def deeply_nested(rng: random.Random) -> Bad:
        # Deeper than Python's recursion limit: the parser gives up, the job must not.
        depth = rng.randrange(1_500, 4_000)
        return b'{"dataset": "prices", "x": ' + b"[" * depth + b"]" * depth + b"}", UNROUTED_QUARANTINE, "not a JSON object"

    def nested_value(rng: random.Random) -> Bad:
        value: Any = 1
        for _ in range(rng.randrange(50, 300)):
            value = [value]
        return _json(_event(rng, x=value)), DATASET_Q, "x: expected an integer"

    def wrong_type(rng: random.Random) -> Bad:
        x = rng.choice(["abc", True, 1.5, {"a": 1}, "1e3"])
        return _json(_event(rng, x=x)), DATASET_Q, "x: expected an integer"

    def out_of_range(rng: random.Random) -> Bad:
        return _json(_event(rng, x=rng.choice([10**30, -(10**25)]))), DATASET_Q, "x: expected a 64-bit integer"

    def wrong_key_type(rng: random.Random) -> Bad:
        return _json(_event(rng, k=rng.choice([123, 4.5, ["k1"], {"k": 1}, False]))), DATASET_Q, "k: expected a string"

    def huge(rng: random.Random) -> Bad:
        note = "y" * rng.randrange(MAX_EVENT_BYTES, 4 * MAX_EVENT_BYTES)
        return _json(_event(rng, note=note)), DATASET_Q, f"exceeds {MAX_EVENT_BYTES}"

    def huge_unnamed(rng: random.Random) -> Bad:
        # The dataset is named only after the payload: too far in to be routed without decoding.
        event = {"note": "z" * rng.randrange(MAX_EVENT_BYTES, 2 * MAX_EVENT_BYTES), **_event(rng)}
        return _json(event), UNROUTED_QUARANTINE, f"exceeds {MAX_EVENT_BYTES}"

    def bad_timestamp(rng: random.Random) -> Bad:
        value = rng.choice(["2024-13-45", "yesterday", "99999-01-01", 12345, [2024], "2024-01-01T25:00:00"])
        return _json(_event(rng, valid_from=value)), DATASET_Q, "valid_from: unparsable timestamp"

    def empty_range(rng: random.Random) -> Bad:
        start = rng.randrange(1, 8)
        end = rng.choice([start, start - 1])
        return _json(_event(rng, valid_from=cell_time(start), valid_to=cell_time(end))), DATASET_Q, "is not after valid_from"

    def missing_key(rng: random.Random) -> Bad:
        return _json(_event(rng, k=rng.choice([..., None, "", "   "]))), DATASET_Q, "missing key column k"

    def missing_valid_from(rng: random.Random) -> Bad:
        return _json(_event(rng, valid_from=rng.choice([..., None, ""]))), DATASET_Q, "missing valid_from"

    def unknown_op(rng: random.Random) -> Bad:
        op = rng.choice(["merge", "DROP TABLE", 1, ["upsert"], {"op": "delete"}])
        return _json(_event(rng, op=op)), DATASET_Q, "unknown op"

    def bad_event_id(rng: random.Random) -> Bad:
        return _json(_event(rng, event_id=rng.choice([[1], 1.5, {"id": 1}, True]))), DATASET_Q, "event_id must be a string"

    def unknown_dataset(rng: random.Random) -> Bad:
        dataset = rng.choice(["nope", "prices__quarantine", "stream-unrouted__quarantine", "", None, 7, ["prices"], ...])
        return _json(_event(rng, dataset=dataset)), UNROUTED_QUARANTINE, "unknown dataset"

    def lone_surrogate(rng: random.Random) -> Bad:
        # `\ud800` is valid JSON but no valid string: it can never become a Java string.
        return _json(_event(rng, k="k\ud800")), UNROUTED_QUARANTINE, "invalid unicode escape"

    def invalid_utf8(rng: random.Random) -> Bad:
        # Bytes that are not UTF-8 inside the key: replacing them would silently create another key.
        junk = rng.choice([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
        event = _json(_event(rng, k="KEY"))
        return event.replace(b"KEY", b"k" + junk), UNROUTED_QUARANTINE, "not valid UTF-8"

    def conflicting_id(rng: random.Random) -> Bad:
        original = rng.choice(sent)
        x = original["x"]
        return _json(dict(original, x=(x or 0) + 1)), DATASET_Q, "already used with different content"

    return {name: make for name, make in locals().items() if callable(make) and not name.startswith("_")}


Label = tuple[str, bytes | None, str, str]  # class, value, quarantine table, reason fragment


def produce(
    producer: Producer, stream: AssertionStream, rng: random.Random, good: int, bad_per_class: int, label: str = "good"
) -> None:
    """`good` events (labelled `label`) and `bad_per_class` records of every class, shuffled, bad
    ones on random partitions; each record's label is kept in `producer.sent`."""
    classes = bad_classes(stream.sent)
    plan = ["good"] * good + [name for name in classes for _ in range(bad_per_class)]
    rng.shuffle(plan)
    if bad_per_class:
        # A conflicting reuse of an event id needs an earlier event to conflict with.
        plan.insert(0, plan.pop(plan.index("good")))
    for kind in plan:
        if kind == "good":
            event = stream.event()
            producer.send(partition_of(event["k"], PARTITIONS), event["k"], json.dumps(event).encode(), label)
        else:
            value, table, reason = classes[kind](rng)
            # A conflicting reuse goes where its key lives, after the event it conflicts with.
            partition = partition_of(json.loads(value or b"")["k"], PARTITIONS) if kind == "conflicting_id" else rng.randrange(PARTITIONS)
            producer.send(partition, "bad", value, (kind, value, table, reason))
    producer.flush()


@pytest.mark.integration
def test_hostile_records_are_quarantined_with_their_reason_and_good_ones_applied(
    kafka_broker: LocalKafkaBroker, job_runtime: JobRuntime, tmp_path: Path
) -> None:
    topic = "hostile"
    kafka_broker.create_topic(topic, partitions=PARTITIONS)
    home = tmp_path / "home"
    lake = Lake(home)
    prices = lake.create_dataset("prices", key=["k"], columns={"x": "long"}, buckets=1)
    rng = random.Random(20261121)
    stream = AssertionStream(seed=7, keys=KEYS, null_rate=0.05)
    producer = Producer(kafka_broker.bootstrap_servers, topic)
    settings = StreamJobSettings(
        home=home,
        datasets=["prices"],
        work_dir=tmp_path / "job",
        bootstrap_servers=kafka_broker.bootstrap_servers,
        topic=topic,
        max_event_bytes=MAX_EVENT_BYTES,
        stable_interval_ms=500,
        idle_partition_ms=2000,
        # Hostile input must never fail the job; nothing else should either.
        restart_attempts=0,
    )
    job = StreamJob(settings, tmp_path / "job.log", job_runtime)
    bad_total = BAD_PER_CLASS * len(bad_classes([]))

    def quarantined() -> int:
        return sum(t.num_rows for t in quarantine_rows(lake, [DATASET_Q, UNROUTED_QUARANTINE]).values())

    try:
        produce(producer, stream, rng, GOOD, BAD_PER_CLASS)
        job.start()
        wait_applied(job, kafka_broker.bootstrap_servers, topic, PARTITIONS, prices, TIMEOUT_S, quarantined, bad_total)
        # After all the hostile input the job still runs and applies what comes next.
        produce(producer, stream, rng, FINAL_GOOD, 0, label="final")
        records = wait_applied(job, kafka_broker.bootstrap_servers, topic, PARTITIONS, prices, TIMEOUT_S, quarantined, bad_total)
        assert job.running(), "the job stopped"
    finally:
        job.kill()
        producer.close()

    labels = producer.sent
    assert set(labels) == {(r.partition, r.offset) for r in records}

    # Every good event applied as the reference model has it, every bad record quarantined once.
    bad = {where: label for where, label in labels.items() if label not in GOOD_LABELS}
    assert len(bad) >= 1_000
    checked = check_stream_result(lake, prices, topic, records, {w: label[2] for w, label in bad.items()}, stream.keys, rng)
    assert checked.good + checked.quarantined == len(records)

    # Each with its reason and its text as received (bad bytes shown as U+FFFD), counted per class.
    found: dict[tuple[int, int], tuple[str, str]] = {}
    for rows in quarantine_rows(lake, [DATASET_Q, UNROUTED_QUARANTINE]).values():
        for source, line, reason, raw in zip(*python_columns(rows, ["source", "line", "reason", "raw"])):
            partition, offset = (int(n) for n in source.removeprefix(f"kafka:{topic}/").split("@"))
            assert line == offset
            found[(partition, offset)] = (reason, raw)
    per_class: Counter[str] = Counter()
    for where, (kind, value, _, fragment) in bad.items():
        reason, raw = found[where]
        assert fragment in reason, (kind, (value or b"")[:200], reason)
        assert raw == (value or b"").decode("utf-8", "replace")[:4096], (kind, "raw text altered")
        per_class[kind] += 1
    assert per_class == {kind: BAD_PER_CLASS for kind in bad_classes([])}

    # The batch produced after all the hostile input was applied.
    final = {where for where, label in labels.items() if label == "final"}
    applied = first_system_times(rows_of(prices))
    values = {(r.partition, r.offset): json.loads(r.value or b"") for r in records if (r.partition, r.offset) in final}
    assert len(final) == FINAL_GOOD and all((e["k"], e["event_id"]) in applied for e in values.values())
