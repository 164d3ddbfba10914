"""Helpers for the streaming fault and hostile-input tests: a seeded assertion stream on a cell grid,
what the topic really holds (read back, with log times), the job's system times recomputed from the
log, the reference model fed from the topic, the job as a process group, and the checks on the
stored rows (versions equal to the model's, no duplicates).

The valid-time grid: cell ``i`` starts at ``BASE + i days``; the last cell (``H``) runs forever.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from chronolake.iceberg import queries
from chronolake.iceberg.dataset import (
    CLOSED,
    CONTROL,
    EVENT,
    EVENT_ID,
    OPEN,
    QUARANTINE_SUFFIX,
    ROW_KIND,
    SYSTEM_FROM,
    VALID_FROM,
)
from chronolake.iceberg.rows import python_columns
from chronolake.iceberg.temporal import SENTINEL, micros_from_datetime
from chronolake.lake import Dataset
from chronolake.streaming.runtime import JobRuntime, StreamJobSettings, launch_stream_job
from chronolake.streaming.service import latest_checkpoint as newest_checkpoint
from chronolake.streaming.transactions import UNROUTED_QUARANTINE, system_time
from tests.reference_model import INFINITE, RefAssertion, ReferenceModel

H = 8
BASE = datetime(2024, 1, 1, tzinfo=timezone.utc)
BASE_US = micros_from_datetime(BASE)
DAY_US = 86_400_000_000
#: Kafka's code for a record stamped by the broker.
LOG_APPEND_TIME_TYPE = 1


def cell_time(cell: int) -> str:
    return (BASE + timedelta(days=cell)).isoformat()


def cell_of(micros: int) -> int:
    cell, rest = divmod(micros - BASE_US, DAY_US)
    assert rest == 0, f"{micros} is not on the valid-time grid"
    return int(cell)


def key_name(index: int) -> str:
    return f"k{index:05d}"


def partition_of(key: str, partitions: int) -> int:
    """Producers key by entity: one key lives in one partition."""
    return int(key[1:]) % partitions


class AssertionStream:
    """A seeded stream of good assertion events over many keys: out-of-order valid times,
    corrections (later events over the same cells), deletes, open, bounded and infinite ranges,
    and replayed deliveries (the same event again, sometimes long after)."""

    def __init__(
        self, seed: int, keys: int, dataset: str = "prices", replay_rate: float = 0.08, null_rate: float = 0.0
    ) -> None:
        self.rng = random.Random(seed)
        self.keys = [key_name(i) for i in range(keys)]
        self.dataset = dataset
        self.replay_rate = replay_rate
        #: How often the payload is JSON null (a value, not a delete).
        self.null_rate = null_rate
        self.sent: list[dict[str, Any]] = []
        self.counter = 0

    def event(self) -> dict[str, Any]:
        rng = self.rng
        if self.sent and rng.random() < self.replay_rate:
            return dict(rng.choice(self.sent))
        valid_from = rng.randrange(H)
        event: dict[str, Any] = {
            "dataset": self.dataset,
            "k": rng.choice(self.keys),
            "x": None if rng.random() < self.null_rate else rng.randrange(1000),
            "valid_from": cell_time(valid_from),
            "op": rng.choice(("upsert", "upsert", "upsert", "delete")),
            "event_id": f"e{self.counter}",
        }
        self.counter += 1
        shape = rng.randrange(3)
        if shape == 1:
            event["valid_to"] = "infinity"
        elif shape == 2:
            event["valid_to"] = cell_time(rng.randint(valid_from + 1, H))
        self.sent.append(event)
        return event


@dataclass(frozen=True)
class Delivered:
    """One record as the topic holds it."""

    partition: int
    offset: int
    log_time_ms: int
    value: bytes | None


class Producer:
    """Sends to explicit partitions; `flush` waits for every acknowledgement and records where each
    record landed: `sent[(partition, offset)]` = the label it was sent with."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self.topic = topic
        self.producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=5)
        self.pending: list[tuple[Any, Any]] = []
        self.sent: dict[tuple[int, int], Any] = {}

    def send(self, partition: int, key: str, value: bytes | None, label: Any = None) -> None:
        future = self.producer.send(self.topic, key=key.encode(), value=value, partition=partition)
        self.pending.append((future, label))

    def flush(self) -> None:
        self.producer.flush()
        for future, label in self.pending:
            metadata = future.get(timeout=60)
            self.sent[(metadata.partition, metadata.offset)] = label
        self.pending = []

    def close(self) -> None:
        self.producer.close()


