"""Publishing assertions to the streaming job's topic or Kinesis stream: files (`chronolake load --via-stream`,
`chronolake produce`) as one JSON event per row.

A file goes through the stream the way a batch load would take it, with the same outcome:

- Every row becomes one event `{"dataset": ..., <the row's fields>, "@origin": {"file", "line"}}`.
  The job validates it with the same parser as a batch load and quarantines a bad row with the
  file's name and line (not the Kafka offset). A row the reader cannot even split into fields (a
  malformed CSV row, broken JSON) is published as `{"@rejected": reason, "@raw": text}` and
  quarantined with that reason.
- A row without an `event_id` gets one derived from the file's SHA-256 and its line
  (`<first 16 hex digits>:<line>`), so publishing the same file again, after a crash halfway for
  instance, changes nothing: the job ignores an event id it has already applied with the same
  content.
- Once every row is acknowledged by the brokers, a ledger event (`{"@ledger": {"sha256": ...}}`)
  goes to every partition, behind the file's rows there; the job writes a ledger row for each. The
  file is in the table when all of them are, as of the latest of their system times (so a report
  at that time sees the whole file). A file already in the ledger is not published again.
- A file that cannot be read at all is refused before anything is published: it is read once in
  full (hash, then a dry pass through the reader) before the first event leaves.

Events are keyed by dataset and key, so one key's assertions stay in one partition, in file order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

from chronolake.batch_compat.readers import ColumnMapping, SourceFile, read_records
from chronolake.iceberg.dataset import EVENT_ID, DatasetSpec
from chronolake.iceberg.parsing import AssertionParser, InvalidAssertion
from chronolake.iceberg.rows import python_columns
from chronolake.streaming.transactions import DATASET_FIELD, LEDGER_FIELD, ORIGIN_FIELD, RAW_FIELD, REJECTED_FIELD

#: One Kafka record: (key, value).
Event = tuple[bytes, bytes]


def _json_value(value: Any) -> Any:
    if isinstance(value, date):  # and datetime
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    raise TypeError(f"cannot publish a value of type {type(value).__name__}")


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, default=_json_value, separators=(",", ":")).encode("utf-8")


def event_key(dataset: str, key: object) -> bytes:
    """The Kafka record key: the dataset and the parsed key, so a key's events share a partition."""
    return f"{dataset}\x00{key!r}".encode()


@dataclass(frozen=True)
class PublishedFile:
    path: Path
    sha256: str
    rows: int
    rejected: int  # rows published as rejected (malformed); the job quarantines them
    status: str  # "published" or "already loaded"
    ledger_entries: int = 0  # partitions that got the ledger event: the job writes one ledger row each


class FileEvents:
    """The events of one file for one dataset (see the module docstring)."""

    def __init__(self, spec: DatasetSpec, path: str | Path, mapping: ColumnMapping | None = None) -> None:
        self.spec = spec
        self.source = SourceFile.detect(path)
        self.mapping = mapping or ColumnMapping()
        if self.mapping.system_time is not None:
            raise ValueError("a system-time column cannot go through the stream: the job stamps system time")
        self.parser = AssertionParser(spec)
        self.sha256 = self.source.sha256()
        self.rows = 0
        self.rejected = 0

    def check(self) -> int:
        """Reads the whole file without publishing; raises `UnreadableFile` if it cannot be read.
        Returns the number of rows."""
        count = 0
        for batch in read_records(self.source, self.spec, mapping=self.mapping):
            count += len(batch.lines) + len(batch.records)
        return count

    def _event(self, line: int, record: dict[str, Any]) -> Event:
        record = {k: v for k, v in record.items() if v is not None}
        if record.get(EVENT_ID) in (None, ""):
            record[EVENT_ID] = f"{self.sha256[:16]}:{line}"
        record[DATASET_FIELD] = self.spec.name
        record[ORIGIN_FIELD] = {"file": str(self.source.path), "line": line}
        try:
            key: object = self.parser.parse_key(record)
        except InvalidAssertion:
            key = None  # quarantined by the job whatever partition it lands in
        return event_key(self.spec.name, key), encode(record)

    def __iter__(self) -> Iterator[Event]:
        self.rows = self.rejected = 0
        for batch in read_records(self.source, self.spec, mapping=self.mapping):
            if batch.table is not None:
                for line, record in zip(batch.lines, batch.table.to_pylist()):
                    self.rows += 1
                    yield self._event(line, record)
            for raw in batch.records:
                self.rows += 1
                if raw.record is not None:
                    yield self._event(raw.line, raw.record)
                    continue
                self.rejected += 1
                rejected = {
                    DATASET_FIELD: self.spec.name,
                    REJECTED_FIELD: raw.problem,
                    RAW_FIELD: raw.raw,
                    ORIGIN_FIELD: {"file": str(self.source.path), "line": raw.line},
                }
                yield event_key(self.spec.name, None), encode(rejected)

    def ledger_event(self) -> bytes:
        """Sent to every partition after the file's rows are all acknowledged (`KafkaPublisher.broadcast`)."""
        return encode(
            {DATASET_FIELD: self.spec.name, LEDGER_FIELD: {"sha256": self.sha256, "file": str(self.source.path), "rows": self.rows}}
        )


