"""The Kinesis source path: the `kinesis-local` emulator, the boto3 publisher, and the bitemporal job
reading a Kinesis stream through the Flink Kinesis connector (4.3.0-1.19 on Flink 1.20).

The job test publishes the seeded random assertion stream of `test_bitemporal_job` (out-of-order
valid times, corrections, deletes, replays, conflicting event-id reuse, eight classes of bad events)
to a two-shard stream, in two waves, and checks what a user can observe: every system time the job
assigned is the one its shard's approximate arrival timestamps give (`t = max(arrival, previous t +
1 us)` in shard order), `as_of` answers equal the reference model at every assigned time, and every
bad event is in quarantine with its reason and its Kinesis coordinates.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chronolake.iceberg.rows import python_columns
from chronolake.iceberg.temporal import micros_from_datetime
from chronolake.lake import Lake
from chronolake.streaming.kinesis import (
    KinesisEmulatorSettings,
    LocalKinesis,
    _batches,
    partition_key,
    publish_kinesis,
)
from chronolake.streaming.runtime import (
    JobRuntime,
    StreamJobSettings,
    StreamSourceError,
    kinesis_source,
    launch_stream_job,
)
from chronolake.streaming.sources import shard_number
from chronolake.streaming.transactions import system_time
from tests.streaming.test_bitemporal_job import (
    BAD_CLASSES,
    BAD_PER_CLASS,
    GOOD_EVENTS,
    MAX_EVENT_BYTES,
    UNROUTED,
    Stream,
    cell_time,
    check_against_reference,
    first_system_times,
    quarantines,
    rows_of,
    stop,
    wait_until,
)

# Every test here talks to the emulator, a real local process.
pytestmark = pytest.mark.integration

SHARDS = 2
READ_TIMEOUT_S = 60.0

#: One published record as read back: (shard number, sequence number) -> (label, value, arrival ms).
Records = dict[tuple[int, int], tuple[str, str, int]]


@pytest.fixture(scope="module")
def kinesis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKinesis]:
    settings = KinesisEmulatorSettings(data_dir=tmp_path_factory.mktemp("kinesis"))
    if not (settings.package_dir / "main.js").is_file():
        pytest.skip("Kinesis emulator not installed (scripts/setup needs npm)")
    with LocalKinesis(settings) as emulator:
        yield emulator


class Publisher:
    """Publishes (partition key, value, label) with `publish_kinesis`, remembering the labels in order."""

    def __init__(self, kinesis: LocalKinesis, stream: str) -> None:
        self.kinesis = kinesis
        self.stream = stream
        self.sent: list[tuple[str, str, str]] = []

    def send(self, items: list[tuple[str, str, str]]) -> None:
        records = [(key, value.encode()) for key, value, _ in items]
        assert publish_kinesis(self.kinesis.endpoint, self.stream, records, region=self.kinesis.region) == len(items)
        self.sent += items

    def read_back(self) -> Records:
        """What the stream holds, per shard in order, each record labelled: identical values share a
        partition key (replays) or a label (identical bad events), and a key's order is kept, so the
        n-th read copy of a value in a shard is its n-th published copy there."""
        client = self.kinesis.client()
        labels: dict[tuple[str, str], list[str]] = {}
        for key, value, label in self.sent:
            labels.setdefault((key, value), []).append(label)
        records: Records = {}
        deadline = time.monotonic() + READ_TIMEOUT_S
        for shard in kinesis_source(self.stream, self.kinesis.region, self.kinesis.endpoint):
            iterator = client.get_shard_iterator(
                StreamName=self.stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            while time.monotonic() < deadline:
                page = client.get_records(ShardIterator=iterator, Limit=1000)
                for record in page["Records"]:
                    value = record["Data"].decode()
                    label = labels[(record["PartitionKey"], value)].pop(0)
                    arrival = record["ApproximateArrivalTimestamp"]
                    records[(shard_number(shard), int(record["SequenceNumber"]))] = (
                        label, value, micros_from_datetime(arrival) // 1000
                    )
                iterator = page["NextShardIterator"]
                if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
                    break
        assert len(records) == len(self.sent), "the stream does not hold every published record"
        return records


def partition_key_for(shard: int, ranges: list[tuple[int, int]]) -> str:
    """A partition key whose MD5 hash falls into the shard's hash key range."""
    low, high = ranges[shard]
    for n in range(10_000):
        key = f"end-{shard}-{n}"
        if low <= int(hashlib.md5(key.encode()).hexdigest(), 16) <= high:
            return key
    raise AssertionError(f"no partition key found for shard {shard}")