def read_topic(bootstrap_servers: str, topic: str, partitions: int) -> list[Delivered]:
    """Every record of the topic, in partition and offset order; checks the broker stamped each one."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    try:
        assigned = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        ends = consumer.end_offsets(assigned)
        records: list[Delivered] = []
        deadline = time.monotonic() + 120
        while any(consumer.position(tp) < ends[tp] for tp in assigned):
            assert time.monotonic() < deadline, "the topic could not be read back"
            for tp, batch in consumer.poll(timeout_ms=1000, max_records=50_000).items():
                for record in batch:
                    assert record.timestamp_type == LOG_APPEND_TIME_TYPE
                    records.append(Delivered(tp.partition, record.offset, record.timestamp, record.value))
    finally:
        consumer.close()
    records.sort(key=lambda r: (r.partition, r.offset))
    return records


def expected_system_times(records: Sequence[Delivered]) -> dict[tuple[int, int], int]:
    """The system time of every record, recomputed from the log: `max(log time, previous + 1 us)` in
    partition order, over every record (bad ones too), exactly as DESIGN.md defines it."""
    times: dict[tuple[int, int], int] = {}
    previous: dict[int, int] = {}
    for record in records:
        t = system_time(record.log_time_ms, previous.get(record.partition))
        previous[record.partition] = t
        times[(record.partition, record.offset)] = t
    return times


def end_offsets(bootstrap_servers: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers)
    try:
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
    finally:
        consumer.close()
    return {tp.partition: offset for tp, offset in ends.items()}


def committed_offsets(bootstrap_servers: str, group_id: str, topic: str) -> dict[int, int]:
    """The offsets the job's Kafka source committed on its completed checkpoints."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=10_000)
        try:
            offsets = admin.list_group_offsets({group_id: None}).get(group_id, {})
        finally:
            admin.close()
    except KafkaError:
        # No coordinator yet (nothing committed so far), or the broker is away.
        return {}
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


def to_reference(event: dict[str, Any]) -> RefAssertion:
    valid_to = event.get("valid_to")
    to_cell: int | str | None = (
        None
        if valid_to is None
        else INFINITE
        if valid_to == "infinity"
        else cell_of(micros_from_datetime(datetime.fromisoformat(valid_to)))
    )
    return RefAssertion(
        key=event["k"],
        op=event.get("op") or "upsert",
        valid_from=cell_of(micros_from_datetime(datetime.fromisoformat(event["valid_from"]))),
        valid_to=to_cell,
        payload=event["x"],
        event_id=event.get("event_id"),
    )


def reference(good: Iterable[tuple[int, dict[str, Any]]]) -> ReferenceModel:
    """The model after every good event, each at its system time (ties are in different keys)."""
    model = ReferenceModel(horizon=H)
    for t, event in sorted(good, key=lambda pair: pair[0]):
        model.apply(t, [to_reference(event)])
    return model


Version = tuple[str, int, int | None, int, int | None, Any]  # key, from cell, to cell (None: forever), sf, st, x