class KafkaPublisher:
    """Publishes events to one topic; `acks=all` and the idempotent producer, flushed before returning."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap_servers,
            acks="all",
            linger_ms=20,
            batch_size=256 * 1024,
            compression_type="gzip",
        )

    def publish(self, events: Iterable[Event], on_event: Callable[[int], None] | None = None) -> int:
        count = 0
        futures = []
        for key, value in events:
            futures.append(self.producer.send(self.topic, key=key, value=value))
            count += 1
            if on_event is not None:
                on_event(count)
            if len(futures) >= 10_000:
                self._settle(futures)
        self._settle(futures)
        return count

    def broadcast(self, value: bytes) -> int:
        """Send one event to every partition of the topic (after everything sent before it is
        acknowledged); returns how many partitions got it."""
        self.producer.flush()
        partitions = sorted(self.producer.partitions_for(self.topic))
        futures = [self.producer.send(self.topic, value=value, partition=p) for p in partitions]
        self._settle(futures)
        return len(partitions)

    def _settle(self, futures: list[Any]) -> None:
        self.producer.flush()
        for future in futures:
            future.get(timeout=60)  # raises the broker's error, if any
        futures.clear()

    def close(self) -> None:
        self.producer.close()

    def __enter__(self) -> KafkaPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KinesisPublisher:
    """The same for a Kinesis data stream: `PutRecords` keyed by entity (`kinesis.publish_kinesis`),
    and the ledger event to every open shard with an explicit hash key in the shard's range."""

    def __init__(self, stream: str, region: str, endpoint: str | None = None) -> None:
        from chronolake.streaming.kinesis import kinesis_client

        self.stream = stream
        self.endpoint = endpoint
        self.region = region
        self.client = kinesis_client(region, endpoint)

    def publish(self, events: Iterable[Event], on_event: Callable[[int], None] | None = None) -> int:
        from chronolake.streaming.kinesis import partition_key, publish_kinesis

        counted = [0]

        def records() -> Iterator[tuple[str, bytes]]:
            for key, value in events:
                counted[0] += 1
                if on_event is not None:
                    on_event(counted[0])
                yield partition_key(key.decode("utf-8")), value

        return publish_kinesis(self.endpoint, self.stream, records(), region=self.region, client=self.client)

    def broadcast(self, value: bytes) -> int:
        shards = []
        paginator = self.client.get_paginator("list_shards")
        for page in paginator.paginate(StreamName=self.stream):
            shards += [s for s in page["Shards"] if "EndingSequenceNumber" not in s.get("SequenceNumberRange", {})]
        for shard in shards:
            self.client.put_record(
                StreamName=self.stream, Data=value, PartitionKey="@ledger",
                ExplicitHashKey=shard["HashKeyRange"]["StartingHashKey"],
            )
        return len(shards)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> KinesisPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Publisher = KafkaPublisher | KinesisPublisher


def publish_files(
    spec: DatasetSpec,
    paths: Sequence[str | Path],
    publisher: Publisher,
    loaded: Callable[[list[str]], dict[str, int]],
    mapping: ColumnMapping | None = None,
    on_event: Callable[[int], None] | None = None,
) -> list[PublishedFile]:
    """Publish each file not yet in the ledger (`loaded` answers which hashes are), in order.

    Every file is opened, hashed and read in full before the first event is published, so an
    unreadable file fails the call with nothing published.
    """
    files = [FileEvents(spec, path, mapping) for path in paths]
    for file in files:
        file.check()
    done = loaded([f.sha256 for f in files])
    results = []
    published = 0
    seen: set[str] = set()
    for file in files:
        if file.sha256 in done or file.sha256 in seen:
            results.append(PublishedFile(file.source.path, file.sha256, 0, 0, "already loaded"))
            continue
        seen.add(file.sha256)
        base = published
        published += publisher.publish(file, None if on_event is None else lambda n, b=base: on_event(b + n))
        entries = publisher.broadcast(file.ledger_event())
        results.append(PublishedFile(file.source.path, file.sha256, file.rows, file.rejected, "published", entries))
    return results


def wait_for_ledger(dataset: Any, results: Sequence[PublishedFile], wait_s: float) -> dict[str, int]:
    """Wait until the job committed every ledger row of the published files (`feed.PublishedFile`)
    and the stable system time covers them; returns {sha256: system time the file is complete at}
    for those that are."""
    expected = {r.sha256: r.ledger_entries for r in results if r.status == "published"}
    complete: dict[str, int] = {}
    deadline = time.monotonic() + wait_s
    while set(expected) - set(complete) and time.monotonic() < deadline:
        time.sleep(0.5)
        dataset.table.refresh()
        if dataset.table.table.current_snapshot() is None:
            continue
        rows = zip(*python_columns(dataset.table.ledger(expected), ["sha256", "loaded_at", "entries"]))
        complete = {sha256: at for sha256, at, entries in rows if entries >= expected[sha256]}
    # Readable once the stable system time covers it (a query at that time is then allowed).
    while complete and time.monotonic() < deadline:
        stable = dataset.stable_system_time()
        if stable is not None and stable >= max(complete.values()):
            break
        time.sleep(0.5)
    return complete