def wave(stream: Stream, good: int, bad_per_class: int) -> list[tuple[str, str, str]]:
    """(partition key, value, label) of one wave, keyed by entity like `test_bitemporal_job`."""
    plan = ["good"] * good + [kind for kind in BAD_CLASSES for _ in range(bad_per_class)]
    stream.rng.shuffle(plan)
    items: list[tuple[str, str, str]] = []
    for item in plan:
        if item == "good" or (item == "conflicting_id" and not stream.sent):
            label, event = stream.good()
            items.append((event["k"], json.dumps(event), label))
        if item != "good":
            key, value = stream.bad(item)
            items.append((key, value, item))
    return items


def test_publisher_keeps_each_keys_order_and_the_service_stamps_arrival(kinesis: LocalKinesis) -> None:
    kinesis.create_stream("ordering", SHARDS)
    published = [(f"key-{i % 7}", f"{i}".encode()) for i in range(400)]
    before_ms = int(time.time() * 1000)
    assert publish_kinesis(kinesis.endpoint, "ordering", published, region=kinesis.region, max_batch=50) == 400

    publisher = Publisher(kinesis, "ordering")
    publisher.sent = [(key, data.decode(), key) for key, data in published]
    records = publisher.read_back()
    shards_of_key: dict[str, set[int]] = {}
    per_key: dict[str, list[int]] = {}
    arrivals: dict[int, list[int]] = {}
    for (shard, _), (key, value, arrival_ms) in sorted(records.items()):
        shards_of_key.setdefault(key, set()).add(shard)
        per_key.setdefault(key, []).append(int(value))
        arrivals.setdefault(shard, []).append(arrival_ms)
    assert all(len(shards) == 1 for shards in shards_of_key.values())
    assert per_key == {key: sorted(values) for key, values in per_key.items()}
    assert len(arrivals) == SHARDS
    for times in arrivals.values():
        assert times == sorted(times) and times[0] >= before_ms - 1000
    # A request never holds one key twice, so a retried failure cannot overtake the key's next record.
    for batch in _batches(published, 50):
        assert len({key for key, _ in batch}) == len(batch) and len(batch) <= 50


def test_a_long_entity_key_goes_by_its_hash_to_one_shard(kinesis: LocalKinesis) -> None:
    kinesis.create_stream("long-keys", SHARDS)
    long_key = "prices\x00" + "k" * 300
    assert publish_kinesis(kinesis.endpoint, "long-keys", [(long_key, b"1"), (long_key, b"2")], region=kinesis.region) == 2
    publisher = Publisher(kinesis, "long-keys")
    publisher.sent = [(partition_key(long_key), value, value) for value in ("1", "2")]
    records = publisher.read_back()
    assert [label for _, (label, _, _) in sorted(records.items())] == ["1", "2"]
    assert len({shard for shard, _ in records}) == 1
    with pytest.raises(ValueError, match="cannot be empty"):
        publish_kinesis(kinesis.endpoint, "long-keys", [("", b"x")], region=kinesis.region)


def test_a_missing_stream_is_refused(kinesis: LocalKinesis) -> None:
    with pytest.raises(StreamSourceError, match="does not exist"):
        kinesis_source("no-such-stream", kinesis.region, kinesis.endpoint)