def model_versions(model: ReferenceModel) -> set[Version]:
    """Every version the model ever held, with its system interval (None: still current)."""
    found: dict[tuple[str, int], list[Any]] = {}
    for key, history in model.snapshots.items():
        live: dict[int, tuple[int, int, int, Any]] = {}  # segment id -> (from, to, sf, payload)
        for t, cells in history:
            segments: dict[int, tuple[int, int, int, Any]] = {}
            for index, cell in enumerate(cells):
                if cell is None:
                    continue
                seg_id, payload, sf = cell
                start = segments[seg_id][0] if seg_id in segments else index
                segments[seg_id] = (start, index + 1, sf, payload)
            for seg_id in set(live) - set(segments):
                found[(key, seg_id)][4] = t
            for seg_id, (start, end, sf, payload) in segments.items():
                if seg_id not in live:
                    found[(key, seg_id)] = [key, start, None if end > H else end, sf, None, payload]
            live = segments
    return {tuple(v) for v in found.values()}  # type: ignore[misc]


def stored_versions(rows: pa.Table, dataset: Dataset, known_at: int) -> set[Version]:
    """Every version the table records as of `known_at`, through the history query (`system_to` as of then)."""
    history = queries.versions(rows, dataset.spec, known_at)
    result: set[Version] = set()
    for key, x, vf, vt, sf, st in zip(*python_columns(history, ["k", "x", "valid_from", "valid_to", SYSTEM_FROM, "system_to"])):
        result.add((key, cell_of(vf), None if vt == SENTINEL else cell_of(vt), sf, None if st == SENTINEL else st, x))
    return result


def check_versions(rows: pa.Table, dataset: Dataset, model: ReferenceModel, known_at: int) -> int:
    """The table's versions, each with its valid and system interval, are exactly the model's, so
    every `as_of(v, t)` and `timeline(t)` answer up to `known_at` is the model's. Returns the count."""
    expected = model_versions(model)
    stored = stored_versions(rows, dataset, known_at)
    missing, extra = sorted(expected - stored, key=repr), sorted(stored - expected, key=repr)
    assert not missing and not extra, f"{len(missing)} versions missing, e.g. {missing[:3]}; {len(extra)} extra, e.g. {extra[:3]}"
    return len(stored)


def check_no_duplicates(rows: pa.Table) -> None:
    """Exactly once in the stored rows: one open and at most one closed twin per version, one marker
    per (key, event id), one control row per published stable time."""
    identity = ["k", VALID_FROM, SYSTEM_FROM]
    for kind, at_most in ((OPEN, 1), (CLOSED, 1)):
        of_kind = rows.filter(pc.equal(rows[ROW_KIND], kind))
        counts = of_kind.group_by(identity).aggregate([(ROW_KIND, "count")])
        worst = pc.max(counts[f"{ROW_KIND}_count"]).as_py() if counts.num_rows else 0
        assert worst <= at_most, f"a version has {worst} {kind} rows"
    closed = rows.filter(pc.equal(rows[ROW_KIND], CLOSED)).select(identity)
    opened = rows.filter(pc.equal(rows[ROW_KIND], OPEN)).select(identity)
    orphans = closed.join(opened, keys=identity, join_type="left anti")
    assert orphans.num_rows == 0, "a closed twin without its open version"
    markers = rows.filter(pc.equal(rows[ROW_KIND], EVENT))
    counted = Counter(zip(*python_columns(markers, ["k", EVENT_ID])))
    assert not counted or max(counted.values()) == 1, "an event marker written twice"
    controls = rows.filter(pc.equal(rows[ROW_KIND], CONTROL))[SYSTEM_FROM].to_pylist()
    assert len(controls) == len(set(controls)), "a stable time published twice"


def first_system_times(rows: pa.Table) -> dict[tuple[str, str], int]:
    """(key, event id) -> the system time the event was applied at (the earliest row carrying it)."""
    applied = rows.filter(pc.is_in(rows[ROW_KIND], pa.array([OPEN, EVENT])))
    times: dict[tuple[str, str], int] = {}
    for key, event_id, sf in zip(*python_columns(applied, ["k", EVENT_ID, SYSTEM_FROM])):
        if event_id is not None:
            times[(key, event_id)] = min(sf, times.get((key, event_id), sf))
    return times


