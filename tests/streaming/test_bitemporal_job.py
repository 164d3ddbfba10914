"""The bitemporal job end to end: a random assertion stream through Kafka and PyFlink into Iceberg,
read back with `chronolake.lake` and compared with the naive reference model.

The stream has out-of-order valid times, corrections, deletes, bounded, open and infinite ranges,
replayed deliveries and conflicting event-id reuse, three keys per partition, and a few dozen bad
events of each kind interleaved. It is produced in two waves, the second after the job has
committed the first, so the job is shown to keep running through bad input. The system times the
job assigned are read from the table (the first row carrying each event id).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import time
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from kafka import KafkaProducer

from chronolake.iceberg.dataset import CONTROL, EVENT, EVENT_ID, OPEN, ROW_KIND, SYSTEM_FROM
from chronolake.iceberg.rows import python_columns
from chronolake.iceberg.temporal import SENTINEL, micros_from_datetime
from chronolake.lake import Dataset, Lake
from chronolake.streaming.broker import LocalKafkaBroker
from chronolake.streaming.runtime import JobRuntime, StreamJobSettings, launch_stream_job
from chronolake.streaming.transactions import UNROUTED_QUARANTINE
from tests.reference_model import INFINITE, RefAssertion, ReferenceModel

PARTITIONS = 2
KEYS = [f"k{i}" for i in range(6)]  # k_i lives in partition i % 2: three keys per partition
H = 8  # valid-time grid: cell i is BASE + i days, cell H runs forever
BASE = datetime(2024, 1, 1, tzinfo=timezone.utc)
GOOD_EVENTS = 150
BAD_PER_CLASS = 24
MAX_EVENT_BYTES = 4096
# Readiness waits only; nothing asserts on how long anything took.
JOB_TIMEOUT_S = 240.0

BAD_CLASSES: dict[str, str] = {
    # class -> a fragment of the quarantine reason
    "broken_json": "not a JSON object",
    "wrong_type": "x: expected an integer",
    "bad_timestamp": "valid_from: unparsable timestamp",
    "empty_range": "is not after valid_from",
    "unknown_dataset": "unknown dataset",
    "huge": "exceeds 4096",
    "missing_key": "missing key column k",
    "conflicting_id": "already used with different content",
}
UNROUTED = {"broken_json", "unknown_dataset"}


def cell_time(cell: int) -> str:
    return (BASE + timedelta(days=cell)).isoformat()


def cell_of(micros: int) -> int:
    return int((micros - micros_from_datetime(BASE)) // 86_400_000_000)


class Stream:
    """A seeded random assertion stream, with what each produced record was meant to be."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.sent: list[dict[str, Any]] = []
        self.counter = 0

    def good(self) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        if self.sent and rng.random() < 0.1:
            return "replay", dict(rng.choice(self.sent))
        valid_from = rng.randrange(H)
        event: dict[str, Any] = {
            "dataset": "prices",
            "k": rng.choice(KEYS),
            "x": rng.randrange(6),
            "valid_from": cell_time(valid_from),
            "op": rng.choice(["upsert", "upsert", "upsert", "delete"]),
            "event_id": f"e{self.counter}",
        }
        self.counter += 1
        choice = rng.randrange(3)
        if choice == 1:
            event["valid_to"] = "infinity"
        elif choice == 2:
            event["valid_to"] = cell_time(rng.randint(valid_from + 1, H))
        self.sent.append(event)
        return "fresh", event

    def bad(self, kind: str) -> tuple[str, str]:
        """(key to partition by, record value) of one bad event of a class."""
        key = self.rng.choice(KEYS)
        event: dict[str, Any] = {"dataset": "prices", "k": key, "x": 1, "valid_from": cell_time(1)}
        if kind == "broken_json":
            return key, json.dumps(event)[:-7]
        if kind == "wrong_type":
            event["x"] = "abc"
        elif kind == "bad_timestamp":
            event["valid_from"] = "2024-13-45"
        elif kind == "empty_range":
            event["valid_to"] = cell_time(1)
        elif kind == "unknown_dataset":
            event["dataset"] = "nope"
        elif kind == "huge":
            event["note"] = "x" * (2 * MAX_EVENT_BYTES)
        elif kind == "missing_key":
            del event["k"]
        elif kind == "conflicting_id":
            original = self.rng.choice(self.sent)
            event = dict(original, x=original["x"] + 100)
            key = event["k"]
        return key, json.dumps(event)