def test_kinesis_stream_matches_reference_model_and_quarantines_bad_events(
    kinesis: LocalKinesis, job_runtime: JobRuntime, tmp_path: Path
) -> None:
    name = "assertions"
    kinesis.create_stream(name, SHARDS)
    shards = kinesis.client().list_shards(StreamName=name)["Shards"]
    ranges = [
        (int(s["HashKeyRange"]["StartingHashKey"]), int(s["HashKeyRange"]["EndingHashKey"]))
        for s in sorted(shards, key=lambda s: shard_number(s["ShardId"]))
    ]
    home = tmp_path / "home"
    lake = Lake(home)
    prices = lake.create_dataset("prices", key=["k"], columns={"x": "long"}, buckets=1)
    log = tmp_path / "job.log"

    stream = Stream(seed=20240601)
    publisher = Publisher(kinesis, name)
    job: subprocess.Popen[bytes] | None = None
    try:
        publisher.send(wave(stream, GOOD_EVENTS // 2, BAD_PER_CLASS // 2))
        settings = StreamJobSettings(
            home=home,
            datasets=["prices"],
            work_dir=tmp_path / "job",
            source="kinesis",
            stream=name,
            region=kinesis.region,
            endpoint=kinesis.endpoint,
            max_event_bytes=MAX_EVENT_BYTES,
            stable_interval_ms=500,
            idle_partition_ms=2000,
            # SQLITE_BUSY between the table committers restarts the job from its latest checkpoint
            # (see test_bitemporal_job); the connector resumes from the checkpointed sequence numbers.
            restart_attempts=20,
        )
        job = launch_stream_job(settings, log, job_runtime)
        wait_until(lambda: rows_of(prices).num_rows > 0, job, log, "the first commit")

        publisher.send(wave(stream, GOOD_EVENTS - GOOD_EVENTS // 2, BAD_PER_CLASS - BAD_PER_CLASS // 2))
        # The last record of each shard: once its version and a stable time covering it are
        # committed, everything before it in the shard is too.
        ends = []
        for shard in range(SHARDS):
            end = {"dataset": "prices", "k": f"end-{shard}", "x": 0, "valid_from": cell_time(0), "event_id": f"end-{shard}"}
            ends.append((partition_key_for(shard, ranges), json.dumps(end), "end"))
        publisher.send(ends)

        def all_committed() -> bool:
            times = first_system_times(rows_of(prices))
            end_times = [times[f"end-{s}"] for s in range(SHARDS) if f"end-{s}" in times]
            stable = prices.stable_system_time()
            return len(end_times) == SHARDS and stable is not None and stable >= max(end_times)

        wait_until(all_committed, job, log, "every record committed under the stable system time")
        expected_quarantined = sum(1 for _, _, label in publisher.sent if label in BAD_CLASSES)

        def quarantine_complete() -> bool:
            committed: int = sum(q.refresh().scan().to_arrow().num_rows for q in quarantines(lake))
            return committed >= expected_quarantined

        wait_until(quarantine_complete, job, log, "every bad event quarantined")
        assert job.poll() is None, "the job stopped although it is unbounded"
    finally:
        if job is not None:
            stop(job)

    records = publisher.read_back()
    expected_t = assigned_system_times(records)
    check_system_times(prices, records, expected_t)
    check_kinesis_quarantine(lake, name, records, expected_t)
    check_against_reference(prices, {c: (label, value) for c, (label, value, _) in records.items()})


def assigned_system_times(records: Records) -> dict[tuple[int, int], int]:
    """The partition clock recomputed from the stream: per shard, in sequence order,
    t = max(approximate arrival, previous t + 1 us)."""
    times: dict[tuple[int, int], int] = {}
    previous: dict[int, int] = {}
    for (shard, sequence), (_, _, arrival_ms) in sorted(records.items()):
        t = system_time(arrival_ms, previous.get(shard))
        times[(shard, sequence)] = previous[shard] = t
    return times


def check_system_times(prices: Any, records: Records, expected_t: dict[tuple[int, int], int]) -> None:
    """Every applied event's system time is its record's, from the shard's arrival timestamps."""
    applied = first_system_times(rows_of(prices))
    for coordinates, (label, value, _) in records.items():
        if label in {"fresh", "end"}:
            assert applied[json.loads(value)["event_id"]] == expected_t[coordinates], coordinates


def check_kinesis_quarantine(
    lake: Lake, stream: str, records: Records, expected_t: dict[tuple[int, int], int]
) -> None:
    prices_q, unrouted_q = (q.scan().to_arrow() for q in quarantines(lake))
    found: dict[tuple[int, int], tuple[str, str]] = {}
    columns = ["source", "line", "reason", "system_time"]
    for table, name in ((prices_q, "prices"), (unrouted_q, "unrouted")):
        for source, line, reason, system_from in zip(*python_columns(table, columns)):
            shard_id, sequence = source.removeprefix(f"kinesis:{stream}/").split("@")
            coordinates = (shard_number(shard_id), int(sequence))
            # A sequence number (up to 56 digits) does not fit the long `line` column.
            assert line is None
            assert system_from == expected_t[coordinates], source
            assert coordinates not in found, f"{source} quarantined twice"
            found[coordinates] = (name, reason)
    bad = {c: label for c, (label, _, _) in records.items() if label in BAD_CLASSES}
    assert set(found) == set(bad)
    for coordinates, label in bad.items():
        table_name, reason = found[coordinates]
        assert BAD_CLASSES[label] in reason, (label, reason)
        assert table_name == ("unrouted" if label in UNROUTED else "prices"), (label, table_name)
    assert Counter(bad.values()) == {kind: BAD_PER_CLASS for kind in BAD_CLASSES}



def test_produce_publishes_a_file_to_kinesis_with_a_ledger_event_behind_it_in_every_shard(
    kinesis: LocalKinesis, cli: Any, tmp_path: Path
) -> None:
    """`chronolake produce --kinesis-stream`: every row once, keyed by entity, malformed rows as
    rejections, and the file's ledger event last in each shard (so it lands after the file's rows)."""
    stream = "produce-feed"
    kinesis.create_stream(stream, SHARDS)
    assert cli("dataset", "create", "prices", "--key", "k", "--column", "x:long").returncode == 0
    source = tmp_path / "prices.csv"
    source.write_text("k,x,valid_from\n" + "".join(f"k{i % 7},{i},2024-01-{1 + i % 28:02d}\n" for i in range(40)) + "bad,1\n")
    produced = cli(
        "produce", "prices", str(source), "--kinesis-stream", stream, "--endpoint", kinesis.endpoint,
        "--region", kinesis.region, "--wait", "0", "--json",
    )
    assert produced.returncode == 0, produced.stderr
    [file] = json.loads(produced.stdout)["files"]
    assert (file["status"], file["rows"]) == ("published", 41)

    client = kinesis.client()
    per_shard: dict[str, list[dict[str, Any]]] = {}
    for shard in kinesis_source(stream, kinesis.region, kinesis.endpoint):
        iterator = client.get_shard_iterator(StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + READ_TIMEOUT_S
        while time.monotonic() < deadline:
            page = client.get_records(ShardIterator=iterator, Limit=1000)
            events += [json.loads(r["Data"]) for r in page["Records"]]
            iterator = page["NextShardIterator"]
            if not page["Records"]:
                break
        per_shard[shard] = events
    assert len(per_shard) == SHARDS
    rows = [e for events in per_shard.values() for e in events if "@ledger" not in e]
    assert sorted(e["@origin"]["line"] for e in rows) == list(range(2, 43))
    assert [e["@rejected"] for e in rows if "@rejected" in e] == ["malformed CSV row: expected 3 fields, found 2"]
    for events in per_shard.values():
        assert events[-1]["@ledger"]["sha256"] == file["sha256"]
        assert sum("@ledger" in e for e in events) == 1
    # One key, one shard.
    shards_of = {}
    for shard, events in per_shard.items():
        for e in events:
            if "k" in e:
                shards_of.setdefault(e["k"], set()).add(shard)
    assert all(len(s) == 1 for s in shards_of.values())