def as_of_answer(table: pa.Table) -> dict[str, tuple[Any, int, int | None, int]]:
    return {
        key: (x, cell_of(vf), None if vt == SENTINEL else cell_of(vt), sf)
        for key, x, vf, vt, sf in zip(*python_columns(table, ["k", "x", "valid_from", "valid_to", SYSTEM_FROM]))
    }


def check_queries(dataset: Dataset, model: ReferenceModel, keys: Sequence[str], known_ats: Sequence[int], stable: int) -> int:
    """The public API against the model: `as_of` at every cell at the stable time, and at every cell
    for each of `known_ats`; `timeline` at each of `known_ats`. Returns how many reads were compared."""
    reads = 0
    for t in [stable, *known_ats]:
        for v in range(H + 1):
            got = as_of_answer(dataset.as_of(cell_time(v), known_at=t))
            want = {k: a for k in keys if (a := model.as_of(k, v, t)) is not None}
            assert got == want, f"as_of(v={v}, t={t}): {len(set(got.items()) ^ set(want.items()))} answers differ"
            reads += 1
    for t in known_ats:
        timeline = dataset.timeline(known_at=t)
        got_segments = {
            (key, cell_of(vf), None if vt == SENTINEL else cell_of(vt), sf, x)
            for key, x, vf, vt, sf in zip(*python_columns(timeline, ["k", "x", "valid_from", "valid_to", SYSTEM_FROM]))
        }
        want_segments = {
            (key, vf, vt, sf, x) for key, vf, vt, sf, st, x in model_versions(model) if sf <= t and (st is None or st > t)
        }
        assert got_segments == want_segments, f"timeline(t={t}) differs"
        reads += 1
    return reads


def rows_of(dataset: Dataset) -> pa.Table:
    dataset.table.refresh()
    if dataset.table.table.current_snapshot() is None:
        return pa.table({EVENT_ID: pa.array([], pa.string())})
    return dataset.table.scan()


class StreamJob:
    """The bitemporal job as a process group (script + gateway JVM), killed and restored by the tests."""

    def __init__(self, settings: StreamJobSettings, log: Path, runtime: JobRuntime) -> None:
        self.settings = settings
        self.log = log
        self.runtime = runtime
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, restore_from: Path | None = None) -> None:
        settings = self.settings if restore_from is None else replace(self.settings, restore_from=restore_from)
        self.process = launch_stream_job(settings, self.log, self.runtime)
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL to the whole process group, then reap the script."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def submitted(self) -> list[Path]:
        """The checkpoint folder of every job run that was submitted (one per run, by job id)."""
        return sorted(p for p in (self.settings.work_dir / "checkpoints").glob("*") if p.is_dir())

    def latest_checkpoint(self) -> Path:
        """The newest retained `chk-N` (checkpoint ids continue across restores)."""
        checkpoints = self.settings.work_dir / "checkpoints"
        latest = newest_checkpoint(checkpoints)
        assert latest is not None, f"no retained checkpoint under {checkpoints}"
        return latest

    def wait_until(self, condition: Callable[[], bool], what: str, timeout_s: float, poll_s: float = 1.0) -> None:
        """A readiness poll: fails when the job exits or the (generous) timeout passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            if not self.running():
                code = None if self.process is None else self.process.returncode
                pytest.fail(f"job exited ({code}) while waiting for {what}:\n{self.tail()}")
            time.sleep(poll_s)
        pytest.fail(f"{what} not seen within {timeout_s}s:\n{self.tail()}")

    def tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-4000:]


def decode(record: Delivered) -> Any:
    return json.loads(record.value)


def quarantine_rows(lake: Any, tables: Sequence[str]) -> dict[str, pa.Table]:
    namespace = lake.settings.namespace
    found = {}
    for name in tables:
        table = lake.catalog.load_table((namespace, name))
        found[name] = table.scan().to_arrow() if table.current_snapshot() is not None else None
    return {name: rows for name, rows in found.items() if rows is not None}


def wait_applied(
    job: StreamJob,
    bootstrap_servers: str,
    topic: str,
    partitions: int,
    dataset: Dataset,
    timeout_s: float,
    quarantined: Callable[[], int] | None = None,
    expected_quarantined: int = 0,
) -> list[Delivered]:
    """Waits until the job has consumed the whole topic (its committed offsets are the end offsets),
    the dataset's stable system time covers every record's system time, and `quarantined()` rows
    are committed; returns the records of the topic."""
    ends = end_offsets(bootstrap_servers, topic, partitions)
    group = job.settings.group_id
    job.wait_until(lambda: committed_offsets(bootstrap_servers, group, topic) == ends, "every offset consumed", timeout_s)
    records = read_topic(bootstrap_servers, topic, partitions)
    last_t = max(expected_system_times(records).values())

    def covered() -> bool:
        stable = dataset.stable_system_time()
        return stable is not None and stable >= last_t

    job.wait_until(covered, "a stable system time covering every record", timeout_s, poll_s=2.0)
    if quarantined is not None:
        job.wait_until(lambda: quarantined() >= expected_quarantined, "every bad record quarantined", timeout_s, poll_s=2.0)
    return records


@dataclass
class Checked:
    """What `check_stream_result` compared, for the test's own sanity checks."""

    good: int
    applied_events: int
    versions: int
    reads: int
    quarantined: int