def partition_of(key: str) -> int:
    return int(key[1:]) % PARTITIONS if key[1:].isdigit() else int(key.rsplit("-", 1)[1])


class Producer:
    def __init__(self, broker: LocalKafkaBroker, topic: str) -> None:
        self.producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
        self.topic = topic
        #: (partition, offset) -> (label, value)
        self.records: dict[tuple[int, int], tuple[str, str]] = {}

    def send(self, key: str, value: str, label: str) -> None:
        partition = partition_of(key)
        metadata = self.producer.send(
            self.topic, key=key.encode(), value=value.encode(), partition=partition
        ).get(timeout=30)
        self.records[(metadata.partition, metadata.offset)] = (label, value)

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()


def produce_wave(producer: Producer, stream: Stream, good: int, bad_per_class: int) -> None:
    plan = ["good"] * good + [kind for kind in BAD_CLASSES for _ in range(bad_per_class)]
    stream.rng.shuffle(plan)
    for item in plan:
        if item == "good":
            label, event = stream.good()
            producer.send(event["k"], json.dumps(event), label)
        elif item == "conflicting_id" and not stream.sent:
            label, event = stream.good()
            producer.send(event["k"], json.dumps(event), label)
            key, value = stream.bad(item)
            producer.send(key, value, item)
        else:
            key, value = stream.bad(item)
            producer.send(key, value, item)


def rows_of(dataset: Dataset) -> pa.Table:
    dataset.table.refresh()
    if dataset.table.table.current_snapshot() is None:
        return pa.table({EVENT_ID: pa.array([], pa.string())})
    return dataset.table.scan()


