"""Kafka -> PyFlink (thread mode, RocksDB) -> Iceberg on the shared SQLite catalog, end to end.

The table is created by the Python tools (pyiceberg) and appended to by the Flink job, which is
the intended flow. Records are produced in two waves: the second only after the first checkpoint's
commit is visible to pyiceberg, so the test also shows that the sink commits per checkpoint and
that the tools can read the catalog while the job is writing it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pytest
from kafka import KafkaProducer
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.types import (
    IntegerType,
    LongType,
    NestedField,
    StringType,
    TimestamptzType,
)

from chronolake.streaming.broker import LOG_APPEND_TIME, LocalKafkaBroker
from chronolake.streaming.runtime import REPO_ROOT, JobRuntime

JOB_SCRIPT = REPO_ROOT / "streaming" / "plumbing_job.py"
PARTITIONS = 2
FIRST_WAVE = 200
SECOND_WAVE = 100
KEYS = 10
# Readiness waits only; nothing asserts on how long anything took.
JOB_TIMEOUT_S = 240.0
# The Iceberg committer's checkpoint id for the commit it makes when a bounded input ends.
END_OF_INPUT_CHECKPOINT_ID = 2**63 - 1

EVENTS_SCHEMA = Schema(
    NestedField(1, "entity_key", StringType(), required=True),
    NestedField(2, "event_seq", LongType(), required=True),
    NestedField(3, "payload", StringType(), required=False),
    NestedField(4, "kafka_partition", IntegerType(), required=False),
    NestedField(5, "kafka_offset", LongType(), required=False),
    NestedField(6, "log_time", TimestamptzType(), required=False),
    NestedField(7, "log_time_type", StringType(), required=False),
    NestedField(8, "system_from", TimestamptzType(), required=False),
    NestedField(9, "udf_parent_pid", IntegerType(), required=False),
)


def open_catalog(home: Path) -> SqlCatalog:
    """The embedded default catalog exactly as the Python tools open it."""
    return SqlCatalog(
        name="chronolake",
        uri=f"sqlite:///{home / 'catalog.db'}",
        warehouse=f"file://{home / 'warehouse'}",
    )


def produce(broker: LocalKafkaBroker, topic: str, seqs: range) -> None:
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
    try:
        for seq in seqs:
            key_index = seq % KEYS
            # Producers key by entity, so one key lives in one partition.
            producer.send(
                topic,
                key=f"entity-{key_index}".encode(),
                value=json.dumps({"key": f"entity-{key_index}", "seq": seq}).encode(),
                partition=key_index % PARTITIONS,
            )
        producer.flush()
    finally:
        producer.close()


def end_offsets(total: int) -> str:
    per_partition = Counter((seq % KEYS) % PARTITIONS for seq in range(total))
    return ",".join(f"{p}:{per_partition[p]}" for p in range(PARTITIONS))


def wait_for_rows(table: Table, at_least: int, job: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        table.refresh()
        if table.current_snapshot() is not None and len(table.scan().to_arrow()) >= at_least:
            return
        if job.poll() is not None:
            pytest.fail(f"job exited with {job.returncode} early:\n{log.read_text()[-4000:]}")
        time.sleep(1.0)
    pytest.fail(f"no commit with {at_least} rows within {JOB_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


@pytest.mark.integration
def test_kafka_to_iceberg_through_pyflink_thread_mode(
    kafka_broker: LocalKafkaBroker, job_runtime: JobRuntime, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    topic = "plumbing-events"
    kafka_broker.create_topic(topic, partitions=PARTITIONS)
    assert kafka_broker.topic_timestamp_type(topic) == LOG_APPEND_TIME

    catalog = open_catalog(home)
    catalog.create_namespace("plumbing")
    table = catalog.create_table("plumbing.events", schema=EVENTS_SCHEMA)
    assert table.format_version == 2

    total = FIRST_WAVE + SECOND_WAVE
    produce(kafka_broker, topic, range(FIRST_WAVE))
    log = tmp_path / "job.log"
    with log.open("wb") as out:
        job = subprocess.Popen(
            job_runtime.command(
                JOB_SCRIPT,
                "--bootstrap-servers", kafka_broker.bootstrap_servers,
                "--topic", topic,
                "--home", str(home),
                "--table", "plumbing.events",
                "--checkpoint-dir", str(tmp_path / "checkpoints"),
                "--checkpoint-interval-ms", "2000",
                "--stop-offsets", end_offsets(total),
            ),
            env=job_runtime.environment(log_dir=tmp_path / "flink-log"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_rows(table, FIRST_WAVE, job, log)
            produce(kafka_broker, topic, range(FIRST_WAVE, total))
            returncode = job.wait(timeout=JOB_TIMEOUT_S)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    assert returncode == 0, log.read_text()[-4000:]

    table = open_catalog(home).load_table("plumbing.events")
    rows = table.scan().to_arrow().sort_by([("kafka_partition", "ascending"), ("kafka_offset", "ascending")])
    assert sorted(rows["event_seq"].to_pylist()) == list(range(total)), "every record exactly once"
    assert set(rows["log_time_type"].to_pylist()) == {LOG_APPEND_TIME}
    assert rows.schema.field("system_from").type == pa.timestamp("us", tz="UTC")
    # Thread mode: the Python function ran inside the JVM that the job script started.
    assert set(rows["udf_parent_pid"].to_pylist()) == {job.pid}

    # System time only moves forward within a partition, in offset order, and never precedes
    # the broker's log time.
    by_partition: dict[int, list[datetime]] = {}
    for partition, log_time, system_from in zip(
        rows["kafka_partition"].to_pylist(),
        rows["log_time"].to_pylist(),
        rows["system_from"].to_pylist(),
    ):
        assert system_from >= log_time
        by_partition.setdefault(partition, []).append(system_from)
    assert sorted(by_partition) == list(range(PARTITIONS))
    for times in by_partition.values():
        assert all(a < b for a, b in zip(times, times[1:]))

    # One append per checkpoint with data: the first wave was committed by a real checkpoint
    # (the test waited for it), the rest at the latest by the commit at end of input.
    snapshots = table.snapshots()
    assert len(snapshots) >= 2
    summaries = [s.summary for s in snapshots]
    assert all(summary is not None and summary.operation.value == "append" for summary in summaries)
    checkpoint_ids = [
        int(summary.additional_properties["flink.max-committed-checkpoint-id"])
        for summary in summaries
        if summary is not None
    ]
    assert checkpoint_ids[0] < END_OF_INPUT_CHECKPOINT_ID