def check_stream_result(
    lake: Any,
    dataset: Dataset,
    topic: str,
    records: Sequence[Delivered],
    bad: dict[tuple[int, int], str],
    keys: Sequence[str],
    sample: random.Random,
) -> Checked:
    """Everything a user can observe after the job consumed `records`, against the reference model:

    - the stored rows hold no duplicate version, closed twin, event marker or control row;
    - the versions, with both intervals, are exactly the model's (fed with every good record at the
      system time recomputed from the log), so every as_of(v, t) and timeline(t) answer is equal;
    - every event id was applied at the system time of its first delivery (replays changed nothing);
    - the public as_of/timeline API agrees with the model at the stable time and two sampled times;
    - every bad record (`bad`: (partition, offset) -> quarantine table) is quarantined exactly once
      there, at its system time, and nothing else is.
    """
    times = expected_system_times(records)
    good = [(times[(r.partition, r.offset)], decode(r)) for r in records if (r.partition, r.offset) not in bad]
    model = reference(good)
    rows = rows_of(dataset)
    check_no_duplicates(rows)
    stable = dataset.stable_system_time()
    assert stable is not None and stable >= max(times.values())
    versions = check_versions(rows, dataset, model, stable)
    first: dict[tuple[str, str], int] = {}
    for t, event in good:
        first[(event["k"], event["event_id"])] = min(t, first.get((event["k"], event["event_id"]), t))
    assert first_system_times(rows) == first, "an event applied at another system time than its first delivery"
    known_ats = sorted(sample.sample(sorted(set(first.values())), 2))
    reads = check_queries(dataset, model, keys, known_ats, stable)

    found: dict[tuple[int, int], str] = {}
    for table, quarantined in quarantine_rows(lake, [dataset.name + QUARANTINE_SUFFIX, UNROUTED_QUARANTINE]).items():
        for source, system_time_ in zip(*python_columns(quarantined, ["source", "system_time"])):
            partition, offset = (int(n) for n in source.removeprefix(f"kafka:{topic}/").split("@"))
            assert (partition, offset) not in found, f"{source} quarantined twice"
            assert system_time_ == times[(partition, offset)]
            found[(partition, offset)] = table
    assert found == bad
    return Checked(len(good), len(first), versions, reads, len(found))