def wait_until(condition: Any, job: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return
        if job.poll() is not None:
            pytest.fail(f"job exited with {job.returncode} while waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(1.0)
    pytest.fail(f"{what} not seen within {JOB_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


def first_system_times(rows: pa.Table) -> dict[str, int]:
    """Each event id's system time: the earliest row carrying it (later rows are temporal leftovers)."""
    applied = rows.filter(pc.is_in(rows[ROW_KIND], pa.array([OPEN, EVENT])))
    times: dict[str, int] = {}
    for event_id, system_from in zip(*python_columns(applied, [EVENT_ID, SYSTEM_FROM])):
        if event_id is not None:
            times[event_id] = min(system_from, times.get(event_id, system_from))
    return times


def stop(job: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


def to_reference(event: dict[str, Any]) -> RefAssertion:
    valid_to = event.get("valid_to")
    to_cell: int | str | None = (
        None if valid_to is None else INFINITE if valid_to == "infinity" else cell_of(micros_from_datetime(datetime.fromisoformat(valid_to)))
    )
    return RefAssertion(
        key=event["k"],
        op=event["op"],
        valid_from=cell_of(micros_from_datetime(datetime.fromisoformat(event["valid_from"]))),
        valid_to=to_cell,
        payload=event["x"],
        event_id=event["event_id"],
    )


@pytest.mark.integration
def test_stream_matches_reference_model_and_quarantines_bad_events(
    kafka_broker: LocalKafkaBroker, job_runtime: JobRuntime, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    topic = "assertions"
    kafka_broker.create_topic(topic, partitions=PARTITIONS)
    lake = Lake(home)
    prices = lake.create_dataset("prices", key=["k"], columns={"x": "long"}, buckets=1)
    log = tmp_path / "job.log"

    stream = Stream(seed=20240601)
    producer = Producer(kafka_broker, topic)
    job: subprocess.Popen[bytes] | None = None
    try:
        produce_wave(producer, stream, GOOD_EVENTS // 2, BAD_PER_CLASS // 2)
        settings = StreamJobSettings(
            home=home,
            datasets=["prices"],
            bootstrap_servers=kafka_broker.bootstrap_servers,
            topic=topic,
            work_dir=tmp_path / "job",
            max_event_bytes=MAX_EVENT_BYTES,
            stable_interval_ms=500,
            idle_partition_ms=2000,
            # The table committers of one checkpoint race for the SQLite catalog and one may fail
            # with SQLITE_BUSY; the job then restarts from its latest checkpoint and commits again.
            restart_attempts=20,
        )
        job = launch_stream_job(settings, log, job_runtime)
        wait_until(lambda: rows_of(prices).num_rows > 0, job, log, "the first commit")

        produce_wave(producer, stream, GOOD_EVENTS - GOOD_EVENTS // 2, BAD_PER_CLASS - BAD_PER_CLASS // 2)
        # The last record of each partition: once their versions and a stable time covering them
        # are committed, everything before them is too.
        for partition in range(PARTITIONS):
            end: dict[str, Any] = {"dataset": "prices", "k": f"end-{partition}", "x": 0, "valid_from": cell_time(0),
                   "event_id": f"end-{partition}"}
            producer.send(end["k"], json.dumps(end), "end")
        producer.close()

        def all_committed() -> bool:
            times = first_system_times(rows_of(prices))
            ends = [times[f"end-{p}"] for p in range(PARTITIONS) if f"end-{p}" in times]
            stable = prices.stable_system_time()
            return len(ends) == PARTITIONS and stable is not None and stable >= max(ends)

        wait_until(all_committed, job, log, "every record committed under the stable system time")
        expected_quarantined = sum(1 for label, _ in producer.records.values() if label in BAD_CLASSES)

        def quarantine_complete() -> bool:
            committed: int = sum(q.refresh().scan().to_arrow().num_rows for q in quarantines(lake))
            return committed >= expected_quarantined

        wait_until(quarantine_complete, job, log, "every bad event quarantined")
        assert job.poll() is None, "the job stopped although it is unbounded"
    finally:
        producer.producer.close()
        if job is not None:
            stop(job)

    check_quarantine(lake, topic, producer.records)
    check_against_reference(prices, producer.records)


def quarantines(lake: Lake) -> list[Any]:
    namespace = lake.settings.namespace
    return [lake.catalog.load_table((namespace, n)) for n in ("prices__quarantine", UNROUTED_QUARANTINE)]


def check_quarantine(lake: Lake, topic: str, records: dict[tuple[int, int], tuple[str, str]]) -> None:
    prices_q, unrouted_q = (q.scan().to_arrow() for q in quarantines(lake))
    found: dict[tuple[int, int], tuple[str, str]] = {}
    for table, name in ((prices_q, "prices"), (unrouted_q, "unrouted")):
        for source, line, reason, system_time in zip(*python_columns(table, ["source", "line", "reason", "system_time"])):
            partition_offset = source.removeprefix(f"kafka:{topic}/")
            partition, offset = (int(part) for part in partition_offset.split("@"))
            assert offset == line
            assert system_time is not None
            assert (partition, offset) not in found, f"{source} quarantined twice"
            found[(partition, offset)] = (name, reason)
    bad = {coordinates: label for coordinates, (label, _) in records.items() if label in BAD_CLASSES}
    assert set(found) == set(bad)
    for coordinates, label in bad.items():
        table_name, reason = found[coordinates]
        assert BAD_CLASSES[label] in reason, (label, reason)
        assert table_name == ("unrouted" if label in UNROUTED else "prices"), (label, table_name)
    assert Counter(bad.values()) == {kind: BAD_PER_CLASS for kind in BAD_CLASSES}


def check_against_reference(prices: Dataset, records: dict[tuple[int, int], tuple[str, str]]) -> None:
    rows = rows_of(prices)
    times = first_system_times(rows)
    fresh = [json.loads(value) for (label, value) in (records[c] for c in sorted(records)) if label == "fresh"]
    # Every fresh event was applied (it opened a version or left an event marker).
    assert {e["event_id"] for e in fresh} <= set(times)
    model = ReferenceModel(horizon=H)
    for event in sorted(fresh, key=lambda e: times[e["event_id"]]):
        model.apply(times[event["event_id"]], [to_reference(event)])
    # Only net effects and one control row per published stable time.
    controls = rows.filter(pc.equal(rows[ROW_KIND], CONTROL))
    assert controls.num_rows >= 1

    assert_time = sorted(times[e["event_id"]] for e in fresh)
    probe_times = [assert_time[0] - 1, *assert_time]
    for t in probe_times:
        for v in range(H + 2):
            answer = prices.as_of(cell_time(v), known_at=t)
            got = {
                key: (x, cell_of(vf), None if vt == SENTINEL else cell_of(vt), sf)
                for key, x, vf, vt, sf in zip(*python_columns(answer, ["k", "x", "valid_from", "valid_to", "system_from"]))
            }
            assert set(got) <= set(KEYS) | {f"end-{p}" for p in range(PARTITIONS)}
            for key in KEYS:
                assert got.get(key) == model.as_of(key, v, t), f"key={key} v={v} t={t}"


TYPED_COLUMNS = {"d": "decimal(18,6)", "day": "date", "n": "long", "x": "double", "s": "string", "b": "boolean",
                 "ts": "timestamp"}
# key -> (the event's payload as produced, the values the table must hold, in TYPED_COLUMNS order)
TYPED_CASES: dict[str, tuple[dict[str, Any], tuple[Any, ...]]] = {
    "extremes-low": (
        {"d": "-999999999999.999999", "day": "0001-01-01", "n": -(2**63), "x": "-Infinity", "s": "é😀\x00x",
         "b": True, "ts": "1900-01-01T00:00:00.000001Z"},
        (Decimal("-999999999999.999999"), date(1, 1, 1), -(2**63), float("-inf"), "é😀\x00x", True,
         datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc)),
    ),
    "extremes-high": (
        {"d": "999999999999.999999", "day": "9999-12-30", "n": 2**63 - 1, "x": 1e300, "s": "", "b": False,
         "ts": "9999-12-30T23:59:59.999999Z"},
        (Decimal("999999999999.999999"), date(9999, 12, 30), 2**63 - 1, 1e300, "", False,
         datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=timezone.utc)),
    ),
    "ordinary": (
        {"d": 1.5, "day": "2024-02-29", "n": 0, "x": 5e-324, "s": "a,b\"c", "b": True,
         "ts": "2024-02-29T12:30:00+02:00"},
        (Decimal("1.500000"), date(2024, 2, 29), 0, 5e-324, "a,b\"c", True,
         datetime(2024, 2, 29, 10, 30, tzinfo=timezone.utc)),
    ),
    "signed-zero-and-nan": (
        {"d": "-0", "x": "NaN", "ts": "1970-01-01T00:00:00Z"},
        (Decimal("0.000000"), None, None, "nan", None, None, datetime(1970, 1, 1, tzinfo=timezone.utc)),
    ),
    "nulls": ({"x": -0.0}, (None, None, None, -0.0, None, None, None)),
}


@pytest.mark.integration
def test_every_column_type_reaches_the_table_with_its_exact_value(
    kafka_broker: LocalKafkaBroker, job_runtime: JobRuntime, tmp_path: Path
) -> None:
    """The job hands payloads to Java as text and Java parses them as the table's types: every type,
    at its extremes, with nulls, NaN, infinities and signed zeros, reads back as the value sent."""
    home = tmp_path / "home"
    topic = "typed"
    kafka_broker.create_topic(topic, partitions=1)
    lake = Lake(home)
    typed = lake.create_dataset("typed", key=["k"], columns=TYPED_COLUMNS, buckets=1)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers, acks="all")
    for key, (payload, _) in TYPED_CASES.items():
        event = {"dataset": "typed", "k": key, "valid_from": "2024-01-01", "event_id": key, **payload}
        producer.send(topic, key=key.encode(), value=json.dumps(event).encode()).get(timeout=30)
    producer.close()
    log = tmp_path / "job.log"
    settings = StreamJobSettings(
        home=home, datasets=["typed"], bootstrap_servers=kafka_broker.bootstrap_servers, topic=topic,
        work_dir=tmp_path / "job", stable_interval_ms=500, idle_partition_ms=2000, restart_attempts=20,
    )
    job = launch_stream_job(settings, log, job_runtime)
    try:
        wait_until(lambda: len(set(rows_of(typed)[EVENT_ID].to_pylist()) & set(TYPED_CASES)) == len(TYPED_CASES),
                   job, log, "every typed event committed")
    finally:
        stop(job)
    rows = rows_of(typed)
    opened = rows.filter(pc.equal(rows[ROW_KIND], OPEN))
    found = {k: values for k, *values in zip(*(opened[name].to_pylist() for name in ["k", *TYPED_COLUMNS]))}
    assert set(found) == set(TYPED_CASES)
    for key, (_, expected) in TYPED_CASES.items():
        for column, want, got in zip(TYPED_COLUMNS, expected, found[key]):
            if want == "nan":
                assert isinstance(got, float) and math.isnan(got), (key, column, got)
            elif isinstance(want, float):
                assert got == want and math.copysign(1, got) == math.copysign(1, want), (key, column, got)
            else:
                assert got == want and type(got) is type(want), (key, column, got)
    assert not lake.catalog.load_table((lake.settings.namespace, "typed__quarantine")).scan().to_arrow().num_rows
